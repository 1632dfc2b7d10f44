"""Training-mode batch normalisation whose derivatives of every order are closed-form (issue 4).

TF-slim's batch norm in training mode (spec 1.5; numgan.models.TFBatchNorm adds beta and keeps the
running statistics) normalises each channel c over the N elements of the batch (and space):

    y = x_hat = (x - mu) * r,   mu = mean(x),  r = 1 / sqrt(var + eps),  var = mean((x - mu)^2).

Its derivative is the linear map  B(v) = r (v - mean(v) - x_hat mean(v x_hat))  (per channel), which is
self-adjoint: dx_hat = B(dx) and, for an incoming gradient g, grad_x = B(g). ConOpt differentiates that
gradient again. With gx = B(g) and m = mean(g x_hat), the derivative of <gg, gx> (gg the gradient arriving
at gx) is

    w.r.t. g:   B(gg)
    w.r.t. x:   r^2 (2 m a2 - a1) / N * x_hat  -  r a2 / N * gx  -  m r^2 gg  +  m r^2 mean(gg)
    with        a1 = sum(gg g) - N mean(gg) mean(g),   a2 = sum(gg x_hat)   (per channel sums)

(differentiate r, mu and m through dx_hat = B(dx), dr = -r^2 mean(x_hat dx), dm = <gx, dx> / N). PyTorch
differentiates its batch-norm backward op by op (about 60 kernels per layer in a ConOpt step's second
derivatives); these formulas take about 20. The forward pass and the first derivative are torch's own fused
kernels (``native_batch_norm`` and its backward), so values, running averages and first derivatives are
exactly ``F.batch_norm``'s, and SimGA / AltGA steps are unchanged; second derivatives agree to rounding
(float64 tests). Third derivatives (torch has none for batch norm) are those of the formulas, recomputed
with differentiable operations when a graph is being built; forward mode (``jvp``, also over a backward
pass) is supported. ``torch.func.vmap`` is not (the running averages are updated in place, as with
``F.batch_norm``).
"""
import torch
from torch import Tensor


def _dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _moments(x: Tensor, eps: float):
    """(mean, biased var, r = 1/sqrt(var + eps), x_hat), per channel, keepdim."""
    var, mu = torch.var_mean(x, dim=_dims(x), keepdim=True, correction=0)
    r = torch.rsqrt(var + eps)
    return mu, var, r, (x - mu) * r


def _b(v: Tensor, x_hat: Tensor, r: Tensor) -> Tensor:
    """B(v) = r (v - mean(v) - x_hat mean(v x_hat)), the derivative of x_hat (self-adjoint)."""
    d = _dims(v)
    return r * torch.addcmul(v - v.mean(d, keepdim=True), x_hat, (v * x_hat).mean(d, keepdim=True), value=-1.0)


def _as_channels(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector [C] as [1, C, 1, ...] for broadcasting against ``like``."""
    return v.view((1, -1) + (1,) * (like.dim() - 2))


class _BatchNorm(torch.autograd.Function):
    """x -> x_hat with torch's fused kernel (``native_batch_norm``, which also updates the running averages);
    its derivative is :class:`_BatchNormGrad`."""

    @staticmethod
    def forward(x: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float):
        y, mean, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
        return y, mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, _, _, ctx.eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, mean, invstd)
        ctx.save_for_forward(x, mean, invstd)

    @staticmethod
    def backward(ctx, g, *_):
        x, mean, invstd = ctx.saved_tensors
        if g is None:
            return None, None, None, None, None
        return _BatchNormGrad.apply(g, x, mean, invstd, ctx.eps), None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        x, mean, invstd = ctx.saved_tensors
        r = _as_channels(invstd, x)
        return _b(x_t, (x - _as_channels(mean, x)) * r, r), None, None


class _BatchNormGrad(torch.autograd.Function):
    """(g, x) -> B(g) with torch's fused kernel (``native_batch_norm_backward``); its own derivative is the
    closed form of the module docstring."""

    @staticmethod
    def forward(g: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, eps: float):
        gx, _, _ = torch.ops.aten.native_batch_norm_backward(g, x, None, None, None, mean, invstd, True, eps,
                                                             [True, False, False])
        return gx

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, mean, invstd, ctx.eps = inputs
        ctx.save_for_backward(g, x, mean, invstd, output)
        ctx.save_for_forward(g, x, mean, invstd, output)

    @staticmethod
    def jvp(ctx, g_t, x_t, *_):
        """d(gx) = B(g_t) - r mean(x_hat x_t) gx - r <gx, x_t> / n x_hat - r m B(x_t)  (m = mean(g x_hat))."""
        g, x, mean, invstd, gx = ctx.saved_tensors
        r = _as_channels(invstd, x)
        x_hat = (x - _as_channels(mean, x)) * r
        d = _dims(g)
        out = _b(g_t, x_hat, r) if g_t is not None else torch.zeros_like(gx)
        if x_t is not None:
            m = (g * x_hat).mean(d, keepdim=True)
            out = out - r * ((x_hat * x_t).mean(d, keepdim=True) * gx + (gx * x_t).mean(d, keepdim=True) * x_hat
                             + m * _b(x_t, x_hat, r))
        return out

    @staticmethod
    def backward(ctx, gg):
        g, x, mean, invstd, gx = ctx.saved_tensors
        if torch.is_grad_enabled():   # building a graph (third derivatives): recompute from x, differentiably
            _, _, r, x_hat = _moments(x, ctx.eps)
            gx = _b(g, x_hat, r)
        else:
            r = _as_channels(invstd, x)
            x_hat = (x - _as_channels(mean, x)) * r
        d = _dims(g)
        n = g.numel() // g.shape[1]
        # per-channel sums of gg, gg x_hat, gg g, g, g x_hat in one reduction
        s = torch.stack([gg, gg * x_hat, gg * g, g, g * x_hat]).sum([i + 1 for i in d], keepdim=True)
        s_gg, a2, s_ggg, s_g, s_gx = s.unbind(0)
        gc = gg - s_gg / n                                                       # gg - mean(gg)
        grad_g = None
        if ctx.needs_input_grad[0]:   # B(gg) = r (gg - mean(gg) - x_hat a2 / n)
            grad_g = r * torch.addcmul(gc, x_hat, a2, value=-1.0 / n)
        grad_x = None
        if ctx.needs_input_grad[1]:
            m = s_gx / n
            a1 = torch.addcmul(s_ggg, s_gg, s_g, value=-1.0 / n)
            r2 = r * r
            coef = r2 * torch.addcmul(a1, m, a2, value=-2.0)                    # -n x (x_hat's coefficient)
            grad_x = x_hat * (coef / -n)
            grad_x = torch.addcmul(grad_x, gx, r * a2, value=-1.0 / n)
            grad_x = torch.addcmul(grad_x, gc, m * r2, value=-1.0)
        return grad_g, grad_x, None, None, None


def batch_norm_train(x: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float) -> Tensor:
    """``F.batch_norm(x, running_mean, running_var, None, None, True, momentum, eps)``: the same values, running
    averages and first derivatives (torch's fused kernels), with the closed-form second derivatives of the
    module docstring."""
    return _BatchNorm.apply(x, running_mean, running_var, float(momentum), float(eps))[0]
