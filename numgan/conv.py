"""Strided convolutions whose derivatives of every order stay on fast kernels (issue 4).

ConOpt differentiates the game's gradient once more (paper Eq. 16-17: grad 1/2 ||v||^2 = v'^T v),
so every convolution is differentiated twice. PyTorch's own double backward of a *strided*
convolution (``_convolution_double_backward``) expresses the derivative of the input gradient with respect
to the weight as a dilated convolution, which CUDA runs on a slow non-cuDNN kernel (``slow_conv_dilated2d``: 60% of a
ConOpt step's GPU time, shared/notes/perf-leads.md).

A convolution y = conv(x, W) (stride s, no padding) is bilinear, and its two first derivatives are
again bilinear maps of the same family:

* ``conv(x, W)``          the forward convolution (cuDNN fprop)
* ``conv_t(g, W, size)``  its adjoint in x, i.e. the transposed convolution (cuDNN dgrad)
* ``wgrad(x, g, shape)``  its adjoint in W, i.e. the weight gradient (cuDNN wgrad)

Each one's vector-Jacobian products are the other two (for <gx, conv_t(g, W)> = <conv(gx, W), g>
and <gW, wgrad(x, g)> = <conv(x, gW), g>):

    conv(x, W):   dx = conv_t(gy, W),   dW = wgrad(x, gy)
    conv_t(g, W): dg = conv(gy, W),     dW = wgrad(gy, g)
    wgrad(x, g):  dx = conv_t(g, gW),   dg = conv(x, gW)

so the three autograd Functions below are closed under differentiation: first, second and higher
derivatives run the three cuDNN algorithms and nothing else. A symmetric zero padding p is an argument of all
three (cuDNN pads, and its adjoint crops, itself); asymmetric padding is applied outside (``F.pad``). The same
identities hold on the CPU, where tests/test_step.py checks the values and ConOpt's second derivatives
against torch's native convolution in float64, and tests/test_models.py each Function's first and second
derivatives (gradcheck, gradgradcheck).

This matters most for stride-1 convolutions, which numgan.train runs in this form for ConOpt and smoothing
(the ResNets' 3x3 blocks, Fig. 10): PyTorch's own double backward of a convolution forms the derivative of
the input gradient with respect to the weight, wgrad(ggI, gO), as a convolution of the batch-transposed ggI
(the gradient flowing back into the input gradient) with the batch-transposed output gradient as its kernel,
a kernel as large as the feature map (32 x 32 over the batch as channels for resnet_cf at 64 x 64), after
copying both transposes (numgan.models.set_conv_impl).

``conv2d_gemm`` / ``conv_transpose2d_gemm`` are a second formulation (im2col + one matrix product),
whose derivatives are matrix products, im2col and col2im. A leaky ReLU next to such a layer can be computed
by its im2col (on the input) or col2im (on the output); its derivative is then a mask inside the same
kernels (numgan.models.fuse_activations). ``Im2Col`` / ``Col2Im`` are a pair of mutually
adjoint autograd Functions (each one's vector-Jacobian product is the other), so ConOpt's second derivatives
stay on them too. ConOpt's second backward pass gives a column matrix two cotangents, one from each product
it enters; ``Im2ColPair`` hands the matrix to the two products as two handles and col2im gathers both
cotangents in one pass, where autograd would first add them up (``PAIR_COLUMNS``). On CUDA both are Triton
kernels: col2im in gather form (each output element sums its
<= ceil(k/s)^2 column entries: no atomics, deterministic) with the bias add and the SAME crop fused, reading
the GEMM's channels-innermost columns and writing channels-last memory, so that the next GEMM reads its rows
without a copy. On the CPU, or where Triton cannot be imported, the same functions run as strided views and
``torch.ops.aten.unfold_backward``; tests/test_conv_col2im.py checks the two paths against each other under
Triton's interpreter. On an H100 the GEMM form gave the faster ConOpt step (cuDNN's strided dgrad kernels and
its NCHW/NHWC conversions cost more than the im2col copies), so numgan.train uses it; benchmarks/bench_step.py
times both, benchmarks/bench_col2im.py the col2im kernels.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import INTERPRET as _INTERPRET, device_guard, tl, triton  # None without Triton: the torch path runs
from .activations import leaky_relu_grad

use_triton = True   # set False to force the pure-torch im2col / col2im (e.g. to compare)


def _conv(x: Tensor, w: Tensor, stride: int, padding: int) -> Tensor:
    return F.conv2d(x, w, stride=stride, padding=padding)


def _conv_t(g: Tensor, w: Tensor, stride: int, padding: int, size) -> Tensor:
    k = w.shape[-1]
    full = [(n - 1) * stride - 2 * padding + k for n in g.shape[-2:]]
    op = (size[0] - full[0], size[1] - full[1])
    return F.conv_transpose2d(g, w, stride=stride, padding=padding, output_padding=op)


def _wgrad(x: Tensor, g: Tensor, stride: int, padding: int, shape) -> Tensor:
    # only the weight's shape is read; its layout follows x's, so that cuDNN does not convert it to x's
    fmt = torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    w = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    return torch.ops.aten.convolution_backward(g, x, w, None, [stride, stride], [padding, padding], [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


class Conv(torch.autograd.Function):
    """y = conv2d(x, W, stride, padding): ``padding`` zeros on every side (symmetric), read by cuDNN itself."""

    @staticmethod
    def forward(ctx, x, w, stride, padding):
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding = stride, padding
        return _conv(x, w, stride, padding)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        dx = ConvT.apply(gy, w, s, p, tuple(x.shape[-2:])) if ctx.needs_input_grad[0] else None
        dw = WGrad.apply(x, gy, s, p, tuple(w.shape)) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


class ConvT(torch.autograd.Function):
    """conv_t(g, W): the adjoint of ``Conv`` (same stride and padding) in x, output spatial size ``size``."""

    @staticmethod
    def forward(ctx, g, w, stride, padding, size):
        ctx.save_for_backward(g, w)
        ctx.stride, ctx.padding = stride, padding
        return _conv_t(g, w, stride, padding, size)

    @staticmethod
    def backward(ctx, gy):
        g, w = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        dg = Conv.apply(gy, w, s, p) if ctx.needs_input_grad[0] else None
        dw = WGrad.apply(gy, g, s, p, tuple(w.shape)) if ctx.needs_input_grad[1] else None
        return dg, dw, None, None, None


class WGrad(torch.autograd.Function):
    """wgrad(x, g): the adjoint of ``Conv`` in W (the weight gradient for output gradient g)."""

    @staticmethod
    def forward(ctx, x, g, stride, padding, shape):
        ctx.save_for_backward(x, g)
        ctx.stride, ctx.padding = stride, padding
        return _wgrad(x, g, stride, padding, shape)

    @staticmethod
    def backward(ctx, gw):
        x, g = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        dx = ConvT.apply(g, gw, s, p, tuple(x.shape[-2:])) if ctx.needs_input_grad[0] else None
        dg = Conv.apply(x, gw, s, p) if ctx.needs_input_grad[1] else None
        return dx, dg, None, None, None


def conv2d_adjoint(x: Tensor, weight: Tensor, bias, stride: int, padding: int = 0) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) through :class:`Conv` (``padding`` zeros on every side;
    asymmetric padding is applied to x before)."""
    y = Conv.apply(x, weight, stride, padding)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv_transpose2d_adjoint(x: Tensor, weight: Tensor, bias, stride: int, padding: int) -> Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding) through :class:`ConvT`.

    ``weight`` is ConvTranspose2d's [in, out, k, k], which is the weight of the convolution it is the
    adjoint of. The full output ((H - 1) s + k) is cropped by ``padding`` on each side (by cuDNN: the
    adjoint of a convolution that pads by ``padding``).
    """
    k = weight.shape[-1]
    size = ((x.shape[-2] - 1) * stride + k - 2 * padding, (x.shape[-1] - 1) * stride + k - 2 * padding)
    y = ConvT.apply(x, weight, stride, padding, size)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------------------------
#
# A column tensor is 2-D, [B Ho Wo, k k C]: one row per output position (b, i, j) holding the k x k x C patch
# of the zero-padded image, x_pad[b, c, i s + p, j s + q]. Within a row the default layout "pqc" puts the
# channel innermost (index (p k + q) C + c): with channels-last activations, which the GEMM forms produce, the
# kernels below then read and write runs of consecutive channels, at the price of one permuted copy of the
# weight per forward ([O, C, k, k] -> [O, k, k, C]). The layout "cpq" (index (c k + p) k + q) is the one the
# weight has, so no weight copy, but the kernels access channels k^2 elements apart. COLS_LAYOUT picks the
# layout the two GEMM convolutions use (benchmarks/bench_col2im.py times both). Images are NCHW tensors of
# any strides; col2im through Triton returns an NCHW view of channels-last memory, so that the next GEMM's
# rows ([B H W, C]) are a free view.

COLS_LAYOUT = "pqc"
_LAYOUTS = ("pqc", "cpq")
# The column matrices are ALIGN-wide multiples: k k C = 75 for a 3-channel image makes rows of 300 bytes, and
# cuBLAS's fast TF32 kernels need 16-byte-aligned rows (leading dimensions); with a misaligned operand it falls
# back to slower ones. The padding columns are zero (im2col writes them, col2im ignores them, a GEMM weight
# matrix gets as many zero columns), so every product is the same. 0 or 1: no padding.
ALIGN = 4
# Each GEMM layer hands its column matrix out twice (Im2ColPair, Linear, ConvTGemm below), so that ConOpt's second
# backward pass gathers the two cotangents it gets inside col2im instead of adding them up first. False: the
# earlier form (Im2Col / Col2Im around torch's own matrix products), the same function; bench_step.py times both.
PAIR_COLUMNS = True


def _width(n: int) -> int:
    """The stored width of a column matrix with n columns (see ALIGN)."""
    return -(-n // ALIGN) * ALIGN if ALIGN > 1 else n


class _Geom(NamedTuple):
    k: int       # kernel size
    s: int       # stride
    h: int       # image height (unpadded)
    w: int       # image width
    ho: int      # patch rows
    wo: int      # patch columns
    top: int     # zero rows before the image (im2col) = rows cropped at the top (col2im)
    left: int    # zero columns before the image
    layout: str  # "pqc" or "cpq"


def _geometry(size, kernel_size: int, stride: int, padding, layout: str = "pqc") -> _Geom:
    k, s = int(kernel_size), int(stride)
    if k < 1 or s < 1:
        raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size} and {stride}")
    if len(padding) != 4 or min(padding) < 0:
        raise ValueError(f"padding must be 4 non-negative ints (top, bottom, left, right), got {padding}")
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown column layout {layout!r}; choose one of {_LAYOUTS}")
    top, bottom, left, right = (int(v) for v in padding)
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    ho, wo = (h + top + bottom - k) // s + 1, (w + left + right - k) // s + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"a {k}x{k} kernel does not fit in a {h}x{w} image padded by {tuple(padding)}")
    return _Geom(k, s, h, w, ho, wo, top, left, layout)


def _mask(t: Tensor, m, slope) -> Tensor:
    """t * (1 where m > 0, else slope): the leaky ReLU's derivative at m applied to t (m None: t)."""
    return t if m is None else torch.where(m > 0, t, t * slope)


