"""How many GPU kernels one training iteration launches, counted on the CPU (issue 4, target 1).

Replayed from a CUDA graph, the fast step's cost on an H100 is its GEMMs plus a few microseconds for
every other kernel, however small. This script counts, without a GPU, the kernels each variant of
bench_step.py would launch: every aten operator that computes something (views, metadata and
allocations excluded), caught with a TorchDispatchMode during one eager iteration on the CPU, with
three CUDA-path substitutions:

* an im2col or col2im of numgan.conv counts as the one Triton kernel it is on CUDA (the CPU runs a
  torch fallback of several operators instead);
* a ``_foreach_*`` operator counts as one kernel (on CUDA it is one multi-tensor launch per ~100
  tensors);
* torch.optim's RMSprop (the plain port's) is built with foreach=True, its default on CUDA;
* numgan's TF1RMSprop counts as the Triton kernels it launches on CUDA (``fused``: one per eight parameter
  tensors; the CPU runs torch's multi-tensor kernels), plus the copies of gradients laid out otherwise than
  their parameters;
* RNG and host-to-device copies of the minibatch are counted like any other operator.

The counts are a property of the code, not of the machine, so they are recorded for the CPU; the
timings that belong with them are bench_step.py's on the GPU.

``--bytes`` (use ``--batch 64``, the paper's) also adds up what each kernel reads and writes: every tensor
argument and result once (an in-place operator's tensor twice), an im2col / col2im as its input, mask and
output, TF1RMSprop's update as p, ms (each read and written), the gradient and the consensus term. Divided by
3 TB/s (an H100's memory bandwidth) this is a floor for the time of the kernels that are not matrix products,
most of which are bound by memory traffic; it says which of them are worth removing before a GPU times them.

    python benchmarks/count_kernels.py --record        # writes benchmarks/results/kernels-cpu.md
    python benchmarks/count_kernels.py --methods conopt --variants fast --batch 64 --bytes --top 12
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
from bench_step import build, settings  # noqa: E402
from numgan import conv, rmsprop  # noqa: E402

# operators that launch no kernel besides views (``func.is_view``): allocation and metadata
NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "resolve_conj",
    "resolve_neg", "lift_fresh", "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride",
    "sym_numel", "_record_function_enter_new", "_record_function_exit", "_unsafe_view",
}
KINDS = [  # (kind, operator names); the first match wins, the rest is "elementwise"
    ("GEMM", {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "convolution", "_convolution", "cudnn_convolution",
              "cudnn_convolution_transpose", "convolution_backward", "convolution_overrideable"}),
    ("im2col/col2im", {"im2col", "col2im"}),
    ("reduction", {"sum", "mean", "norm", "linalg_vector_norm", "dot", "vdot", "max", "min", "amax"}),
    ("copy/fill", {"copy_", "clone", "contiguous", "_to_copy", "fill_", "zero_", "zeros", "zeros_like",
                   "ones_like", "full", "full_like", "cat", "stack", "constant_pad_nd"}),
    ("foreach/optimizer", None),   # torch's multi-tensor kernels and TF1RMSprop's fused update
]


def kind_of(name: str) -> str:
    if name.startswith("_foreach_") or name == "tf1_rmsprop":
        return "foreach/optimizer"
    for kind, names in KINDS:
        if names is not None and name in names:
            return kind
    return "elementwise"


def tensor_bytes(*objs) -> int:
    """Bytes of every tensor in ``objs`` (nested lists and tuples included), each counted once per mention."""
    total = 0
    for o in objs:
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, (list, tuple)):
            total += tensor_bytes(*o)
    return total


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching aten operators and the bytes they move (see the module docstring);
    ``suppress`` > 0 pauses counting (inside a fallback)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.bytes = collections.Counter()
        self.suppress = 0

    def add(self, name: str, nbytes: int = 0) -> None:
        if not self.suppress:
            self.counts[name] += 1
            self.bytes[name] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        out = func(*args, **(kwargs or {}))
        if not func.is_view and name not in NO_KERNEL:
            self.add(name, tensor_bytes(args, list((kwargs or {}).values()), out))
        return out


def _as_one_kernel(counter: KernelCounter, fn, name: str):
    def wrapped(*a, **k):
        counter.suppress += 1
        try:
            out = fn(*a, **k)
        finally:
            counter.suppress -= 1
        counter.add(name, tensor_bytes(a, list(k.values()), out))
        return out
    return wrapped


def _as_fused_update(counter: KernelCounter, update):
    """TF1RMSprop._update as on CUDA: one kernel per eight tensors where it fuses there (float32, no momentum)."""
    def wrapped(self, group, params, grads, extra, alpha):
        if self.fused is False or group["momentum"] > 0 or not rmsprop.fused_available():
            return update(self, group, params, grads, extra, alpha)
        extra = extra or [None] * len(params)
        n_with_e, nbytes = 0, 0
        for p, g, e in zip(params, grads, extra):
            if not rmsprop.fusable(p, self.state[p].get("square_avg", p)):   # pragma: no cover - not in the models
                raise NotImplementedError("count_kernels: a parameter TF1RMSprop would not fuse on CUDA")
            n_with_e += e is not None
            nbytes += tensor_bytes(p) * (5 + (e is not None))   # p, ms read and written; g (and e) read
            for t in (g, e):
                if t is not None and not rmsprop.same_layout(t, p):
                    counter.add("copy_", 2 * tensor_bytes(t))        # rmsprop.laid_out_as
        launches = sum(-(-n // rmsprop._SLOTS) for n in (n_with_e, len(params) - n_with_e))  # _SLOTS alike each
        for i in range(launches):
            counter.add("tf1_rmsprop", nbytes if i == 0 else 0)
        counter.suppress += 1
        try:
            return update(self, group, params, grads, extra, alpha)
        finally:
            counter.suppress -= 1
    return wrapped


def count_step(step, with_bytes: bool = False):
    """Kernel counts (by operator name) of one call of ``step``, CUDA-path substitutions applied; with
    ``with_bytes`` also the bytes moved (by operator name)."""
    counter = KernelCounter()
    saved = conv._im2col_torch, conv._col2im_torch, rmsprop.TF1RMSprop._update
    conv._im2col_torch = _as_one_kernel(counter, saved[0], "im2col")
    conv._col2im_torch = _as_one_kernel(counter, saved[1], "col2im")
    rmsprop.TF1RMSprop._update = _as_fused_update(counter, saved[2])
    try:
        with counter:
            step()
    finally:
        conv._im2col_torch, conv._col2im_torch, rmsprop.TF1RMSprop._update = saved
    return (counter.counts, counter.bytes) if with_bytes else counter.counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="dcgan4_nobn")
    ap.add_argument("--batch", type=int, default=8, help="the counts do not depend on it")
    ap.add_argument("--methods", default="simga,altga,conopt")
    ap.add_argument("--variants", default="plain,fast")
    ap.add_argument("--top", type=int, default=0, help="also list the N most frequent operators of each row")
    ap.add_argument("--bytes", action="store_true", help="also the bytes each kind of kernel moves (module docstring)")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    rows, tops, byte_rows = [], [], []
    for method in args.methods.split(","):
        for variant in args.variants.split(","):
            # "fast" on the CPU: numgan.train's CUDA-path step (fast_conv_impl's convolutions), run eagerly
            with settings(variant):   # e.g. fast-unpaired: numgan.conv.PAIR_COLUMNS = False
                step, _, _ = build(variant, method, args.arch, args.batch, images, torch.device("cpu"))
                for _ in range(2):     # optimiser state exists, lazy initialisation done
                    step()
                counts, nbytes = count_step(step, with_bytes=True)
            by_kind, mb_kind = collections.Counter(), collections.Counter()
            for op, n in counts.items():
                by_kind[kind_of(op)] += n
                mb_kind[kind_of(op)] += nbytes[op] / 1e6
            row = {"method": method, "variant": variant, "kernels/iter": sum(counts.values())}
            row.update({kind: by_kind.get(kind, 0) for kind, _ in KINDS})
            row["elementwise"] = by_kind.get("elementwise", 0)
            rows.append(row)
            if args.bytes:
                mb = {k: round(v, 1) for k, v in mb_kind.items()}
                other = sum(v for k, v in mb_kind.items() if k != "GEMM")
                byte_rows.append({"method": method, "variant": variant, "batch": args.batch,
                                  **{f"MB {k}": mb.get(k, 0.0) for k in [k for k, _ in KINDS] + ["elementwise"]},
                                  "MB not GEMM": round(other, 1), "floor ms at 3 TB/s (not GEMM)": other / 3e3,
                                  "floor ms at 3 TB/s (all)": (other + mb_kind["GEMM"]) / 3e3})
            if args.top:
                tops.append(f"{method} {variant}: " + ", ".join(f"{op} {n}" for op, n in counts.most_common(args.top)))
                if args.bytes:
                    top_mb = sorted(((op, b) for op, b in nbytes.items() if kind_of(op) != "GEMM"), key=lambda x: -x[1])
                    tops.append(f"{method} {variant}, MB moved, not GEMM: " + ", ".join(
                        f"{op} {b / 1e6:.0f} ({counts[op]})" for op, b in top_mb[:args.top]))
    head = common.header("cpu")
    text = (f"## kernels per iteration, {args.arch} (counted on the CPU; CUDA-path substitutions, see the script)"
            f"\n\n{common.format_header(head)}\n\n" + common.markdown_table(rows) + "\n")
    if byte_rows:
        text += "\nBytes moved per iteration (reads + writes, module docstring):\n\n" + common.markdown_table(byte_rows) + "\n"
    if tops:
        text += "\n" + "\n".join(f"- {t}" for t in tops) + "\n"
    common.report("kernels", "cpu", text, args.record)


if __name__ == "__main__":
    main()
