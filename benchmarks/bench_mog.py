"""MoG game step throughput: autograd vs the fused engine's backends (issue 4, target 2).

    OMP_NUM_THREADS=1 python benchmarks/bench_mog.py                 # CPU: S in {1, 8}
    OMP_NUM_THREADS=1 python benchmarks/bench_mog.py --full-run      # + 20k-step ConOpt runs via mog.train
    python benchmarks/bench_mog.py --device cuda                     # + CUDA-graph variants (k steps/graph)
    python benchmarks/bench_mog.py --device cuda --train-check 64    # + fused vs triton-tf32 mog.train, 64 seeds

Prints seed-steps/s (S seeds x steps per second) of one optimiser step including the minibatch draw.
On the CPU the engines are "autograd" (numgan.optim), "fused" (numgan.mog_fused's batched products) and
"native" (numgan.mog_native, compiled C); with OMP_NUM_THREADS=1 all of them use one core.
On CUDA the graph rows cover backend "torch" (numgan.mog_fused's batched products, float32) and
"triton" (numgan.mog_triton, one row per --triton-precisions entry, "precision[:tile[:warps[:split]]]");
the "rel. error" column is the
ConOpt direction's ||d - d64|| / ||d64|| on one minibatch against the float64 torch backend.
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
    eng = mog_fused.FusedMoG(mog_fused.pack(G, D), method, backend="native" if engine == "native" else "torch")

    def step():
        x_real = mog.sample_real(S, B, generator=gen, device=device)
        z = torch.randn(S, B, mog.Z_DIM, generator=gen, device=device)
        eng.step(x_real, z, losses=False)

    return step


def triton_options(spec):
    """"precision[:tile[:num_warps[:split]]]" -> numgan.mog_triton.direction options (omitted: its defaults)."""
    parts = spec.split(":")
    opts = dict(precision=parts[0])
    for key, val in zip(("tile", "num_warps", "split"), parts[1:]):
        opts[key] = int(val)
    return opts


def direction_error(S, device, backend, opts):
    """||d - d64|| / ||d64|| of the ConOpt direction on one minibatch (d64: float64 torch backend)."""
    G, D = mog.make_models(S, 0, device)
    x = mog_fused.pack(G, D)
    gen = torch.Generator(device=device).manual_seed(0)
    xr = mog.sample_real(S, B, generator=gen, device=device)
    z = torch.randn(S, B, mog.Z_DIM, generator=gen, device=device)
    ref = mog_fused.conopt_direction(x.double(), xr.double(), z.double(), 10.0)
    d, _ = mog_fused.FusedMoG(x, "conopt", backend=backend, triton_options=opts).direction(xr, z)
    return float((d.double() - ref).norm() / ref.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="*", help="S values (default: 1 8 on cpu, 1 64 256 1024 on cuda)")
    ap.add_argument("--steps", type=int, default=50, help="steps per timed repeat (eager)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=["conopt", "simga"])
    ap.add_argument("--engines", nargs="*", help="default: autograd fused native on cpu, autograd fused on cuda")
    ap.add_argument("--graph-k", type=int, nargs="*", default=[1, 10, 50], help="steps per CUDA graph")
    ap.add_argument("--triton-precisions", nargs="*", default=["ieee", "tf32:32:4:16"],
                    help="numgan.mog_triton configurations to time on CUDA: precision[:tile[:warps[:split]]], "
                         "precision one of tf32, ieee, tf32x3")
    ap.add_argument("--train-check", type=int, default=0, metavar="S",
                    help="CUDA: train S seeds 20k ConOpt steps with engines fused and triton-tf32, compare modes")
    ap.add_argument("--full-run", action="store_true",
                    help="time single-seed 20k-step ConOpt mog.train runs (engines native and fused on the CPU)")
    ap.add_argument("--include-eager-full", action="store_true", help="also the autograd full run (~3 min)")
    ap.add_argument("--record", "--out", dest="record", action="store_true",
                    help="append the table to benchmarks/results/bench_mog-<device>.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    seeds = args.seeds or ([1, 8] if device.type == "cpu" else [1, 64, 256, 1024])
    engines = args.engines or (["autograd", "fused", "native"] if device.type == "cpu" else ["autograd", "fused"])
    rows = []
    for method in args.methods:
        for S in seeds:
            for engine in engines:
                fn = eager_step_fn(engine, method, S, device)
                n = args.steps if engine != "autograd" or S <= 8 else max(5, args.steps // 5)
                t = timeit(lambda: [fn() for _ in range(n)], warmup=1, repeat=args.repeat, device=device) / n
                err = None
                if engine != "autograd" and method == "conopt":
                    err = direction_error(S, device, "native" if engine == "native" else "torch", None)
                rows.append(dict(method=method, engine=engine, variant="eager", S=S, ms_per_step=t * 1e3,
                                 seed_steps_per_s=S / t, rel_error=err))
                print(rows[-1], flush=True)
            if device.type == "cuda":
                backends = [("torch", None)] + [("triton", p) for p in args.triton_precisions]
                for backend, prec in backends:
                    opts = None if prec is None else triton_options(prec)
                    err = direction_error(S, device, backend, opts) if method == "conopt" else float("nan")
                    for k in args.graph_k:
                        G, D = mog.make_models(S, 0, device)
                        eng = mog_fused.FusedMoG(mog_fused.pack(G, D), method, backend=backend, triton_options=opts)
                        gs = eng.make_graphed_steps(k, batch_size=B, sample=True)
                        reps = max(1, 200 // k)
                        t = timeit(lambda: [gs.replay() for _ in range(reps)], warmup=1, repeat=args.repeat,
                                   device=device) / (reps * k)
                        name = "fused" if prec is None else f"fused/triton {prec}"
                        rows.append(dict(method=method, engine=name, variant=f"cuda graph k={k}", S=S,
                                         ms_per_step=t * 1e3, seed_steps_per_s=S / t, rel_error=err))
                        print(rows[-1], flush=True)
    text = f"## bench_mog ({device.type})\n\n{header_text(device)}\n\n"
    text += markdown_table(rows, ["method", "engine", "variant", "S", "ms_per_step", "seed_steps_per_s", "rel_error"])
    if args.train_check:
        chk = []
        for engine in ("fused", "triton-tf32"):
            t0 = time.perf_counter()
            r = mog.train("conopt", n_seeds=args.train_check, n_iters=20_000, engine=engine, device=device)
            sync(device)
            chk.append(dict(engine=engine, seeds=args.train_check, wall_s=time.perf_counter() - t0,
                            modes_mean=float(r["modes"][-1].mean()), modes_min=int(r["modes"][-1].min()),
                            hq_mean=float(r["hq"][-1].mean()), loss_d=float(r["loss_d"][-1].mean()),
                            diverged=int((r["diverged_at"] >= 0).sum())))
            print(chk[-1], flush=True)
        text += (f"\n\nmog.train ConOpt, {args.train_check} seeds x 20,000 steps, float32 fused vs TF32 triton "
                 "(same draws, final snapshot):\n\n")
        text += markdown_table(chk, list(chk[0]))
    if args.full_run:
        full = []
        full_engines = ["native", "fused"] if device.type == "cpu" else ["fused"]
        for engine in full_engines + (["autograd"] if args.include_eager_full else []):
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
