"""im2col / col2im of the GEMM convolutions (numgan.conv): the pure-torch path and the Triton kernels.

* In this process (the torch path on the CPU): Im2Col and Col2Im are adjoint, <col2im(c), x> = <c, im2col(x)>;
  gradcheck / gradgradcheck; conv2d_gemm and conv_transpose2d_gemm (with the SAME padding / crop folded in or
  not) equal torch's native convolutions in values, first derivatives and ConOpt's second derivatives.
* In a subprocess with TRITON_INTERPRET=1 (set before triton decorates the kernels, which happens when
  numgan.conv is imported, so it cannot be switched on in this process): the Triton kernels on CPU tensors
  equal the torch path in float64 for every strided layer of dcgan4_nobn at 32x32 and 64x64 and for odd
  sizes and channel counts, with NCHW / channels-last / transposed inputs; and the derivative checks above
  run again through the kernels. Running this file as a script does those checks.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from numgan import conv

HAS_TRITON = conv.triton is not None
NO_TRITON = "triton is not importable here: the Triton im2col/col2im kernels cannot be run (the torch path is tested)"

# (C_in, C_out, input size) of the strided layers of dcgan4_nobn (f = 64) at image size 32 and 64
_G_LAYERS = {32: [(512, 256, 2), (256, 128, 4), (128, 64, 8), (64, 3, 16)],
             64: [(512, 256, 4), (256, 128, 8), (128, 64, 16), (64, 3, 32)]}
_D_LAYERS = {32: [(3, 64, 32), (64, 128, 16), (128, 256, 8), (256, 512, 4)],
             64: [(3, 64, 64), (64, 128, 32), (128, 256, 16), (256, 512, 8)]}
SAME = (1, 2, 1, 2)   # TF 'SAME' padding of a 5x5 stride-2 conv on an even size (top, bottom, left, right)


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Checks shared by this process (torch path) and the interpreter subprocess (Triton path)
# ------------------------------------------------------------------------------------------------

def _check_adjoint():
    gen = torch.Generator().manual_seed(0)
    for (b, c, h, w, k, s, pad) in [(2, 3, 8, 8, 5, 2, SAME), (1, 4, 7, 9, 5, 2, (1, 2, 0, 3)),
                                    (2, 2, 6, 5, 3, 1, (1, 1, 1, 1)), (1, 3, 11, 11, 5, 2, (0, 0, 0, 0)),
                                    (1, 2, 5, 5, 2, 3, (0, 1, 2, 0))]:
        x = _rand(b, c, h, w, gen=gen)
        for layout in ("pqc", "cpq"):
            cols = conv.im2col(x, k, s, pad, layout)
            c_rand = _rand(*cols.shape, gen=gen)
            y = conv.col2im(c_rand, (h, w), k, s, pad, layout=layout)
            assert y.shape == x.shape
            lhs, rhs = (y * x).sum(), (c_rand * cols).sum()
            torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
            bias = _rand(c, gen=gen)
            torch.testing.assert_close(conv.col2im(c_rand, (h, w), k, s, pad, bias, layout),
                                       y + bias.view(1, -1, 1, 1), rtol=1e-13, atol=1e-13)
        # the two layouts differ by a permutation of each row
        a, b_ = conv.im2col(x, k, s, pad, "pqc"), conv.im2col(x, k, s, pad, "cpq")
        assert torch.equal(a.view(-1, k, k, c).permute(0, 3, 1, 2).reshape(b_.shape), b_)
        # masked by the leaky ReLU's derivative at m (fused activations): still adjoint; with m = x, the patches
        # of leaky_relu(x); col2im with a slope applies the activation after the bias
        g = conv._geometry((h, w), k, s, pad)
        m = _rand(b, c, h, w, gen=gen).contiguous(memory_format=torch.channels_last)
        cols_m = conv.Im2Col.apply(x, g, m, 0.2)
        c_rand = _rand(*cols_m.shape, gen=gen)
        y_m = conv.Col2Im.apply(c_rand, None, g, m, 0.2)
        torch.testing.assert_close((y_m * x).sum(), (c_rand * cols_m).sum(), rtol=1e-12, atol=1e-12)
        assert cols_m.shape[1] == conv._width(k * k * c) and not cols_m[:, k * k * c:].any()   # ALIGN's zeros
        c_rand = c_rand[:, :k * k * c]
        assert (y_m != conv.col2im(c_rand, (h, w), k, s, pad)).any()
        torch.testing.assert_close(conv.im2col(x, k, s, pad, slope=0.2), conv.im2col(F.leaky_relu(x, 0.2), k, s, pad),
                                   rtol=0, atol=0)
        bias = _rand(c, gen=gen)
        torch.testing.assert_close(conv.col2im(c_rand, (h, w), k, s, pad, bias, slope=0.2),
                                   F.leaky_relu(conv.col2im(c_rand, (h, w), k, s, pad, bias), 0.2), rtol=1e-13, atol=0)


def _check_gradcheck(fast_mode=False):
    gen = torch.Generator().manual_seed(1)

    def gradcheck(fn, inputs):
        return torch.autograd.gradcheck(fn, inputs, fast_mode=fast_mode)

    def gradgradcheck(fn, inputs):
        return torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast_mode)

    x = _rand(1, 2, 5, 6, gen=gen).requires_grad_()
    c = _rand(3 * 4, 2 * 9, gen=gen).requires_grad_()   # for a 5x6 image, k 3, s 2, padding (1, 1, 1, 2)
    bias = _rand(2, gen=gen).requires_grad_()
    pad = (1, 1, 1, 2)
    assert conv.im2col(x, 3, 2, pad).shape == c.shape
    assert gradcheck(lambda t: conv.im2col(t, 3, 2, pad), (x,))
    assert gradgradcheck(lambda t: conv.im2col(t, 3, 2, pad), (x,))
    assert gradcheck(lambda t, b: conv.col2im(t, (5, 6), 3, 2, pad, b), (c, bias))
    assert gradgradcheck(lambda t, b: conv.col2im(t, (5, 6), 3, 2, pad, b), (c, bias))
    assert gradgradcheck(lambda t, b: conv.col2im(t, (5, 6), 3, 2, pad, b, "cpq"), (c, bias))
    w = _rand(3, 2, 3, 3, gen=gen).requires_grad_()
    bw = _rand(3, gen=gen).requires_grad_()
    assert gradgradcheck(lambda a, b, d: conv.conv2d_gemm(a, b, d, 2, pad), (x, w, bw))
    wt = _rand(2, 3, 3, 3, gen=gen).requires_grad_()
    xt = _rand(1, 2, 3, 2, gen=gen).requires_grad_()
    assert gradgradcheck(lambda a, b, d: conv.conv_transpose2d_gemm(a, b, d, 2, 1, 1), (xt, wt, bw))
    # with the leaky ReLU fused in (piecewise linear: the random points are away from its kink)
    assert gradgradcheck(lambda a, b, d: conv.conv2d_gemm(a, b, d, 2, pad, in_slope=0.2), (x, w, bw))
    assert gradgradcheck(lambda a, b, d: conv.conv_transpose2d_gemm(a, b, d, 2, 1, 1, out_slope=0.2), (xt, wt, bw))
    # third derivatives (the first derivatives' gradgradcheck), through LinearGrad's and Im2ColPair's derivatives
    for fn, inputs in ((lambda a, b, d: conv.conv2d_gemm(a, b, d, 2, pad, in_slope=0.2), (x, w, bw)),
                       (lambda a, b, d: conv.conv_transpose2d_gemm(a, b, d, 2, 1, 1, out_slope=0.2), (xt, wt, bw))):
        def first(*t, fn=fn):
            y = fn(*t)
            return torch.autograd.grad((y * y).sum(), t, create_graph=True)
        assert gradgradcheck(first, inputs)
    # the paired pieces alone: the column matrix twice with its channel sums, masked; two column sources; the
    # matrix products' vector-Jacobian product
    g = conv._geometry((5, 6), 3, 2, pad)
    m = _rand(1, 2, 5, 6, gen=gen)
    c2 = _rand(3 * 4, 2 * 9, gen=gen).requires_grad_()
    gy, xw, wm = (_rand(6, 3, gen=gen).requires_grad_(), _rand(6, 4, gen=gen).requires_grad_(),
                  _rand(3, 4, gen=gen).requires_grad_())
    for fn, inputs in ((lambda t: conv.Im2ColPair.apply(t, g, m, 0.2, True), (x,)),
                       (lambda t: conv.Im2ColPair.apply(t, g), (x,)),
                       (lambda a, b, d: conv.Col2Im.apply(a, d, g, m, 0.2, False, b), (c, c2, bias)),
                       (lambda a, b, d: conv.LinearGrad.apply(a, b, d, True, True, True), (gy, xw, wm))):
        assert gradcheck(fn, inputs) and gradgradcheck(fn, inputs)
    # (gradcheck differentiates one output at a time: all cotangents at once, against torch's own products)
    cot = [_rand(6, 4, gen=gen), _rand(3, 4, gen=gen), _rand(3, gen=gen)]
    got = torch.autograd.grad(conv.LinearGrad.apply(gy, xw, wm, True, True, True), (gy, xw, wm), cot)
    ref = torch.autograd.grad((gy @ wm, gy.t() @ xw, gy.sum(0)), (gy, xw, wm), cot)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    cot = [_rand(4 * 3, conv._width(18), gen=gen) for _ in range(2)] + [_rand(2, gen=gen)]
    got = torch.autograd.grad(conv.Im2ColPair.apply(x, g, m, 0.2, True), x, cot)[0]
    ref = torch.autograd.grad((conv.Im2Col.apply(x, g, m, 0.2), torch.where(m > 0, x, 0.2 * x)), x,
                              (cot[0] + cot[1], cot[2].view(1, -1, 1, 1).expand_as(x)))[0]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def _mini_gan(gen):
    """A two-layer G (z [B, 4, 2, 2] -> 8x8, SAME deconvs) and a two-layer D (8x8 -> 2x2, SAME convs)."""
    shapes = [(4, 3, 5, 5), (3,), (3, 2, 5, 5), (2,), (3, 2, 5, 5), (3,), (2, 3, 5, 5), (2,)]
    params = [(0.3 * _rand(*s, gen=gen)).requires_grad_() for s in shapes]
    return params[:4], params[4:], _rand(3, 4, 2, 2, gen=gen), _rand(3, 2, 8, 8, gen=gen)


def _run_gan(impl, g_params, d_params, z, x):
    g1, gb1, g2, gb2 = g_params
    d1, db1, d2, db2 = d_params

    def deconv(t, w, b):
        if impl == "native":
            return F.conv_transpose2d(t, w, b, stride=2, padding=1)[..., :-1, :-1]
        if impl in ("gemm-folded", "gemm-fused"):   # padding and crop inside col2im
            return conv.conv_transpose2d_gemm(t, w, b, 2, 1, crop_after=1)
        return conv.conv_transpose2d_gemm(t, w, b, 2, 1)[..., :-1, :-1]   # as numgan.models calls it

    def conv2d(t, w, b):
        if impl == "native":
            return F.conv2d(F.pad(t, (1, 2, 1, 2)), w, b, stride=2)
        if impl in ("gemm-folded", "gemm-fused"):
            return conv.conv2d_gemm(t, w, b, 2, SAME)
        return conv.conv2d_gemm(F.pad(t, (1, 2, 1, 2)), w, b, 2)

    def G(t):
        if impl == "gemm-fused":   # the activations inside col2im / im2col (numgan.models.fuse_activations)
            return torch.tanh(deconv(conv.conv_transpose2d_gemm(t, g1, gb1, 2, 1, 1, out_slope=0.2), g2, gb2))
        return torch.tanh(deconv(F.leaky_relu(deconv(t, g1, gb1), 0.2), g2, gb2))

    def D(t):
        if impl == "gemm-fused":
            return conv.conv2d_gemm(conv2d(t, d1, db1), d2, db2, 2, SAME, in_slope=0.2).sum((1, 2, 3))
        return conv2d(F.leaky_relu(conv2d(t, d1, db1), 0.2), d2, db2).sum((1, 2, 3))

    d_fake = D(G(z))
    loss_d = F.softplus(-D(x)).mean() + F.softplus(d_fake).mean()
    loss_g = F.softplus(-d_fake).mean()
    v = list(torch.autograd.grad(loss_g, g_params, create_graph=True)) + \
        list(torch.autograd.grad(loss_d, d_params, create_graph=True))
    u = torch.autograd.grad(0.5 * sum((t * t).sum() for t in v), g_params + d_params)   # ConOpt: J^T v
    return [G(z).detach(), D(x).detach()] + [t.detach() for t in v] + list(u)


def _check_conopt_matches_native():
    gen = torch.Generator().manual_seed(2)
    g_params, d_params, z, x = _mini_gan(gen)
    ref = _run_gan("native", g_params, d_params, z, x)
    default = conv.COLS_LAYOUT
    try:
        for layout in ("pqc", "cpq"):
            conv.COLS_LAYOUT = layout
            for impl in ("gemm", "gemm-folded", "gemm-fused"):
                out = _run_gan(impl, g_params, d_params, z, x)
                assert len(out) == len(ref)
                for a, b in zip(out, ref):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        conv.COLS_LAYOUT = default
        conv.PAIR_COLUMNS = False   # the earlier form of the GEMM layers
        for a, b in zip(_run_gan("gemm-fused", g_params, d_params, z, x), ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    finally:
        conv.COLS_LAYOUT, conv.PAIR_COLUMNS = default, True
    assert all(t.abs().max() > 1e-6 for t in ref[-8:])   # second derivatives are non-trivial


def _check_values_against_torch_path():
    """Triton kernels vs the torch path, float64, every strided layer of dcgan4_nobn at 32 and 64, odd cases."""
    gen = torch.Generator().manual_seed(3)
    k, s = 5, 2

    def both(x=None, cols=None, size=None, pad=SAME, bias=None, layout="pqc", masks=False):
        """Triton vs torch; with ``masks`` also masked by a random mask source (channels-last, other strides
        than the data) and, for col2im, with the activation applied."""
        g = conv._geometry(size if x is None else x.shape[-2:], k, s, pad, layout)
        if x is not None:
            a, b = conv._im2col_triton(x, g), conv._im2col_torch(x, g)
            assert a.shape == b.shape and torch.equal(a, b), ("im2col", tuple(x.shape), pad)
            if masks:
                m = torch.randn(x.shape, generator=gen, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
                for src in (m, x):
                    a, b = conv._im2col_triton(x, g, src, 0.2), conv._im2col_torch(x, g, src, 0.2)
                    assert torch.equal(a, b), ("masked im2col", tuple(x.shape), pad)
        if cols is not None:
            a, b = conv._col2im_triton(cols, bias, g), conv._col2im_torch(cols, bias, g)
            assert a.shape == b.shape, ("col2im", a.shape, b.shape)
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
            # a second column source (Im2ColPair's derivative), laid out otherwise (transposed storage)
            cols2 = _rand(cols.shape[1], cols.shape[0], gen=gen).t()
            a2 = conv._col2im_triton(cols, bias, g, cols2=cols2)
            torch.testing.assert_close(a2, conv._col2im_torch(cols, bias, g, cols2=cols2), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(a2, conv._col2im_torch(cols + cols2, bias, g), rtol=1e-13, atol=1e-13)
            assert (a2 != a).any()
            if bias is not None:   # a strided bias (Im2ColPair's derivative passes a cotangent as the bias)
                sb = _rand(2 * bias.shape[0], gen=gen)[::2]
                torch.testing.assert_close(conv._col2im_triton(cols, sb, g, cols2=cols2),
                                           conv._col2im_torch(cols, sb, g, cols2=cols2), rtol=1e-13, atol=1e-13)
            if masks:
                m = torch.randn(b.shape, generator=gen, dtype=b.dtype)
                for kw in (dict(m=m), dict(act=True)):
                    a, b2 = conv._col2im_triton(cols, bias, g, slope=0.2, **kw), conv._col2im_torch(cols, bias, g, slope=0.2, **kw)
                    torch.testing.assert_close(a, b2, rtol=1e-13, atol=1e-13)
                    assert (a != b).any()
                    torch.testing.assert_close(conv._col2im_triton(cols, bias, g, slope=0.2, cols2=cols2, **kw),
                                               conv._col2im_torch(cols + cols2, bias, g, slope=0.2, **kw),
                                               rtol=1e-13, atol=1e-13)

    for size in (32, 64):
        for c_in, c_out, h in _G_LAYERS[size]:   # G: col2im (forward, bias, SAME crop), im2col (backward)
            cols = _rand(h * h, k * k * c_out, gen=gen)
            pad = (1, 2, 1, 2)   # crop 1 before, padding + crop_after = 2 after: output 2h
            both(cols=cols, size=(2 * h, 2 * h), pad=pad, bias=_rand(c_out, gen=gen), masks=size == 32)
            both(cols=cols, size=(2 * h + 1, 2 * h + 1), pad=(1, 1, 1, 1))   # crop_after left to the caller
            gy = _rand(1, 2 * h, 2 * h, c_out, gen=gen).permute(0, 3, 1, 2)   # channels-last gradient
            both(x=gy, pad=pad, masks=size == 32)
        for c_in, c_out, h in _D_LAYERS[size]:   # D: im2col (forward), col2im (backward)
            x = _rand(1, c_in, h, h, gen=gen)
            both(x=x, pad=SAME, masks=size == 32)
            both(x=F.pad(x, (1, 2, 1, 2)).contiguous(memory_format=torch.channels_last), pad=(0, 0, 0, 0))
            cols = _rand((h // 2) ** 2, k * k * c_in, gen=gen)
            both(cols=cols, size=(h, h), pad=SAME, masks=size == 32)
            both(cols=cols, size=(h + 3, h + 3), pad=(0, 0, 0, 0))
    # odd cases: sizes 4..32, C in {3, 64, 128}, 2 images, transposed (non-contiguous) columns; sizes 4 and 8
    # with the GPU's small tiles (partial position / channel / column blocks; larger ones cost minutes here)
    big = conv._TILE, conv._MAX_BLOCK_C, conv._MAX_BLOCK_J
    for h in (4, 8, 16, 32):
        conv._TILE, conv._MAX_BLOCK_C, conv._MAX_BLOCK_J = (2048, 64, 128) if h <= 8 else big
        for c in (3, 64, 128):
            x = _rand(2, c, h, h, gen=gen)
            both(x=x, pad=SAME)
            ho = h // 2
            cols_t = _rand(k * k * c, 2 * ho * ho, gen=gen).t()
            both(cols=cols_t, size=(h, h), pad=SAME, bias=_rand(c, gen=gen))
    # float32 (what training runs): the kernels accumulate in float32 like the torch path
    g = conv._geometry((16, 16), k, s, SAME)
    cols32, b32 = torch.randn(2 * 64, k * k * 64, generator=gen), torch.randn(64, generator=gen)
    torch.testing.assert_close(conv._col2im_triton(cols32, b32, g), conv._col2im_torch(cols32, b32, g))
    x32 = torch.randn(2, 64, 16, 16, generator=gen)
    assert torch.equal(conv._im2col_triton(x32, g), conv._im2col_torch(x32, g))
    # the channel-outermost column layout ("cpq") on a few shapes
    for c, h in ((3, 32), (64, 8), (128, 4)):
        x = _rand(2, c, h, h, gen=gen).contiguous(memory_format=torch.channels_last)
        both(x=x, pad=SAME, layout="cpq")
        both(cols=_rand(2 * (h // 2) ** 2, k * k * c, gen=gen), size=(h, h), pad=SAME, bias=_rand(c, gen=gen),
             layout="cpq")


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

def test_im2col_and_col2im_are_adjoint():
    _check_adjoint()


def test_gradcheck_and_gradgradcheck():
    _check_gradcheck()


def test_gemm_convolutions_match_native_values_and_conopt_second_derivatives():
    _check_conopt_matches_native()


def _column_sums(pair: bool) -> tuple:
    """Run the mini GAN's ConOpt gradient with the GEMM layers (PAIR_COLUMNS = ``pair``) and return the
    shapes of the additions of column matrices (2-D, [12 or 48 rows, 52 or 76 columns]; the weight matrices
    have 2-4 rows; the torch col2im's own sum of two sources stands for the Triton kernel's and is not counted) and of the
    matrix products computed during ``autograd.grad(L_G, generator parameters)``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    gen = torch.Generator().manual_seed(5)
    g_params, d_params, z, x = _mini_gan(gen)
    record = {"on": False, "adds": [], "mm": []}

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if record["on"] and name in ("add", "add_") and out.dim() == 2 and min(out.shape) >= 12:
                record["adds"].append(tuple(out.shape))
            if record["on"] == "g" and name in ("mm", "addmm", "addmm_"):
                record["mm"].append(tuple(out.shape))
            return out

    col2im_torch = conv._col2im_torch

    def quiet_col2im(*a, **k):
        on, record["on"] = record["on"], False
        try:
            return col2im_torch(*a, **k)
        finally:
            record["on"] = on

    saved = conv.PAIR_COLUMNS, conv._col2im_torch
    conv.PAIR_COLUMNS, conv._col2im_torch = pair, quiet_col2im
    try:
        g1, gb1, g2, gb2 = g_params
        d1, db1, d2, db2 = d_params
        G = lambda t: torch.tanh(conv.conv_transpose2d_gemm(  # noqa: E731
            conv.conv_transpose2d_gemm(t, g1, gb1, 2, 1, 1, out_slope=0.2), g2, gb2, 2, 1, 1))
        D = lambda t: conv.conv2d_gemm(conv.conv2d_gemm(t, d1, db1, 2, SAME), d2, db2, 2, SAME,  # noqa: E731
                                       in_slope=0.2).sum((1, 2, 3))
        with Spy():
            d_fake = D(G(z))
            loss_d = F.softplus(-D(x)).mean() + F.softplus(d_fake).mean()
            record["on"] = "g"
            u = list(torch.autograd.grad(F.softplus(-d_fake).mean(), g_params, create_graph=True))
            record["on"] = True
            u += list(torch.autograd.grad(loss_d, d_params, create_graph=True))
            torch.autograd.grad(u, g_params + d_params, grad_outputs=[t.detach() for t in u])
    finally:
        conv.PAIR_COLUMNS, conv._col2im_torch = saved
    return record["adds"], record["mm"]


