"""Where the time of one training iteration goes: the top GPU kernels of a bench_step variant.

    python benchmarks/profile_step.py --device cuda --method conopt --variant gemm
    python benchmarks/profile_step.py --method conopt --variant fast --summary     # by kind of kernel
    python benchmarks/profile_step.py --method conopt --variant gemm --by-shape    # every matrix product

``--by-shape`` lists the GPU time of every matrix product with its operand shapes, and its TFLOP/s. A CUDA graph's kernels are not attributed to the operators that recorded them, so use it on an
eager variant ("gemm": the fast path's convolutions without the graph; its kernels are the graph's).
"""
import argparse
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import VARIANTS, build  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="dcgan4_nobn")
    ap.add_argument("--method", default="conopt")
    ap.add_argument("--variant", default="adjoint", choices=list(VARIANTS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--summary", action="store_true",
                    help="also print GPU time and kernel count per iteration by kind of kernel")
    ap.add_argument("--by-shape", action="store_true",
                    help="also list every matrix product by operand shapes (use an eager variant, e.g. gemm)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images = torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8)
    device = torch.device(args.device)
    step, _, _ = build(args.variant, args.method, args.arch, 64, images, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)   # the CPU: to try the script
    for _ in range(5):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.by_shape) as prof:
        for _ in range(args.iters):
            step()
        sync()
    print(f"# {args.arch} {args.method} {args.variant}: {args.iters} iterations")
    print(prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                    row_limit=args.rows, max_name_column_width=60))
    if args.summary:
        print(summary(prof, args.iters))
    if args.by_shape:
        print(gemms_by_shape(prof, args.iters, device.type == "cuda"))


KINDS = [  # (kind, pattern on the kernel name); the first match wins
    ("GEMM (cuBLAS/CUTLASS)", r"gemm|sm90_|sm80_|cutlass|xmma|cublas"),
    ("convolution (cuDNN)", r"conv|cudnn|implicit|wgrad|dgrad"),
    ("im2col/col2im (Triton)", r"im2col|col2im"),
    ("multi-tensor (foreach)", r"multi_tensor|foreach"),
    ("reduction", r"reduce|sum|norm"),
    ("copy/fill", r"copy|fill|cat"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton"),
]


def summary(prof, iters: int) -> str:
    """GPU kernels grouped by kind: count and microseconds per iteration."""
    from torch.autograd import DeviceType
    rows = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        kind = next((k for k, pat in KINDS if re.search(pat, e.name, re.I)), "other")
        n, t = rows.get(kind, (0, 0.0))
        rows[kind] = (n + 1, t + e.time_range.elapsed_us())
    total_n = sum(n for n, _ in rows.values())
    total_t = sum(t for _, t in rows.values())
    lines = ["| kind of kernel | kernels/iter | us/iter | share |", "|---|---|---|---|"]
    for kind, (n, t) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {kind} | {n / iters:.0f} | {t / iters:.0f} | {100 * t / max(total_t, 1e-9):.0f}% |")
    lines.append(f"| total | {total_n / iters:.0f} | {total_t / iters:.0f} | 100% |")
    return "\n".join(lines)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemms_by_shape(prof, iters: int, cuda: bool = True) -> str:
    """Matrix products grouped by (operator, operand shapes): calls and GPU time per iteration, TFLOP/s."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in GEMM_OPS:
            continue
        shapes = [tuple(s) for s in e.input_shapes if s]
        a, b = shapes[-2], shapes[-1]         # addmm / baddbmm: (bias, a, b)
        flop = 2 * a[-2] * a[-1] * b[-1] * (a[0] if len(a) == 3 else 1)
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0) if cuda else e.cpu_time_total
        rows.append((us / iters, e.key.split("::")[1], a, b, e.count / iters, flop))
    rows.sort(key=lambda r: -r[0])
    total = sum(r[0] for r in rows)
    lines = [f"GEMMs: {total:.0f} us per iteration", "",
             "| op | A | B | calls/iter | us/iter | us/call | TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for us, op, a, b, calls, flop in rows:
        per_call = us / max(calls, 1e-9)
        lines.append(f"| {op} | {list(a)} | {list(b)} | {calls:.0f} | {us:.0f} | {per_call:.1f} | "
                     f"{flop / max(per_call, 1e-9) / 1e6:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
