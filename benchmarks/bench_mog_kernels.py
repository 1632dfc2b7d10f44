"""The MoG ConOpt step's Triton kernels alone, this tree against a git revision, on CUDA (issue 4, target 2).

Times ``numgan.mog_triton.conopt_step`` (the four kernels, RMSProp applied in place) captured k times in one
CUDA graph at S seeds and batch 512, for the working tree's kernels and, with ``--against REV``, for
numgan/mog_triton.py as committed at REV, in alternating rounds on the same machine (machines differ by a
few percent). Also prints each version's ConOpt direction error against the float64 torch engine.
bench_mog.py times the whole engine step (minibatch draws included), which is what the issue's target counts.
``conopt_step`` runs one program per seed, so a TF32 row here is not the engine's TF32 setting (16 programs
per seed through ``direction``, ``mog_triton.TF32_OPTIONS``; bench_mog.py times that).

    python benchmarks/bench_mog_kernels.py --against dda02e1 --configs ieee:16:4 ieee:16:8 tf32:32:4 --record
    git show dda02e1:numgan/mog_triton.py > old.py      # where the copy has no git history (a GPU machine):
    python benchmarks/bench_mog_kernels.py --against-file old.py
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from numgan import mog, mog_fused  # noqa: E402

B = 512


def graphed_steps(mod, x0, xr, z, k, precision, tile, warps):
    """A CUDA graph of k conopt_step calls of module ``mod`` on copies of x0 (warmed up on a side stream)."""
    p, ms = x0.clone(), torch.ones_like(x0)
    kw = dict(precision=precision, tile=tile, num_warps=warps, workspace=mod.Workspace(p))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            mod.conopt_step(p, ms, xr, z, 10.0, 1e-4, 0.9, 1e-10, **kw)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        for _ in range(k):
            mod.conopt_step(p, ms, xr, z, 10.0, 1e-4, 0.9, 1e-10, **kw)
    return g


def ms_per_step(g, k, reps):
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / (reps * k)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="also time numgan/mog_triton.py as committed at this git revision")
    ap.add_argument("--against-file", help="also time this copy of an earlier numgan/mog_triton.py")
    ap.add_argument("--configs", nargs="*", default=["ieee:16:4"], help="precision:tile:num_warps")
    ap.add_argument("--seeds", type=int, default=256)
    ap.add_argument("--steps-per-graph", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds; min and median are reported")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/results/mog_kernels-cuda.md")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mog_kernels.py times CUDA kernels: no CUDA device here "
                         "(benchmarks/sass_mog_triton.py inspects them without one)")
    from numgan import mog_triton
    if not mog_triton.available():
        raise SystemExit("needs Triton (it ships with the Linux CUDA wheels of torch)")
    versions = [("working tree" if common.git_commit().endswith("dirty") else common.git_commit(), mog_triton)]
    if a.against:
        versions.append((a.against, common.module_at(a.against)))
    if a.against_file:
        path = Path(a.against_file)
        if not path.is_file():
            raise SystemExit(f"--against-file {path}: no such file")
        versions.append((path.name, common.module_from_source(path.read_text(), f"mog_triton_{path.stem}")))
    S, k = a.seeds, a.steps_per_graph
    G, D = mog.make_models(S, 0, "cuda")
    x0 = mog_fused.pack(G, D)
    gen = torch.Generator(device="cuda").manual_seed(0)
    xr = mog.sample_real(S, B, generator=gen, device="cuda")
    z = torch.randn(S, B, mog.Z_DIM, generator=gen, device="cuda")
    ref = mog_fused.conopt_direction(x0.double(), xr.double(), z.double(), 10.0)
    rows = []
    for cfg in a.configs:
        precision, tile, warps = cfg.split(":")
        tile, warps = int(tile), int(warps)
        graphs = [graphed_steps(mod, x0, xr, z, k, precision, tile, warps) for _, mod in versions]
        times = [[] for _ in graphs]
        for _ in range(a.rounds):
            for i, g in enumerate(graphs):
                times[i].append(ms_per_step(g, k, reps=10))
        for i, (label, mod) in enumerate(versions):
            d, _ = mod.direction(x0, xr, z, 10.0, precision=precision, tile=tile, num_warps=warps)
            t = sorted(times[i])
            rows.append({"kernels": label, "precision:tile:warps": cfg, "ms/step (min)": t[0],
                         "ms/step (median)": t[len(t) // 2], "seed-steps/s": f"{S / t[0] * 1e3:,.0f}",
                         "rel. error vs float64": f"{float((d.double() - ref).norm() / ref.norm()):.2e}"})
    text = (f"## MoG ConOpt step kernels (mog_triton.conopt_step), S={S}, B={B}, {k} steps per CUDA graph\n\n"
            f"{common.header_text('cuda')}\n\n{common.markdown_table(rows)}\n")
    common.report("mog_kernels", "cuda", text, a.record)


if __name__ == "__main__":
    main()
