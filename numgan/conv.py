"""Strided convolutions whose derivatives of every order stay on fast kernels (issue 4).

ConOpt differentiates the game's gradient once more (paper Eq. 16-17: grad 1/2 ||v||^2 = v'^T v),
so every convolution is differentiated twice. PyTorch's own double backward of a *strided*
convolution (``_convolution_double_backward``) expresses the derivative of the weight gradient as a
dilated convolution, which CUDA runs on a slow non-cuDNN kernel (``slow_conv_dilated2d``: 60% of a
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
derivatives run the three cuDNN algorithms and nothing else. Padding and cropping are applied outside
(``F.pad`` and slicing). The same identities hold on the CPU, where tests/test_step.py checks the
values and ConOpt's second derivatives against torch's native convolution in float64.

``conv2d_gemm`` / ``conv_transpose2d_gemm`` are a second formulation (im2col + one matrix product),
whose derivatives are matrix products, strided views and col2im. On an H100 the GEMM form gave the
faster ConOpt step (cuDNN's strided dgrad kernels and its NCHW/NHWC conversions cost more than the
im2col copies), so numgan.train uses it; benchmarks/bench_step.py times both.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def _conv(x: Tensor, w: Tensor, stride: int) -> Tensor:
    return F.conv2d(x, w, stride=stride)


def _conv_t(g: Tensor, w: Tensor, stride: int, size) -> Tensor:
    k = w.shape[-1]
    op = (size[0] - ((g.shape[-2] - 1) * stride + k), size[1] - ((g.shape[-1] - 1) * stride + k))
    return F.conv_transpose2d(g, w, stride=stride, output_padding=op)


def _wgrad(x: Tensor, g: Tensor, stride: int, shape) -> Tensor:
    w = x.new_empty(shape)  # only its shape is read
    return torch.ops.aten.convolution_backward(g, x, w, None, [stride, stride], [0, 0], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]


class Conv(torch.autograd.Function):
    """y = conv2d(x, W, stride) without padding."""

    @staticmethod
    def forward(ctx, x, w, stride):
        ctx.save_for_backward(x, w)
        ctx.stride = stride
        return _conv(x, w, stride)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        s = ctx.stride
        dx = ConvT.apply(gy, w, s, tuple(x.shape[-2:])) if ctx.needs_input_grad[0] else None
        dw = WGrad.apply(x, gy, s, tuple(w.shape)) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class ConvT(torch.autograd.Function):
    """conv_t(g, W): the adjoint of ``Conv`` in x, output spatial size ``size``."""

    @staticmethod
    def forward(ctx, g, w, stride, size):
        ctx.save_for_backward(g, w)
        ctx.stride = stride
        return _conv_t(g, w, stride, size)

    @staticmethod
    def backward(ctx, gy):
        g, w = ctx.saved_tensors
        s = ctx.stride
        dg = Conv.apply(gy, w, s) if ctx.needs_input_grad[0] else None
        dw = WGrad.apply(gy, g, s, tuple(w.shape)) if ctx.needs_input_grad[1] else None
        return dg, dw, None, None


class WGrad(torch.autograd.Function):
    """wgrad(x, g): the adjoint of ``Conv`` in W (the weight gradient for output gradient g)."""

    @staticmethod
    def forward(ctx, x, g, stride, shape):
        ctx.save_for_backward(x, g)
        ctx.stride = stride
        return _wgrad(x, g, stride, shape)

    @staticmethod
    def backward(ctx, gw):
        x, g = ctx.saved_tensors
        s = ctx.stride
        dx = ConvT.apply(g, gw, s, tuple(x.shape[-2:])) if ctx.needs_input_grad[0] else None
        dg = Conv.apply(x, gw, s) if ctx.needs_input_grad[1] else None
        return dx, dg, None, None


def conv2d_adjoint(x: Tensor, weight: Tensor, bias, stride: int) -> Tensor:
    """F.conv2d(x, weight, bias, stride) (x already padded) through :class:`Conv`."""
    y = Conv.apply(x, weight, stride)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv_transpose2d_adjoint(x: Tensor, weight: Tensor, bias, stride: int, padding: int) -> Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding) through :class:`ConvT`.

    ``weight`` is ConvTranspose2d's [in, out, k, k], which is the weight of the convolution it is the
    adjoint of. The full output ((H - 1) s + k) is cropped by ``padding`` on each side.
    """
    k = weight.shape[-1]
    hf, wf = (x.shape[-2] - 1) * stride + k, (x.shape[-1] - 1) * stride + k
    y = ConvT.apply(x, weight, stride, (hf, wf))
    if padding:
        y = y[:, :, padding:hf - padding, padding:wf - padding]
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv2d_gemm(x: Tensor, weight: Tensor, bias, stride: int) -> Tensor:
    """F.conv2d(x, weight, bias, stride) (no padding) as im2col and one 2-D matrix product.

    im2col is a strided view (``Tensor.unfold``) copied once into [B Ho Wo, k k C] rows (channels
    innermost); ``F.unfold`` is avoided because its CUDA kernel is launched once per image. Every
    derivative is a matrix product, a strided view or ``unfold_backward`` (col2im). The output is an
    NCHW view of channels-last memory.
    """
    b = x.shape[0]
    c_out, _, k, _ = weight.shape
    patches = x.unfold(2, k, stride).unfold(3, k, stride)            # [B, C, Ho, Wo, k, k] (a view)
    ho, wo = patches.shape[2], patches.shape[3]
    cols = patches.permute(0, 2, 3, 4, 5, 1).reshape(b * ho * wo, -1)   # [B Ho Wo, k k C] (one copy)
    y = cols @ weight.permute(0, 2, 3, 1).reshape(c_out, -1).t()          # [B Ho Wo, O]
    if bias is not None:
        y = y + bias
    return y.view(b, ho, wo, c_out).permute(0, 3, 1, 2)


def conv_transpose2d_gemm(x: Tensor, weight: Tensor, bias, stride: int, padding: int) -> Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding) as one 2-D matrix product and col2im
    (``unfold_backward`` per spatial axis, the adjoint of the strided im2col view)."""
    b, c_in, h, w = x.shape
    _, c_out, k, _ = weight.shape
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c_in)                # free for channels-last input
    cols = rows @ weight.reshape(c_in, c_out * k * k)                    # [B H W, O k k]
    cols = cols.view(b, h, w, c_out, k, k).permute(0, 3, 1, 2, 4, 5)     # [B, O, H, W, k, k] (a view)
    hf, wf = (h - 1) * stride + k, (w - 1) * stride + k                 # the uncropped output
    y = torch.ops.aten.unfold_backward(cols, [b, c_out, h, wf, k], 3, k, stride)
    y = torch.ops.aten.unfold_backward(y, [b, c_out, hf, wf], 2, k, stride)
    if padding:
        y = y[:, :, padding:hf - padding, padding:wf - padding]
    return y if bias is None else y + bias.view(1, -1, 1, 1)
