"""col2im / im2col of the GEMM convolutions (numgan.conv): the previous torch formulation ("old":
``unfold_backward`` per spatial axis, strided-view copies) against the Triton kernels ("new"), for every strided
layer of dcgan4_nobn (issue 4: col2im was the largest item of a graphed ConOpt step on the H100).

Rows per layer (G: transposed convolutions, D: convolutions; shapes from numgan.models at --batch):
  G col2im fwd   [B h w, k k O] columns -> cropped image + bias (old: (o,p,q) columns, unfold_backward x2, slice,
                 bias add; new: one kernel on (p,q,o) columns, numgan.conv's default layout "pqc")
  G im2col bwd   its gradient w.r.t. the columns (old: autograd of the old ops; new: the im2col kernel)
  D im2col fwd   image -> [B Ho Wo, k k C] (old: F.pad + unfold view + copy; new: one kernel, SAME zeros inside)
  D col2im bwd   its gradient w.r.t. the image (old: unfold_backward x2 + pad backward; new: one kernel)
  layer          the whole layer, ConOpt-style: forward, gradients with create_graph, then the gradient of
                 1/2 ||gradients||^2 (old: the previous conv_transpose2d_gemm / conv2d_gemm, copied below;
                 new: numgan.conv as numgan.models calls it today, F.pad / crop outside; new_folded: the SAME
                 padding and crop passed into numgan.conv instead)
  new_cpq_us / new_folded_cpq_us: the same with the channel-outermost column layout "cpq" (the weight's own
  layout: no weight copy, strided channel access); wcopy_us: the weight permute that "pqc" costs per forward.
On CUDA each time is GPU time per call from a CUDA graph of --inner calls (the training step is graphed too;
--eager times launches instead). On the CPU only the torch path exists (no Triton kernels), so "new" is the
torch path there and the script only checks that everything runs.

    python benchmarks/bench_col2im.py --device cuda --record        # benchmarks/results/col2im-cuda.md
    python benchmarks/bench_col2im.py --device cuda --image-sizes 32 64 --tile 4096
    OMP_NUM_THREADS=1 python benchmarks/bench_col2im.py              # CPU, batch 4
"""
import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from numgan import conv  # noqa: E402
from numgan.models import SameConv2d, SameConvTranspose2d, build_models, tf_same_padding  # noqa: E402


# ------------------------------------------------------------------------------------------------
# The previous formulation (numgan.conv before the Triton kernels), kept here as the reference
# ------------------------------------------------------------------------------------------------

def old_col2im(cols_opq, b, c_out, h, w, k, s, padding, bias):
    """[B h w, O k k] -> conv_transpose output cropped by ``padding``, plus bias (unfold_backward x2)."""
    v = cols_opq.view(b, h, w, c_out, k, k).permute(0, 3, 1, 2, 4, 5)
    hf, wf = (h - 1) * s + k, (w - 1) * s + k
    y = torch.ops.aten.unfold_backward(v, [b, c_out, h, wf, k], 3, k, s)
    y = torch.ops.aten.unfold_backward(y, [b, c_out, hf, wf], 2, k, s)
    if padding:
        y = y[:, :, padding:hf - padding, padding:wf - padding]
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def old_im2col(x_padded, k, s):
    patches = x_padded.unfold(2, k, s).unfold(3, k, s)
    b, ho, wo = patches.shape[0], patches.shape[2], patches.shape[3]
    return patches.permute(0, 2, 3, 4, 5, 1).reshape(b * ho * wo, -1)


def old_conv2d_gemm(x, weight, bias, stride):
    b = x.shape[0]
    c_out, _, k, _ = weight.shape
    patches = x.unfold(2, k, stride).unfold(3, k, stride)
    ho, wo = patches.shape[2], patches.shape[3]
    cols = patches.permute(0, 2, 3, 4, 5, 1).reshape(b * ho * wo, -1)
    y = cols @ weight.permute(0, 2, 3, 1).reshape(c_out, -1).t()
    if bias is not None:
        y = y + bias
    return y.view(b, ho, wo, c_out).permute(0, 3, 1, 2)


