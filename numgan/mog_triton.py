"""The MoG game step in Triton kernels that keep the networks on-chip (issue 4, target 2).

The same algebra as numgan.mog_fused (read its module docstring first): u = (grad_theta L_G, grad_phi L_D)
and the ConOpt direction u + gamma J_u^T u (paper Eq. 16-17) with J_u^T u = H_{L_G} (u_theta, 0) +
H_{L_D} (0, u_phi), objective ``standard``, for S independent runs at once. numgan.mog_fused writes every
activation of every seed to GPU memory between ~130 batched matrix products of inner size 16, which makes
it memory-bound (~2.7 ms per step at 256 seeds on an H100). Here a program owns one seed and a share of
its minibatch rows and walks over tiles of T rows; a tile's activations, deltas and tangents live in
registers and the parameter sums accumulate on-chip:

* ``_grad_kernel``  pass 1: forward G, D on the real and fake rows, backward; partial sums of u and of
  the two losses per program.
* pass 2 (ConOpt only; it needs the complete u, hence separate kernels): push the tangent t = u forward
  through G and D and back again (forward-over-reverse), recomputing the tile's forward pass and primal
  deltas, and accumulate H_{L_G}(t_theta, 0) + H_{L_D}(0, t_phi). It is split in three kernels so that
  each holds few tiles at once: ``_hvp_real_kernel`` (real rows, D's block), ``_hvp_fake_kernel`` (fake
  rows, D's block; hands two 2-vectors per row to the next kernel) and ``_hvp_g_kernel`` (G's block).
  With one program per seed the last two write u + gamma J_u^T u directly.

Per-row notation (rows are samples): G's layer l maps a_l -> h_l = a_l W_l + b_l, a_{l+1} = relu(h_l),
a_0 = z and x_fake = h_4; D's layer l maps e_l -> e_l V_l + c_l, e_0 = x, logit d = e_4 V_4 + c_4.
The 16-wide layers are [T, 16] x [16, 16] products (``tl.dot``). The narrow ones are not padded to that
shape: a point x (2 columns), a logit (1 column) and their deltas and tangents are [T] vectors, and
their products are outer products and row sums (``_outer``, ``_rowdot``). As 16 x 16 products they were
49 of the four kernels' ~165 products and mostly zeros; without them the kernels compile to 25% fewer
multiply-adds and shared-memory loads and spill 23-71% fewer bytes in the float32 setting (tile 16, 4 warps;
benchmarks/sass_mog_triton.py).
Primal deltas (dL/d(layer output)): on real rows delta (L_D); on fake rows beta is the backprop of a
unit logit delta, so the L_D delta is beta sigma/B and the L_G delta beta (sigma - 1)/B (the two losses
differ only in their derivative at the logit); gamma_l are G's deltas of L_G. The fake rows carry two
tangents: the D-parameter tangent of H_{L_D}(0, t_phi) ("phi chain") and the input tangent x' of
H_{L_G}(t_theta, 0) ("x chain"); both losses have curvature sigma (1 - sigma)/B at the logit, so the
two chains share one tangent backward.

The row sums run in a fixed order within a program and the per-program partials are added by torch, so
results are deterministic (bit-identical reruns); they equal numgan.mog_fused up to float rounding
(tests/test_mog_triton.py compares them in float64 with Triton's CPU interpreter).

Precision. Matrix products use ``tl.dot`` with ``input_precision`` (``PRECISIONS``). The default "ieee" is
float32 FMA arithmetic, the function the torch engines compute (torch's float32 matmuls on CUDA do not use
TF32 unless asked): on an H100 its ConOpt direction is as close to float64 as numgan.mog_fused's (relative
error 4.2e-5 on a 256-seed batch), and a graphed ConOpt step of 256 seeds takes 1.28-1.32 ms (194k-200k
seed-steps/s on two H100 machines; numgan.mog_fused: 2.7-2.8 ms). "tf32" (tensor cores, 10-bit mantissa
operands) is a precision change, opt-in: 0.85 ms (~300k seed-steps/s) at a relative error of 1e-2 per
direction, which left 20k-step training outcomes unchanged in a 64-seed comparison. "tf32x3" (float32 accuracy from three TF32 products)
spilled registers and ran at ~60k. Numbers: benchmarks/results/bench_mog-cuda.md. Under Triton's
interpreter (tests) every product is exact numpy arithmetic in the input dtype. All these times are from
before the narrow layers became row operations; they are not yet timed after it.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._triton import INTERPRET as _INTERPRET, tl, triton  # None without Triton: the torch engines run
from .mog_fused import N_PARAMS, X_DIM, Z_DIM

PRECISIONS = ("ieee", "tf32x3", "tf32")


def available() -> bool:
    """True when Triton is importable (kernels run on CUDA tensors, or on CPU tensors under
    ``TRITON_INTERPRET=1``, Triton's interpreter, which the tests use)."""
    return triton is not None


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return available() and _INTERPRET


if triton is not None:
    # ------------------------------------------------------------------------------------------------
    # helpers. Hidden layers are [16, 16] blocks and a tile's activations [T, 16] blocks (product with
    # tl.dot). The three narrow layers are never padded to 16 x 16 products: D's input layer (2 -> 16)
    # and G's output layer (16 -> 2) work on two [T] columns (the 2-D points), D's logit layer (16 -> 1)
    # on one; their products are outer products and row sums (_outer, _rowdot), and their parameter
    # sums accumulate as [T, 16] / [T] partials summed over the rows once per program (the G kernel sums
    # its output layer's per tile into [16] vectors: fewer spills there), then go out through _putG / _putD.
    # ------------------------------------------------------------------------------------------------
    @triton.jit
    def _ld(p, OFF: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr):
        """Layer block at flat offset OFF: weight [IN, OUT] (row-major) then bias [OUT], padded to 16."""
        i = tl.arange(0, 16)[:, None]
        j = tl.arange(0, 16)[None, :]
        w = tl.load(p + OFF + i * OUT + j, mask=(i < IN) & (j < OUT), other=0.0)
        c = tl.arange(0, 16)
        b = tl.load(p + OFF + IN * OUT + c, mask=c < OUT, other=0.0)
        return w, b

    @triton.jit
    def _ld_in2(p, OFF: tl.constexpr):
        """Layer 2 -> 16 at OFF (D's first): its two weight rows and its bias, each [16]."""
        c = tl.arange(0, 16)
        return tl.load(p + OFF + c), tl.load(p + OFF + 16 + c), tl.load(p + OFF + 32 + c)

    @triton.jit
    def _ld_out2(p, OFF: tl.constexpr):
        """Layer 16 -> 2 at OFF (G's last): its two weight columns [16] and its two biases (scalars)."""
        r = tl.arange(0, 16)
        return tl.load(p + OFF + 2 * r), tl.load(p + OFF + 2 * r + 1), tl.load(p + OFF + 32), tl.load(p + OFF + 33)

    @triton.jit
    def _ld_out1(p, OFF: tl.constexpr):
        """Layer 16 -> 1 at OFF (D's last): its weight column [16] and its bias (scalar)."""
        r = tl.arange(0, 16)
        return tl.load(p + OFF + r), tl.load(p + OFF + 16)

    @triton.jit
    def _ldG(p):
        """G's layers at p: four hidden blocks (weight, bias), then the output layer's columns and biases."""
        W0, b0 = _ld(p, 0, 16, 16)
        W1, b1 = _ld(p, 272, 16, 16)
        W2, b2 = _ld(p, 544, 16, 16)
        W3, b3 = _ld(p, 816, 16, 16)
        w4a, w4b, b4a, b4b = _ld_out2(p, 1088)
        return W0, b0, W1, b1, W2, b2, W3, b3, w4a, w4b, b4a, b4b

    @triton.jit
    def _ldD(p):
        """D's layers at p: the input layer's rows and bias, three hidden blocks, the logit column and bias."""
        v0a, v0b, c0 = _ld_in2(p, 1122)
        V1, c1 = _ld(p, 1170, 16, 16)
        V2, c2 = _ld(p, 1442, 16, 16)
        V3, c3 = _ld(p, 1714, 16, 16)
        v4, c4 = _ld_out1(p, 1986)
        return v0a, v0b, c0, V1, c1, V2, c2, V3, c3, v4, c4

    @triton.jit
    def _zeros4(P):
        """Four zero [16, 16] blocks and [16] vectors, interleaved (accumulators of four layers)."""
        w = tl.zeros([16, 16], P.dtype.element_ty)
        b = tl.zeros([16], P.dtype.element_ty)
        return w, b, w, b, w, b, w, b

    @triton.jit
    def _rmsprop(x, ms, offs, m, g, lr, decay, omd, eps):
        """TF-1 RMSProp on the entries ``offs`` (mask m) of one seed's parameters x and mean squares ms, with
        direction g: ms <- decay ms + (1 - decay) g^2, x <- x - lr g / sqrt(ms + eps) (numgan.rmsprop;
        ``omd`` = 1 - decay, rounded on the host as torch rounds it). Both are loaded before either is stored."""
        v = tl.load(ms + offs, mask=m, other=1.0)
        w = tl.load(x + offs, mask=m, other=0.0)
        v = v * decay + omd * (g * g)
        if v.dtype == tl.float32:   # IEEE-rounded root and quotient, in addcdiv's form w - lr * (g / den)
            d = lr * tl.div_rn(g, tl.sqrt_rn(v + eps))
        else:                       # float64 (the interpreter's tests)
            d = lr * (g / tl.sqrt(v + eps))
        tl.store(ms + offs, v, mask=m)
        tl.store(x + offs, w - d, mask=m)

    @triton.jit
    def _put(o, q, OFF: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr, w, b, gam,
             ADD: tl.constexpr, FINAL: tl.constexpr, x, ms, lr, decay, omd, eps, OPT: tl.constexpr):
        """Write a layer block (w, b) at o: with ADD, first add what o holds (an earlier kernel's part); with
        FINAL, write u + gam * (w, b) instead, u read from q (the finished ConOpt direction). With OPT, apply
        the RMSProp update (:func:`_rmsprop`) with that block to the seed's parameters x and mean squares ms
        in place instead of writing o."""
        i = tl.arange(0, 16)[:, None]
        j = tl.arange(0, 16)[None, :]
        c = tl.arange(0, 16)
        mw = (i < IN) & (j < OUT)
        mb = c < OUT
        if ADD:
            w = w + tl.load(o + OFF + i * OUT + j, mask=mw, other=0.0)
            b = b + tl.load(o + OFF + IN * OUT + c, mask=mb, other=0.0)
        if FINAL:
            w = tl.load(q + OFF + i * OUT + j, mask=mw, other=0.0) + gam * w
            b = tl.load(q + OFF + IN * OUT + c, mask=mb, other=0.0) + gam * b
        if OPT:
            _rmsprop(x, ms, OFF + i * OUT + j, mw, w, lr, decay, omd, eps)
            _rmsprop(x, ms, OFF + IN * OUT + c, mb, b, lr, decay, omd, eps)
        else:
            tl.store(o + OFF + i * OUT + j, w, mask=mw)
            tl.store(o + OFF + IN * OUT + c, b, mask=mb)

    @triton.jit
    def _putG(o, q, W0, b0, W1, b1, W2, b2, W3, b3, w4a, w4b, b4a, b4b, gam, ADD: tl.constexpr,
              FINAL: tl.constexpr, x, ms, lr, decay, omd, eps, OPT: tl.constexpr):
        """G's five layer blocks through :func:`_put`; the output layer as its two weight columns [16] and
        biases (scalars)."""
        _put(o, q, 0, 16, 16, W0, b0, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)
        _put(o, q, 272, 16, 16, W1, b1, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)
        _put(o, q, 544, 16, 16, W2, b2, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)
        _put(o, q, 816, 16, 16, W3, b3, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)
        j = tl.arange(0, 16)[None, :]
        c = tl.arange(0, 16)
        W4 = tl.where(j == 0, w4a[:, None], tl.where(j == 1, w4b[:, None], 0.0))
        b4 = tl.where(c == 0, b4a, tl.where(c == 1, b4b, 0.0))
        _put(o, q, 1088, 16, 2, W4, b4, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)

    @triton.jit
    def _putD(o, q, v0a, v0b, c0, V1, c1, V2, c2, V3, c3, v4, c4, gam, ADD: tl.constexpr, FINAL: tl.constexpr,
              x, ms, lr, decay, omd, eps, OPT: tl.constexpr):
        """D's five layer blocks through :func:`_put`; the input layer as its two weight rows [16] and bias,
        the logit layer as its weight column [16] and bias (scalar)."""
        i = tl.arange(0, 16)[:, None]
        j = tl.arange(0, 16)[None, :]
        c = tl.arange(0, 16)
        V0 = tl.where(i == 0, v0a[None, :], tl.where(i == 1, v0b[None, :], 0.0))
        _put(o, q, 1122, 2, 16, V0, c0, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)
        _put(o, q, 1170, 16, 16, V1, c1, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)
        _put(o, q, 1442, 16, 16, V2, c2, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)
        _put(o, q, 1714, 16, 16, V3, c3, gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)
        V4 = tl.where(j == 0, v4[:, None], 0.0)
        _put(o, q, 1986, 16, 1, V4, tl.where(c == 0, c4, 0.0), gam, ADD, FINAL, x, ms, lr, decay, omd, eps, OPT)

    @triton.jit
    def _mm(a, b, PREC: tl.constexpr):
        return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _mmT(a, b, PREC: tl.constexpr):
        """a^T b (a parameter-gradient block: sum over the tile's rows)."""
        return tl.dot(tl.trans(a), b, input_precision=PREC)

    @triton.jit
    def _mmBT(a, b, PREC: tl.constexpr):
        """a b^T (backprop through a weight)."""
        return tl.dot(a, tl.trans(b), input_precision=PREC)

    @triton.jit
    def _lin(a, w, b, PREC: tl.constexpr):
        return _mm(a, w, PREC) + b[None, :]

    @triton.jit
    def _rowdot(a, w):
        """a w for a [T, 16] block and a [16] vector: [T] (a product with one output column)."""
        return tl.sum(a * w[None, :], axis=1)

    @triton.jit
    def _outer(v, w):
        """v w^T for v [T] and w [16]: [T, 16] (a product with one input column)."""
        return v[:, None] * w[None, :]

    @triton.jit
    def _relu(h):
        return tl.maximum(h, 0.0)

    @triton.jit
    def _on(g, a):
        """g where the ReLU output a is positive (threshold_backward), else 0."""
        return tl.where(a > 0.0, g, 0.0)

    @triton.jit
    def _softplus(x):
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _hidden(x, W0, b0, W1, b1, W2, b2, W3, b3, PREC: tl.constexpr):
        """G's four hidden ReLU layers on rows x [T, 16]: their outputs (the inputs of layers 1-4)."""
        h1 = _relu(_lin(x, W0, b0, PREC))
        h2 = _relu(_lin(h1, W1, b1, PREC))
        h3 = _relu(_lin(h2, W2, b2, PREC))
        h4 = _relu(_lin(h3, W3, b3, PREC))
        return h1, h2, h3, h4

    @triton.jit
    def _hiddenD(x0, x1, v0a, v0b, c0, V1, c1, V2, c2, V3, c3, PREC: tl.constexpr):
        """D's four hidden ReLU layers on the points (x0, x1) [T]: their outputs (the inputs of layers 1-4)."""
        h1 = _relu(_outer(x0, v0a) + _outer(x1, v0b) + c0[None, :])
        h2 = _relu(_lin(h1, V1, c1, PREC))
        h3 = _relu(_lin(h2, V2, c2, PREC))
        h4 = _relu(_lin(h3, V3, c3, PREC))
        return h1, h2, h3, h4

    @triton.jit
    def _load_rows(ptr, s, B, rows, rmask, WIDTH: tl.constexpr):
        cols = tl.arange(0, 16)[None, :]
        return tl.load(ptr + (s * B + rows)[:, None] * WIDTH + cols, mask=rmask[:, None] & (cols < WIDTH), other=0.0)

    @triton.jit
    def _load_col(ptr, s, B, rows, rmask, COL: tl.constexpr):
        """Column COL of rows of a [S, B, 2] tensor: [T] (0 on rows outside rmask)."""
        return tl.load(ptr + (s * B + rows) * 2 + COL, mask=rmask, other=0.0)

    # ------------------------------------------------------------------------------------------------
    # pass 1: u and the losses
    # ------------------------------------------------------------------------------------------------
    @triton.jit
    def _grad_kernel(P, XR, Z, OUT, LOSS, S, B, rows_per_prog, inv_b,
                     T: tl.constexpr, PREC: tl.constexpr, RELOAD: tl.constexpr):
        s = tl.program_id(0)
        k = tl.program_id(1)
        p = P + s * 2003
        ty = P.dtype.element_ty
        if not RELOAD:
            W0, b0, W1, b1, W2, b2, W3, b3, w4a, w4b, b4a, b4b = _ldG(p)
            v0a, v0b, c0, V1, c1, V2, c2, V3, c3, v4, c4 = _ldD(p)
        gW0, gb0, gW1, gb1, gW2, gb2, gW3, gb3 = _zeros4(P)
        gV1, gc1, gV2, gc2, gV3, gc3, _w, gc0 = _zeros4(P)
        gW4a = tl.zeros([T, 16], ty)   # row partials of the narrow layers' sums
        gW4b = tl.zeros([T, 16], ty)
        gb4a = tl.zeros([T], ty)
        gb4b = tl.zeros([T], ty)
        gV0a = tl.zeros([T, 16], ty)
        gV0b = tl.zeros([T, 16], ty)
        gV4 = tl.zeros([T, 16], ty)
        gc4 = tl.zeros([T], ty)
        sum_ld = tl.zeros([T], ty)
        sum_lg = tl.zeros([T], ty)
        start = k * rows_per_prog
        stop = tl.minimum(start + rows_per_prog, B)
        for r0 in range(start, stop, T):
            if RELOAD:
                W0, b0, W1, b1, W2, b2, W3, b3, w4a, w4b, b4a, b4b = _ldG(p)
                v0a, v0b, c0, V1, c1, V2, c2, V3, c3, v4, c4 = _ldD(p)
            rows = r0 + tl.arange(0, T)
            rmask = rows < stop
            live = tl.where(rmask, inv_b, 0.0)  # 1/B on real rows of this tile, 0 on padding rows
            # ---- real rows: D forward, L_D backward ----
            x0 = _load_col(XR, s, B, rows, rmask, 0)
            x1 = _load_col(XR, s, B, rows, rmask, 1)
            e1, e2, e3, e4 = _hiddenD(x0, x1, v0a, v0b, c0, V1, c1, V2, c2, V3, c3, PREC)
            d = _rowdot(e4, v4) + c4
            sum_ld += tl.where(rmask, _softplus(-d), 0.0)
            dd = (tl.sigmoid(d) - 1.0) * live   # L_D's delta at the logit [T]
            gV4 += e4 * dd[:, None]
            gc4 += dd
            dl = _on(_outer(dd, v4), e4)
            gV3 += _mmT(e3, dl, PREC)
            gc3 += tl.sum(dl, axis=0)
            dl = _on(_mmBT(dl, V3, PREC), e3)
            gV2 += _mmT(e2, dl, PREC)
            gc2 += tl.sum(dl, axis=0)
            dl = _on(_mmBT(dl, V2, PREC), e2)
            gV1 += _mmT(e1, dl, PREC)
            gc1 += tl.sum(dl, axis=0)
            dl = _on(_mmBT(dl, V1, PREC), e1)
            gV0a += dl * x0[:, None]
            gV0b += dl * x1[:, None]
            gc0 += tl.sum(dl, axis=0)
            # ---- G forward: the fake points (fx, fy) ----
            a0 = _load_rows(Z, s, B, rows, rmask, 16)
            a1, a2, a3, a4 = _hidden(a0, W0, b0, W1, b1, W2, b2, W3, b3, PREC)
            fx = _rowdot(a4, w4a) + b4a
            fy = _rowdot(a4, w4b) + b4b
            # ---- fake rows: D forward; beta = backprop of a unit logit delta ----
            f1, f2, f3, f4 = _hiddenD(fx, fy, v0a, v0b, c0, V1, c1, V2, c2, V3, c3, PREC)
            d = _rowdot(f4, v4) + c4
            sum_ld += tl.where(rmask, _softplus(d), 0.0)
            sum_lg += tl.where(rmask, _softplus(-d), 0.0)
            sig = tl.sigmoid(d)
            s_d = sig * live           # L_D delta = beta * s_d
            s_g = (sig - 1.0) * live   # L_G delta = beta * s_g
            sd = s_d[:, None]
            gV4 += f4 * sd
            gc4 += s_d
            bt = _on(v4[None, :] + tl.zeros_like(f4), f4)
            gV3 += _mmT(f3, bt * sd, PREC)
            gc3 += tl.sum(bt * sd, axis=0)
            bt = _on(_mmBT(bt, V3, PREC), f3)
            gV2 += _mmT(f2, bt * sd, PREC)
            gc2 += tl.sum(bt * sd, axis=0)
            bt = _on(_mmBT(bt, V2, PREC), f2)
            gV1 += _mmT(f1, bt * sd, PREC)
            gc1 += tl.sum(bt * sd, axis=0)
            bt = _on(_mmBT(bt, V1, PREC), f1)
            gV0a += bt * (fx * s_d)[:, None]
            gV0b += bt * (fy * s_d)[:, None]
            gc0 += tl.sum(bt * sd, axis=0)
            # ---- G backward of L_G from dL_G/dx_fake = (gx, gy) ----
            bg = bt * s_g[:, None]
            gx = _rowdot(bg, v0a)
            gy = _rowdot(bg, v0b)
            gW4a += a4 * gx[:, None]
            gW4b += a4 * gy[:, None]
            gb4a += gx
            gb4b += gy
            gl = _on(_outer(gx, w4a) + _outer(gy, w4b), a4)
            gW3 += _mmT(a3, gl, PREC)
            gb3 += tl.sum(gl, axis=0)
            gl = _on(_mmBT(gl, W3, PREC), a3)
            gW2 += _mmT(a2, gl, PREC)
            gb2 += tl.sum(gl, axis=0)
            gl = _on(_mmBT(gl, W2, PREC), a2)
            gW1 += _mmT(a1, gl, PREC)
            gb1 += tl.sum(gl, axis=0)
            gl = _on(_mmBT(gl, W1, PREC), a1)
            gW0 += _mmT(a0, gl, PREC)
            gb0 += tl.sum(gl, axis=0)
        o = OUT + (k * S + s) * 2003
        _putG(o, o, gW0, gb0, gW1, gb1, gW2, gb2, gW3, gb3, tl.sum(gW4a, axis=0), tl.sum(gW4b, axis=0),
              tl.sum(gb4a, axis=0), tl.sum(gb4b, axis=0), 0.0, False, False,
              o, o, 0.0, 0.0, 0.0, 0.0, False)
        _putD(o, o, tl.sum(gV0a, axis=0), tl.sum(gV0b, axis=0), gc0, gV1, gc1, gV2, gc2, gV3, gc3,
              tl.sum(gV4, axis=0), tl.sum(gc4, axis=0), 0.0, False, False,
              o, o, 0.0, 0.0, 0.0, 0.0, False)
        lo = LOSS + (k * S + s) * 2
        tl.store(lo, tl.sum(sum_ld, axis=0) * inv_b)
        tl.store(lo + 1, tl.sum(sum_lg, axis=0) * inv_b)

    # ------------------------------------------------------------------------------------------------
    # pass 2: J_u^T u (forward-over-reverse along t = u), in three kernels with small live sets
    # (one kernel holding everything spilled registers and ran ~10x slower on an H100)
    # ------------------------------------------------------------------------------------------------
    @triton.jit
    def _hvp_real_kernel(P, U, XR, OUT, S, B, rows_per_prog, inv_b,
                         T: tl.constexpr, PREC: tl.constexpr, RELOAD: tl.constexpr):
        """Real rows: the D-parameter part of H_{L_D}(0, t_phi); writes D's block of OUT (partial)."""
        s = tl.program_id(0)
        k = tl.program_id(1)
        p = P + s * 2003
        q = U + s * 2003
        ty = P.dtype.element_ty
        if not RELOAD:
            v0a, v0b, c0, V1, c1, V2, c2, V3, c3, v4, c4 = _ldD(p)
            tv0a, tv0b, tc0, tV1, tc1, tV2, tc2, tV3, tc3, tv4, tc4 = _ldD(q)
        hV1, hc1, hV2, hc2, hV3, hc3, _w, hc0 = _zeros4(P)
        hV0a = tl.zeros([T, 16], ty)
        hV0b = tl.zeros([T, 16], ty)
        hV4 = tl.zeros([T, 16], ty)
        hc4 = tl.zeros([T], ty)
        start = k * rows_per_prog
        stop = tl.minimum(start + rows_per_prog, B)
        for r0 in range(start, stop, T):
            if RELOAD:
                v0a, v0b, c0, V1, c1, V2, c2, V3, c3, v4, c4 = _ldD(p)
                tv0a, tv0b, tc0, tV1, tc1, tV2, tc2, tV3, tc3, tv4, tc4 = _ldD(q)
            rows = r0 + tl.arange(0, T)
            rmask = rows < stop
            live = tl.where(rmask, inv_b, 0.0)
            x0 = _load_col(XR, s, B, rows, rmask, 0)
            x1 = _load_col(XR, s, B, rows, rmask, 1)
            e1, e2, e3, e4 = _hiddenD(x0, x1, v0a, v0b, c0, V1, c1, V2, c2, V3, c3, PREC)
            sig = tl.sigmoid(_rowdot(e4, v4) + c4)
            # tangent forward (D-parameter tangent)
            te1 = _on(_outer(x0, tv0a) + _outer(x1, tv0b) + tc0[None, :], e1)
            te2 = _on(_mm(te1, V1, PREC) + _lin(e1, tV1, tc1, PREC), e2)
            te3 = _on(_mm(te2, V2, PREC) + _lin(e2, tV2, tc2, PREC), e3)
            te4 = _on(_mm(te3, V3, PREC) + _lin(e3, tV3, tc3, PREC), e4)
            td = _rowdot(te4, v4) + _rowdot(e4, tv4) + tc4
            tdd = td * sig * (1.0 - sig) * live   # tangent of the logit delta [T]
            dd = (sig - 1.0) * live               # the primal logit delta [T]
            # tangent backward, with the primal deltas dl computed alongside (fewer live tiles)
            hV4 += e4 * tdd[:, None] + te4 * dd[:, None]
            hc4 += tdd
            dt = _on(_outer(tdd, v4) + _outer(dd, tv4), e4)
            dl = _on(_outer(dd, v4), e4)
            hV3 += _mmT(e3, dt, PREC) + _mmT(te3, dl, PREC)
            hc3 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, V3, PREC) + _mmBT(dl, tV3, PREC), e3)
            dl = _on(_mmBT(dl, V3, PREC), e3)
            hV2 += _mmT(e2, dt, PREC) + _mmT(te2, dl, PREC)
            hc2 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, V2, PREC) + _mmBT(dl, tV2, PREC), e2)
            dl = _on(_mmBT(dl, V2, PREC), e2)
            hV1 += _mmT(e1, dt, PREC) + _mmT(te1, dl, PREC)
            hc1 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, V1, PREC) + _mmBT(dl, tV1, PREC), e1)
            hV0a += dt * x0[:, None]
            hV0b += dt * x1[:, None]
            hc0 += tl.sum(dt, axis=0)
        o = OUT + (k * S + s) * 2003
        _putD(o, o, tl.sum(hV0a, axis=0), tl.sum(hV0b, axis=0), hc0, hV1, hc1, hV2, hc2, hV3, hc3,
              tl.sum(hV4, axis=0), tl.sum(hc4, axis=0), 0.0, False, False,
              o, o, 0.0, 0.0, 0.0, 0.0, False)

    @triton.jit
    def _hvp_fake_kernel(P, U, Z, OUT, DXT, GL, S, B, rows_per_prog, inv_b, gam, X, MS, lr, decay, omd, eps,
                         T: tl.constexpr, PREC: tl.constexpr, FINAL: tl.constexpr, OPT: tl.constexpr):
        """Fake rows: D's block of H_{L_D}(0, t_phi) + H_{L_G}(t_theta, 0) (added to the real rows' part in
        OUT), and per row the two 2-vectors G's tangent backward needs: the tangent of dL/dx_fake (DXT)
        and L_G's primal delta at G's output (GL)."""
        s = tl.program_id(0)
        k = tl.program_id(1)
        p = P + s * 2003
        q = U + s * 2003
        ty = P.dtype.element_ty
        hV1, hc1, hV2, hc2, hV3, hc3, _w, hc0 = _zeros4(P)
        hV0a = tl.zeros([T, 16], ty)
        hV0b = tl.zeros([T, 16], ty)
        hV4 = tl.zeros([T, 16], ty)
        hc4 = tl.zeros([T], ty)
        start = k * rows_per_prog
        stop = tl.minimum(start + rows_per_prog, B)
        for r0 in range(start, stop, T):
            rows = r0 + tl.arange(0, T)
            rmask = rows < stop
            live = tl.where(rmask, inv_b, 0.0)
            # G forward, primal and tangent (t_theta): only x_fake = (fx, fy) and its tangent leave this block
            W0, b0 = _ld(p, 0, 16, 16)
            tW0, tb0 = _ld(q, 0, 16, 16)
            a0 = _load_rows(Z, s, B, rows, rmask, 16)
            a1 = _relu(_lin(a0, W0, b0, PREC))
            ta = _on(_lin(a0, tW0, tb0, PREC), a1)
            W1, b1 = _ld(p, 272, 16, 16)
            tW1, tb1 = _ld(q, 272, 16, 16)
            a2 = _relu(_lin(a1, W1, b1, PREC))
            ta = _on(_mm(ta, W1, PREC) + _lin(a1, tW1, tb1, PREC), a2)
            W2, b2 = _ld(p, 544, 16, 16)
            tW2, tb2 = _ld(q, 544, 16, 16)
            a3 = _relu(_lin(a2, W2, b2, PREC))
            ta = _on(_mm(ta, W2, PREC) + _lin(a2, tW2, tb2, PREC), a3)
            W3, b3 = _ld(p, 816, 16, 16)
            tW3, tb3 = _ld(q, 816, 16, 16)
            a4 = _relu(_lin(a3, W3, b3, PREC))
            ta = _on(_mm(ta, W3, PREC) + _lin(a3, tW3, tb3, PREC), a4)
            w4a, w4b, b4a, b4b = _ld_out2(p, 1088)
            tw4a, tw4b, tb4a, tb4b = _ld_out2(q, 1088)
            fx = _rowdot(a4, w4a) + b4a
            fy = _rowdot(a4, w4b) + b4b
            xtx = _rowdot(ta, w4a) + _rowdot(a4, tw4a) + tb4a
            xty = _rowdot(ta, w4b) + _rowdot(a4, tw4b) + tb4b
            # D forward on the fake rows
            v0a, v0b, c0, V1, c1, V2, c2, V3, c3, v4, c4 = _ldD(p)
            f1, f2, f3, f4 = _hiddenD(fx, fy, v0a, v0b, c0, V1, c1, V2, c2, V3, c3, PREC)
            sig = tl.sigmoid(_rowdot(f4, v4) + c4)
            s_d = sig * live
            s_g = (sig - 1.0) * live
            sd = s_d[:, None]
            sg = s_g[:, None]
            # tangents of D's activations: the sum chain tc (phi + x chains, for the logit) and the
            # weighted chain tw = s_d * phi chain + s_g * x chain (for the cross terms with beta)
            tv0a, tv0b, tc0 = _ld_in2(q, 1122)
            pv = _outer(fx, tv0a) + _outer(fy, tv0b) + tc0[None, :]
            xv = _outer(xtx, v0a) + _outer(xty, v0b)
            tc = _on(pv + xv, f1)
            tw1 = _on(pv * sd + xv * sg, f1)
            tV1, tc1 = _ld(q, 1170, 16, 16)
            pv = _lin(f1, tV1, tc1, PREC)
            tc = _on(_mm(tc, V1, PREC) + pv, f2)
            tw2 = _on(_mm(tw1, V1, PREC) + pv * sd, f2)
            tV2, tc2 = _ld(q, 1442, 16, 16)
            pv = _lin(f2, tV2, tc2, PREC)
            tc = _on(_mm(tc, V2, PREC) + pv, f3)
            tw3 = _on(_mm(tw2, V2, PREC) + pv * sd, f3)
            tV3, tc3 = _ld(q, 1714, 16, 16)
            pv = _lin(f3, tV3, tc3, PREC)
            tc = _on(_mm(tc, V3, PREC) + pv, f4)
            tw4 = _on(_mm(tw3, V3, PREC) + pv * sd, f4)
            tv4, tc4 = _ld_out1(q, 1986)
            td = _rowdot(tc, v4) + _rowdot(f4, tv4) + tc4
            tdd = td * sig * (1.0 - sig) * live   # tangent of the logit delta [T]
            # tangent backward through D, with beta (the unit-logit backprop) layer by layer
            hV4 += f4 * tdd[:, None] + tw4
            hc4 += tdd
            dt = _on(_outer(tdd, v4) + _outer(s_d, tv4), f4)
            bt = _on(v4[None, :] + tl.zeros_like(f4), f4)
            hV3 += _mmT(f3, dt, PREC) + _mmT(tw3, bt, PREC)
            hc3 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, V3, PREC) + _mmBT(bt * sd, tV3, PREC), f3)
            bt = _on(_mmBT(bt, V3, PREC), f3)
            hV2 += _mmT(f2, dt, PREC) + _mmT(tw2, bt, PREC)
            hc2 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, V2, PREC) + _mmBT(bt * sd, tV2, PREC), f2)
            bt = _on(_mmBT(bt, V2, PREC), f2)
            hV1 += _mmT(f1, dt, PREC) + _mmT(tw1, bt, PREC)
            hc1 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, V1, PREC) + _mmBT(bt * sd, tV1, PREC), f1)
            bt = _on(_mmBT(bt, V1, PREC), f1)
            hV0a += dt * fx[:, None] + bt * (xtx * s_g)[:, None]
            hV0b += dt * fy[:, None] + bt * (xty * s_g)[:, None]
            hc0 += tl.sum(dt, axis=0)
            # into G: the tangent of dL/dx (both losses, plus the phi chain's term through V0), and
            # L_G's primal delta at G's output, two columns each
            bs = bt * sd
            bg = bt * sg
            off = (s * B + rows) * 2
            tl.store(DXT + off, _rowdot(dt, v0a) + _rowdot(bs, tv0a), mask=rmask)
            tl.store(DXT + off + 1, _rowdot(dt, v0b) + _rowdot(bs, tv0b), mask=rmask)
            tl.store(GL + off, _rowdot(bg, v0a), mask=rmask)
            tl.store(GL + off + 1, _rowdot(bg, v0b), mask=rmask)
        o = OUT + (k * S + s) * 2003
        if OPT:   # every warp is done reading D's parameters before any of them is updated
            tl.debug_barrier()
        _putD(o, q, tl.sum(hV0a, axis=0), tl.sum(hV0b, axis=0), hc0, hV1, hc1, hV2, hc2, hV3, hc3,
              tl.sum(hV4, axis=0), tl.sum(hc4, axis=0), gam, True, FINAL,
              X + s * 2003, MS + s * 2003, lr, decay, omd, eps, OPT)

    @triton.jit
    def _hvp_g_kernel(P, U, Z, OUT, DXT, GL, S, B, rows_per_prog, gam, X, MS, lr, decay, omd, eps,
                      T: tl.constexpr, PREC: tl.constexpr, FINAL: tl.constexpr, RELOAD: tl.constexpr,
                      OPT: tl.constexpr):
        """G's block of H_{L_G}(t_theta, 0) + H_{L_D}(0, t_phi): the tangent backward through G from DXT,
        with L_G's primal deltas from GL and the tangent activations of t_theta recomputed."""
        s = tl.program_id(0)
        k = tl.program_id(1)
        p = P + s * 2003
        q = U + s * 2003
        ty = P.dtype.element_ty
        if not RELOAD:
            W0, b0, W1, b1, W2, b2, W3, b3, w4a, w4b, b4a, b4b = _ldG(p)
            tW0, tb0, tW1, tb1, tW2, tb2, tW3, tb3, tw4a, tw4b, tb4a, tb4b = _ldG(q)
        hW0, hb0, hW1, hb1, hW2, hb2, hW3, hb3 = _zeros4(P)
        hW4a = tl.zeros([16], ty)
        hW4b = tl.zeros([16], ty)
        hb4a = tl.zeros([T], ty)
        hb4b = tl.zeros([T], ty)
        start = k * rows_per_prog
        stop = tl.minimum(start + rows_per_prog, B)
        for r0 in range(start, stop, T):
            if RELOAD:
                W0, b0, W1, b1, W2, b2, W3, b3, w4a, w4b, b4a, b4b = _ldG(p)
                tW0, tb0, tW1, tb1, tW2, tb2, tW3, tb3, tw4a, tw4b, tb4a, tb4b = _ldG(q)
            rows = r0 + tl.arange(0, T)
            rmask = rows < stop
            a0 = _load_rows(Z, s, B, rows, rmask, 16)
            a1, a2, a3, a4 = _hidden(a0, W0, b0, W1, b1, W2, b2, W3, b3, PREC)
            ta1 = _on(_lin(a0, tW0, tb0, PREC), a1)
            ta2 = _on(_mm(ta1, W1, PREC) + _lin(a1, tW1, tb1, PREC), a2)
            ta3 = _on(_mm(ta2, W2, PREC) + _lin(a2, tW2, tb2, PREC), a3)
            ta4 = _on(_mm(ta3, W3, PREC) + _lin(a3, tW3, tb3, PREC), a4)
            dtx = _load_col(DXT, s, B, rows, rmask, 0)
            dty = _load_col(DXT, s, B, rows, rmask, 1)
            glx = _load_col(GL, s, B, rows, rmask, 0)  # L_G's primal delta, backpropagated alongside
            gly = _load_col(GL, s, B, rows, rmask, 1)
            hW4a += tl.sum(a4 * dtx[:, None] + ta4 * glx[:, None], axis=0)
            hW4b += tl.sum(a4 * dty[:, None] + ta4 * gly[:, None], axis=0)
            hb4a += dtx
            hb4b += dty
            dt = _on(_outer(dtx, w4a) + _outer(dty, w4b) + _outer(glx, tw4a) + _outer(gly, tw4b), a4)
            gl = _on(_outer(glx, w4a) + _outer(gly, w4b), a4)
            hW3 += _mmT(a3, dt, PREC) + _mmT(ta3, gl, PREC)
            hb3 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, W3, PREC) + _mmBT(gl, tW3, PREC), a3)
            gl = _on(_mmBT(gl, W3, PREC), a3)
            hW2 += _mmT(a2, dt, PREC) + _mmT(ta2, gl, PREC)
            hb2 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, W2, PREC) + _mmBT(gl, tW2, PREC), a2)
            gl = _on(_mmBT(gl, W2, PREC), a2)
            hW1 += _mmT(a1, dt, PREC) + _mmT(ta1, gl, PREC)
            hb1 += tl.sum(dt, axis=0)
            dt = _on(_mmBT(dt, W1, PREC) + _mmBT(gl, tW1, PREC), a1)
            hW0 += _mmT(a0, dt, PREC)
            hb0 += tl.sum(dt, axis=0)
        o = OUT + (k * S + s) * 2003
        if OPT:   # every warp is done reading G's parameters before any of them is updated
            tl.debug_barrier()
        _putG(o, q, hW0, hb0, hW1, hb1, hW2, hb2, hW3, hb3, hW4a, hW4b,
              tl.sum(hb4a, axis=0), tl.sum(hb4b, axis=0), gam, False, FINAL,
              X + s * 2003, MS + s * 2003, lr, decay, omd, eps, OPT)


