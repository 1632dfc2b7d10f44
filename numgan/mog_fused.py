"""A fused, hand-differentiated engine for the MoG game (paper Sec. 5 / Fig. 2-3; spec 1.4-1.5; issue 4).

The MoG networks (numgan.mog) are tiny (G: 16 -> 4 x 16 -> 2, D: 2 -> 4 x 16 -> 1), so with autograd
the per-op overhead dominates. This module computes the same quantities with a few batched matmuls
and no autograd:

* ``player_grads``: u = (grad_theta L_G, grad_phi L_D) = -v (numgan.game sign convention), objective
  ``standard`` (non-saturating): L_D = mean sp(-D(x_r)) + mean sp(D(G(z))), L_G = mean sp(-D(G(z))).
* ``conopt_direction``: u + gamma J_u^T u (paper Eq. 16-17; J_u = -v' is the Jacobian of u), i.e. the
  ``p.grad`` of numgan.optim.ConOpt. J_u^T u = H_{L_G} (u_theta, 0) + H_{L_D} (0, u_phi), where H is the
  full Hessian over x = (theta, phi); both Hessian-vector products are forward-over-reverse passes
  written by hand and summed inside one pass (see ``_hvp``).
* ``jacobian``: the exact game Jacobian v'(x) = -J_u, one HVP per row of J_u (row i of J_u is
  H_{L_G} e_i for a generator index i and H_{L_D} e_i for a discriminator index), in chunks of
  directions at once.
* ``FusedMoG``: S runs' flat parameters [S, 2003] plus TF-1 RMSProp state (numgan.rmsprop) and a
  SimGA / ConOpt step that is CUDA-graph capturable (``make_graphed_steps``).

Layout: per seed one flat vector, G's layers then D's, each layer ``weight [in, out]`` then ``bias
[out]`` -- the order of ``torch.cat([G.flat(s), D.flat(s)])`` in numgan.mog. A layer's block is
therefore the row-major [in + 1, out] matrix P = [W; b], and with activations augmented by a column of
ones, A_aug = [a, 1], the layer is h = A_aug P and its parameter gradient is A_aug^T delta.

The discriminator is evaluated on 3B stacked rows: [real (L_D), fake (L_D), fake again (L_G)]. The
two fake copies carry different loss derivatives and, in the HVP, different tangents, and summing
the parameter terms over all 3B rows yields H_{L_G}(u_theta, 0) + H_{L_D}(0, u_phi) directly.

Tangent tensors carry K directions in an "rows outer, directions inner" layout [S, R, K, width], so
every product with the (direction-independent) primal quantities is one plain batched matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Z_DIM, X_DIM, HIDDEN, DEPTH = 16, 2, 16, 4
G_DIMS = (Z_DIM,) + (HIDDEN,) * DEPTH + (X_DIM,)
D_DIMS = (X_DIM,) + (HIDDEN,) * DEPTH + (1,)


def _layout(dims, start):
    out, off = [], start
    for a, b in zip(dims[:-1], dims[1:]):
        out.append((off, a, b))
        off += (a + 1) * b
    return out, off


G_LAYERS, N_G = _layout(G_DIMS, 0)
D_LAYERS, N_PARAMS = _layout(D_DIMS, N_G)
N_D = N_PARAMS - N_G
N_LAYERS = len(G_LAYERS)  # 5 for both networks
SUPPORTED_METHODS = ("simga", "conopt")
BACKENDS = ("torch", "triton", "native")  # FusedMoG: these batched-matmul steps, numgan.mog_triton's CUDA
# kernels, or numgan.mog_native's compiled CPU step
SUPPORTED_OBJECTIVES = ("standard",)

_thr_bwd = torch.ops.aten.threshold_backward


# ----------------------------------------------------------------------------------------------------
# flat layout helpers
# ----------------------------------------------------------------------------------------------------

def layer_views(flat: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer views [..., in + 1, out] (rows 0..in-1 = weight, last row = bias) of ``flat [..., 2003]``.

    Returns (G layers, D layers); writing into a view writes into ``flat``.
    """
    if flat.shape[-1] != N_PARAMS:
        raise ValueError(f"expected a flat MoG parameter tensor [..., {N_PARAMS}], got {tuple(flat.shape)}")
    lead = flat.shape[:-1]
    views = [flat[..., o:o + (i + 1) * n].view(*lead, i + 1, n) for o, i, n in G_LAYERS + D_LAYERS]
    return views[:N_LAYERS], views[N_LAYERS:]


def pack(G, D) -> Tensor:
    """Flat parameters [S, 2003] of numgan.mog ensembles G, D (row s = ``cat([G.flat(s), D.flat(s)])``)."""
    ps = list(G._ordered()) + list(D._ordered())
    S = ps[0].shape[0]
    return torch.cat([p.detach().reshape(S, -1) for p in ps], 1)


@torch.no_grad()
def unpack_into(flat: Tensor, G, D) -> None:
    """Copy flat parameters [S, 2003] into the ensembles G, D (inverse of :func:`pack`)."""
    ps = list(G._ordered()) + list(D._ordered())
    S = ps[0].shape[0]
    if flat.shape != (S, N_PARAMS):
        raise ValueError(f"flat parameters must have shape ({S}, {N_PARAMS}), got {tuple(flat.shape)}")
    off = 0
    for p in ps:
        n = p[0].numel()
        p.copy_(flat[:, off:off + n].reshape(p.shape))
        off += n


# ----------------------------------------------------------------------------------------------------
# workspace: activation buffers with the constant ones column filled once
# ----------------------------------------------------------------------------------------------------

