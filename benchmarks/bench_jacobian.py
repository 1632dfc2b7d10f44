"""The exact 2003 x 2003 MoG game Jacobian: numgan.spectrum.jacobian (jacrev, chunk 128) vs the fused
Hessian-vector products of numgan.mog_fused and, on the CPU, the compiled ones of numgan.mog_native with one
thread and with torch's threads (issue 4, target 3).

    OMP_NUM_THREADS=1 python benchmarks/bench_jacobian.py
    OMP_NUM_THREADS=2 python benchmarks/bench_jacobian.py             # + the native rows on 2 threads
    python benchmarks/bench_jacobian.py --device cuda --chunks 256 512 2003
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_text, markdown_table, report, timeit  # noqa: E402
from numgan import mog, mog_fused, mog_native, spectrum  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--chunks", type=int, nargs="*", default=None,
                    help="fused chunk sizes (default: 128 and the library's default for the device: 128 rows "
                         "per pass on the CPU, plus 256; all 2003 on CUDA)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-jacrev", action="store_true")
    ap.add_argument("--record", "--out", dest="record", action="store_true",
                    help="append the table to benchmarks/results/bench_jacobian-<device>.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.chunks is None:
        args.chunks = [128, mog_fused.N_PARAMS] if device.type == "cuda" else [128, 256]
    rows = []
    G, D = mog.make_models(1, 0)
    g = torch.Generator().manual_seed(0)
    x_real = mog.sample_real(1, args.batch, generator=g)[0]
    z = torch.randn(args.batch, mog.Z_DIM, generator=g)
    for name in args.dtypes:
        dt = getattr(torch, name)
        Gd, Dd = G.to(dt), D.to(dt)
        x = mog_fused.pack(Gd, Dd)[0].to(device)
        xr, zz = x_real.to(device, dt), z.to(device, dt)
        ref = None
        if not args.skip_jacrev:
            field = mog.field_for_seed(Gd.to(device), Dd.to(device), 0, xr, zz)
            ref = spectrum.jacobian(field, x)
            t = timeit(lambda: spectrum.jacobian(field, x), warmup=1, repeat=args.repeat, device=device)
            rows.append(dict(method="spectrum.jacobian (jacrev, chunk 128)", dtype=name, seconds=t))
            print(rows[-1], flush=True)
        for c in args.chunks:
            J = mog_fused.jacobian(x, xr, zz, chunk_size=c)
            err = None if ref is None else float((J - ref).abs().max() / ref.abs().max())
            t = timeit(lambda: mog_fused.jacobian(x, xr, zz, chunk_size=c), warmup=1, repeat=args.repeat,
                       device=device)
            rows.append(dict(method=f"mog_fused.jacobian (chunk {c})", dtype=name, seconds=t, rel_err_vs_jacrev=err))
            print(rows[-1], flush=True)
        if device.type == "cpu" and mog_native.available(dt):
            for n in sorted({1, torch.get_num_threads()}):
                J = mog_native.jacobian(x, xr, zz, threads=n)
                err = None if ref is None else float((J - ref).abs().max() / ref.abs().max())
                t = timeit(lambda: mog_native.jacobian(x, xr, zz, threads=n), warmup=1, repeat=args.repeat,
                           device=device)
                rows.append(dict(method=f"mog_native.jacobian ({n} thread{'s' if n > 1 else ''})", dtype=name,
                                 seconds=t, rel_err_vs_jacrev=err))
                print(rows[-1], flush=True)
    text = f"## bench_jacobian ({device.type}, batch {args.batch})\n\n{header_text(device)}\n\n"
    text += markdown_table(rows, ["method", "dtype", "seconds", "rel_err_vs_jacrev"])
    report("bench_jacobian", device, text, args.record)


if __name__ == "__main__":
    main()
