"""MoG game step throughput, autograd vs fused engine (issue 4, target 2).

    OMP_NUM_THREADS=1 python benchmarks/bench_mog.py                 # CPU: S in {1, 8}
    OMP_NUM_THREADS=1 python benchmarks/bench_mog.py --full-run      # + one 20k-step ConOpt run via mog.train
    python benchmarks/bench_mog.py --device cuda                     # + CUDA-graph variants (k steps/graph)

Prints seed-steps/s (S seeds x steps per second) of one optimiser step including the minibatch draw.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_text, markdown_table, report, sync, timeit  # noqa: E402
from numgan import mog, mog_fused  # noqa: E402
from numgan.optim import make_game_optimizer  # noqa: E402

B = 512


def eager_step_fn(engine, method, S, device):
    G, D = mog.make_models(S, 0, device)
    gen = torch.Generator(device=device).manual_seed(0)
    if engine == "autograd":
        opt = make_game_optimizer(method, G.parameters(), D.parameters())

        def closure(need_d=True, need_g=True):
            x_real = mog.sample_real(S, B, generator=gen, device=device)
            z = torch.randn(S, B, mog.Z_DIM, generator=gen, device=device)
            return mog.game_losses(G, D, x_real, z, need_d=need_d, need_g=need_g)

        return lambda: opt.step(closure)
    eng = mog_fused.FusedMoG(mog_fused.pack(G, D), method)

    def step():
        x_real = mog.sample_real(S, B, generator=gen, device=device)
        z = torch.randn(S, B, mog.Z_DIM, generator=gen, device=device)
        eng.step(x_real, z, losses=False)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="*", help="S values (default: 1 8 on cpu, 1 64 256 1024 on cuda)")
    ap.add_argument("--steps", type=int, default=50, help="steps per timed repeat (eager)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=["conopt", "simga"])
    ap.add_argument("--engines", nargs="*", default=["autograd", "fused"])
    ap.add_argument("--graph-k", type=int, nargs="*", default=[1, 10, 50], help="steps per CUDA graph")
    ap.add_argument("--full-run", action="store_true", help="time one single-seed 20k-step ConOpt mog.train run")
    ap.add_argument("--include-eager-full", action="store_true", help="also the autograd full run (~3 min)")
    ap.add_argument("--record", "--out", dest="record", action="store_true",
                    help="append the table to benchmarks/results/bench_mog-<device>.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    seeds = args.seeds or ([1, 8] if device.type == "cpu" else [1, 64, 256, 1024])
    rows = []
    for method in args.methods:
        for S in seeds:
            for engine in args.engines:
                fn = eager_step_fn(engine, method, S, device)
                n = args.steps if engine == "fused" or S <= 8 else max(5, args.steps // 5)
                t = timeit(lambda: [fn() for _ in range(n)], warmup=1, repeat=args.repeat, device=device) / n
                rows.append(dict(method=method, engine=engine, variant="eager", S=S, ms_per_step=t * 1e3,
                                 seed_steps_per_s=S / t))
                print(rows[-1], flush=True)
            if device.type == "cuda":
                for k in args.graph_k:
                    G, D = mog.make_models(S, 0, device)
                    eng = mog_fused.FusedMoG(mog_fused.pack(G, D), method)
                    gs = eng.make_graphed_steps(k, batch_size=B, sample=True)
                    reps = max(1, 200 // k)
                    t = timeit(lambda: [gs.replay() for _ in range(reps)], warmup=1, repeat=args.repeat,
                               device=device) / (reps * k)
                    rows.append(dict(method=method, engine="fused", variant=f"cuda graph k={k}", S=S,
                                     ms_per_step=t * 1e3, seed_steps_per_s=S / t))
                    print(rows[-1], flush=True)
    text = f"## bench_mog ({device.type})\n\n{header_text(device)}\n\n"
    text += markdown_table(rows, ["method", "engine", "variant", "S", "ms_per_step", "seed_steps_per_s"])
    if args.full_run:
        full = []
        for engine in (["fused", "autograd"] if args.include_eager_full else ["fused"]):
            t0 = time.perf_counter()
            r = mog.train("conopt", n_seeds=1, n_iters=20_000, engine=engine, device=device)
            sync(device)
            full.append(dict(engine=engine, wall_s=time.perf_counter() - t0, step_s=float(r["seconds"]),
                             final_modes=int(r["modes"][-1, 0])))
            print(full[-1], flush=True)
        text += "\n\nFull single-seed 20,000-step ConOpt run, mog.train(engine=...):\n\n"
        text += markdown_table(full, ["engine", "wall_s", "step_s", "final_modes"])
    report("bench_mog", device, text, args.record)


if __name__ == "__main__":
    main()