def old_conv_transpose2d_gemm(x, weight, bias, stride, padding):
    b, c_in, h, w = x.shape
    _, c_out, k, _ = weight.shape
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c_in)
    cols = rows @ weight.reshape(c_in, c_out * k * k)
    return old_col2im(cols, b, c_out, h, w, k, stride, padding, bias)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def gpu_time(fn, inner: int, repeat: int) -> float:
    """Median GPU seconds per call of ``fn`` replayed from a CUDA graph of ``inner`` calls.

    Runs on the current stream, which must not be the default one: main() runs everything on a side stream,
    so that the backward passes of graphs built outside the capture run on the capturing stream too."""
    stream = torch.cuda.current_stream()
    for _ in range(3):   # compiles the Triton kernels before the capture
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def make_timer(args, device):
    if device.type == "cuda" and not args.eager:
        return lambda fn: gpu_time(fn, args.inner, args.repeat)
    return lambda fn: common.timeit(fn, warmup=2, repeat=args.repeat, device=device)


def layer_shapes(image_size: int, f_dim: int, batch: int):
    """(kind, index, module, input shape) of every strided SAME conv of dcgan4_nobn, from a forward pass."""
    G, D = build_models("dcgan4_nobn", image_size, f_dim=f_dim)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.append((m, (batch,) + tuple(inp[0].shape[1:]))))
             for m in list(G.modules()) + list(D.modules()) if isinstance(m, (SameConv2d, SameConvTranspose2d))]
    with torch.no_grad():
        D(G(torch.randn(1, G.z_dim)))
    for h in hooks:
        h.remove()
    out, counts = [], {"G": 0, "D": 0}
    for m, shape in seen:
        kind = "G" if isinstance(m, SameConvTranspose2d) else "D"
        counts[kind] += 1
        out.append((kind, counts[kind], m, shape))
    return out


def conopt_layer(fn, inputs):
    """Forward, first derivatives with create_graph, then the derivative of 1/2 ||first derivatives||^2."""
    y = fn(*inputs)
    r = torch.ones_like(y)
    grads = torch.autograd.grad(y, inputs, r, create_graph=True)
    # (the bias gradient is constant, so its second derivative is unused)
    return torch.autograd.grad(0.5 * sum((g * g).sum() for g in grads), inputs, allow_unused=True,
                               materialize_grads=True)


