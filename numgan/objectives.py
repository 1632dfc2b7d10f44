"""GAN objectives (spec 1.1; paper Sec. 2.1 and supplement Sec. "Additional experiments", Fig. 9).

The discriminator D returns a logit (no sigmoid). Each player *minimises* its loss;
the paper's utilities are the negated losses (f = -L_G, g = -L_D).
With sp(t) = log(1 + e^t) (softplus):

============  =======================================  ==========================  =========
objective     L_D (discriminator)                      L_G (generator)             zero-sum
============  =======================================  ==========================  =========
standard      mean sp(-D(x_r)) + mean sp(D(x_f))       mean sp(-D(x_f))            no
JS            as standard                              -mean sp(D(x_f))            yes
KL            as standard                              -mean D(x_f)                no
tv            mean tanh D(x_f) - mean tanh D(x_r)      -mean tanh D(x_f)           yes
indicator     mean D(x_f) - mean D(x_r)                -mean D(x_f)                yes
============  =======================================  ==========================  =========

``standard`` is the non-saturating loss of Goodfellow et al. used by the paper's code for every
figure except 6-9 (JS) and 9c (indicator); it is *not* zero-sum (spec D-10).

:func:`joint_losses` computes both losses from the logits of one D pass over the stacked batch
[real; fake] (numgan.step's ``joint_d``); for the softplus objectives it is one autograd Function with
closed-form derivatives (issue 4).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("standard", "JS", "KL", "tv", "indicator")


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown GAN objective {objective!r}; choose one of {OBJECTIVES}")


def loss_d(d_real: torch.Tensor, d_fake: torch.Tensor, objective: str = "standard") -> torch.Tensor:
    """Discriminator loss L_D from the logits on a real and a fake batch (leading dims averaged)."""
    _check(objective)
    if objective in ("standard", "JS", "KL"):
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if objective == "tv":
        return torch.tanh(d_fake).mean() - torch.tanh(d_real).mean()
    return d_fake.mean() - d_real.mean()  # indicator


def loss_g(d_fake: torch.Tensor, objective: str = "standard") -> torch.Tensor:
    """Generator loss L_G from the discriminator logits on a fake batch."""
    _check(objective)
    if objective == "standard":
        return F.softplus(-d_fake).mean()
    if objective == "JS":
        return -F.softplus(d_fake).mean()
    if objective == "tv":
        return -torch.tanh(d_fake).mean()
    return -d_fake.mean()  # KL and indicator: the raw logit


# ----------------------------------------------------------------------------------------------------
# both losses from one D pass over [real; fake] (numgan.step, joint_d)
# ----------------------------------------------------------------------------------------------------
# For standard, JS and KL every per-logit derivative is affine in sigma = sigmoid(d):
#   dL_D/dd = (sigma - y) / n   (y = 1 on real rows, 0 on fake rows; n = that batch's size)
#   dL_G/dd = a sigma + b on fake rows, 0 on real rows: (a, b) = (1, -1)/n_f standard, (-1, 0)/n_f JS,
#             (0, -1)/n_f KL
# so dd = sigma * alpha + beta with alpha, beta linear in the two incoming loss gradients, and the
# second derivative is sigma (1 - sigma) alpha: a few elementwise kernels per derivative order instead
# of torch's softplus / mean / slice formulas (about 70 kernels in a ConOpt step). For a saturated logit
# (sigma rounds to 1) sigma - 1 is 0 instead of -sigmoid(-d), a tiny number: the absolute error stays at
# float rounding (~6e-8 / n in float32), as in torch's formulas; only the relative error of that tiny
# entry is large, which no update notices.
_G_AFFINE = {"standard": (1.0, -1.0), "JS": (-1.0, 0.0), "KL": (0.0, -1.0)}
_COEFS: dict = {}


def _coefs(n_real: int, n: int, objective: str, like: Tensor) -> Tensor:
    """[4, n] constants (A_D, B_D, A_G, B_G) of the affine derivatives above, cached per shape/device.

    Made on the CPU and copied with a blocking copy, so a cached tensor is complete before any stream
    (numgan.step.run_concurrently runs several) reads it; inside a CUDA-graph capture (no blocking copy
    allowed) they are made by the graph itself and not cached."""
    key = (n_real, n, objective, like.dtype, like.device)
    c = _COEFS.get(key)
    if c is None:
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            return _make_coefs(n_real, n, objective, like.dtype, like.device)
        c = _COEFS[key] = _make_coefs(n_real, n, objective, like.dtype, "cpu").to(like.device)
    return c


def _make_coefs(n_real: int, n: int, objective: str, dtype, device) -> Tensor:
    n_f = n - n_real
    a_g, b_g = _G_AFFINE[objective]
    c = torch.zeros(4, n, dtype=dtype, device=device)
    c[0, :n_real], c[0, n_real:] = 1.0 / n_real, 1.0 / n_f
    c[1, :n_real] = -1.0 / n_real
    c[2, n_real:], c[3, n_real:] = a_g / n_f, b_g / n_f
    return c


class _JointLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d: Tensor, n_real: int, objective: str):
        ctx.n_real, ctx.objective = n_real, objective
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(d)
        return loss_d(d[:n_real], d[n_real:], objective), loss_g(d[n_real:], objective)

    @staticmethod
    def backward(ctx, g_d: Optional[Tensor], g_g: Optional[Tensor]):
        d, = ctx.saved_tensors
        return _JointLossesGrad.apply(d, g_d, g_g, _coefs(ctx.n_real, d.shape[0], ctx.objective, d)), None, None


class _JointLossesGrad(torch.autograd.Function):
    """(d, g_D, g_G) -> g_D dL_D/dd + g_G dL_G/dd = sigma(d) alpha + beta (see above); its own derivative
    is again closed-form (and written with differentiable ops, so higher orders work too)."""

    @staticmethod
    def _coef(c: Tensor, g_d: Optional[Tensor], g_g: Optional[Tensor]) -> Tensor:
        """[alpha; beta] [2, n] for the incoming loss gradients (None = 0)."""
        if g_d is None:
            return c[2:] * g_g if g_g is not None else torch.zeros_like(c[2:])
        return c[:2] * g_d if g_g is None else c[:2] * g_d + c[2:] * g_g

    @staticmethod
    def forward(ctx, d: Tensor, g_d: Optional[Tensor], g_g: Optional[Tensor], c: Tensor):
        coef = _JointLossesGrad._coef(c, g_d, g_g)
        sig = torch.sigmoid(d)
        ctx.save_for_backward(d, sig, coef, c, g_d, g_g)
        return torch.addcmul(coef[1], sig, coef[0])

    @staticmethod
    def backward(ctx, gg: Tensor):
        d, sig, coef, c, g_d, g_g = ctx.saved_tensors
        if torch.is_grad_enabled():   # building a graph (third derivatives): recompute from the inputs
            sig, coef = torch.sigmoid(d), _JointLossesGrad._coef(c, g_d, g_g)
        grad_d = torch.ops.aten.sigmoid_backward(gg * coef[0], sig) if ctx.needs_input_grad[0] else None
        grad_gd = (gg * torch.addcmul(c[1], sig, c[0])).sum() if ctx.needs_input_grad[1] else None
        grad_gg = (gg * torch.addcmul(c[3], sig, c[2])).sum() if ctx.needs_input_grad[2] else None
        return grad_d, grad_gd, grad_gg, None


def joint_losses(logits: Tensor, n_real: int, objective: str = "standard") -> tuple[Tensor, Tensor]:
    """(L_D, L_G) from the logits [n_real + n_fake] of one D pass over the stacked batch [real; fake].

    The same values and derivatives (of every order) as ``loss_d(logits[:n_real], logits[n_real:])`` and
    ``loss_g(logits[n_real:])``; for standard, JS and KL through one autograd Function with closed-form
    derivatives (the comment above), for tv and indicator through those functions.
    """
    _check(objective)
    if logits.dim() != 1 or not 0 < n_real < logits.shape[0]:
        raise ValueError(f"expected logits [n_real + n_fake] with both parts non-empty, got shape "
                         f"{list(logits.shape)} and n_real={n_real}")
    if objective in _G_AFFINE:
        return _JointLosses.apply(logits, n_real, objective)
    return loss_d(logits[:n_real], logits[n_real:], objective), loss_g(logits[n_real:], objective)
