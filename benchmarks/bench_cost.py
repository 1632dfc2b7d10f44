"""The cost of a full reproduction on one GPU, per figure, before and after the fast path (issue 4).

For every distinct training configuration of the 50 image runs (numgan.experiments.RUNS, full scale)
this times one iteration of the plain eager step (``train(..., fast=False)``: the reference) and of the
fast step of numgan.train (CUDA graph; im2col/GEMM convolutions for ConOpt and smoothing), each as the median of --repeat blocks of --iters iterations
after a warm-up, and one evaluation (6,400 samples: IS, plus FID where the run computes it; CelebA runs
draw only the sample grid). A run costs n_iters x (seconds per iteration) + n_evals x (seconds per
evaluation). A figure's cost is the sum over the runs it needs (numgan.experiments.FIGURE_RUNS);
runs shared between figures are counted once in the total, in figure order. The last column divides
the fast training time by the measured throughput gain of concurrent runs (--concurrency-gain, from
benchmarks/bench_sweep.py) for the runs that experiments.run_many trains concurrently (the CIFAR-10 runs).

No Inception weights exist offline, so evaluations are timed with a randomly initialised network of
the same shape (the time does not depend on the weights).

    python benchmarks/bench_cost.py --device cuda --concurrency-gain 1.28 --record
    python benchmarks/bench_cost.py --from-results benchmarks/results/cost-cuda.md --concurrency-gain 1.28
                                         # recompute the tables from recorded timings (no device needed)
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from numgan import experiments, metrics  # noqa: E402
from numgan.models import build_models  # noqa: E402
from numgan.train import build_training, set_precision  # noqa: E402


def step_seconds(cfg, fast, device, iters, repeat, warmup):
    images = torch.randint(0, 256, (1024, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    step = build_training(cfg, images, device, fast).step
    for _ in range(warmup):
        step()

    def block():
        for _ in range(iters):
            step()

    return common.timeit(block, warmup=0, repeat=repeat, device=device) / iters


def eval_seconds(device, fid, model, n_samples=6400, repeat=2):
    G, _ = build_models("dcgan4_nobn", 32)
    G = G.to(device).eval()
    ref = (np.zeros(2048), np.eye(2048)) if fid else None
    ev = metrics.Evaluator(ref, inception=True, fid=fid, device=device, model=model, n_samples=n_samples)
    gen = torch.Generator(device=device).manual_seed(0)

    def run():
        with torch.no_grad():
            ev.evaluate(lambda n: G(torch.randn(n, 256, generator=gen, device=device)))

    return common.timeit(run, warmup=1, repeat=repeat, device=device)


def config_key(cfg) -> tuple:
    return (cfg.arch, cfg.method, cfg.objective, cfg.batch_size, cfg.image_size, cfg.f_dim)


def cost_tables(cfgs: dict, timing: dict, ev_s: dict, gain: float, head: str) -> str:
    """The per-figure and per-configuration tables from step times ``timing[key] = {False: eager s, True:
    fast s}`` and evaluation times ``ev_s = {False: IS s, True: IS + FID s}``. ``gain`` divides the fast
    training time of the runs that experiments.run_many trains concurrently (not the CelebA runs)."""
    from numgan.experiments import concurrency_for

    def run_cost(rid):
        cfg = cfgs[rid]
        key = config_key(cfg)
        n_evals = cfg.n_iters // cfg.eval_every + 1
        ev = ev_s[cfg.fid] if (cfg.inception or cfg.fid) else 0.0
        g = gain if concurrency_for(rid, "cuda") > 1 else 1.0
        return (cfg.n_iters * timing[key][False] + n_evals * ev, cfg.n_iters * timing[key][True] + n_evals * ev,
                cfg.n_iters * timing[key][True] / g + n_evals * ev)

    rows, seen, totals = [], set(), np.zeros(3)
    col = f"after, {gain:.2f}x concurrent"
    for fig, ids in experiments.FIGURE_RUNS.items():
        ids = [experiments.resolve(r) for r in ids if experiments.resolve(r) in cfgs]
        if not ids:
            continue
        cost = np.sum([run_cost(r) for r in ids], axis=0) / 3600
        new = [r for r in dict.fromkeys(ids) if r not in seen]
        seen |= set(new)
        add = np.sum([run_cost(r) for r in new], axis=0) / 3600 if new else np.zeros(3)
        totals += add
        rows.append({"figure": fig, "runs": len(set(ids)), "new runs": len(new),
                     "GPU-h before (plain eager)": f"{cost[0]:.1f}", "GPU-h after (fast)": f"{cost[1]:.1f}",
                     col: f"{cost[2]:.1f}", "new-run GPU-h before / after": f"{add[0]:.1f} / {add[2]:.1f}"})
    rows.append({"figure": "all (each run once)", "runs": len(seen), "new runs": len(seen),
                 "GPU-h before (plain eager)": f"{totals[0]:.1f}", "GPU-h after (fast)": f"{totals[1]:.1f}",
                 col: f"{totals[2]:.1f}", "new-run GPU-h before / after": f"{totals[0]:.1f} / {totals[2]:.1f}"})
    steps = [{"arch": k[0], "method": k[1], "objective": k[2], "batch": k[3], "image": k[4], "f": k[5],
              "eager ms/iter": f"{v[False] * 1e3:.2f}", "fast ms/iter": f"{v[True] * 1e3:.2f}",
              "speed-up": f"{v[False] / v[True]:.1f}x"} for k, v in timing.items()]
    return (f"## Cost of a full reproduction (Figs. 4-14; Figs. 1-3 run on a CPU)\n\n{head}\n\n"
            f"Evaluation (6,400 samples): IS {ev_s[False]:.2f} s, IS + FID {ev_s[True]:.2f} s.\n\n"
            f"{common.markdown_table(rows)}\n\nPer configuration:\n\n{common.markdown_table(steps)}\n")


def parse_results(path) -> tuple[dict, dict, str]:
    """(timing, ev_s, header line) from the first table set of a recorded cost-*.md file."""
    import re

    text = Path(path).read_text()
    head = next(line for line in text.splitlines() if line.startswith("device:"))
    m = re.search(r"IS ([0-9.]+) s, IS \+ FID ([0-9.]+) s", text)
    ev_s = {False: float(m.group(1)), True: float(m.group(2))}
    timing = {}
    for line in text.split("Per configuration:", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[3].isdigit():
            key = (cells[0], cells[1], cells[2], int(cells[3]), int(cells[4]), int(cells[5]))
            timing.setdefault(key, {False: float(cells[6]) / 1e3, True: float(cells[7]) / 1e3})
        elif timing and not line.startswith("|"):
            break
    return timing, ev_s, head


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--concurrency-gain", type=float, default=1.0,
                    help="total-throughput gain of concurrent runs (bench_sweep.py); 1 = none")
    ap.add_argument("--runs", default="", help="comma-separated run ids (default: all 50)")
    ap.add_argument("--n-eval", type=int, default=6400, help="samples per evaluation (paper: 6400)")
    ap.add_argument("--from-results", default=None,
                    help="recompute the tables from a recorded results file instead of timing anything")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    run_ids = args.runs.split(",") if args.runs else list(experiments.RUNS)
    cfgs = {rid: experiments.config(rid, "full") for rid in run_ids}
    if args.from_results:
        timing, ev_s, head = parse_results(args.from_results)
        head += f" | recomputed from {Path(args.from_results).name}"
        print(cost_tables(cfgs, timing, ev_s, args.concurrency_gain, head))
        return
    set_precision(device, True)
    timing = {}
    for rid, cfg in cfgs.items():
        key = config_key(cfg)
        if key not in timing:
            timing[key] = {f: step_seconds(cfg, f, device, args.iters, args.repeat, args.warmup) for f in (False, True)}
            print(key, {k: f"{v * 1e3:.2f} ms" for k, v in timing[key].items()}, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    model = metrics.make_inception(device, random_init=True)
    ev_s = {fid: eval_seconds(device, fid, model, args.n_eval) * 6400 / args.n_eval for fid in (False, True)}
    print("evaluation seconds (IS, IS+FID):", ev_s[False], ev_s[True], flush=True)
    text = cost_tables(cfgs, timing, ev_s, args.concurrency_gain, common.format_header(common.header(device)))
    common.report("cost", device, text, args.record)


if __name__ == "__main__":
    main()
