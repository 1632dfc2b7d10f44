"""Where the time of one training iteration goes: the top GPU kernels of a bench_step variant.

    python benchmarks/profile_step.py --device cuda --method conopt --variant gemm
"""
import argparse
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


if __name__ == "__main__":
    main()