def test_conopt_adds_no_column_matrices_and_skips_unrequested_weight_gradients():
    """With PAIR_COLUMNS the second backward pass sums no column matrix as a tensor (their two cotangents meet in
    col2im); in the earlier form it does. And the generator's gradient pass computes no discriminator weight
    gradient (D's weight matrices: [3, 52] and [2, 76]; G's are [4, 76] and [3, 52]), as torch's own nodes do
    not."""
    adds, mm = _column_sums(pair=True)
    assert adds == [], adds
    assert (2, 76) not in mm and mm.count((3, 52)) == 1, mm
    assert (4, 76) in mm   # G's weight gradients are computed
    adds_before, _ = _column_sums(pair=False)
    assert len(adds_before) >= 4, adds_before


def test_transposed_gemm_layer_gives_the_bias_gradient_alone():
    """ConvTGemm's backward pass when only the bias gradient is asked for (no columns), with and without the
    fused leaky ReLU, against the native transposed convolution."""
    gen = torch.Generator().manual_seed(6)
    x, w, b = (_rand(2, 4, 3, 3, gen=gen).requires_grad_(), _rand(4, 3, 5, 5, gen=gen).requires_grad_(),
               _rand(3, gen=gen).requires_grad_())
    r = _rand(2, 3, 6, 6, gen=gen)
    for slope in (None, 0.2):
        y = conv.conv_transpose2d_gemm(x, w, b, 2, 1, 1, out_slope=slope)
        y_ref = F.conv_transpose2d(x, w, b, stride=2, padding=1)[..., :-1, :-1]
        y_ref = y_ref if slope is None else F.leaky_relu(y_ref, slope)
        got, = torch.autograd.grad((y * r).sum(), [b])
        torch.testing.assert_close(got, torch.autograd.grad((y_ref * r).sum(), [b])[0], rtol=1e-12, atol=1e-12)