class _Workspace:
    """Persistent buffers (stable addresses, as CUDA graphs need); ``aug`` buffers end in a ones column."""

    def __init__(self):
        self._bufs = {}

    def aug(self, name, S, R, w, like: Tensor) -> Tensor:
        b = self._bufs.get(name)
        if b is None or b.shape != (S, R, w + 1) or b.dtype != like.dtype or b.device != like.device:
            b = torch.empty(S, R, w + 1, dtype=like.dtype, device=like.device)
            b[..., w] = 1
            self._bufs[name] = b
        return b


class _Primal:
    """Forward pass, losses and player gradients; keeps what the HVP needs."""

    def __init__(self, PG, PD, x_real, z, ws: _Workspace):
        S, B = z.shape[0], z.shape[1]
        self.S, self.B, self.PG, self.PD = S, B, PG, PD
        # generator forward
        A = ws.aug("g0", S, B, Z_DIM, z)
        A[..., :Z_DIM].copy_(z)
        AG = [A]
        for l in range(N_LAYERS - 1):
            A = ws.aug(f"g{l + 1}", S, B, HIDDEN, z)
            torch.clamp_min(torch.bmm(AG[-1], PG[l]), 0, out=A[..., :HIDDEN])
            AG.append(A)
        # discriminator forward on [real; fake; fake]
        X = ws.aug("d0", S, 3 * B, X_DIM, z)
        X[:, :B, :X_DIM].copy_(x_real)
        torch.bmm(AG[-1], PG[-1], out=X[:, B:2 * B, :X_DIM])
        X[:, 2 * B:, :X_DIM].copy_(X[:, B:2 * B, :X_DIM])
        AD = [X]
        for l in range(N_LAYERS - 1):
            A = ws.aug(f"d{l + 1}", S, 3 * B, HIDDEN, z)
            torch.clamp_min(torch.bmm(AD[-1], PD[l]), 0, out=A[..., :HIDDEN])
            AD.append(A)
        self.AG, self.AD = AG, AD
        self.d = torch.bmm(AD[-1], PD[-1])  # logits [S, 3B, 1]
        self.sig = torch.sigmoid(self.d)
        # dL/dd per row: (sigma - y) / B with y = 1 for real (L_D), 0 for fake (L_D), 1 for fake (L_G)
        y = ws.aug("y", 1, 3 * B, 0, z)  # [1, 3B, 1]
        y[:, B:2 * B] = 0  # idempotent; rows real and fake-for-L_G stay 1
        self.delta_out = (self.sig - y) * (1.0 / B)

    def losses(self):
        """Per-seed (L_D, L_G) of this minibatch (the mean softplus terms of numgan.objectives)."""
        S, B = self.S, self.B
        d = self.d.view(S, 3, B)
        sp = torch.stack([F.softplus(-d[:, 0]), F.softplus(d[:, 1]), F.softplus(-d[:, 2])], 1).mean(2)
        return sp[:, 0] + sp[:, 1], sp[:, 2]

    def backward(self, out: Tensor):
        """Write u = (grad_theta L_G, grad_phi L_D) into ``out [S, 2003]``; keep the deltas."""
        B, PG, PD = self.B, self.PG, self.PD
        UG, UD = layer_views(out)
        dD = [None] * N_LAYERS  # primal deltas at each D pre-activation, all 3B rows
        delta = self.delta_out
        for l in range(N_LAYERS - 1, -1, -1):
            dD[l] = delta
            torch.bmm(self.AD[l][:, :2 * B].mT, delta[:, :2 * B], out=UD[l])  # grad_phi L_D
            if l > 0:
                delta = _thr_bwd(torch.bmm(delta, PD[l][:, :-1].mT), self.AD[l][..., :HIDDEN], 0)
        delta = torch.bmm(delta[:, 2 * B:], PD[0][:, :-1].mT)  # dL_G / dx_fake  [S, B, 2]
        dG = [None] * N_LAYERS
        for l in range(N_LAYERS - 1, -1, -1):
            dG[l] = delta
            torch.bmm(self.AG[l].mT, delta, out=UG[l])
            if l > 0:
                delta = _thr_bwd(torch.bmm(delta, PG[l][:, :-1].mT), self.AG[l][..., :HIDDEN], 0)
        self.dD, self.dG = dD, dG
        return out


def _tan_params(P: Tensor, S: int, K: int):
    """Tangent layer block [S, K, in+1, out] -> (P' as [S, in+1, K*out], W'^T as [S, out, K*in])."""
    _, _, i1, o = P.shape
    Pk = P.permute(0, 2, 1, 3).reshape(S, i1, K * o)
    Wt = P[:, :, :-1].permute(0, 3, 1, 2).reshape(S, o, K * (i1 - 1))
    return Pk, Wt


def _param_tangent(out: Tensor, A: Tensor, dT: Tensor, At: Optional[Tensor] = None,
                   delta: Optional[Tensor] = None) -> None:
    """out [S, K, in+1, out] = A^T dT + [At^T delta; 0] summed over rows (the tangent of A^T delta)."""
    S, R, K, o = dT.shape
    i1 = A.shape[-1]
    t2 = torch.bmm(A.mT, dT.reshape(S, R, K * o)).view(S, i1, K, o).permute(0, 2, 1, 3)
    if At is None:
        out.copy_(t2)
        return
    Rt = At.shape[1]
    t1 = torch.bmm(At.reshape(S, Rt, K * (i1 - 1)).mT, delta).view(S, K, i1 - 1, o)
    out.copy_(t2)
    out[:, :, :-1].add_(t1)


