"""Several image-GAN runs trained at once on one GPU, against one run at a time.

Issue 4, target 5: the sweeps (Figures 12-14) and the 4x4 comparisons (Figures 6-7) are many runs of
the same small models. numgan.experiments.run_many trains them ``concurrent`` at a time, each in its
own thread and CUDA stream with its step replayed from a CUDA graph (numgan.step.run_concurrently).
This benchmark trains K copies of one configuration (different seeds) through numgan.train.train,
exactly as run_many does, and reports the total throughput (iterations per second over all runs)
against training the same K runs one after another.

    python benchmarks/bench_sweep.py --device cuda --record
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from numgan.step import run_concurrently  # noqa: E402
from numgan.train import TrainConfig, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="dcgan4_nobn")
    ap.add_argument("--methods", default="conopt,altga")
    ap.add_argument("--iters", type=int, default=400, help="iterations per run")
    ap.add_argument("--ks", default="1,2,4,8", help="numbers of concurrent runs")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    rows, best = [], 1.0
    for method in args.methods.split(","):
        single = None
        for k in map(int, args.ks.split(",")):
            cfgs = [TrainConfig(dataset="synthetic", arch=args.arch, method=method, n_iters=args.iters,
                                eval_every=10 ** 9, inception=False, seed=s) for s in range(k)]
            jobs = [lambda mode, c=c: train(c, None, device, images=images, capture_error_mode=mode) for c in cfgs]
            run_concurrently(jobs[:1], device, 1)      # warm-up (cuDNN/cuBLAS handles, allocator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            results = run_concurrently(jobs, device, k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            assert all(r["status"] == "ok" and r["iters_done"] == args.iters for r in results)
            thr = k * args.iters / wall
            single = thr if k == 1 else single
            best = max(best, thr / single)
            rows.append({"method": method, "concurrent runs": k, "iterations each": args.iters,
                         "wall s": f"{wall:.1f}", "total it/s": f"{thr:.0f}",
                         "vs one at a time": f"{thr / single:.2f}x" if single else ""})
            print(rows[-1], flush=True)
    text = (f"## Concurrent runs of {args.arch} (batch 64, synthetic data, no evaluation)\n\n"
            f"{common.format_header(common.header(device))}\n\n{common.markdown_table(rows)}\n")
    common.report("sweep", device, text, args.record)
    print(f"BEST_GAIN={best:.2f}")


if __name__ == "__main__":
    main()
