"""Image GAN architectures (spec FIGURES.md §1.5; Fig 8 [DEFAULT]; Fig 10 ResNet variants).

PyTorch versions of the authors' TF-slim models (`consensus_gan/models/*.py`): TF 'SAME'
padding reproduced exactly, TF-slim batch norm (decay 0.999, eps 1e-3, centre only, no scale),
Xavier/Glorot-uniform weights, zero biases, leaky ReLU with leak 0.2, tanh generator output and
a single discriminator logit. Shapes are NCHW; z ~ N(0, I) of size `z_dim`.

==================  ==========================================================  ===============================
name                what                                                        used for (spec / paper)
==================  ==========================================================  ===============================
dcgan3              3-deconv DC-GAN; BN in G (FC: per feature) and D conv2-3    Fig 5 AltGA, Fig 12
dcgan3_nobn         dcgan3 without BN, biases everywhere                        Figs 4a, 5 ConOpt, 13, 14
dcgan4              4-deconv DC-GAN with BN, lrelu in G                         Figs 6/7 arch 1, 11 AltGA, 12
dcgan4_nobn         dcgan4 without BN                                           Figs 6/7 arch 2, 11 ConOpt, 13, 14
dcgan4_nobn_cf      dcgan4_nobn with a constant f filters everywhere            Figs 6/7 arch 3-4, Fig 9
dcgan4_fc           dcgan4; D gets flatten -> FC 512 lrelu -> FC 1              Fig 8 [DEFAULT] arch 1
dcgan4_nobn_fc      dcgan4_nobn, same extra D layer                             Fig 8 [DEFAULT] arch 2
dcgan4_nobn_cf_fc   dcgan4_nobn_cf, same extra D layer (D = R's conv4 D)        Fig 8 [DEFAULT] arch 3-4
resnet_cf           constant-filter ResNet, s = 1, branch-last conv N(0,1e-10)  Figs 10, 4b [DEFAULT] (6b6df36)
resnet_cf_s01       constant-filter ResNet, s = 0.1, Xavier everywhere          Fig 10 ablation (HEAD c8e9bf4)
conv3               in R, unused: constant-filter G; D with FC 512              none
conv4               in R, unused: FC 512 in G and in D                          Fig 8 alternative reading
dcgan3_nobn_cf      in R, unused: 3-layer constant-filter, no BN                none
==================  ==========================================================  ===============================

Spatial sizes: the dcgan3 family starts G at image_size/8 (3 stride-2 deconvs), the dcgan4
family and the ResNets at image_size/16 (4 stride-2 layers), so CIFAR (32) gives 4x4 / 2x2 and
CelebA (64) gives 8x8 / 4x4. Feature maps are NCHW, so the FC <-> feature-map reshapes order
units differently from TF's NHWC; with i.i.d. initialisation this is only a relabelling of units.

Batch norm: training mode uses batch statistics and updates the moving averages in place
(PyTorch momentum 0.001 = TF decay 0.999); eval mode uses the moving averages. The spec's
sample/Inception graphs use G in eval mode and D always in training mode; that is the caller's
choice (`G.eval()`), not enforced here.

All modules avoid in-place ops and `.data` so that double backprop (ConOpt) works.
"""
from __future__ import annotations

import collections
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import batchnorm, conv
from .activations import LeakyReLU, leaky_relu

__all__ = [
    "ARCHITECTURES",
    "BN_EPS",
    "BN_MOMENTUM",
    "LEAK",
    "RESNET_BRANCH_INIT_STD",
    "Discriminator",
    "Generator",
    "ResidualBlock",
    "SameConv2d",
    "SameConvTranspose2d",
    "TFBatchNorm",
    "CONV_IMPLS",
    "build_models",
    "fuse_activations",
    "set_conv_impl",
    "tf_same_padding",
]

LEAK = 0.2  # lrelu(t) = max(t, 0.2 t) throughout R (spec §0.2)
BN_MOMENTUM = 0.001  # TF-slim decay 0.999 (spec §1.5)
BN_EPS = 1e-3  # TF-slim epsilon (spec §1.5)
RESNET_BRANCH_INIT_STD = 1e-5  # release/6b6df36 ResNet: last conv of each residual branch (spec Fig 10)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