def _hvp(pr: _Primal, TG: Optional[Tensor], TD: Optional[Tensor], out: Tensor) -> Tensor:
    """out [S, K, 2003] = H_{L_G} (t_theta, 0) + H_{L_D} (0, t_phi) for K tangents (J_u^T t).

    ``TG`` [S, K, 1122] / ``TD`` [S, K, 881] are the generator / discriminator parts of the tangents;
    None means zero and skips its terms. Needs ``pr.backward`` to have run (primal deltas).
    """
    S, B, PG, PD = pr.S, pr.B, pr.PG, pr.PD
    K = out.shape[1]
    HG, HD = layer_views(out)
    g_on, d_on = TG is not None, TD is not None
    # D rows that carry a tangent: [real, fake] (L_D, param tangent) and/or fake again (L_G, input tangent)
    r0, r1 = (0 if d_on else 2 * B), (3 * B if g_on else 2 * B)
    R, n_par = r1 - r0, (2 * B - r0 if d_on else 0)
    if g_on:
        tg = [_tan_params(t, S, K) for t in layer_views(torch.cat([TG, TG.new_zeros(S, K, N_D)], 2))[0]]
    if d_on:
        td = [_tan_params(t, S, K) for t in layer_views(torch.cat([TD.new_zeros(S, K, N_G), TD], 2))[1]]

    # --- tangent forward through G (HVP1 only: direction t_theta) ---
    TA_G = [None] * N_LAYERS
    if g_on:
        th = torch.bmm(pr.AG[0], tg[0][0])  # [S, B, K*out]
        for l in range(1, N_LAYERS):
            ta = _thr_bwd(th.view(S, B, K, HIDDEN), pr.AG[l][..., :HIDDEN].unsqueeze(2), 0)
            TA_G[l] = ta
            th = torch.baddbmm(torch.bmm(ta.view(S, B * K, HIDDEN), PG[l][:, :-1]).view(S, B, K * PG[l].shape[-1]),
                               pr.AG[l], tg[l][0])
        x_tan = th.view(S, B, K, X_DIM)  # tangent of the fake samples

    # --- tangent forward through D on rows r0:r1 ---
    TA_D = [None] * N_LAYERS
    o0 = PD[0].shape[-1]
    parts = []
    if d_on:
        parts.append(torch.bmm(pr.AD[0][:, r0:2 * B], td[0][0]))
    if g_on:
        parts.append(torch.bmm(x_tan.reshape(S, B * K, X_DIM), PD[0][:, :-1]).view(S, B, K * o0))
    th = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    for l in range(1, N_LAYERS):
        ta = _thr_bwd(th.view(S, R, K, HIDDEN), pr.AD[l][:, r0:r1, :HIDDEN].unsqueeze(2), 0)
        TA_D[l] = ta
        o = PD[l].shape[-1]
        th = torch.bmm(ta.view(S, R * K, HIDDEN), PD[l][:, :-1]).view(S, R, K * o)
        if d_on:
            th[:, :n_par].baddbmm_(pr.AD[l][:, r0:2 * B], td[l][0])
    # loss: d(delta_out) = sigma (1 - sigma) / B * d(logit)
    s2 = pr.sig[:, r0:r1] * (1 - pr.sig[:, r0:r1]) * (1.0 / B)
    dt = th.view(S, R, K, 1) * s2.unsqueeze(2)

    # --- tangent backward through D ---
    for l in range(N_LAYERS - 1, -1, -1):
        delta = pr.dD[l][:, r0:r1]
        if l > 0:
            _param_tangent(HD[l], pr.AD[l][:, r0:r1], dt, TA_D[l], delta)
        elif g_on:  # input tangent lives on the L_G fake rows only
            _param_tangent(HD[0], pr.AD[0][:, r0:r1], dt, x_tan, pr.dD[0][:, 2 * B:])
        else:
            _param_tangent(HD[0], pr.AD[0][:, r0:r1], dt)
        i = PD[l].shape[1] - 1
        if l > 0:
            ta = torch.bmm(dt.reshape(S, R * K, dt.shape[-1]), PD[l][:, :-1].mT).view(S, R, K, i)
            if d_on:
                ta[:, :n_par].add_(torch.bmm(delta[:, :n_par], td[l][1]).view(S, n_par, K, i))
            dt = _thr_bwd(ta, pr.AD[l][:, r0:r1, :HIDDEN].unsqueeze(2), 0)
        else:  # tangent of dL/dx on the fake rows, both copies summed -> into G
            f0 = max(B - r0, 0)  # first fake row within r0:r1
            ta = torch.bmm(dt[:, f0:].reshape(S, (R - f0) * K, dt.shape[-1]), PD[0][:, :-1].mT)
            ta = ta.view(S, R - f0, K, X_DIM)
            if d_on and g_on:
                ta = ta[:, :B] + ta[:, B:]
            if d_on:
                ta = ta + torch.bmm(delta[:, B - r0:n_par], td[0][1]).view(S, B, K, X_DIM)
            dt = ta

    # --- tangent backward through G ---
    for l in range(N_LAYERS - 1, -1, -1):
        if g_on and l > 0:
            _param_tangent(HG[l], pr.AG[l], dt, TA_G[l], pr.dG[l])
        else:
            _param_tangent(HG[l], pr.AG[l], dt)
        if l > 0:
            i = PG[l].shape[1] - 1
            ta = torch.bmm(dt.reshape(S, B * K, dt.shape[-1]), PG[l][:, :-1].mT).view(S, B, K, i)
            if g_on:
                ta.add_(torch.bmm(pr.dG[l], tg[l][1]).view(S, B, K, i))
            dt = _thr_bwd(ta, pr.AG[l][..., :HIDDEN].unsqueeze(2), 0)
    return out