def test_linear_needs_the_same_column_matrix_twice():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="same column matrix"):
        conv.Linear.apply(x, x.clone(), torch.randn(3, 4), None)
    torch.testing.assert_close(conv.Linear.apply(x, x.view_as(x), torch.eye(3, 4), None), x[:, :3])


def test_cpu_uses_the_torch_path_and_bad_shapes_raise():
    x = torch.randn(2, 3, 8, 8)
    assert not conv._use_triton(x, x.numel()) or conv._INTERPRET
    with pytest.raises(ValueError, match="image batch"):
        conv.im2col(x[0], 5, 2)
    with pytest.raises(ValueError, match="does not fit"):
        conv.im2col(x, 9, 2)
    with pytest.raises(ValueError, match="padding"):
        conv.im2col(x, 5, 2, (1, 2))
    with pytest.raises(ValueError, match="col2im expects columns"):
        conv.col2im(torch.randn(10, 75), (8, 8), 5, 2, SAME)
    with pytest.raises(ValueError, match="layout"):
        conv.im2col(x, 5, 2, SAME, "qpc")
    with pytest.raises(ValueError, match="bias"):
        conv.col2im(torch.randn(2 * 16, 75), (8, 8), 5, 2, SAME, bias=torch.randn(4))


def _interpret(part: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), part], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0 and f"ok {part}" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_triton_kernels_equal_the_torch_path_under_the_interpreter():
    _interpret("values")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_triton_path_derivatives_under_the_interpreter():
    _interpret("derivatives")