def _channel_sums(t: Tensor, m, slope) -> Tensor:
    """Sum over batch and space of t masked by the leaky ReLU's derivative at m (m None: of t): a bias gradient,
    differentiable in t (numgan.activations.leaky_relu_grad)."""
    return (t if m is None else leaky_relu_grad(t, m, slope)).sum((0, 2, 3))


def _im2col_torch(x: Tensor, g: _Geom, m=None, slope=None) -> Tensor:
    """im2col as a strided view (``Tensor.unfold``) of the zero-padded image, copied once (of x masked by
    the leaky ReLU's derivative at m when m is given: the patches of leaky_relu(x) when m is x)."""
    x = _mask(x, m, slope)
    b, c = x.shape[:2]
    n = g.k * g.k * c
    hf, wf = (g.ho - 1) * g.s + g.k, (g.wo - 1) * g.s + g.k            # the padded extent the patches cover
    pads = (g.left, wf - g.left - g.w, g.top, hf - g.top - g.h)          # negative = crop unused rows
    if any(pads):
        x = F.pad(x, pads)
    patches = x.unfold(2, g.k, g.s).unfold(3, g.k, g.s)                 # [B, C, Ho, Wo, k, k] (a view)
    if g.layout == "pqc":
        cols = x.new_empty(b, g.ho, g.wo, g.k, g.k, c)
        cols.copy_(patches.permute(0, 2, 3, 4, 5, 1))
    else:
        cols = x.new_empty(b, g.ho, g.wo, c, g.k, g.k)
        cols.copy_(patches.permute(0, 2, 3, 1, 4, 5))
    cols = cols.view(b * g.ho * g.wo, n)
    return cols if _width(n) == n else F.pad(cols, (0, _width(n) - n))