# ----------------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------------

def _check(x: Tensor, x_real: Tensor, z: Tensor):
    if x.dim() != 2 or x.shape[-1] != N_PARAMS:
        raise ValueError(f"params must be [S, {N_PARAMS}] (numgan.mog_fused.pack), got {tuple(x.shape)}")
    S = x.shape[0]
    if x_real.dim() != 3 or x_real.shape[0] != S or x_real.shape[2] != X_DIM:
        raise ValueError(f"x_real must be [S={S}, B, {X_DIM}], got {tuple(x_real.shape)}")
    if z.shape != (S, x_real.shape[1], Z_DIM):
        raise ValueError(f"z must be [S={S}, B={x_real.shape[1]}, {Z_DIM}], got {tuple(z.shape)}")
    if not (x.dtype == x_real.dtype == z.dtype):
        raise ValueError(f"params, x_real and z must share a dtype, got {x.dtype}, {x_real.dtype}, {z.dtype}")


def player_grads(x: Tensor, x_real: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss_d [S], loss_g [S], u [S, 2003]) with u = (grad_theta L_G, grad_phi L_D) per seed.

    ``x`` [S, 2003] flat parameters, ``x_real`` [S, B, 2], ``z`` [S, B, 16]; objective ``standard``.
    """
    _check(x, x_real, z)
    PG, PD = layer_views(x)
    pr = _Primal(PG, PD, x_real, z, _Workspace())
    u = pr.backward(torch.empty_like(x))
    ld, lg = pr.losses()
    return ld, lg, u


def conopt_direction(x: Tensor, x_real: Tensor, z: Tensor, gamma: float) -> Tensor:
    """ConOpt's loss-form direction u + gamma J_u^T u [S, 2003] (the ``p.grad`` of numgan.optim.ConOpt)."""
    _check(x, x_real, z)
    PG, PD = layer_views(x)
    pr = _Primal(PG, PD, x_real, z, _Workspace())
    u = pr.backward(torch.empty_like(x))
    hv = _hvp(pr, u[:, None, :N_G], u[:, None, N_G:], torch.empty_like(x)[:, None])
    return u + gamma * hv[:, 0]