def _main(part: str) -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: the kernels run on CPU tensors."""
    assert conv._INTERPRET and conv.triton is not None, "run with TRITON_INTERPRET=1 and triton installed"
    calls = {"im2col": 0, "col2im": 0}
    im2col_triton, col2im_triton = conv._im2col_triton, conv._col2im_triton

    def count_im2col(*a, **k):
        calls["im2col"] += 1
        return im2col_triton(*a, **k)

    def count_col2im(*a, **k):
        calls["col2im"] += 1
        return col2im_triton(*a, **k)

    conv._im2col_triton, conv._col2im_triton = count_im2col, count_col2im
    # few, large programs: the interpreter runs them one after the other
    conv._TILE, conv._MAX_BLOCK_C, conv._MAX_BLOCK_J = 1 << 16, 512, 2048
    if part == "values":
        _check_values_against_torch_path()
    elif part == "derivatives":
        _check_adjoint()
        _check_gradcheck(fast_mode=True)   # (full mode: one kernel launch per Jacobian row, minutes here)
        _check_conopt_matches_native()
    else:
        raise SystemExit(f"unknown part {part!r}; use 'values' or 'derivatives'")
    assert calls["im2col"] > 0 and calls["col2im"] > 0, calls   # the Triton path really ran
    print(f"ok {part}", calls)


if __name__ == "__main__":
    _main(sys.argv[1] if len(sys.argv) > 1 else "values")