def _col2im_torch(cols: Tensor, bias, g: _Geom, m=None, slope=None, act: bool = False, cols2=None) -> Tensor:
    """col2im as ``unfold_backward`` per spatial axis, then crop (or zero-pad) to the image, plus bias; then
    masked by the leaky ReLU's derivative at m (m given), or the leaky ReLU applied (``act``). ``cols2``: a
    second column matrix of the same shape, summed with ``cols`` first."""
    b, c = cols.shape[0] // (g.ho * g.wo), cols.shape[1] // (g.k * g.k)
    cols = cols[:, :g.k * g.k * c]                                       # without ALIGN's zero columns
    if cols2 is not None:
        cols = cols + cols2[:, :g.k * g.k * c]
    hf, wf = (g.ho - 1) * g.s + g.k, (g.wo - 1) * g.s + g.k
    if g.layout == "pqc":
        v = cols.reshape(b, g.ho, g.wo, g.k, g.k, c).permute(0, 5, 1, 2, 3, 4)   # [B, C, Ho, Wo, k, k]
    else:
        v = cols.reshape(b, g.ho, g.wo, c, g.k, g.k).permute(0, 3, 1, 2, 4, 5)
    y = torch.ops.aten.unfold_backward(v, [b, c, g.ho, wf, g.k], 3, g.k, g.s)
    y = torch.ops.aten.unfold_backward(y, [b, c, hf, wf], 2, g.k, g.s)
    pads = (-g.left, g.w + g.left - wf, -g.top, g.h + g.top - hf)     # the adjoint of _im2col_torch's pad
    if any(pads):
        y = F.pad(y, pads)
    y = y if bias is None else y + bias.view(1, -1, 1, 1)
    return _mask(y, y if act else m, slope)