def hvp(x: Tensor, x_real: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """J_u^T t = H_{L_G} (t_theta, 0) + H_{L_D} (0, t_phi) for K tangents ``t`` [S, K, 2003] -> [S, K, 2003]."""
    _check(x, x_real, z)
    if t.dim() != 3 or t.shape[0] != x.shape[0] or t.shape[2] != N_PARAMS:
        raise ValueError(f"tangents must be [S, K, {N_PARAMS}], got {tuple(t.shape)}")
    PG, PD = layer_views(x)
    pr = _Primal(PG, PD, x_real, z, _Workspace())
    pr.backward(torch.empty_like(x))
    return _hvp(pr, t[..., :N_G], t[..., N_G:], torch.empty_like(t))


def jacobian(x: Tensor, x_real: Tensor, z: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """Exact game Jacobian v'(x) [2003, 2003] of one run on a fixed minibatch (objective ``standard``).

    ``x`` [2003] flat parameters (G then D), ``x_real`` [B, 2], ``z`` [B, 16]; computed in x's dtype
    and on x's device. Equals ``numgan.spectrum.jacobian(numgan.mog.field_for_seed(...), x)``: rows =
    components of v = -u, columns = parameters. Row i of J_u is H_{L_G} e_i (generator i) or
    H_{L_D} e_i (discriminator i); ``chunk_size`` rows are computed per pass (G and D rows separately,
    so each pass skips the other player's tangent terms). Default: 128 on the CPU (cache-sized; fastest
    there), all rows of a player at once on CUDA (benchmarks/results/bench_jacobian-*.md).
    """
    if chunk_size is None:
        chunk_size = N_PARAMS if x.device.type == "cuda" else 128
    if x.dim() != 1 or x.numel() != N_PARAMS:
        raise ValueError(f"x must be a flat [{N_PARAMS}] parameter vector, got {tuple(x.shape)}")
    if x_real.dim() != 2 or z.dim() != 2:
        raise ValueError(f"x_real [B, 2] and z [B, 16] (one run's batch), got {tuple(x_real.shape)}, "
                         f"{tuple(z.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    x, x_real, z = x.detach()[None], x_real.to(x.dtype)[None], z.to(x.dtype)[None]
    _check(x, x_real, z)
    PG, PD = layer_views(x)
    pr = _Primal(PG, PD, x_real, z, _Workspace())
    pr.backward(torch.empty_like(x))
    J = torch.empty(N_PARAMS, N_PARAMS, dtype=x.dtype, device=x.device)
    for lo_, hi_, n in ((0, N_G, N_G), (N_G, N_PARAMS, N_D)):
        for a in range(lo_, hi_, chunk_size):
            b = min(a + chunk_size, hi_)
            eye = torch.zeros(1, b - a, n, dtype=x.dtype, device=x.device)
            eye[0, :, a - lo_:b - lo_].fill_diagonal_(1)
            tg, td = (eye, None) if lo_ == 0 else (None, eye)
            _hvp(pr, tg, td, J[a:b][None])
    return J.neg_()


# ----------------------------------------------------------------------------------------------------
# the training step: the same algebra as _Primal / _hvp for one tangent (K = 1), every view and buffer
# prepared once, every op writing into a fixed buffer (few Python-level ops; CUDA-graph friendly)
# ----------------------------------------------------------------------------------------------------



class _StepPlan:
    """Static buffers and views for S runs at batch size B; ``run`` computes u or u + gamma J_u^T u."""

    def __init__(self, params: Tensor, S: int, B: int):
        kw = dict(dtype=params.dtype, device=params.device)
        self.S, self.B = S, B
        L, H = N_LAYERS, HIDDEN

        def aug(R, w):
            b = torch.empty(S, R, w + 1, **kw)
            b[..., w] = 1
            return b

        def new(*shape):
            return torch.zeros(*shape, **kw)

        self.u, self.hv = new(S, N_PARAMS), new(S, N_PARAMS)
        self.PG, self.PD = layer_views(params)
        self.UG, self.UD = layer_views(self.u)
        self.HG, self.HD = layer_views(self.hv)
        self.WG = [P[:, :-1] for P in self.PG]
        self.WD = [P[:, :-1] for P in self.PD]
        self.WGt = [W.mT for W in self.WG]
        self.WDt = [W.mT for W in self.WD]
        self.TWGt = [P[:, :-1].mT for P in self.UG]  # tangent W'^T (the tangent is u)
        self.TWDt = [P[:, :-1].mT for P in self.UD]
        self.HGw = [P[:, :-1] for P in self.HG]
        self.HDw = [P[:, :-1] for P in self.HD]
        # activations [a, 1] (inputs of each layer), pre-activations h, deltas
        self.AG = [aug(B, G_DIMS[l]) for l in range(L)]
        self.AD = [aug(3 * B, D_DIMS[l]) for l in range(L)]
        self.AGv = [A[..., :-1] for A in self.AG]
        self.ADv = [A[..., :-1] for A in self.AD]
        self.AGt = [A.mT for A in self.AG]
        self.ADt = [A.mT for A in self.AD]
        self.AD2t = [A[:, :2 * B].mT for A in self.AD]
        self.AD2 = [A[:, :2 * B] for A in self.AD]
        self.hG = [new(S, B, H) for _ in range(L - 1)]
        self.hD = [new(S, 3 * B, H) for _ in range(L - 1)]
        self.logit, self.sig, self.s2 = new(S, 3 * B, 1), new(S, 3 * B, 1), new(S, 3 * B, 1)
        y = new(1, 3 * B, 1)
        y[:, :B] = 1.0 / B
        y[:, 2 * B:] = 1.0 / B
        self.neg_y = -y  # delta_out = sigma / B - y / B
        self.zero_out = new(S, 3 * B, 1)
        self.dG = [new(S, B, G_DIMS[l + 1]) for l in range(L)]
        self.dD = [new(S, 3 * B, D_DIMS[l + 1]) for l in range(L)]
        self.dD2 = [d[:, :2 * B] for d in self.dD]
        self.tmpG, self.tmpD = new(S, B, H), new(S, 3 * B, H)
        self.tmpD2 = self.tmpD[:, :2 * B]
        self.tmpX = new(S, 2 * B, X_DIM)
        # tangents
        self.thG = [new(S, B, G_DIMS[l + 1]) for l in range(L)]
        self.taG = [None] + [new(S, B, H) for _ in range(L - 1)]
        self.taGt = [None] + [t.mT for t in self.taG[1:]]
        self.thD = [new(S, 3 * B, D_DIMS[l + 1]) for l in range(L)]
        self.thD2 = [t[:, :2 * B] for t in self.thD]
        self.taD = [None] + [new(S, 3 * B, H) for _ in range(L - 1)]
        self.taDt = [None] + [t.mT for t in self.taD[1:]]
        self.dtG = [new(S, B, G_DIMS[l + 1]) for l in range(L)]
        self.dtD = [new(S, 3 * B, D_DIMS[l + 1]) for l in range(L)]
        self.xt_t = self.thG[-1].mT  # tangent of the fake samples, transposed
        # ReLU masks (1 where the pre-activation is > 0): a multiply is cheaper than threshold_backward
        self.mG = [new(S, B, H) for _ in range(L - 1)]
        self.mD = [new(S, 3 * B, H) for _ in range(L - 1)]
        # row blocks of the stacked D batch [real; fake (L_D); fake (L_G)], sliced once (a slice costs an op)
        x0 = self.ADv[0]
        self.x0_real, self.x0_fake, self.x0_fake2 = x0[:, :B], x0[:, B:2 * B], x0[:, 2 * B:]
        self.dD0_g, self.dD0_fake = self.dD[0][:, 2 * B:], self.dD[0][:, B:2 * B]
        self.thD0_g, self.dtD0_fakes = self.thD[0][:, 2 * B:], self.dtD[0][:, B:]
        self.tmpX_a, self.tmpX_b = self.tmpX[:, :B], self.tmpX[:, B:]

    def run(self, x_real: Tensor, z: Tensor, gamma: Optional[float]) -> Tensor:
        B, L, bmm, mul = self.B, N_LAYERS, torch.bmm, torch.mul
        PG, PD, AG, AD, hG, hD, mG, mD = self.PG, self.PD, self.AG, self.AD, self.hG, self.hD, self.mG, self.mD
        # ---- primal forward: G, then D on [real; fake (L_D); fake (L_G)] ----
        self.AGv[0].copy_(z)
        for l in range(L - 1):
            bmm(AG[l], PG[l], out=hG[l])
            torch.clamp_min(hG[l], 0, out=self.AGv[l + 1])
            torch.sign(self.AGv[l + 1], out=mG[l])   # relu(h) >= 0: its sign is the mask
        self.x0_real.copy_(x_real)
        bmm(AG[-1], PG[-1], out=self.x0_fake)
        self.x0_fake2.copy_(self.x0_fake)
        for l in range(L - 1):
            bmm(AD[l], PD[l], out=hD[l])
            torch.clamp_min(hD[l], 0, out=self.ADv[l + 1])
            torch.sign(self.ADv[l + 1], out=mD[l])
        bmm(AD[-1], PD[-1], out=self.logit)
        torch.sigmoid(self.logit, out=self.sig)
        dD, dG = self.dD, self.dG
        torch.add(self.neg_y, self.sig, alpha=1.0 / B, out=dD[-1])
        # ---- primal backward: u = (grad_theta L_G, grad_phi L_D) ----
        for l in range(L - 1, -1, -1):
            bmm(self.AD2t[l], self.dD2[l], out=self.UD[l])
            if l > 0:
                bmm(dD[l], self.WDt[l], out=self.tmpD)
                mul(self.tmpD, mD[l - 1], out=dD[l - 1])
        bmm(self.dD0_g, self.WDt[0], out=dG[-1])
        for l in range(L - 1, -1, -1):
            bmm(self.AGt[l], dG[l], out=self.UG[l])
            if l > 0:
                bmm(dG[l], self.WGt[l], out=self.tmpG)
                mul(self.tmpG, mG[l - 1], out=dG[l - 1])
        if gamma is None:
            return self.u
        # ---- HVP along t = u (see _hvp): tangent forward through G ----
        thG, taG, thD, taD, dtG, dtD = self.thG, self.taG, self.thD, self.taD, self.dtG, self.dtD
        bmm(AG[0], self.UG[0], out=thG[0])
        for l in range(1, L):
            mul(thG[l - 1], mG[l - 1], out=taG[l])
            bmm(taG[l], self.WG[l], out=thG[l])
            thG[l].baddbmm_(AG[l], self.UG[l])
        # tangent forward through D: param tangent on [real; fake], input tangent on fake (L_G)
        bmm(self.AD2[0], self.UD[0], out=self.thD2[0])
        bmm(thG[-1], self.WD[0], out=self.thD0_g)
        for l in range(1, L):
            mul(thD[l - 1], mD[l - 1], out=taD[l])
            bmm(taD[l], self.WD[l], out=thD[l])
            self.thD2[l].baddbmm_(self.AD2[l], self.UD[l])
        torch.addcmul(self.sig, self.sig, self.sig, value=-1.0, out=self.s2)
        torch.addcmul(self.zero_out, thD[-1], self.s2, value=1.0 / B, out=dtD[-1])
        # tangent backward through D
        for l in range(L - 1, -1, -1):
            bmm(self.ADt[l], dtD[l], out=self.HD[l])
            if l > 0:
                self.HDw[l].baddbmm_(self.taDt[l], dD[l])
                bmm(dtD[l], self.WDt[l], out=self.tmpD)
                self.tmpD2.baddbmm_(self.dD2[l], self.TWDt[l])
                mul(self.tmpD, mD[l - 1], out=dtD[l - 1])
            else:
                self.HDw[0].baddbmm_(self.xt_t, self.dD0_g)
                bmm(self.dtD0_fakes, self.WDt[0], out=self.tmpX)
                torch.add(self.tmpX_a, self.tmpX_b, out=dtG[-1])
                dtG[-1].baddbmm_(self.dD0_fake, self.TWDt[0])
        # tangent backward through G
        for l in range(L - 1, -1, -1):
            bmm(self.AGt[l], dtG[l], out=self.HG[l])
            if l > 0:
                self.HGw[l].baddbmm_(self.taGt[l], dG[l])
                bmm(dtG[l], self.WGt[l], out=self.tmpG)
                self.tmpG.baddbmm_(dG[l], self.TWGt[l])
                mul(self.tmpG, mG[l - 1], out=dtG[l - 1])
        return self.u.add_(self.hv, alpha=gamma)

    def losses(self):
        d = self.logit.view(self.S, 3, self.B)
        sp = torch.stack([F.softplus(-d[:, 0]), F.softplus(d[:, 1]), F.softplus(-d[:, 2])], 1).mean(2)
        return sp[:, 0] + sp[:, 1], sp[:, 2]


# ----------------------------------------------------------------------------------------------------
# the optimiser: S runs' flat parameters + TF-1 RMSProp, one SimGA / ConOpt step
# ----------------------------------------------------------------------------------------------------

class FusedMoG:
    """S independent MoG runs: flat parameters [S, 2003] and TF-1 RMSProp state (numgan.rmsprop, spec 1.3).

    ``step(x_real, z)`` does one SimGA or ConOpt iteration (paper Alg. 1 / Alg. 2) on the minibatch
    ``x_real`` [S, B, 2], ``z`` [S, B, 16], exactly as numgan.optim.SimGA / ConOpt with the default
    TF1RMSprop on numgan.mog's EnsembleMLP: ms <- decay ms + (1 - decay) g^2, x <- x - lr g / sqrt(ms + eps)
    with ms starting at ``initial_accumulator``. The step has no host syncs and keeps every buffer at a
    fixed address, so it can be captured in a CUDA graph (:meth:`make_graphed_steps`).

    ``params`` and ``square_avg`` are plain tensors that the step updates in place. ``backend`` "torch"
    computes the direction with the batched matrix products of this module; "triton" with the on-chip
    kernels of numgan.mog_triton (CUDA, float32; ``triton_options`` are passed to
    ``mog_triton.direction``: precision, tile, split, num_warps, reload); "native" with the compiled C
    step of numgan.mog_native (CPU, float32 or float64; the whole step, update included, is one call).
    All compute the same function (with the default float32 precision).
    """

    def __init__(self, params: Tensor, method: str = "conopt", gamma: float = 10.0, lr: float = 1e-4,
                 decay: float = 0.9, eps: float = 1e-10, initial_accumulator: float = 1.0,
                 backend: str = "torch", triton_options: Optional[dict] = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if method not in SUPPORTED_METHODS:
            raise ValueError(f"the fused MoG engine supports methods {SUPPORTED_METHODS}, got {method!r}")
        if params.dim() != 2 or params.shape[1] != N_PARAMS:
            raise ValueError(f"params must be [S, {N_PARAMS}] (numgan.mog_fused.pack(G, D)), got {tuple(params.shape)}")
        if gamma < 0 or lr < 0 or not 0.0 <= decay < 1.0 or eps < 0:
            raise ValueError(f"invalid settings: gamma={gamma}, lr={lr}, decay={decay}, eps={eps}")
        self.method, self.gamma, self.lr, self.decay, self.eps = method, float(gamma), lr, decay, eps
        self.params = params.detach().clone().contiguous()
        self.square_avg = torch.full_like(self.params, initial_accumulator)
        self._plan = None
        self.backend, self.triton_options = backend, dict(triton_options or {})
        if backend == "triton":
            from . import mog_triton
            if not mog_triton.available():
                raise ValueError("backend='triton' needs Triton (shipped with the Linux CUDA wheels of torch); "
                                 "use backend='torch'")
            mog_triton.check_engine(self.params, self.triton_options)
        if backend == "native":
            from . import mog_native
            mog_native.check_engine(self.params)

    @property
    def n_seeds(self) -> int:
        return self.params.shape[0]

    def _triton_workspace(self):
        """The Triton backend's buffers (numgan.mog_triton.Workspace), made on first use."""
        from . import mog_triton
        if self._plan is None:
            self._plan = mog_triton.Workspace(self.params)
        return self._plan

    def _native_workspace(self, S: int, B: int):
        """The native backend's scratch memory (numgan.mog_native.Workspace), remade when B changes."""
        from . import mog_native
        if self._plan is None or not self._plan.fits(S, B, self.params.dtype):
            self._plan = mog_native.Workspace(S, B, self.params.dtype)
        return self._plan

    def _check_batch(self, x_real: Tensor, z: Tensor) -> None:
        B = x_real.shape[1] if x_real.dim() == 3 else -1
        if x_real.shape != (self.n_seeds, B, X_DIM) or z.shape != (self.n_seeds, B, Z_DIM):
            raise ValueError(f"expected x_real [{self.n_seeds}, B, {X_DIM}] and z [{self.n_seeds}, B, {Z_DIM}], "
                             f"got {tuple(x_real.shape)} and {tuple(z.shape)}")

    def direction(self, x_real: Tensor, z: Tensor, losses: bool = False):
        """The loss-form update direction (u for SimGA, u + gamma J_u^T u for ConOpt) [S, 2003].

        Returns (direction, (loss_d, loss_g) or None). The direction lives in an internal buffer that
        the next call overwrites.
        """
        S, B = x_real.shape[0], x_real.shape[1]
        self._check_batch(x_real, z)
        gamma = self.gamma if self.method == "conopt" else None
        if self.backend == "native":
            from . import mog_native
            g, ls = mog_native.direction(self.params, x_real.contiguous(), z.contiguous(), gamma,
                                         workspace=self._native_workspace(S, B))
            return g, ((ls[:, 0].clone(), ls[:, 1].clone()) if losses else None)
        if self.backend == "triton":
            from . import mog_triton
            g, ls = mog_triton.direction(self.params, x_real.contiguous(), z.contiguous(), gamma,
                                         workspace=self._triton_workspace(), **self.triton_options)
            return g, ((ls[:, 0].clone(), ls[:, 1].clone()) if losses else None)
        if self._plan is None or self._plan.B != B:
            self._plan = _StepPlan(self.params, S, B)
        g = self._plan.run(x_real, z, gamma)
        return g, (self._plan.losses() if losses else None)

    def step(self, x_real: Tensor, z: Tensor, losses: bool = True):
        """One game step on (x_real [S, B, 2], z [S, B, 16]); returns the per-seed (loss_d, loss_g) of the
        minibatch before the update (None with ``losses=False``, which saves a few ops)."""
        out = self._step(x_real, z, losses)
        return (out[0].clone(), out[1].clone()) if losses else None

    def _fused_update(self) -> bool:
        """Whether the Triton kernels apply the update themselves (mog_triton.conopt_step: ConOpt, one
        program per seed)."""
        return self.backend == "triton" and self.method == "conopt" and self.triton_options.get("split", 1) == 1

    def _step(self, x_real: Tensor, z: Tensor, losses: bool = True):
        """:meth:`step`, returning the losses as views of internal buffers (overwritten by the next step;
        None for the torch and native backends with ``losses=False``)."""
        if self.backend == "native":
            from . import mog_native
            self._check_batch(x_real, z)
            S, B = x_real.shape[0], x_real.shape[1]
            ls = mog_native.step(self.params, self.square_avg, x_real.contiguous(), z.contiguous(),
                                 self.gamma if self.method == "conopt" else None, self.lr, self.decay, self.eps,
                                 workspace=self._native_workspace(S, B), losses=losses)
            return (ls[:, 0], ls[:, 1]) if losses else None
        if self._fused_update():
            from . import mog_triton
            self._check_batch(x_real, z)
            opts = {k: v for k, v in self.triton_options.items() if k != "split"}
            ls = mog_triton.conopt_step(self.params, self.square_avg, x_real.contiguous(), z.contiguous(),
                                        self.gamma, self.lr, self.decay, self.eps,
                                        workspace=self._triton_workspace(), **opts)
            return ls[:, 0], ls[:, 1]
        g, _ = self.direction(x_real, z)
        sq = self.square_avg
        sq.mul_(self.decay).addcmul_(g, g, value=1.0 - self.decay)
        self.params.addcdiv_(g, torch.add(sq, self.eps).sqrt_(), value=-self.lr)
        if self.backend == "triton":
            ls = self._plan.buffers(self.triton_options.get("split", 1), x_real.shape[1]).losses
            return ls[:, 0], ls[:, 1]
        return self._plan.losses() if losses else None

    def make_graphed_steps(self, n_steps: int, batch_size: int = 512, sample: bool = False) -> "GraphedSteps":
        """Capture ``n_steps`` consecutive steps in one ``torch.cuda.CUDAGraph`` (CUDA only).

        With ``sample=False`` the graph reads its minibatches from the static buffers ``x_real``
        [n_steps, S, B, 2] and ``z`` [n_steps, S, B, 16] of the returned object: copy pre-drawn
        batches in before each ``replay()`` (this reproduces numgan.mog's random stream). With
        ``sample=True`` the graph draws them itself from the default CUDA generator (a different
        stream from numgan.mog.train's ``gen``: same distribution, not the same numbers). Losses of
        every captured step land in ``loss_d`` / ``loss_g`` [n_steps, S].
        """
        if self.params.device.type != "cuda":
            raise ValueError("make_graphed_steps needs the parameters on a CUDA device; on the CPU call step()")
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        return GraphedSteps(self, n_steps, batch_size, sample)


class GraphedSteps:
    """``n_steps`` captured steps of a :class:`FusedMoG`; see :meth:`FusedMoG.make_graphed_steps`."""

    def __init__(self, eng: FusedMoG, n_steps: int, batch_size: int, sample: bool):
        from .mog import N_MODES, STD, _row_centres
        S, dev, dt = eng.n_seeds, eng.params.device, eng.params.dtype
        self.engine, self.n_steps, self.sample = eng, n_steps, sample
        self.x_real = torch.zeros(n_steps, S, batch_size, X_DIM, device=dev, dtype=dt)
        self.z = torch.zeros(n_steps, S, batch_size, Z_DIM, device=dev, dtype=dt)
        self.loss_d = torch.zeros(n_steps, S, device=dev, dtype=dt)
        self.loss_g = torch.zeros(n_steps, S, device=dev, dtype=dt)
        self._modes = _row_centres(batch_size, N_MODES, dt, dev)  # numgan.mog.sample_real's centres
        self._std = STD

        def body():
            for i in range(n_steps):
                if sample:
                    torch.randn(self.x_real[i].shape, out=self.x_real[i], device=dev, dtype=dt)
                    self.x_real[i].mul_(self._std).add_(self._modes)
                    torch.randn(self.z[i].shape, out=self.z[i], device=dev, dtype=dt)
                ld, lg = eng._step(self.x_real[i], self.z[i])
                self.loss_d[i].copy_(ld)
                self.loss_g[i].copy_(lg)

        # warm up on a side stream (allocates the workspace), then restore the state and capture
        saved = eng.params.clone(), eng.square_avg.clone()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream(dev).wait_stream(side)
        eng.params.copy_(saved[0])
        eng.square_avg.copy_(saved[1])
        self.graph = torch.cuda.CUDAGraph()
        # captured on this object's own stream, not torch.cuda.graph's process-wide one: graphs captured on
        # one stream share their cuBLAS workspaces and race if replayed at once (numgan.step._work_stream)
        with torch.cuda.graph(self.graph, stream=side):
            body()

    def replay(self) -> None:
        """Run the captured steps (asynchronously, on the current stream)."""
        self.graph.replay()


# ----------------------------------------------------------------------------------------------------
# RMSProp state <-> numgan.optim's TF1RMSprop (so checkpoints work across engines)
# ----------------------------------------------------------------------------------------------------

def _inner_rmsprop(opt):
    inner = opt.optimizers.get("both") if hasattr(opt, "optimizers") else None
    if inner is None or inner.__class__.__name__ != "TF1RMSprop":
        raise ValueError("expected a SimGA / ConOpt game optimiser with numgan.rmsprop.TF1RMSprop inside")
    return inner


@torch.no_grad()
def load_rmsprop_state(eng: FusedMoG, opt, G, D) -> None:
    """Copy the mean squares of ``opt`` (a numgan.optim SimGA / ConOpt over G, D with TF1RMSprop) into ``eng``.

    Parameters without state (a fresh optimiser) keep the engine's initial accumulator.
    """
    inner = _inner_rmsprop(opt)
    off = 0
    for p in list(G._ordered()) + list(D._ordered()):
        n = p[0].numel()
        st = inner.state.get(p)
        if st and "square_avg" in st:
            eng.square_avg[:, off:off + n].copy_(st["square_avg"].reshape(eng.n_seeds, n))
        off += n


@torch.no_grad()
def store_rmsprop_state(eng: FusedMoG, opt, G, D, n_steps: int) -> None:
    """Write ``eng``'s mean squares into ``opt``'s TF1RMSprop state (``step`` = ``n_steps``), the inverse
    of :func:`load_rmsprop_state`; ``opt.state_dict()`` then gives the autograd engine's checkpoint format."""
    inner = _inner_rmsprop(opt)
    off = 0
    for p in list(G._ordered()) + list(D._ordered()):
        n = p[0].numel()
        inner.state[p] = {"step": n_steps, "square_avg": eng.square_avg[:, off:off + n].reshape(p.shape).clone()}
        off += n
