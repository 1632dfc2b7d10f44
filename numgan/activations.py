"""Leaky ReLU whose derivatives of every order are one kernel each (issue 4).

``lrelu(t) = max(t, a t)`` with slope ``a`` (0.2 in the image GANs, spec 0.2). Its
derivative ``g -> g * (1 if t > 0 else a)`` is linear in ``g`` and piecewise constant in ``t``. PyTorch's
built-in formula differentiates that derivative with respect to ``t`` as well, and the result, an
all-zero tensor, costs a fill kernel and an addition in every ConOpt double backward (one of each per
activation). Here the derivative is an autograd Function of its own whose gradient with respect to ``t``
is declared absent (``None``), which autograd treats as zero without computing anything. Values and
derivatives of every order are those of ``torch.nn.functional.leaky_relu`` (tests/test_models.py);
forward mode (``jvp``) and ``torch.func`` transforms are supported.
"""
import torch
from torch import Tensor, nn

_lrelu_grad = torch.ops.aten.leaky_relu_backward


class _LeakyReLU(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, slope: float) -> Tensor:
        return torch.nn.functional.leaky_relu(x, slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.slope = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return _LeakyReLUGrad.apply(g, x, ctx.slope), None

    @staticmethod
    def jvp(ctx, x_t, _):
        x, = ctx.saved_tensors
        return _LeakyReLUGrad.apply(x_t, x, ctx.slope)


class _LeakyReLUGrad(torch.autograd.Function):
    """g -> g * (1 if x > 0 else slope): linear in g; x only picks the factor (its derivative is 0)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, x: Tensor, slope: float) -> Tensor:
        return _lrelu_grad(g, x, slope, False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, ctx.slope = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, gg):
        x, = ctx.saved_tensors
        return _LeakyReLUGrad.apply(gg, x, ctx.slope), None, None

    @staticmethod
    def jvp(ctx, g_t, x_t, _):
        x, = ctx.saved_tensors
        return _LeakyReLUGrad.apply(g_t, x, ctx.slope)


def leaky_relu_grad(g: Tensor, x: Tensor, slope: float) -> Tensor:
    """``g * (1 if x > 0 else slope)``, the leaky ReLU's derivative at ``x`` applied to ``g``; differentiable in
    ``g`` to any order (``x`` only picks the factors)."""
    return _LeakyReLUGrad.apply(g, x, float(slope))


def leaky_relu(x: Tensor, slope: float) -> Tensor:
    """``torch.nn.functional.leaky_relu(x, slope)`` with cheaper higher derivatives (module docstring)."""
    return _LeakyReLU.apply(x, float(slope))


class LeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` computed by :func:`leaky_relu`; with ``fused`` set (numgan.models.fuse_activations) the
    neighbouring GEMM convolution computes it, and the module passes its input through."""

    fused = False

    def forward(self, x: Tensor) -> Tensor:
        return x if self.fused else leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fused into the neighbouring GEMM convolution" if self.fused else "")