CONV_IMPLS = ("native", "adjoint", "gemm")   # see set_conv_impl and numgan.conv


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) of one spatial axis of length `size` (spec §1.5).

    The output has ceil(size/stride) entries; the total padding is
    max((ceil(size/stride) - 1) * stride + kernel - size, 0), with the smaller half before.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'SAME' padding (asymmetric: the extra row/column goes after).

    For a 5x5 stride-2 conv on an even size this is F.pad(x, (1, 2, 1, 2)) then
    Conv2d(k=5, s=2, p=0); for 3x3 stride 1 it is p=1 (spec §1.5). The padding is computed
    from the actual input size, so odd sizes follow TF too.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)
        self.same_kernel = int(kernel_size)
        self.same_stride = int(stride)
        self.impl = "native"   # or "adjoint" / "gemm": see set_conv_impl
        self.in_slope = None   # gemm: the leaky ReLU before this layer, applied inside im2col (set_conv_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], self.same_kernel, self.same_stride)
        left, right = tf_same_padding(x.shape[-1], self.same_kernel, self.same_stride)
        if self.impl == "gemm":  # im2col reads the zero padding itself (and applies a fused activation)
            return conv.conv2d_gemm(x, self.weight, self.bias, self.same_stride, (top, bottom, left, right),
                                    in_slope=self.in_slope)
        if self.in_slope is not None:   # fused by fuse_activations, impl changed since: the same function
            x = leaky_relu(x, self.in_slope)
        pad = top   # symmetric (e.g. 3x3 stride 1): the convolution pads itself; else pad x first
        if not top == bottom == left == right:
            x, pad = F.pad(x, (left, right, top, bottom)), 0
        if self.impl == "adjoint":
            return conv.conv2d_adjoint(x, self.weight, self.bias, self.same_stride, pad)
        return F.conv2d(x, self.weight, self.bias, self.same_stride, pad)


class SameConvTranspose2d(nn.ConvTranspose2d):
    """Transposed conv with TF 'SAME' padding: N -> N * stride, the adjoint of `SameConv2d`
    applied to an input of size N * stride (TF's conv2d_transpose with output N * stride).

    For 5x5 stride 2 this is ConvTranspose2d(k=5, s=2, p=1) followed by dropping the last row
    and column (spec §1.5). Weight layout is PyTorch's [in, out, k, k].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = True):
        if kernel_size < stride:
            raise ValueError(f"SameConvTranspose2d needs kernel_size >= stride, got {kernel_size} < {stride}")
        # The forward SAME conv on an input of size M = N*stride pads kernel - stride in total
        # (tf_same_padding(M, kernel, stride) for any such M), the smaller half before.
        total = kernel_size - stride
        before, after = total // 2, total - total // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=before, bias=bias)
        self.crop_after = after - before  # 0 or 1 extra rows/cols at the end
        self.impl = "native"   # or "adjoint" / "gemm": see set_conv_impl
        self.out_slope = None  # gemm: the leaky ReLU after this layer, applied inside col2im (set_conv_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "gemm":  # col2im crops (both ends) and adds the bias itself
            return conv.conv_transpose2d_gemm(x, self.weight, self.bias, self.stride[0], self.padding[0],
                                              crop_after=self.crop_after, out_slope=self.out_slope)
        if self.impl == "adjoint":
            y = conv.conv_transpose2d_adjoint(x, self.weight, self.bias, self.stride[0], self.padding[0])
        else:
            y = super().forward(x)
        if self.crop_after:
            y = y[..., : y.shape[-2] - self.crop_after, : y.shape[-1] - self.crop_after]
        return y if self.out_slope is None else leaky_relu(y, self.out_slope)   # (fused, impl changed since)


class TFBatchNorm(nn.Module):
    """TF-slim batch norm with centre (beta) and no scale (gamma fixed at 1), spec §1.5.

    Per channel for [B, C, H, W] input, per feature for [B, C]. Decay 0.999 (momentum 0.001),
    eps 1e-3. The only parameter is `beta`; `running_mean` / `running_var` are buffers.
    """

    def __init__(self, num_features: int, momentum: float = BN_MOMENTUM, eps: float = BN_EPS):
        super().__init__()
        self.num_features = int(num_features)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.beta = nn.Parameter(torch.zeros(self.num_features))
        self.closed_form = True  # numgan.batchnorm's second derivatives; False: F.batch_norm's own (same values)
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        if not self.training or not self.closed_form:
            # beta is added outside F.batch_norm on purpose: in torch 2.14, F.batch_norm with weight=None
            # but a bias fails in double backward ("Expected a proper Tensor but got None")
            y = F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, self.momentum,
                             self.eps)
            return y + self.beta.view(shape)
        n = x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else 0
        if x.dim() < 2 or x.shape[1] != self.num_features or n < 2:
            raise ValueError(f"TFBatchNorm({self.num_features}) in training mode needs input [B, {self.num_features}, ...] "
                             f"with more than one value per channel, got {list(x.shape)}")
        # numgan.batchnorm: F.batch_norm's kernels, values and first derivatives, with closed-form second
        # derivatives (fewer kernels in ConOpt's double backprop). The moving variance is PyTorch's (unbiased batch
        # variance); TF-1 non-fused slim uses the biased one. That changes only eval-mode outputs, by a
        # factor n/(n-1) in variance.
        y = batchnorm.batch_norm_train(x, self.running_mean, self.running_var, self.momentum, self.eps)
        return y + self.beta.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}, scale=False"


class _Reshape(nn.Module):
    """[B, C*H*W] -> [B, C, H, W]."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return str(self.shape)