if triton is not None:
    @triton.jit
    def _col2im_kernel(cols, cols2, bias, out, mask_src, slope, n_pos, C, H, W, Ho, Wo, top, left,
                       s_b, s_i, s_j, s_p, s_q, s_c, t_b, t_i, t_j, t_p, t_q, t_c,
                       o_b, o_c, o_h, o_w, m_b, m_c, m_h, m_w,
                       K: tl.constexpr, S: tl.constexpr, KT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       TWO: tl.constexpr, MASK: tl.constexpr, ACT: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # Gather form: output element (b, c, h, w) sums the <= KT^2 column entries (b, i, j, p, q, c) with
        # i s + p = h + top, j s + q = w + left (strides s_* of the columns as a 6-D tensor), and with TWO the
        # same entries of cols2 (strides t_*). No atomics; the summation order is fixed. A program: BLOCK_P
        # positions (b, h, w) x BLOCK_C channels.
        pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pmask = pos < n_pos
        cmask = c < C
        w = pos % W
        t = pos // W
        h = t % H
        b = t // H
        hf = h + top
        wf = w + left
        c_off = (c * s_c)[None, :]
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for th in tl.static_range(KT):
            i = hf // S - th
            p = hf - i * S
            ok_h = pmask & (i >= 0) & (i < Ho) & (p < K)
            base_h = b * s_b + i * s_i + p * s_p
            for tw in tl.static_range(KT):
                j = wf // S - tw
                q = wf - j * S
                ok = ok_h & (j >= 0) & (j < Wo) & (q < K)
                off = base_h + j * s_j + q * s_q
                v = tl.load(cols + off[:, None] + c_off, mask=ok[:, None] & cmask[None, :], other=0.0)
                acc += v.to(ACC)
                if TWO:
                    off2 = b * t_b + i * t_i + p * t_p + j * t_j + q * t_q
                    v2 = tl.load(cols2 + off2[:, None] + (c * t_c)[None, :], mask=ok[:, None] & cmask[None, :],
                                 other=0.0)
                    acc += v2.to(ACC)
        if HAS_BIAS:
            acc += tl.load(bias + c, mask=cmask, other=0.0).to(ACC)[None, :]
        if MASK or ACT:   # the leaky ReLU's derivative at mask_src (MASK), or the leaky ReLU itself (ACT)
            a = tl.load(slope).to(ACC)
            if MASK:
                m_off = (b * m_b + h * m_h + w * m_w)[:, None] + (c * m_c)[None, :]
                mv = tl.load(mask_src + m_off, mask=pmask[:, None] & cmask[None, :], other=0.0)
                acc = tl.where(mv > 0, acc, acc * a)
            else:
                acc = tl.where(acc > 0, acc, acc * a)
        o_off = (b * o_b + h * o_h + w * o_w)[:, None] + (c * o_c)[None, :]
        tl.store(out + o_off, acc.to(out.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])

    @triton.jit
    def _im2col_kernel(x, cols, mask_src, slope, n_rows, n_cols, n_valid, C, H, W, Ho, Wo, top, left,
                       x_b, x_c, x_h, x_w, m_b, m_c, m_h, m_w,
                       K: tl.constexpr, S: tl.constexpr, CPQ: tl.constexpr, MASK: tl.constexpr,
                       MASK_SELF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
        # A [BLOCK_R rows (b, i, j)] x [BLOCK_J columns] tile of the contiguous column matrix; the source
        # address and the bounds split into a row part and a column part. Zeros outside the image and in the
        # columns from n_valid to n_cols (ALIGN's padding).
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        jj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        rmask = r < n_rows
        jmask = jj < n_cols
        j = r % Wo
        t = r // Wo
        i = t % Ho
        b = t // Ho
        h0 = i * S - top
        w0 = j * S - left
        if CPQ:
            q = jj % K
            cp = jj // K
            p = cp % K
            c = cp // K
        else:
            c = jj % C
            pq = jj // C
            p = pq // K
            q = pq - p * K
        h = h0[:, None] + p[None, :]
        w = w0[:, None] + q[None, :]
        ok = (rmask[:, None] & (jj < n_valid)[None, :]) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        src = (b * x_b + h0 * x_h + w0 * x_w)[:, None] + (c * x_c + p * x_h + q * x_w)[None, :]
        v = tl.load(x + src, mask=ok, other=0.0)
        if MASK:   # x times the leaky ReLU's derivative at mask_src (leaky_relu(x) when mask_src is x)
            if MASK_SELF:
                mv = v
            else:
                m_src = (b * m_b + h0 * m_h + w0 * m_w)[:, None] + (c * m_c + p * m_h + q * m_w)[None, :]
                mv = tl.load(mask_src + m_src, mask=ok, other=0.0)
            v = tl.where(mv > 0, v, v * tl.load(slope).to(v.dtype))
        tl.store(cols + (r * n_cols)[:, None] + jj[None, :], v, mask=rmask[:, None] & jmask[None, :])


# Tile sizes (not tuned per shape: one compiled kernel per (k, s, dtype, block sizes)). A program handles about
# _TILE elements: BLOCK_C <= _MAX_BLOCK_C channels (col2im), BLOCK_J <= _MAX_BLOCK_J columns (im2col).
_TILE = 2048
_MAX_BLOCK_C = 64
_MAX_BLOCK_J = 128
_INT32_MAX = 2 ** 31 - 1
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _max_offset(t: Tensor) -> int:
    return sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)


def _use_triton(t: Tensor, n_out: int) -> bool:
    if triton is None or not use_triton or t.dtype not in _TRITON_DTYPES:
        return False
    if not (t.is_cuda or (_INTERPRET and t.device.type == "cpu")):
        return False
    return _max_offset(t) <= _INT32_MAX and n_out <= _INT32_MAX   # the kernels index with int32


_SLOPES: dict = {}


def _slope_tensor(slope: float, like: Tensor) -> Tensor:
    """The leaky slope as a one-element tensor of ``like``'s dtype and device, which the kernels load (a
    float argument would reach them rounded to float32). Cached: made once, before any CUDA-graph capture."""
    key = (float(slope), like.dtype, like.device)
    t = _SLOPES.get(key)
    if t is None:
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a fused leaky ReLU's first use is inside a CUDA-graph capture: run the step once "
                               "eagerly before capturing it (numgan.step.GanStep does)")
        t = torch.full((1,), float(slope), dtype=like.dtype, device=like.device)
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()   # filled before any other stream reads it
        _SLOPES[key] = t
    return t