OPTIONS = ("precision", "tile", "split", "num_warps", "reload")  # the keyword options of direction()
TF32_OPTIONS = dict(precision="tf32", tile=32, split=16)  # the fastest TF32 setting timed on an H100


def check_engine(params: Tensor, options: dict) -> None:
    """ValueError unless ``params`` can run here (CUDA and float32, or anything under the interpreter) and
    ``options`` are keyword options of :func:`direction` (``OPTIONS``)."""
    if params.device.type != "cuda" and not interpreted():
        raise ValueError("the Triton MoG kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); "
                         f"got {params.device}; use numgan.mog_fused there")
    if params.dtype != torch.float32 and not interpreted():
        raise ValueError(f"the Triton MoG kernels compute in float32 on CUDA, got {params.dtype}")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown Triton options {sorted(unknown)}; numgan.mog_triton.direction takes {OPTIONS}")


def _check_inputs(params: Tensor, x_real: Tensor, z: Tensor, precision: str, tile: int, split: int):
    if triton is None:
        raise RuntimeError("numgan.mog_triton needs Triton (it ships with the Linux CUDA wheels of torch: "
                           "pip install torch); use numgan.mog_fused (engine='fused') without it")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if tile not in (16, 32, 64, 128):
        raise ValueError(f"tile must be 16, 32, 64 or 128 rows, got {tile}")
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    if params.dim() != 2 or params.shape[1] != N_PARAMS:
        raise ValueError(f"params must be [S, {N_PARAMS}] (numgan.mog_fused.pack), got {tuple(params.shape)}")
    S = params.shape[0]
    if x_real.dim() != 3 or x_real.shape[0] != S or x_real.shape[2] != X_DIM:
        raise ValueError(f"x_real must be [S={S}, B, {X_DIM}], got {tuple(x_real.shape)}")
    if S < 1 or x_real.shape[1] < 1:
        raise ValueError(f"need at least one seed and one row, got S={S}, B={x_real.shape[1]}")
    if S * x_real.shape[1] * Z_DIM >= 2 ** 31:
        raise ValueError(f"S x B = {S} x {x_real.shape[1]} rows overflow the kernels' int32 offsets; "
                         "split the seeds over several engines")
    if z.shape != (S, x_real.shape[1], Z_DIM):
        raise ValueError(f"z must be [S={S}, B={x_real.shape[1]}, {Z_DIM}], got {tuple(z.shape)}")
    if not (params.dtype == x_real.dtype == z.dtype) or params.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"params, x_real and z must share a dtype (float32; float64 in the interpreter), got "
                         f"{params.dtype}, {x_real.dtype}, {z.dtype}")
    check_engine(params, {})
    if not (params.device == x_real.device == z.device):
        raise ValueError(f"params, x_real and z must be on one device, got {params.device}, {x_real.device}, "
                         f"{z.device}")
    for name, t in (("params", params), ("x_real", x_real), ("z", z)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


class Workspace:
    """Output buffers of :func:`direction` for S runs of ``params``' dtype and device, one set per (split, B),
    made on first use and kept (fixed addresses, as CUDA graphs need)."""

    def __init__(self, params: Tensor):
        self.S, self.dtype, self.device = params.shape[0], params.dtype, params.device
        self._sets = {}

    def fits(self, params: Tensor) -> bool:
        return (self.S, self.dtype, self.device) == (params.shape[0], params.dtype, params.device)

    def buffers(self, split: int, B: int) -> SimpleNamespace:
        """u_parts / h_parts [split, S, 2003] and loss_parts [split, S, 2] (per-program partial sums), their
        sums u, out, losses (views of part 0 when split == 1), and dxt, gl [S, B, 2] (the per-row hand-over
        between the pass-2 kernels)."""
        if (split, B) not in self._sets:
            kw = dict(dtype=self.dtype, device=self.device)
            S = self.S
            b = SimpleNamespace(u_parts=torch.empty(split, S, N_PARAMS, **kw),
                                h_parts=torch.empty(split, S, N_PARAMS, **kw),
                                loss_parts=torch.empty(split, S, 2, **kw),
                                dxt=torch.empty(S, B, 2, **kw), gl=torch.empty(S, B, 2, **kw))
            one = split == 1
            b.u = b.u_parts[0] if one else torch.empty(S, N_PARAMS, **kw)
            b.out = b.h_parts[0] if one else torch.empty(S, N_PARAMS, **kw)
            b.losses = b.loss_parts[0] if one else torch.empty(S, 2, **kw)
            self._sets[(split, B)] = b
        return self._sets[(split, B)]


def direction(params: Tensor, x_real: Tensor, z: Tensor, gamma: Optional[float], *, precision: str = "ieee",
              tile: int = 16, split: int = 1, num_warps: int = 4, reload: bool = False,
              workspace: Optional[Workspace] = None):
    """The loss-form update direction of S MoG runs: u (``gamma=None``, SimGA) or u + gamma J_u^T u (ConOpt).

    ``params`` [S, 2003] (numgan.mog_fused layout), ``x_real`` [S, B, 2], ``z`` [S, B, 16]. ``split``
    programs share each seed's rows (their partial sums are added in a fixed order); ``tile`` rows are
    processed at a time. The defaults were the fastest float32 setting timed on an H100 (256 seeds, 512
    rows; with "tf32": ``TF32_OPTIONS``).
    ``precision``: see the module docstring. ``reload`` makes the gradient, real-row and G kernels read the
    weights once per tile instead of once per program (the fake-row kernel always reads them per tile).
    Float scalars (1/B, gamma) reach the kernels as float32, so under the float64 interpreter 1/B is rounded
    to float32 unless B is a power of two. Returns (direction [S, 2003], losses [S, 2] = per-seed (L_D, L_G) of the
    minibatch); both live in ``workspace`` (made if None) and are overwritten by the next call.
    """
    return _launch(params, x_real, z, gamma, None, precision, tile, split, num_warps, reload, workspace)


def conopt_step(params: Tensor, square_avg: Tensor, x_real: Tensor, z: Tensor, gamma: float, lr: float,
                decay: float, eps: float, *, precision: str = "ieee", tile: int = 16, num_warps: int = 4,
                reload: bool = False, workspace: Optional[Workspace] = None) -> Tensor:
    """One ConOpt step with TF-1 RMSProp (numgan.rmsprop) on S MoG runs, in place, in four kernels.

    The same update as ``direction(...)`` followed by ``ms <- decay ms + (1 - decay) g^2``,
    ``params <- params - lr g / sqrt(ms + eps)`` (numgan.mog_fused.FusedMoG.step), but the last two kernels
    apply it to ``params`` and ``square_avg`` [S, 2003] as they finish each block of the direction, which
    is never written out. Possible with one program per seed (``split=1``): the fake-row kernel updates D's
    block after its last read of D, and no later kernel reads D; the G kernel then updates G's block.
    Returns the per-seed losses [S, 2] of the minibatch (in ``workspace``, overwritten by the next call).
    """
    if square_avg.shape != params.shape or square_avg.dtype != params.dtype or square_avg.device != params.device \
            or not square_avg.is_contiguous():
        raise ValueError(f"square_avg must be a contiguous tensor like params {tuple(params.shape)} {params.dtype} "
                         f"{params.device}, got {tuple(square_avg.shape)} {square_avg.dtype} {square_avg.device}")
    opt = (square_avg, float(lr), float(decay), float(eps))
    return _launch(params, x_real, z, float(gamma), opt, precision, tile, 1, num_warps, reload, workspace)[1]


def _launch(params, x_real, z, gamma, opt, precision, tile, split, num_warps, reload, workspace):
    _check_inputs(params, x_real, z, precision, tile, split)
    S, B = x_real.shape[0], x_real.shape[1]
    ws = (workspace if workspace is not None and workspace.fits(params) else Workspace(params)).buffers(split, B)
    rows = -(-B // split)
    rows = -(-rows // tile) * tile  # whole tiles per program
    grid = (S, split)
    _grad_kernel[grid](params, x_real, z, ws.u_parts, ws.loss_parts, S, B, rows, 1.0 / B,
                       T=tile, PREC=precision, RELOAD=reload, num_warps=num_warps)
    if split > 1:
        torch.sum(ws.u_parts, 0, out=ws.u)
        torch.sum(ws.loss_parts, 0, out=ws.losses)
    if gamma is None:
        return ws.u, ws.losses
    final = split == 1
    ms, lr, decay, eps = opt if opt is not None else (params, 0.0, 0.0, 0.0)
    omd = 1.0 - decay   # rounded to float32 from the double, as torch's addcmul value is
    fused = opt is not None
    _hvp_real_kernel[grid](params, ws.u, x_real, ws.h_parts, S, B, rows, 1.0 / B,
                           T=tile, PREC=precision, RELOAD=reload, num_warps=num_warps)
    _hvp_fake_kernel[grid](params, ws.u, z, ws.h_parts, ws.dxt, ws.gl, S, B, rows, 1.0 / B, float(gamma),
                           params, ms, lr, decay, omd, eps, T=tile, PREC=precision, FINAL=final, OPT=fused,
                           num_warps=num_warps)
    _hvp_g_kernel[grid](params, ws.u, z, ws.h_parts, ws.dxt, ws.gl, S, B, rows, float(gamma),
                        params, ms, lr, decay, omd, eps, T=tile, PREC=precision, FINAL=final, RELOAD=reload,
                        OPT=fused, num_warps=num_warps)
    if split > 1:
        torch.sum(ws.h_parts, 0, out=ws.out)
        ws.out.mul_(gamma).add_(ws.u)
    return (None if fused else ws.out), ws.losses
