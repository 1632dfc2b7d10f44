"""Every matrix product of one image-GAN iteration, timed alone, as recorded and in other operand forms.

Issue 4, target 1: after the kernel diet the fast ConOpt step of dcgan4_nobn spends ~1.9 ms of its ~3.3 ms GPU
time in ~97 matrix products running at ~90 TFLOP/s (TF32), far from the H100's peak. This script records each
product of one eager iteration of the fast path's convolutions (bench_step's "gemm" variant: the graph's
kernels, attributed to their operators), with the operands' shapes and strides, and times each distinct one
alone on the GPU:

* ``recorded``   the operands as the step passes them (strides included: transposed views, padded rows);
* ``contiguous`` both operands made contiguous first (is a transposed operand slower here?);
* ``aligned``    the inner and output sizes padded to multiples of 4 with zeros (16-byte rows, see
                 numgan.conv.ALIGN; only rows where something is misaligned).

The table lists per product: calls per iteration, microseconds per call in each form, TFLOP/s as recorded,
and the totals, so the next change to the GEMM side (layouts, padding, cuBLASLt, splitting) can be chosen by
its measured share. On the CPU it only lists the products (no timing).

    python benchmarks/bench_gemm.py --device cuda --method conopt --record
"""
import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from bench_step import build  # noqa: E402
from numgan.train import set_precision  # noqa: E402

GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


class Recorder(TorchDispatchMode):
    """Counts each matrix product by (operator, shapes, strides) of its two factors."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in GEMMS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            self.calls[(name, tuple(a.shape), tuple(a.stride()), tuple(b.shape), tuple(b.stride()))] += 1
        return func(*args, **(kwargs or {}))


def _operand(shape, stride, device, dtype=torch.float32):
    """A random tensor with the recorded shape and strides (in storage large enough for them)."""
    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.randn(span, device=device, dtype=dtype).as_strided(shape, stride)


def _aligned(a: torch.Tensor, b: torch.Tensor, mult: int = 4):
    """a [.., M, K] and b [.., K, N] with K and N zero-padded to multiples of ``mult`` (contiguous rows)."""
    k, n = a.shape[-1], b.shape[-1]
    kp, np_ = -(-k // mult) * mult, -(-n // mult) * mult
    a2 = torch.nn.functional.pad(a, (0, kp - k))
    b2 = torch.nn.functional.pad(b, (0, np_ - n, 0, kp - k))
    return a2, b2


def _time(fn, device, reps: int) -> float:
    """Median microseconds per call over 5 blocks of ``reps`` calls (CUDA events)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="dcgan4_nobn")
    ap.add_argument("--method", default="conopt")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50, help="calls per timed block")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/results/")
    args = ap.parse_args()
    device = torch.device(args.device)
    set_precision(device, True)
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    step, _, _ = build("gemm", args.method, args.arch, args.batch, images, device)
    step(), step()
    rec = Recorder()
    with rec:
        step()
    rows, totals = [], collections.Counter()
    for (op, sa, ta, sb, tb), n in sorted(rec.calls.items(), key=lambda kv: -kv[1]):
        a, b = _operand(sa, ta, device), _operand(sb, tb, device)
        flop = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        mat = torch.bmm if a.dim() == 3 else torch.mm
        row = {"op": op, "A": f"{list(sa)} s{list(ta)}", "B": f"{list(sb)} s{list(tb)}", "calls/iter": n}
        if device.type == "cuda":
            t_rec = _time(lambda: mat(a, b), device, args.reps)
            ac, bc = a.contiguous(), b.contiguous()
            t_con = _time(lambda: mat(ac, bc), device, args.reps)
            misaligned = any(s % 4 for s in (a.shape[-1], b.shape[-1])) or any(
                t[-2] % 4 for t in (ta, tb) if len(t) >= 2 and t[-1] == 1)
            t_al = None
            if misaligned:
                a2, b2 = _aligned(ac, bc)
                t_al = _time(lambda: mat(a2, b2), device, args.reps)
            row.update({"us recorded": f"{t_rec:.1f}", "us contiguous": f"{t_con:.1f}",
                        "us aligned": "" if t_al is None else f"{t_al:.1f}",
                        "TFLOP/s": f"{flop / t_rec / 1e6:.0f}"})
            totals["recorded"] += n * t_rec
            totals["best"] += n * min(t for t in (t_rec, t_con, t_al) if t is not None)
        totals["GFLOP"] += n * flop / 1e9
        rows.append(row)
    head = common.header(device)
    summary = (f"{sum(rec.calls.values())} products per iteration, {totals['GFLOP']:.0f} GFLOP"
               + (f"; alone: {totals['recorded']:.0f} us as recorded, {totals['best']:.0f} us taking each "
                  "product's fastest form" if device.type == "cuda" else " (CPU: shapes only, not timed)"))
    text = (f"## matrix products of one {args.method} iteration, {args.arch}, batch {args.batch}, TF32 on\n\n"
            f"{common.format_header(head)}\n\n{summary}\n\n" + common.markdown_table(rows) + "\n")
    common.report("gemm", device, text, args.record)


if __name__ == "__main__":
    main()