def _im2col_triton(x: Tensor, g: _Geom, m=None, slope=None) -> Tensor:
    b, c = x.shape[:2]
    n_valid = g.k * g.k * c
    n_cols = _width(n_valid)
    cols = torch.empty(b * g.ho * g.wo, n_cols, device=x.device, dtype=x.dtype)
    if cols.numel() == 0:
        return cols
    bj = min(_MAX_BLOCK_J, triton.next_power_of_2(n_cols))
    while bj > 16 and triton.cdiv(n_cols, bj) * bj > 1.25 * n_cols:   # little padding waste: 75 columns -> 3 x 32
        bj //= 2
    br = max(_TILE // bj, 16)
    grid = (triton.cdiv(cols.shape[0], br), triton.cdiv(n_cols, bj))
    with device_guard(x):
        _im2col_kernel[grid](x, cols, x if m is None else m, x if m is None else _slope_tensor(slope, x),
                             cols.shape[0], n_cols, n_valid, c, g.h, g.w, g.ho, g.wo, g.top, g.left, *x.stride(),
                             *(x if m is None else m).stride(), K=g.k, S=g.s, CPQ=g.layout == "cpq",
                             MASK=m is not None, MASK_SELF=m is x, BLOCK_R=br, BLOCK_J=bj)
    return cols


def _col_strides(cols: Tensor, g: _Geom, c: int) -> tuple:
    """The strides of a column matrix as a 6-D [B, Ho, Wo, k, k, C] tensor."""
    r0, r1 = cols.stride()
    if g.layout == "pqc":
        return g.ho * g.wo * r0, g.wo * r0, r0, g.k * c * r1, c * r1, r1
    return g.ho * g.wo * r0, g.wo * r0, r0, g.k * r1, r1, g.k * g.k * r1


def _col2im_triton(cols: Tensor, bias, g: _Geom, m=None, slope=None, act: bool = False, cols2=None) -> Tensor:
    b, c = cols.shape[0] // (g.ho * g.wo), cols.shape[1] // (g.k * g.k)
    out = torch.empty((b, c, g.h, g.w), device=cols.device, dtype=cols.dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    strides = _col_strides(cols, g, c)
    strides2 = strides if cols2 is None else _col_strides(cols2, g, c)
    if bias is not None:
        bias = bias.contiguous()   # the kernel reads bias[c]; a cotangent as the bias (Im2ColPair) may be strided
    acc = tl.float64 if cols.dtype == torch.float64 else tl.float32
    bc = min(_MAX_BLOCK_C, triton.next_power_of_2(c))
    bp = max(_TILE // bc, 16)
    n_pos = b * g.h * g.w
    grid = (triton.cdiv(n_pos, bp), triton.cdiv(c, bc))
    masked = m is not None or act
    with device_guard(cols):
        _col2im_kernel[grid](cols, cols if cols2 is None else cols2, cols if bias is None else bias, out,
                             out if m is None else m, _slope_tensor(slope, cols) if masked else cols, n_pos, c,
                             g.h, g.w, g.ho, g.wo, g.top, g.left, *strides, *strides2, *out.stride(),
                             *(out if m is None else m).stride(), K=g.k, S=g.s, KT=-(-g.k // g.s),
                             HAS_BIAS=bias is not None, TWO=cols2 is not None, MASK=m is not None,
                             ACT=bool(act), ACC=acc, BLOCK_P=bp, BLOCK_C=bc)
    return out


def _im2col(x: Tensor, g: _Geom, m=None, slope=None) -> Tensor:
    n_out = x.shape[0] * g.ho * g.wo * _width(g.k * g.k * x.shape[1])
    ok = _use_triton(x, n_out) and (m is None or (m.dtype == x.dtype and _max_offset(m) <= _INT32_MAX))
    return _im2col_triton(x, g, m, slope) if ok else _im2col_torch(x, g, m, slope)


def _col2im(cols: Tensor, bias, g: _Geom, m=None, slope=None, act: bool = False, cols2=None) -> Tensor:
    """col2im(cols (+ cols2)) + bias, masked or activated: the Triton kernel where it applies, else torch."""
    if cols2 is not None and cols2.shape != cols.shape:
        raise ValueError(f"col2im: two column sources of different shapes {list(cols.shape)}, {list(cols2.shape)}")
    n_out = cols.shape[0] // (g.ho * g.wo) * (cols.shape[1] // (g.k * g.k)) * g.h * g.w
    ok = _use_triton(cols, n_out) and (bias is None or (bias.device == cols.device and bias.dtype == cols.dtype))
    ok = ok and (m is None or (m.dtype == cols.dtype and _max_offset(m) <= _INT32_MAX))
    ok = ok and (cols2 is None or (cols2.device == cols.device and cols2.dtype == cols.dtype
                                   and _max_offset(cols2) <= _INT32_MAX))
    fn = _col2im_triton if ok else _col2im_torch
    return fn(cols, bias, g, m, slope, act, cols2)


class Im2Col(torch.autograd.Function):
    """cols = im2col(s(m) x): [B, C, H, W] -> [B Ho Wo, k k C] (stored ALIGN-wide: zero columns appended, which
    :class:`Col2Im` ignores), zero padding included, where s(m) is the leaky
    ReLU's derivative at ``m`` (1 where m > 0, else ``slope``; no mask when m is None). Linear in x for a fixed
    m, and m only picks the factors (its derivative is zero), so with m = x it is the im2col of leaky_relu(x)
    and its derivative. The vector-Jacobian product is :class:`Col2Im` with the same mask (and Col2Im's is
    Im2Col), so derivatives of every order stay on these two kernels."""

    @staticmethod
    def forward(ctx, x, geom, m=None, slope=None):
        ctx.geom, ctx.slope = geom, slope
        if m is not None:
            ctx.save_for_backward(m)
        return _im2col(x, geom, m, slope)

    @staticmethod
    def backward(ctx, gc):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        m = ctx.saved_tensors[0] if ctx.saved_tensors else None
        return Col2Im.apply(gc, None, ctx.geom, m, ctx.slope), None, None, None


class Col2Im(torch.autograd.Function):
    """y = s(m) (col2im(cols) + bias): the adjoint of :class:`Im2Col` (each image element sums the column entries
    that copy it), with a per-channel bias added in the same pass, masked by the leaky ReLU's derivative at
    ``m`` when given. ``act=True`` instead applies the leaky ReLU itself, y = leaky_relu(col2im(cols) + bias):
    then y's own sign picks the factors of its derivative, which is Im2Col masked at y. ``cols2``: a second
    column matrix of the same shape, gathered in the same pass (col2im(cols + cols2), without the sum as a
    tensor of its own; its derivative is the same Im2Col)."""

    @staticmethod
    def forward(ctx, cols, bias, geom, m=None, slope=None, act=False, cols2=None):
        ctx.geom, ctx.slope, ctx.width = geom, slope, cols.shape[1]
        y = _col2im(cols, bias, geom, m, slope, act, cols2)
        mask_src = y if act else m
        if mask_src is not None:
            ctx.save_for_backward(mask_src)
        return y

    @staticmethod
    def backward(ctx, gy):
        m = ctx.saved_tensors[0] if ctx.saved_tensors else None
        need = ctx.needs_input_grad + (False,) * (7 - len(ctx.needs_input_grad))   # cols2 may not be given
        gc = None
        if need[0] or need[6]:
            gc = Im2Col.apply(gy, ctx.geom, m, ctx.slope)
            if gc.shape[1] != ctx.width:   # columns given without ALIGN's zero columns
                gc = gc[:, :ctx.width]
        gb = None
        if need[1]:
            gb = _channel_sums(gy, m, ctx.slope)
        grads = (gc if need[0] else None, gb, None, None, None, None, gc if need[6] else None)
        return grads[:len(ctx.needs_input_grad)]


# ---------------------------------------------------------------------------------------------
# one GEMM layer, differentiated twice without summing its column matrices' cotangents as tensors
# ---------------------------------------------------------------------------------------------
#
# In ConOpt's second backward pass a column matrix X = im2col(x) of a convolution y = X W^T receives two
# cotangents, ggy W from the product and gy dgW from the weight gradient gW = gy^T X of the first pass, and
# the transposed convolution's im2col(gy) likewise one from each product of its first backward pass. With
# torch's own matrix products autograd adds the two (a kernel reading two column matrices and writing a
# third, the largest tensors of the step: benchmarks/README.md, item 17), and the sum then goes to col2im.
# Here the column matrix is handed out twice (:class:`Im2ColPair`: one tensor and a view of it), one use per
# product, so the two cotangents reach Im2ColPair's derivative apart and col2im gathers from both in one pass.
# :class:`LinearGrad` does the same for the output gradient gy of a convolution, whose cotangent is
# dgX W + X dgW + dgb: one matrix product accumulated into the other (beta = 1), the bias as its addend.


def _mark_inputs(ctx, *inputs) -> None:
    """Record which of a custom Function's inputs are tensors (for :func:`_needed`); call it in ``forward``."""
    ctx.tensor_inputs = tuple(isinstance(t, Tensor) for t in inputs)


def _needed(ctx) -> tuple:
    """Which inputs of a custom Function's node this backward pass needs gradients for. ``ctx.needs_input_grad``
    only says which inputs require grad; torch's own nodes also skip what the current pass does not ask for
    (e.g. the discriminator's weight gradients in ``autograd.grad(L_G, generator parameters)``), and so do
    these, by asking the engine whether it will run each input's node (``ctx.next_functions`` holds one per
    tensor input, recorded by :func:`_mark_inputs`). Where torch cannot answer (it raises for a leaf that is
    one of ``autograd.grad``'s inputs, and outside a backward pass), the gradient is computed."""
    nodes = iter(ctx.next_functions)
    out = []
    for need, is_tensor in zip(ctx.needs_input_grad, ctx.tensor_inputs):
        node = next(nodes)[0] if is_tensor else None
        if need and node is not None:
            try:
                need = torch._C._will_engine_execute_node(node)
            except (RuntimeError, AttributeError):
                pass
        out.append(bool(need))
    return tuple(out)


class Im2ColPair(torch.autograd.Function):
    """(cols, cols) = im2col(s(m) x), the same as :class:`Im2Col`, returned twice (a tensor and a view of it)
    so that two consumers' cotangents stay apart; with ``with_sum`` also the channel sums of s(m) x (the bias
    gradient when x is an output gradient). The derivative is :class:`Col2Im` of both cotangents in one pass,
    with the sum's cotangent as its bias."""

    @staticmethod
    def forward(ctx, x, geom, m=None, slope=None, with_sum=False):
        _mark_inputs(ctx, x, geom, m, slope, with_sum)
        ctx.set_materialize_grads(False)
        ctx.geom, ctx.slope, ctx.shape = geom, slope, x.shape
        if m is not None:
            ctx.save_for_backward(m)
        cols = _im2col(x, geom, m, slope)
        if not with_sum:
            return cols, cols.view_as(cols)
        return cols, cols.view_as(cols), _channel_sums(x, m, slope)

    @staticmethod
    def backward(ctx, g1, g2, gs=None):
        if not _needed(ctx)[0]:
            return None, None, None, None, None
        m = ctx.saved_tensors[0] if ctx.saved_tensors else None
        if g1 is None:
            g1, g2 = g2, None
        if g1 is None:   # only the sum has a cotangent (or nothing has)
            if gs is None:
                return None, None, None, None, None
            gx = gs.view(1, -1, 1, 1).expand(ctx.shape)
            return (gx if m is None else leaky_relu_grad(gx, m, ctx.slope)), None, None, None, None
        return Col2Im.apply(g1, gs, ctx.geom, m, ctx.slope, False, g2), None, None, None, None


class Linear(torch.autograd.Function):
    """y = xf wm^T (+ bias): a convolution's matrix product, where ``xw`` is ``xf`` again (the second output of
    :class:`Im2ColPair`, the same memory): the product's derivative goes to xf, the weight gradient reads xw,
    so that the second derivatives of the two reach the column matrix apart. Only correct when xw is xf."""

    @staticmethod
    def forward(ctx, xf, xw, wm, bias):
        _mark_inputs(ctx, xf, xw, wm, bias)
        if xw.data_ptr() != xf.data_ptr() or xw.shape != xf.shape:
            raise ValueError("Linear: xw must be the same column matrix as xf (Im2ColPair's two outputs)")
        ctx.save_for_backward(xw, wm)
        return xf @ wm.t() if bias is None else torch.addmm(bias, xf, wm.t())

    @staticmethod
    def backward(ctx, gy):
        xw, wm = ctx.saved_tensors
        nx, _, nw, nb = _needed(ctx)
        gx, gw, gb = LinearGrad.apply(gy, xw, wm, nx, nw, nb)   # nb is False for a None bias
        return gx, None, gw, gb


class LinearGrad(torch.autograd.Function):
    """(gx, gw, gb) = (gy wm, gy^T xw, sum_rows gy), each only where its flag asks: :class:`Linear`'s
    vector-Jacobian product. Its own derivative sums the three terms of gy's cotangent, dgx wm^T + xw dgw^T
    + dgb, in two matrix products (the second accumulating into the first, the bias as the first's addend)."""

    @staticmethod
    def forward(ctx, gy, xw, wm, need_x, need_w, need_b):
        _mark_inputs(ctx, gy, xw, wm, need_x, need_w, need_b)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gy, xw, wm)
        return (gy @ wm if need_x else None, gy.t() @ xw if need_w else None,
                gy.sum(0) if need_b else None)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, xw, wm = ctx.saved_tensors
        need = _needed(ctx)
        d_gy = d_xw = d_wm = None
        if need[0]:   # dgx wm^T + xw dgw^T + dgb, from the cotangents that are present
            terms = ([(ggx, wm.t())] if ggx is not None else []) + ([(xw, ggw.t())] if ggw is not None else [])
            if terms:
                (a, b), rest = terms[0], terms[1:]
                d_gy = a @ b if ggb is None else torch.addmm(ggb, a, b)
                for a, b in rest:
                    d_gy = d_gy.addmm_(a, b)     # beta = 1: no separate sum
            elif ggb is not None:
                d_gy = ggb.expand(gy.shape)
        if need[1] and ggw is not None:
            d_xw = gy @ ggw
        if need[2] and ggx is not None:
            d_wm = gy.t() @ ggx
        return d_gy, d_xw, d_wm, None, None, None


class ConvTGemm(torch.autograd.Function):
    """y = a(col2im(rows wm) + bias): a transposed convolution as one matrix product and col2im, where a is the
    leaky ReLU of slope ``slope`` applied by col2im (none when slope is None). Its backward pass takes the output
    gradient's columns once per product (:class:`Im2ColPair`, with the bias gradient), so that in a second
    pass the two products' cotangents meet inside col2im instead of in a sum of column matrices."""

    @staticmethod
    def forward(ctx, rows, wm, bias, geom, slope=None):
        _mark_inputs(ctx, rows, wm, bias, geom, slope)
        act = slope is not None
        y = _col2im(rows @ wm, bias, geom, None, slope, act)
        ctx.geom, ctx.slope = geom, slope
        ctx.save_for_backward(rows, wm, y if act else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        rows, wm, y = ctx.saved_tensors
        n_rows, n_wm, n_b = _needed(ctx)[:3]
        if not (n_rows or n_wm):   # the bias gradient alone: no columns
            return None, None, _channel_sums(gy, y, ctx.slope) if n_b else None, None, None
        gc, gc_w, *gb = Im2ColPair.apply(gy, ctx.geom, y, ctx.slope, n_b)
        return (gc @ wm.t() if n_rows else None, rows.t() @ gc_w if n_wm else None,
                gb[0] if n_b else None, None, None)


def im2col(x: Tensor, kernel_size: int, stride: int, padding=(0, 0, 0, 0), layout: str = "pqc",
           slope=None) -> Tensor:
    """The patches of ``x`` [B, C, H, W] zero-padded by ``padding`` = (top, bottom, left, right), as a
    [B Ho Wo, k k C] matrix: row (b, i, j) holds x_pad[b, c, i s + p, j s + q] at column (p k + q) C + c
    (``layout="pqc"``, channel innermost) or (c k + p) k + q (``"cpq"``).

    With ``slope``: the patches of ``leaky_relu(x, slope)``, the activation computed on the fly.
    Differentiable to any order (:class:`Im2Col`); a Triton kernel on CUDA, a strided copy elsewhere.
    """
    if x.dim() != 4:
        raise ValueError(f"im2col expects an image batch [B, C, H, W], got shape {list(x.shape)}")
    g = _geometry(x.shape[-2:], kernel_size, stride, padding, layout)
    cols = Im2Col.apply(x, g, None if slope is None else x, None if slope is None else float(slope))
    return cols[:, :g.k * g.k * x.shape[1]]     # without ALIGN's zero columns


def col2im(cols: Tensor, size, kernel_size: int, stride: int, padding=(0, 0, 0, 0), bias=None,
           layout: str = "pqc", slope=None) -> Tensor:
    """The adjoint of :func:`im2col` for an image of spatial ``size`` (H, W) with the same ``padding`` and
    ``layout``: each image element sums the column entries that hold it (entries in the padding are dropped),
    plus ``bias`` [C] per channel. ``cols``: [B Ho Wo, k k C]. Returns [B, C, H, W] (through Triton an NCHW
    view of channels-last memory).

    With ``slope``: ``leaky_relu(col2im(cols) + bias, slope)``, the activation applied in the same pass.
    Differentiable to any order (:class:`Col2Im`); on CUDA one deterministic Triton kernel (gather form, bias
    fused), elsewhere ``unfold_backward`` per spatial axis.
    """
    g = _geometry(size, kernel_size, stride, padding, layout)
    if cols.dim() != 2 or cols.shape[1] % (g.k * g.k) or cols.shape[0] % (g.ho * g.wo):
        raise ValueError(f"col2im expects columns [B*{g.ho}*{g.wo}, C*{g.k * g.k}] for a {g.h}x{g.w} image "
                         f"(kernel {g.k}, stride {g.s}, padding {tuple(padding)}), got shape {list(cols.shape)}")
    if bias is not None and tuple(bias.shape) != (cols.shape[1] // (g.k * g.k),):
        raise ValueError(f"bias must have shape [{cols.shape[1] // (g.k * g.k)}], got {list(bias.shape)}")
    return _col2im_act(cols, bias, g, slope)


def _act_slope(slope):
    """The slope of a leaky ReLU fused into col2im as a float (None: none); it must be positive, for the output's
    sign stands for the pre-activation's only then (the derivative is masked at the output)."""
    if slope is None:
        return None
    if not slope > 0:
        raise ValueError(f"a leaky ReLU fused into col2im needs a positive slope, got {slope}")
    return float(slope)


def _col2im_act(cols: Tensor, bias, g: _Geom, slope) -> Tensor:
    slope = _act_slope(slope)
    if slope is None:
        return Col2Im.apply(cols, bias, g)
    return Col2Im.apply(cols, bias, g, None, slope, True)


def _weight_matrix(weight: Tensor, layout: str) -> Tensor:
    """[A, B, k, k] -> [A, k k B] in the column layout (a view for "cpq", and for "pqc" when the weight is
    channels-last, as numgan.models.set_conv_impl stores it; a copy otherwise), then zero columns up to the
    stored width of the column matrices (ALIGN; a small copy where k k B is not a multiple)."""
    wm = weight.permute(0, 2, 3, 1) if layout == "pqc" else weight
    wm = wm.reshape(weight.shape[0], -1)
    n = wm.shape[1]
    return wm if _width(n) == n else F.pad(wm, (0, _width(n) - n))


def conv2d_gemm(x: Tensor, weight: Tensor, bias, stride: int, padding=(0, 0, 0, 0), in_slope=None) -> Tensor:
    """F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride) as im2col and one 2-D matrix product.

    ``padding`` = (top, bottom, left, right) zeros are read inside im2col (no padded copy of ``x``). im2col
    (:func:`im2col`, layout ``COLS_LAYOUT``) writes [B Ho Wo, k k C] rows; ``F.unfold`` is avoided because its
    CUDA kernel is launched once per image. The bias is added in the GEMM (``addmm``). Every derivative is a
    matrix product, im2col or col2im. The output is an NCHW view of channels-last memory. With ``in_slope``
    the input is the pre-activation of a leaky ReLU, which im2col applies as it reads (the layer computes
    ``conv(leaky_relu(x, in_slope))``; its derivatives mask inside col2im / im2col: no activation kernels).
    With ``PAIR_COLUMNS`` the column matrix goes to the product and to its weight gradient as two handles
    (:class:`Im2ColPair`, :class:`Linear`): a second backward pass then adds their cotangents inside col2im.
    """
    b = x.shape[0]
    c_out, _, k, _ = weight.shape
    g = _geometry(x.shape[-2:], k, stride, padding, COLS_LAYOUT)
    m, slope = (None, None) if in_slope is None else (x, float(in_slope))
    wm = _weight_matrix(weight, g.layout)                                 # [O, k k C]
    if PAIR_COLUMNS:
        cols, cols_w = Im2ColPair.apply(x, g, m, slope)                   # [B Ho Wo, k k C], twice
        y = Linear.apply(cols, cols_w, wm, bias)                          # [B Ho Wo, O]
    else:
        cols = Im2Col.apply(x, g, m, slope)
        y = cols @ wm.t() if bias is None else torch.addmm(bias, cols, wm.t())
    return y.view(b, g.ho, g.wo, c_out).permute(0, 3, 1, 2)


def conv_transpose2d_gemm(x: Tensor, weight: Tensor, bias, stride: int, padding: int,
                          crop_after: int = 0, out_slope=None) -> Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding) as one 2-D matrix product and col2im.

    The full output ((H - 1) s + k) is cropped by ``padding`` on each side and by ``crop_after`` more at the
    end (bottom, right) inside col2im, which also adds the bias (:func:`col2im`: on CUDA one Triton kernel
    writing channels-last memory). The rows [B H W, C_in] are a free view of channels-last input. With
    ``out_slope``, col2im also applies a leaky ReLU (``leaky_relu(conv_transpose(x), out_slope)``).
    With ``PAIR_COLUMNS`` the layer is one Function (:class:`ConvTGemm`) whose backward pass takes the output
    gradient's columns twice, one handle per product, for the same reason.
    """
    b, c_in, h, w = x.shape
    _, c_out, k, _ = weight.shape
    hf, wf = (h - 1) * stride + k, (w - 1) * stride + k                  # the uncropped output
    size = (hf - 2 * padding - crop_after, wf - 2 * padding - crop_after)
    g = _geometry(size, k, stride, (padding, padding + crop_after, padding, padding + crop_after), COLS_LAYOUT)
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c_in)                # free for channels-last input
    wm = _weight_matrix(weight, g.layout)                                 # [C_in, k k O]
    if not PAIR_COLUMNS:
        return _col2im_act(rows @ wm, bias, g, out_slope)
    return ConvTGemm.apply(rows, wm, bias, g, _act_slope(out_slope))