class ResidualBlock(nn.Module):
    """Pre-activation residual block of the constant-filter ResNet (spec §1.5, ResNet variants):
    h + scale * conv_out(lrelu(conv_in(lrelu(h)))), both convs 3x3 stride 1 with bias.

    `branch_init_std`: if not None, `conv_out.weight` is initialised N(0, std^2) by
    `build_models` (release variant); otherwise Xavier like every other layer.
    """

    def __init__(self, channels: int, hidden: int, scale: float = 1.0,
                 branch_init_std: float | None = None):
        super().__init__()
        self.conv_in = SameConv2d(channels, hidden, 3, 1)
        self.conv_out = SameConv2d(hidden, channels, 3, 1)
        self.scale = float(scale)
        self.branch_init_std = branch_init_std

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.conv_out(leaky_relu(self.conv_in(leaky_relu(h, LEAK)), LEAK))
        if self.scale != 1.0:
            r = self.scale * r
        return h + r

    def extra_repr(self) -> str:
        return f"scale={self.scale}, branch_init_std={self.branch_init_std}"


# ---------------------------------------------------------------------------------------------
# Generator / discriminator wrappers
# ---------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """G: z [B, z_dim] -> images [B, C, H, W] in [-1, 1]. Attributes: `z_dim`, `image_shape`, `arch`."""

    def __init__(self, net: nn.Module, z_dim: int, image_shape: tuple[int, int, int], arch: str):
        super().__init__()
        self.net = net
        self.z_dim = int(z_dim)
        self.image_shape = tuple(image_shape)
        self.arch = arch

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"{self.arch} generator expects z of shape [B, {self.z_dim}], got {list(z.shape)}")
        return self.net(z)

    def sample_z(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latent vectors z ~ N(0, I) on `device` (the model's device by default)."""
        if device is None:
            device = next(self.parameters()).device
        return torch.randn(n, self.z_dim, device=device, generator=generator)


class Discriminator(nn.Module):
    """D: images [B, C, H, W] -> logits [B] (no sigmoid). Attributes: `image_shape`, `arch`."""

    def __init__(self, net: nn.Module, image_shape: tuple[int, int, int], arch: str):
        super().__init__()
        self.net = net
        self.image_shape = tuple(image_shape)
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"{self.arch} discriminator expects images of shape [B, "
                             f"{', '.join(map(str, self.image_shape))}], got {list(x.shape)}")
        return self.net(x).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Network bodies
# ---------------------------------------------------------------------------------------------


def _act(kind: str) -> nn.Module:
    return nn.ReLU() if kind == "relu" else LeakyReLU(LEAK)


def _conv_generator(z_dim: int, base: int, widths: list[int], channels: int, *, act: str,
                    bn: str | None = None, hidden_fc: int | None = None) -> nn.Sequential:
    """FC to widths[0] x base x base, then len(widths) 5x5 stride-2 deconvs (last to `channels`, tanh).

    bn: None (no BN, biases everywhere); "1d" (dcgan3: FC without bias -> BN per feature -> act
    -> reshape); "2d" (dcgan4: FC with bias -> reshape -> BN per channel -> act). With BN the
    hidden deconvs have BN and no bias. hidden_fc: an extra FC + act before (conv4's G).
    """
    layers: list[nn.Module] = []
    in_dim = z_dim
    if hidden_fc:
        layers += [nn.Linear(z_dim, hidden_fc), _act(act)]
        in_dim = hidden_fc
    c0 = widths[0]
    n0 = c0 * base * base
    if bn == "1d":
        layers += [nn.Linear(in_dim, n0, bias=False), TFBatchNorm(n0), _act(act), _Reshape(c0, base, base)]
    elif bn == "2d":
        layers += [nn.Linear(in_dim, n0), _Reshape(c0, base, base), TFBatchNorm(c0), _act(act)]
    else:
        layers += [nn.Linear(in_dim, n0), _Reshape(c0, base, base), _act(act)]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers.append(SameConvTranspose2d(c_in, c_out, 5, 2, bias=bn is None))
        if bn is not None:
            layers.append(TFBatchNorm(c_out))
        layers.append(_act(act))
    layers += [SameConvTranspose2d(widths[-1], channels, 5, 2), nn.Tanh()]
    return nn.Sequential(*layers)


def _conv_discriminator(channels: int, base: int, widths: list[int], *, bn: bool,
                        hidden_fc: int | None = None) -> nn.Sequential:
    """len(widths) 5x5 stride-2 convs with lrelu (BN on all but the first if `bn`), flatten,
    optional FC hidden_fc + lrelu (no BN), FC 1."""
    layers: list[nn.Module] = [SameConv2d(channels, widths[0], 5, 2), LeakyReLU(LEAK)]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers.append(SameConv2d(c_in, c_out, 5, 2, bias=not bn))
        if bn:
            layers.append(TFBatchNorm(c_out))
        layers.append(LeakyReLU(LEAK))
    layers.append(nn.Flatten())
    n = widths[-1] * base * base
    if hidden_fc:
        layers += [nn.Linear(n, hidden_fc), LeakyReLU(LEAK)]
        n = hidden_fc
    layers.append(nn.Linear(n, 1))
    return nn.Sequential(*layers)


def _resnet_generator(z_dim: int, base: int, c: int, channels: int, scale: float,
                      branch_std: float | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(z_dim, c * base * base), _Reshape(c, base, base)]
    for _ in range(3):
        layers += [LeakyReLU(LEAK), SameConvTranspose2d(c, c, 5, 2),
                   ResidualBlock(c, c // 2, scale, branch_std)]
    layers += [LeakyReLU(LEAK), SameConvTranspose2d(c, channels, 5, 2), nn.Tanh()]
    return nn.Sequential(*layers)


def _resnet_discriminator(channels: int, base: int, c: int, scale: float,
                          branch_std: float | None) -> nn.Sequential:
    # No activation on the input; the first block's bottleneck is C, the others C/2.
    layers: list[nn.Module] = [SameConv2d(channels, c, 5, 2), ResidualBlock(c, c, scale, branch_std)]
    for _ in range(3):
        layers += [LeakyReLU(LEAK), SameConv2d(c, c, 5, 2), ResidualBlock(c, c // 2, scale, branch_std)]
    layers += [LeakyReLU(LEAK), nn.Flatten(), nn.Linear(c * base * base, 1)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# name -> (number of stride-2 layers = log2(image_size / base), builder(z, base, f, ch) -> (G net, D net))
_Builder = Callable[[int, int, int, int], tuple[nn.Module, nn.Module]]
_FC = 512  # width of the extra FC layer (R's conv3/conv4, Fig 8 [DEFAULT])


def _dcgan3(bn: bool) -> _Builder:
    def build(z, b, f, ch):
        return (_conv_generator(z, b, [4 * f, 2 * f, f], ch, act="relu", bn="1d" if bn else None),
                _conv_discriminator(ch, b, [f, 2 * f, 4 * f], bn=bn))
    return build


def _dcgan4(bn: bool, fc: bool) -> _Builder:
    def build(z, b, f, ch):
        return (_conv_generator(z, b, [8 * f, 4 * f, 2 * f, f], ch, act="lrelu", bn="2d" if bn else None),
                _conv_discriminator(ch, b, [f, 2 * f, 4 * f, 8 * f], bn=bn, hidden_fc=_FC if fc else None))
    return build


def _cf(n_layers: int, d_fc: bool, g_fc: bool = False) -> _Builder:
    def build(z, b, f, ch):
        return (_conv_generator(z, b, [f] * n_layers, ch, act="lrelu", hidden_fc=_FC if g_fc else None),
                _conv_discriminator(ch, b, [f] * n_layers, bn=False, hidden_fc=_FC if d_fc else None))
    return build


def _resnet(scale: float, branch_std: float | None) -> _Builder:
    def build(z, b, f, ch):
        return (_resnet_generator(z, b, f, ch, scale, branch_std),
                _resnet_discriminator(ch, b, f, scale, branch_std))
    return build


_REGISTRY: dict[str, tuple[int, _Builder]] = {
    "dcgan3": (3, _dcgan3(bn=True)),
    "dcgan3_nobn": (3, _dcgan3(bn=False)),
    "dcgan4": (4, _dcgan4(bn=True, fc=False)),
    "dcgan4_nobn": (4, _dcgan4(bn=False, fc=False)),
    "dcgan4_nobn_cf": (4, _cf(4, d_fc=False)),
    "dcgan4_fc": (4, _dcgan4(bn=True, fc=True)),
    "dcgan4_nobn_fc": (4, _dcgan4(bn=False, fc=True)),
    "dcgan4_nobn_cf_fc": (4, _cf(4, d_fc=True)),
    "resnet_cf": (4, _resnet(1.0, RESNET_BRANCH_INIT_STD)),
    "resnet_cf_s01": (4, _resnet(0.1, None)),
    "conv3": (3, _cf(3, d_fc=True)),
    "conv4": (4, _cf(4, d_fc=True, g_fc=True)),
    "dcgan3_nobn_cf": (3, _cf(3, d_fc=False)),
}

ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)


def _init_weights(net: nn.Module) -> None:
    """Xavier/Glorot-uniform weights (fans include k^2), zero biases, zero BN beta (spec §1.5);
    then the N(0, std^2) residual-branch init where a ResidualBlock asks for it."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, TFBatchNorm):
            nn.init.zeros_(m.beta)
    for m in net.modules():
        if isinstance(m, ResidualBlock) and m.branch_init_std is not None:
            nn.init.normal_(m.conv_out.weight, 0.0, m.branch_init_std)


def set_conv_impl(model: nn.Module, impl: str = "gemm", strided_only: bool = True,
                  unstrided: Optional[str] = None) -> nn.Module:
    """Choose how the model's SAME convolutions are computed; returns ``model``.

    ``"native"``: torch's conv2d / conv_transpose2d. ``"adjoint"``: the same cuDNN kernels through
    autograd Functions whose derivatives of every order are again cuDNN convolutions
    (numgan.conv). ``"gemm"``: im2col / col2im and one matrix product per layer. All three compute the
    same function with the same parameters (tests/test_step.py compares values and ConOpt's second
    derivatives in float64), so a model can be switched at any time and its state dict does not
    change. The reason is ConOpt's double backprop: on CUDA, PyTorch differentiates the backward of
    a *strided* convolution with a slow non-cuDNN kernel. numgan.train uses ``"gemm"`` for the strided
    layers on CUDA: on an H100 it gave the fastest ConOpt step of the three (cuDNN's strided dgrad kernels
    and its NCHW/NHWC conversions made "adjoint" slower; benchmarks/results/step-cuda.md).

    The stride-1 convolutions (the ResNets' 3x3 blocks) get ``unstrided`` if given, else ``impl`` with
    ``strided_only=False``, else ``"native"``. Their native double backward stays on cuDNN but forms the
    input gradient's derivative with respect to the weight as a convolution of the batch-transposed ggI (what
    flows back into the input gradient) with the batch-transposed output gradient as its kernel (a kernel the
    size of the feature map, e.g. 32 x 32 over 128 "channels" that are the batch), after copying both
    transposes; ``"adjoint"`` keeps every derivative order on the
    three usual algorithms (fprop, dgrad, wgrad) with the padding inside cuDNN, and ``"gemm"`` would
    write 9-fold im2col copies of the largest activations. numgan.train's ConOpt and smoothing use
    ``"adjoint"`` for them (:func:`numgan.train.fast_conv_impl`).

    With ``"gemm"`` every SAME layer's weight is stored channels-last (same values, other strides): a GEMM
    layer's memory is then the [out, k k in] matrix of the GEMM (numgan.conv's "pqc" column layout), so
    neither the weight nor its gradient is copied to change layout (issue 4). Switch before the optimiser has state, or its
    foreach kernels see mismatched layouts and fall back to per-tensor kernels (same result, slower).

    Also with ``"gemm"``, a leaky ReLU module next to a GEMM layer in an ``nn.Sequential`` is computed by that
    layer's im2col / col2im kernel (:func:`fuse_activations`): the same function, without the activation's
    own kernels in every derivative order.
    """
    if unstrided is None:
        unstrided = "native" if strided_only else impl
    for name in (impl, unstrided):
        if name not in CONV_IMPLS:
            raise ValueError(f"unknown conv implementation {name!r}; choose one of {CONV_IMPLS}")
    for m in model.modules():
        if isinstance(m, (SameConv2d, SameConvTranspose2d)):
            m.impl = impl if m.stride[0] > 1 else unstrided
            # a stride-1 layer (native or adjoint) in a "gemm" model sees channels-last activations:
            # channels-last weights keep cuDNN on NHWC and its weight gradient in the weight's layout too
            fmt = torch.channels_last if "gemm" in (impl, unstrided) and conv.COLS_LAYOUT == "pqc" \
                else torch.contiguous_format
            if not m.weight.is_contiguous(memory_format=fmt):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
    return fuse_activations(model)


def fuse_activations(model: nn.Module) -> nn.Module:
    """Let each GEMM layer compute a leaky ReLU next to it (issue 4); returns ``model``.

    In an ``nn.Sequential``, a :class:`LeakyReLU` right after a "gemm" :class:`SameConvTranspose2d` is applied
    by its col2im (``out_slope``), and one right before a "gemm" :class:`SameConv2d` by its im2col
    (``in_slope``); the module itself then passes its input through (``LeakyReLU.fused``). The function is
    the same: the derivative of the fused activation is a mask inside the same two kernels (numgan.conv.Im2Col,
    Col2Im), where ConOpt's step otherwise launched five or six activation kernels per layer (forward, first
    and second derivatives). Activations not adjacent to a GEMM layer (batch norm between, the last one
    before the FC layer, functional calls in residual blocks, a module used in several places) stay as they
    are. A fused layer whose ``impl`` is changed by hand keeps applying its activation (the same function);
    :func:`set_conv_impl` re-runs this.
    """
    uses = collections.Counter(id(m) for m in model.modules(remove_duplicate=False))
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        layers = list(seq)
        for m in layers:   # undo this container's pairs (a pair never spans two containers)
            if isinstance(m, SameConv2d):
                m.in_slope = None
            elif isinstance(m, SameConvTranspose2d):
                m.out_slope = None
            elif isinstance(m, LeakyReLU):
                m.fused = False
        for a, b in zip(layers[:-1], layers[1:]):
            if uses[id(a)] > 1 or uses[id(b)] > 1:
                continue
            if (isinstance(a, SameConvTranspose2d) and a.impl == "gemm" and isinstance(b, LeakyReLU)
                    and not b.fused and b.negative_slope > 0):   # col2im's mask comes from the output's sign
                a.out_slope, b.fused = b.negative_slope, True
            elif isinstance(a, LeakyReLU) and not a.fused and isinstance(b, SameConv2d) and b.impl == "gemm":
                b.in_slope, a.fused = a.negative_slope, True
    return model


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def build_models(arch: str, image_size: int = 32, z_dim: int = 256, f_dim: int = 64,
                 channels: int = 3) -> tuple[Generator, Discriminator]:
    """Build the generator and discriminator of architecture `arch` (see `ARCHITECTURES` and the
    module docstring), freshly initialised with the spec's init, in training mode.

    image_size: side of the square images; must be divisible by 8 (dcgan3, dcgan3_nobn,
    dcgan3_nobn_cf, conv3) or 16 (all others). z_dim: latent size. f_dim: base filter count f
    (the ResNet width C; must be even there). channels: image channels.
    Returns (G, D): G(z [B, z_dim]) -> [B, channels, image_size, image_size] in [-1, 1];
    D(x) -> logits [B].
    """
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(ARCHITECTURES)}")
    image_size = _check_int("image_size", image_size)
    z_dim = _check_int("z_dim", z_dim)
    f_dim = _check_int("f_dim", f_dim)
    channels = _check_int("channels", channels)
    n_down, builder = _REGISTRY[arch]
    factor = 2 ** n_down
    if image_size % factor:
        raise ValueError(f"{arch} needs image_size divisible by {factor} ({n_down} stride-2 layers "
                         f"from a {factor}x smaller base), got {image_size}; e.g. 32 (CIFAR) or 64 (CelebA)")
    if arch.startswith("resnet") and f_dim % 2:
        raise ValueError(f"{arch} needs an even f_dim (residual bottleneck f_dim/2), got {f_dim}")
    g_net, d_net = builder(z_dim, image_size // factor, f_dim, channels)
    _init_weights(g_net)
    _init_weights(d_net)
    shape = (channels, image_size, image_size)
    return Generator(g_net, z_dim, shape, arch), Discriminator(d_net, shape, arch)