def max_diff(a, b) -> float:
    """max |a - b| / max |b| (the largest over tuples)."""
    if isinstance(a, (tuple, list)):
        return max(max_diff(x, y) for x, y in zip(a, b))
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench_layer(kind, idx, m, shape, timer, device, dtype, us):
    gen = torch.Generator(device=device).manual_seed(idx)
    rows = []
    weight = m.weight.detach().to(device, dtype).requires_grad_()
    bias = m.bias.detach().to(device, dtype).requires_grad_()
    k, s = m.kernel_size[0], m.stride[0]
    b, c_in, h, w = shape
    name = f"{kind}{idx} {c_in}->{weight.shape[1] if kind == 'G' else weight.shape[0]} {h}x{w}"
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    if kind == "D" and idx > 1 or kind == "G":
        x = x.contiguous(memory_format=torch.channels_last)   # what the GEMM layers feed each other
    x.requires_grad_()
    if kind == "G":
        c_out, pad, crop = weight.shape[1], m.padding[0], m.crop_after
        hf, wf = (h - 1) * s + k, (w - 1) * s + k
        size = (hf - 2 * pad - crop, wf - 2 * pad - crop)
        pads = (pad, pad + crop, pad, pad + crop)
        rows_ = x.detach().permute(0, 2, 3, 1).reshape(b * h * w, c_in)
        cols_opq = (rows_ @ weight.detach().reshape(c_in, -1)).requires_grad_()
        cols_pqc = (rows_ @ weight.detach().permute(0, 2, 3, 1).reshape(c_in, -1)).requires_grad_()
        bias_d = bias.detach()

        def old_fwd():
            return old_col2im(cols_opq, b, c_out, h, w, k, s, pad, bias_d)[..., :size[0], :size[1]]

        def new_fwd():
            return conv.col2im(cols_pqc, size, k, s, pads, bias_d)

        def new_cpq():   # the kernel reading the (o,p,q) columns the weight's own layout gives
            return conv.col2im(cols_opq, size, k, s, pads, bias_d, layout="cpq")

        diff = max(max_diff(old_fwd(), new_fwd()), max_diff(old_fwd(), new_cpq()))
        row = dict(layer=name, op="col2im fwd", old_us=us(timer(old_fwd)), new_us=us(timer(new_fwd)),
                   new_cpq_us=us(timer(new_cpq)),
                   wcopy_us=us(timer(lambda: weight.detach().permute(0, 2, 3, 1).reshape(c_in, -1))),
                   rel_diff=diff)
        rows.append(row)
        y_old, y_new, y_cpq = old_fwd(), new_fwd(), new_cpq()   # (cols need grad: these build graphs)
        gy = torch.randn(y_new.shape, generator=gen, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        gc_old = torch.autograd.grad(y_old, cols_opq, gy, retain_graph=True)[0]
        gc_new = torch.autograd.grad(y_new, cols_pqc, gy, retain_graph=True)[0]
        diff = max_diff(gc_old.view(-1, c_out, k, k).permute(0, 2, 3, 1).reshape(gc_new.shape), gc_new)
        rows.append(dict(layer=name, op="im2col bwd",
                         old_us=us(timer(lambda: torch.autograd.grad(y_old, cols_opq, gy, retain_graph=True))),
                         new_us=us(timer(lambda: torch.autograd.grad(y_new, cols_pqc, gy, retain_graph=True))),
                         new_cpq_us=us(timer(lambda: torch.autograd.grad(y_cpq, cols_opq, gy, retain_graph=True))),
                         rel_diff=diff))

        def old_layer(a, wt, bb):
            return old_conv_transpose2d_gemm(a, wt, bb, s, pad)[..., :size[0], :size[1]]

        def new_layer(a, wt, bb):
            return conv.conv_transpose2d_gemm(a, wt, bb, s, pad)[..., :size[0], :size[1]]

        def new_layer_folded(a, wt, bb):
            return conv.conv_transpose2d_gemm(a, wt, bb, s, pad, crop_after=crop)
    else:
        top, bottom = tf_same_padding(h, k, s)
        left, right = tf_same_padding(w, k, s)
        pads = (top, bottom, left, right)
        xd = x.detach().requires_grad_()

        def old_fwd():
            return old_im2col(F.pad(xd, (left, right, top, bottom)), k, s)

        def new_fwd():
            return conv.im2col(xd, k, s, pads)

        def new_cpq():
            return conv.im2col(xd, k, s, pads, layout="cpq")

        rows.append(dict(layer=name, op="im2col fwd", old_us=us(timer(old_fwd)), new_us=us(timer(new_fwd)),
                         new_cpq_us=us(timer(new_cpq)), rel_diff=max_diff(old_fwd(), new_fwd())))
        c_old, c_new, c_cpq = old_fwd(), new_fwd(), new_cpq()
        gcols = torch.randn(c_new.shape, generator=gen, device=device, dtype=dtype)
        diff = max_diff(torch.autograd.grad(c_old, xd, gcols, retain_graph=True)[0],
                        torch.autograd.grad(c_new, xd, gcols, retain_graph=True)[0])
        rows.append(dict(layer=name, op="col2im bwd",
                         old_us=us(timer(lambda: torch.autograd.grad(c_old, xd, gcols, retain_graph=True))),
                         new_us=us(timer(lambda: torch.autograd.grad(c_new, xd, gcols, retain_graph=True))),
                         new_cpq_us=us(timer(lambda: torch.autograd.grad(c_cpq, xd, gcols, retain_graph=True))),
                         rel_diff=diff))

        def old_layer(a, wt, bb):
            return old_conv2d_gemm(F.pad(a, (left, right, top, bottom)), wt, bb, s)

        def new_layer(a, wt, bb):
            return conv.conv2d_gemm(F.pad(a, (left, right, top, bottom)), wt, bb, s)

        def new_layer_folded(a, wt, bb):
            return conv.conv2d_gemm(a, wt, bb, s, pads)

    inputs = (x, weight, bias)
    ref = conopt_layer(old_layer, inputs)
    row = dict(layer=name, op="layer ConOpt-style", old_us=us(timer(lambda: conopt_layer(old_layer, inputs))))
    diff = 0.0
    default = conv.COLS_LAYOUT
    try:
        for layout in ("pqc", "cpq"):
            conv.COLS_LAYOUT = layout
            suffix = "" if layout == "pqc" else "_cpq"
            for key, fn in ((f"new{suffix}_us", new_layer), (f"new_folded{suffix}_us", new_layer_folded)):
                diff = max(diff, max_diff(conopt_layer(fn, inputs), ref))
                row[key] = us(timer(lambda: conopt_layer(fn, inputs)))
    finally:
        conv.COLS_LAYOUT = default
    rows.append(dict(row, rel_diff=diff))
    for r in rows:
        r["speedup"] = r["old_us"] / r["new_us"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="default 64 on cuda, 4 on cpu")
    ap.add_argument("--image-sizes", type=int, nargs="*", default=[32])
    ap.add_argument("--f-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats (default 20 on cuda, 3 on cpu)")
    ap.add_argument("--inner", type=int, default=20, help="calls per CUDA graph replay")
    ap.add_argument("--eager", action="store_true", help="CUDA: time launches (synchronised), not a graph")
    ap.add_argument("--tile", type=int, default=None, help="elements per Triton program (numgan.conv._TILE)")
    ap.add_argument("--max-block-c", type=int, default=None, help="numgan.conv._MAX_BLOCK_C")
    ap.add_argument("--max-block-j", type=int, default=None, help="numgan.conv._MAX_BLOCK_J")
    ap.add_argument("--record", "--out", dest="record", action="store_true",
                    help="append the table to benchmarks/results/col2im-<device>.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    batch = args.batch or (64 if device.type == "cuda" else 4)
    args.repeat = args.repeat or (20 if device.type == "cuda" else 3)
    for flag, attr in ((args.tile, "_TILE"), (args.max_block_c, "_MAX_BLOCK_C"), (args.max_block_j, "_MAX_BLOCK_J")):
        if flag is not None:
            if flag < 16 or flag & (flag - 1):
                raise SystemExit(f"tile sizes must be powers of two >= 16, got {flag}")
            setattr(conv, attr, flag)
    dtype = getattr(torch, args.dtype)
    timer = make_timer(args, device)
    backend = "triton" if conv._use_triton(torch.empty(1, device=device, dtype=dtype), 1) else "torch"
    rows = []
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for size in args.image_sizes:
            for kind, idx, m, shape in layer_shapes(size, args.f_dim, batch):
                for r in bench_layer(kind, idx, m, shape, timer, device, dtype, lambda t: t * 1e6):
                    rows.append(dict(image=size, **r))
                    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    how = "eager, synchronised" if device.type != "cuda" or args.eager else f"CUDA graph of {args.inner} calls"
    text = (f"## bench_col2im ({device.type}, dcgan4_nobn, batch {batch}, {args.dtype}, new = {backend} path, "
            f"{how}; tile {conv._TILE}, max BLOCK_C {conv._MAX_BLOCK_C}, max BLOCK_J {conv._MAX_BLOCK_J})\n\n")
    text += common.header_text(device) + "\n\n"
    text += common.markdown_table(rows, ["image", "layer", "op", "old_us", "new_us", "speedup", "new_cpq_us",
                                         "wcopy_us", "new_folded_us", "new_folded_cpq_us", "rel_diff"])
    tot_old = sum(r["old_us"] for r in rows if r["op"] != "layer ConOpt-style")
    tot_new = sum(r["new_us"] for r in rows if r["op"] != "layer ConOpt-style")
    text += f"\n\nim2col/col2im ops, summed: old {tot_old:.1f} us, new {tot_new:.1f} us (x{tot_old / tot_new:.2f})"
    common.report("col2im", device, text, args.record)


if __name__ == "__main__":
    main()
