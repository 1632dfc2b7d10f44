"""Where the time of one training iteration goes: the top GPU kernels of a bench_step variant.

    python benchmarks/profile_step.py --device cuda --method conopt --variant gemm
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
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images = torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8)
    step, _, _ = build(args.variant, args.method, args.arch, 64, images, torch.device(args.device))
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
    print(f"# {args.arch} {args.method} {args.variant}: {args.iters} iterations")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.summary:
        print(summary(prof, args.iters))


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


if __name__ == "__main__":
    main()
