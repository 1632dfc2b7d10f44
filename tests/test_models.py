"""Tests of numgan.models against spec FIGURES.md §1.5 (layer tables, TF 'SAME' padding,
TF-slim batch norm, Xavier init) and the double backprop that ConOpt needs.

Expected parameter counts and the SAME-padding rule are computed here by hand from the spec,
independently of the model code.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numgan.models import (
    ARCHITECTURES,
    RESNET_BRANCH_INIT_STD,
    ResidualBlock,
    SameConv2d,
    SameConvTranspose2d,
    TFBatchNorm,
    build_models,
    tf_same_padding,
)

Z, F64 = 256, 64  # CIFAR settings of every experiment file (spec §1.8)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def ref_same_pad(n, k, s):
    """TF 'SAME' rule, written independently of the library."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


# --------------------------------------------------------------------------------------------
# registry, shapes, errors
# --------------------------------------------------------------------------------------------


def test_registry_has_required_names():
    required = {"dcgan3", "dcgan3_nobn", "dcgan4", "dcgan4_nobn", "dcgan4_nobn_cf", "dcgan4_fc",
                "dcgan4_nobn_fc", "dcgan4_nobn_cf_fc", "resnet_cf", "resnet_cf_s01"}
    assert required <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes_default_size(arch):
    size = 64 if arch.startswith("resnet") else 32  # CelebA for the ResNets, CIFAR otherwise
    torch.manual_seed(0)
    G, D = build_models(arch, image_size=size)
    assert G.z_dim == Z and isinstance(G, nn.Module) and isinstance(D, nn.Module)
    x = G(torch.randn(3, Z))
    assert x.shape == (3, 3, size, size)
    assert x.abs().max() <= 1.0
    assert D(x).shape == (3,)
    assert D(x[:1]).shape == (1,)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes_other_size_and_channels(arch):
    size = 32 if arch.startswith("resnet") else 64
    G, D = build_models(arch, image_size=size, z_dim=10, f_dim=8, channels=1)
    x = G(torch.randn(2, 10))
    assert x.shape == (2, 1, size, size)
    assert D(x).shape == (2,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dcgan4_nobn_cf"):  # the message lists valid names
        build_models("dcgan5")
    with pytest.raises(ValueError, match="divisible by 16"):
        build_models("dcgan4", image_size=40)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_models("dcgan3", image_size=36)
    G, _ = build_models("dcgan3_nobn", image_size=40, f_dim=4)  # 40 / 8 = 5 is fine
    assert G(torch.randn(1, Z)).shape == (1, 3, 40, 40)
    with pytest.raises(ValueError, match="even"):
        build_models("resnet_cf", image_size=64, f_dim=7)
    for kw in ({"image_size": 0}, {"z_dim": -1}, {"f_dim": 2.5}, {"channels": True}):
        with pytest.raises(ValueError):
            build_models("dcgan4_nobn", **kw)
    G, D = build_models("dcgan4_nobn_cf", f_dim=4)
    with pytest.raises(ValueError, match=r"\[B, 256\]"):
        G(torch.randn(2, 100))
    with pytest.raises(ValueError, match="3, 32, 32"):
        D(torch.randn(2, 3, 64, 64))


# --------------------------------------------------------------------------------------------
# parameter counts from the spec tables (f = 64, z = 256, 32x32x3); 5x5 kernels -> 25
# --------------------------------------------------------------------------------------------
f, z, k2 = F64, Z, 25

DCGAN3_G = (z * 4096 + 4096                      # FC no bias + BN beta (per feature, 4096)
            + k2 * 4 * f * 2 * f + 2 * f         # deconv 4f->2f, BN beta
            + k2 * 2 * f * f + f                 # deconv 2f->f, BN beta
            + k2 * f * 3 + 3)                    # deconv f->3 + bias
DCGAN3_D = (k2 * 3 * f + f                       # conv 3->f + bias
            + k2 * f * 2 * f + 2 * f             # conv f->2f, BN beta
            + k2 * 2 * f * 4 * f + 4 * f         # conv 2f->4f, BN beta
            + 4 * 4 * 4 * f + 1)                 # FC 4096 -> 1
DCGAN3_NOBN_G = (z * 4096 + 4096 + k2 * 4 * f * 2 * f + 2 * f + k2 * 2 * f * f + f + k2 * f * 3 + 3)
DCGAN3_NOBN_D = DCGAN3_D                         # BN beta replaced by a bias of the same size

DCGAN4_NOBN_G = (z * 2048 + 2048                 # FC 256 -> 2x2x8f with bias
                 + k2 * 8 * f * 4 * f + 4 * f
                 + k2 * 4 * f * 2 * f + 2 * f
                 + k2 * 2 * f * f + f
                 + k2 * f * 3 + 3)
DCGAN4_G = DCGAN4_NOBN_G + 8 * f                 # FC keeps its bias, plus BN beta on 8f channels
DCGAN4_D = (k2 * 3 * f + f + k2 * f * 2 * f + 2 * f + k2 * 2 * f * 4 * f + 4 * f
            + k2 * 4 * f * 8 * f + 8 * f + 2 * 2 * 8 * f + 1)
DCGAN4_FC_D = DCGAN4_D - (2048 + 1) + (2048 * 512 + 512) + (512 + 1)

CF4_G = z * 4 * f + 4 * f + 3 * (k2 * f * f + f) + k2 * f * 3 + 3
CF4_D = k2 * 3 * f + f + 3 * (k2 * f * f + f) + 2 * 2 * f + 1
CF4_FC_D = k2 * 3 * f + f + 3 * (k2 * f * f + f) + (4 * f * 512 + 512) + 512 + 1


def _resnet_counts(c, z=Z, base=4):
    h = c // 2
    g = (z * base * base * c + base * base * c
         + 3 * ((k2 * c * c + c) + (9 * c * h + h) + (9 * h * c + c))
         + k2 * c * 3 + 3)
    d = ((k2 * 3 * c + c) + (9 * c * c + c) + (9 * c * c + c)
         + 3 * ((k2 * c * c + c) + (9 * c * h + h) + (9 * h * c + c))
         + base * base * c + 1)
    return g, d


@pytest.mark.parametrize("arch, g, d", [
    ("dcgan3", DCGAN3_G, DCGAN3_D),
    ("dcgan3_nobn", DCGAN3_NOBN_G, DCGAN3_NOBN_D),
    ("dcgan4", DCGAN4_G, DCGAN4_D),
    ("dcgan4_nobn", DCGAN4_NOBN_G, DCGAN4_D),  # D: BN beta <-> bias, same count
    ("dcgan4_nobn_cf", CF4_G, CF4_D),
    ("dcgan4_fc", DCGAN4_G, DCGAN4_FC_D),
    ("dcgan4_nobn_fc", DCGAN4_NOBN_G, DCGAN4_FC_D),
    ("dcgan4_nobn_cf_fc", CF4_G, CF4_FC_D),
])
def test_parameter_counts_cifar(arch, g, d):
    G, D = build_models(arch)
    assert (n_params(G), n_params(D)) == (g, d)


def test_parameter_counts_sanity_values():
    # a few totals written out, so a slip in the formulas above cannot hide
    assert DCGAN4_NOBN_G == 4_832_387 and DCGAN4_D == 4_308_609 and DCGAN3_G == 2_081_667


@pytest.mark.parametrize("arch", ["resnet_cf", "resnet_cf_s01"])
@pytest.mark.parametrize("c", [64, 128])
def test_parameter_counts_resnet(arch, c):
    G, D = build_models(arch, image_size=64, f_dim=c)
    assert (n_params(G), n_params(D)) == _resnet_counts(c)


def test_resnet_structure():
    for arch, scale in (("resnet_cf", 1.0), ("resnet_cf_s01", 0.1)):
        G, D = build_models(arch, image_size=64, f_dim=16)
        gb = [m for m in G.modules() if isinstance(m, ResidualBlock)]
        db = [m for m in D.modules() if isinstance(m, ResidualBlock)]
        assert len(gb) == 3 and len(db) == 4
        assert [b.conv_in.out_channels for b in gb] == [8, 8, 8]
        assert [b.conv_in.out_channels for b in db] == [16, 8, 8, 8]  # D's first block: C
        assert all(b.scale == scale for b in gb + db)
        assert all(b.conv_in.kernel_size == (3, 3) and b.conv_in.stride == (1, 1) for b in gb + db)


def test_resnet_residual_scale_applied():
    """Zeroing the branch's last conv makes each block the identity; s multiplies the branch."""
    torch.manual_seed(0)
    blk = ResidualBlock(4, 2, scale=0.1)
    h = torch.randn(2, 4, 6, 6)
    r = blk.conv_out(F.leaky_relu(blk.conv_in(F.leaky_relu(h, 0.2)), 0.2))
    torch.testing.assert_close(blk(h), h + 0.1 * r)


# --------------------------------------------------------------------------------------------
# TF 'SAME' padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 12))
@pytest.mark.parametrize("k, s", [(5, 2), (3, 1), (3, 2), (4, 2), (1, 1)])
def test_tf_same_padding_rule(n, k, s):
    assert tf_same_padding(n, k, s) == ref_same_pad(n, k, s)


def _numpy_same_conv(x, w, s):
    """Explicit loop: zero-pad by the TF rule, then cross-correlate with stride s."""
    b, cin, h, wd = x.shape
    cout, _, k, _ = w.shape
    (t, bo), (l, r) = ref_same_pad(h, k, s), ref_same_pad(wd, k, s)
    xp = np.zeros((b, cin, h + t + bo, wd + l + r))
    xp[:, :, t:t + h, l:l + wd] = x
    oh, ow = math.ceil(h / s), math.ceil(wd / s)
    out = np.zeros((b, cout, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * s:i * s + k, j * s:j * s + k]
            out[:, :, i, j] = np.einsum("bcuv,ocuv->bo", patch, w)
    return out


@pytest.mark.parametrize("k, s, n", [(5, 2, 8), (5, 2, 7), (3, 1, 6), (3, 2, 5)])
def test_same_conv_matches_numpy_loop(k, s, n):
    torch.manual_seed(1)
    conv = SameConv2d(2, 3, k, s).double()
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 2, n, n + 1, dtype=torch.float64)
    ref = _numpy_same_conv(x.numpy(), conv.weight.detach().numpy(), s) + conv.bias.detach().numpy()[:, None, None]
    out = conv(x).detach().numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k, s", [(5, 2), (3, 1), (4, 2)])
def test_same_conv_matches_manual_pad(k, s):
    torch.manual_seed(2)
    conv = SameConv2d(3, 4, k, s, bias=False).double()
    for n in (8, 9, 16, 32):
        x = torch.randn(2, 3, n, n, dtype=torch.float64)
        t, b = ref_same_pad(n, k, s)
        ref = F.conv2d(F.pad(x, (t, b, t, b)), conv.weight, stride=s)
        torch.testing.assert_close(conv(x), ref)
    if (k, s) == (5, 2):
        # the spec's explicit form, and the half-pixel shift of symmetric padding p=2
        x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
        torch.testing.assert_close(conv(x), F.conv2d(F.pad(x, (1, 2, 1, 2)), conv.weight, stride=2))
        assert not torch.allclose(conv(x), F.conv2d(x, conv.weight, stride=2, padding=2))


@pytest.mark.parametrize("k, s", [(5, 2), (3, 1), (4, 2), (3, 2)])
@pytest.mark.parametrize("n", [2, 4, 5])
def test_same_conv_transpose_is_adjoint(k, s, n):
    """SAME transposed conv (N -> sN) = A^T where A is the SAME conv on sN-sized inputs."""
    torch.manual_seed(3)
    cin, cout = 3, 2  # A: cin -> cout channels; A^T: cout -> cin
    conv = SameConv2d(cin, cout, k, s, bias=False).double()
    convt = SameConvTranspose2d(cout, cin, k, s, bias=False).double()
    with torch.no_grad():
        convt.weight.copy_(conv.weight)  # both [cout, cin, k, k]
    m = n * s
    x = torch.randn(4, cin, m, m, dtype=torch.float64)
    y = torch.randn(4, cout, n, n, dtype=torch.float64)
    ax, aty = conv(x), convt(y)
    assert ax.shape == y.shape and aty.shape == x.shape
    lhs = (ax * y).sum(dim=(1, 2, 3))
    rhs = (x * aty).sum(dim=(1, 2, 3))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    # and the full matrices for one sample
    with torch.no_grad():  # column j of a linear map = its image of the j-th basis vector
        A = conv(torch.eye(cin * m * m, dtype=torch.float64).reshape(-1, cin, m, m)).reshape(cin * m * m, -1).T
        At = convt(torch.eye(cout * n * n, dtype=torch.float64).reshape(-1, cout, n, n)).reshape(cout * n * n, -1).T
    torch.testing.assert_close(At, A.T)


def test_same_conv_transpose_spec_form():
    torch.manual_seed(4)
    convt = SameConvTranspose2d(3, 2, 5, 2, bias=False).double()
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ref = F.conv_transpose2d(y, convt.weight, stride=2, padding=1)[..., :-1, :-1]
    torch.testing.assert_close(convt(y), ref)
    assert convt(y).shape == (2, 2, 8, 8)


# --------------------------------------------------------------------------------------------
# batch norm
# --------------------------------------------------------------------------------------------


def test_tf_batchnorm_parameters_and_constants():
    bn = TFBatchNorm(5)
    assert [n for n, _ in bn.named_parameters()] == ["beta"]  # centre only, no scale
    assert {n for n, _ in bn.named_buffers()} == {"running_mean", "running_var"}
    assert bn.momentum == 0.001 and bn.eps == 1e-3


def test_tf_batchnorm_train_and_eval():
    torch.manual_seed(5)
    bn = TFBatchNorm(3).double()
    with torch.no_grad():
        bn.beta.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = 3 * torch.randn(8, 3, 4, 4, dtype=torch.float64) + 1
    mean = x.mean(dim=(0, 2, 3))
    var_b = x.var(dim=(0, 2, 3), unbiased=False)
    var_u = x.var(dim=(0, 2, 3), unbiased=True)
    y = bn(x)  # training mode: batch statistics
    ref = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var_b.view(1, 3, 1, 1) + 1e-3) + bn.beta.view(1, 3, 1, 1)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(bn.running_mean, 0.001 * mean)
    torch.testing.assert_close(bn.running_var, 0.999 + 0.001 * var_u)
    # eval mode: the moving averages, no update
    bn.eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 9.0]))
    y = bn(x)
    ref = ((x - bn.running_mean.view(1, 3, 1, 1)) / torch.sqrt(bn.running_var.view(1, 3, 1, 1) + 1e-3)
           + bn.beta.view(1, 3, 1, 1))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(bn.running_mean, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    # 1-D (per feature), as in dcgan3's FC layer
    bn1 = TFBatchNorm(6)
    v = torch.randn(10, 6)
    torch.testing.assert_close(bn1(v), (v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-3))


def _layers(model):
    return list(model.net)


@pytest.mark.parametrize("arch, n_g, n_d, g_1d", [
    ("dcgan3", 3, 2, 4096), ("dcgan4", 4, 3, None), ("dcgan4_fc", 4, 3, None),
    ("dcgan3_nobn", 0, 0, None), ("dcgan4_nobn", 0, 0, None), ("dcgan4_nobn_cf", 0, 0, None),
    ("resnet_cf", 0, 0, None),
])
def test_bn_placement(arch, n_g, n_d, g_1d):
    G, D = build_models(arch, image_size=64 if arch.startswith("resnet") else 32)
    for model, n_bn in ((G, n_g), (D, n_d)):
        layers = _layers(model)
        bns = [m for m in model.modules() if isinstance(m, TFBatchNorm)]
        assert len(bns) == n_bn
        for a, b in zip(layers[:-1], layers[1:]):
            if isinstance(b, TFBatchNorm) and hasattr(a, "bias"):  # (dcgan4 G: FC, reshape, BN)
                assert a.bias is None  # a layer with BN has no bias
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
        if n_bn == 0:
            assert all(m.bias is not None for m in convs)
        else:
            assert convs[-1].bias is not None  # output layer (deconv to 3 / FC 1) keeps its bias
    if g_1d:
        assert _layers(G)[1].num_features == g_1d  # dcgan3: BN per feature right after the FC
    if arch.startswith("dcgan4") and n_g:
        assert _layers(G)[0].bias is not None  # dcgan4 G's FC has a bias before its BN


def test_generator_eval_mode_uses_running_stats():
    torch.manual_seed(6)
    G, _ = build_models("dcgan4", f_dim=8)
    z = torch.randn(6, Z)
    with torch.no_grad():
        for _ in range(3):
            G(torch.randn(16, Z))  # move the running averages
        train_full, train_one = G(z)[:1], G(z[:1].repeat(2, 1))[:1]
        G.eval()
        eval_full, eval_one = G(z)[:1], G(z[:1])
    assert not torch.allclose(train_full, train_one, atol=1e-4)  # batch statistics: depends on batch
    torch.testing.assert_close(eval_full, eval_one)  # moving averages: per-sample


# --------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_xavier_init_and_zero_biases(arch):
    torch.manual_seed(7)
    G, D = build_models(arch, image_size=64 if arch.startswith("resnet") else 32)
    for model in (G, D):
        branch_last = {id(m.conv_out.weight) for m in model.modules()
                       if isinstance(m, ResidualBlock) and m.branch_init_std is not None}
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("beta"):
                assert torch.all(p == 0), name
                continue
            if id(p) in branch_last:
                continue
            shape = p.shape
            fan_sum = (shape[0] + shape[1]) * int(np.prod(shape[2:], dtype=np.int64))  # fans x k^2
            limit = math.sqrt(6.0 / fan_sum)
            w = p.detach()
            assert w.abs().max() <= limit * (1 + 1e-6), name
            if w.numel() >= 2000:
                assert w.abs().max() > 0.95 * limit, name
                assert abs(w.std().item() / (limit / math.sqrt(3)) - 1) < 0.05, name


def test_resnet_branch_init():
    torch.manual_seed(8)
    G, D = build_models("resnet_cf", image_size=64)
    blocks = [m for m in list(G.modules()) + list(D.modules()) if isinstance(m, ResidualBlock)]
    assert len(blocks) == 7
    assert RESNET_BRANCH_INIT_STD == 1e-5
    for b in blocks:
        w = b.conv_out.weight.detach()
        assert abs(w.std().item() / 1e-5 - 1) < 0.05
        assert abs(w.mean().item()) < 1e-6
        assert torch.all(b.conv_out.bias == 0)
        c_in = b.conv_in.weight.detach()  # the first conv of the branch is Xavier
        assert c_in.std().item() > 1e-2
    # the HEAD variant is Xavier everywhere
    G, D = build_models("resnet_cf_s01", image_size=64)
    for b in [m for m in list(G.modules()) + list(D.modules()) if isinstance(m, ResidualBlock)]:
        assert b.branch_init_std is None and b.conv_out.weight.std().item() > 1e-2


# --------------------------------------------------------------------------------------------
# double backward (ConOpt: grad of 1/2 ||v||^2 through the convolutions and BN)
# --------------------------------------------------------------------------------------------


def _game_grads(G, D, z, xr, create_graph):
    """u = (grad_theta L_G, grad_phi L_D) with the standard (non-saturating) losses."""
    d_fake = D(G(z))
    l_d = F.softplus(-D(xr)).mean() + F.softplus(d_fake).mean()
    l_g = F.softplus(-d_fake).mean()
    gp, dp = list(G.parameters()), list(D.parameters())
    return (torch.autograd.grad(l_g, gp, create_graph=create_graph, retain_graph=True)
            + torch.autograd.grad(l_d, dp, create_graph=create_graph))


@pytest.mark.parametrize("arch", ["dcgan4", "dcgan4_nobn", "dcgan3", "resnet_cf"])
def test_double_backward_runs(arch):
    torch.manual_seed(9)
    G, D = build_models(arch, z_dim=16, f_dim=4)
    z, xr = torch.randn(3, 16), torch.rand(3, 3, 32, 32) * 2 - 1
    u = _game_grads(G, D, z, xr, create_graph=True)
    reg = 0.5 * sum((g ** 2).sum() for g in u)
    params = list(G.parameters()) + list(D.parameters())
    jg = torch.autograd.grad(reg, params)
    assert all(torch.isfinite(g).all() for g in jg)
    assert sum(g.abs().sum() for g in jg) > 0


@pytest.mark.parametrize("arch", ["dcgan4", "dcgan4_nobn"])
def test_double_backward_matches_finite_differences(arch):
    """<grad (1/2 ||u||^2), d> equals the central difference of 1/2 ||u||^2 along d (float64)."""
    torch.manual_seed(10)
    G, D = build_models(arch, z_dim=4, f_dim=2)
    G, D = G.double(), D.double()
    z = torch.randn(5, 4, dtype=torch.float64)
    xr = torch.rand(5, 3, 32, 32, dtype=torch.float64) * 2 - 1
    params = list(G.parameters()) + list(D.parameters())

    def reg(create_graph):
        u = _game_grads(G, D, z, xr, create_graph=create_graph)
        return 0.5 * sum((g ** 2).sum() for g in u)

    jg = torch.autograd.grad(reg(True), params)
    d = [torch.randn_like(p) for p in params]
    analytic = sum((a * b).sum() for a, b in zip(jg, d)).item()
    # lrelu's derivative jumps at 0, so 1/2||u||^2 jumps whenever a pre-activation changes sign:
    # eps must be small enough (float64) that no unit crosses 0 (eps = 1e-5 already fails).
    eps = 1e-7
    base = [p.detach().clone() for p in params]
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, b, di in zip(params, base, d):
                p.copy_(b + sign * eps * di)
        values.append(reg(False).item())
    numeric = (values[0] - values[1]) / (2 * eps)
    assert analytic != 0
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric)


@pytest.mark.parametrize("arch, g_act", [("dcgan3", nn.ReLU), ("dcgan3_nobn", nn.ReLU), ("dcgan4", nn.LeakyReLU),
                                         ("dcgan4_nobn", nn.LeakyReLU), ("dcgan4_nobn_cf", nn.LeakyReLU)])
def test_activations(arch, g_act):
    """dcgan3's G uses ReLU, dcgan4's G leaky ReLU (spec D-15); every D uses lrelu with leak 0.2."""
    G, D = build_models(arch, f_dim=4)
    g_acts = [m for m in G.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    # the leaky ReLUs are numgan.activations.LeakyReLU (torch's values, cheaper double backward)
    assert g_acts and all(isinstance(m, g_act) and isinstance(m, nn.LeakyReLU) == (g_act is nn.LeakyReLU)
                          for m in g_acts)
    assert all(m.negative_slope == 0.2 for m in g_acts if isinstance(m, nn.LeakyReLU))
    d_acts = [m for m in D.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert d_acts and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in d_acts)
    assert isinstance(list(G.net)[-1], nn.Tanh)


def test_leaky_relu_function_has_torchs_values_and_derivatives_of_every_order():
    """numgan.activations.leaky_relu: F.leaky_relu's values, first and second derivatives (float64), in
    reverse and forward mode, under torch.func, and without the all-zero term of torch's double backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from numgan.activations import leaky_relu
    from numgan.models import LEAK
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(leaky_relu(x, LEAK), F.leaky_relu(x, LEAK), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: leaky_relu(t, LEAK), (x,))
    assert torch.autograd.gradgradcheck(lambda t: leaky_relu(t, LEAK), (x,))
    assert torch.autograd.gradcheck(lambda t: leaky_relu(t, LEAK), (x,), check_forward_ad=True,
                                    check_backward_ad=False)
    # a double backward through a network with the activation: the same as torch's
    w = torch.randn(7, 7, generator=gen, dtype=torch.float64, requires_grad=True)

    def consensus(act):
        y = act(x @ w) @ w
        g = torch.autograd.grad(y.square().sum(), [x, w], create_graph=True)
        return sum(t.square().sum() for t in g)

    ours = torch.autograd.grad(consensus(lambda t: leaky_relu(t, LEAK)), [x, w])
    ref = torch.autograd.grad(consensus(lambda t: F.leaky_relu(t, LEAK)), [x, w])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # torch.func: forward-over-reverse Hessian-vector product and vmap
    f = lambda t: (leaky_relu(t, LEAK) ** 3).sum()  # noqa: E731
    f_ref = lambda t: (F.leaky_relu(t, LEAK) ** 3).sum()  # noqa: E731
    v = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    hvp = torch.func.jvp(torch.func.grad(f), (x.detach(),), (v,))[1]
    hvp_ref = torch.func.jvp(torch.func.grad(f_ref), (x.detach(),), (v,))[1]
    torch.testing.assert_close(hvp, hvp_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(x.detach()),
                               torch.func.vmap(torch.func.grad(f_ref))(x.detach()), rtol=1e-12, atol=1e-12)

    # the point of the Function: no zero-filled tensors in the second derivative
    class Ops(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    y = leaky_relu(x, LEAK)
    g, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with Ops() as ops:
        torch.autograd.grad(g.square().sum(), x)
    assert "leaky_relu_backward" in ops.names and not {"zeros_like", "zero_", "fill_"} & set(ops.names)


@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (7, 4)])
def test_batch_norm_closed_form_derivatives_equal_torchs(shape):
    """numgan.batchnorm.batch_norm_train: F.batch_norm's values, running averages and first derivative
    exactly (the same kernels), its second derivatives to rounding, forward mode, and third derivatives
    (which torch does not have for batch norm) that pass a finite-difference check (float64)."""
    from numgan.batchnorm import batch_norm_train
    gen = torch.Generator().manual_seed(2)
    x = (2 * torch.randn(*shape, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    c = shape[1]
    stats = [torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)]
    ref_stats = [t.clone() for t in stats]
    ours = lambda t: batch_norm_train(t, *stats, 0.1, 1e-3)  # noqa: E731
    ref = lambda t: F.batch_norm(t, *ref_stats, None, None, True, 0.1, 1e-3)  # noqa: E731
    y, y_ref = ours(x), ref(x)
    assert torch.equal(y, y_ref) and torch.equal(stats[0], ref_stats[0]) and torch.equal(stats[1], ref_stats[1])

    def consensus(fn, t):   # a ConOpt-like second-order quantity
        out = fn(t)
        g, = torch.autograd.grad((out * w).square().sum() + (out ** 3).sum(), t, create_graph=True)
        h, = torch.autograd.grad(g.square().sum(), t, create_graph=True)
        return g, h

    (g, h), (g_ref, h_ref) = consensus(ours, x), consensus(ref, x)
    assert torch.equal(g, g_ref)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-10)
    assert torch.autograd.gradcheck(ours, (x,)) and torch.autograd.gradgradcheck(ours, (x,))
    assert torch.autograd.gradcheck(lambda t: consensus(ours, t)[1], (x,))   # third derivatives
    v = torch.randn(*shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.func.jvp(ours, (x.detach(),), (v,))[1],
                               torch.func.jvp(ref, (x.detach(),), (v,))[1], rtol=1e-12, atol=1e-12)
    # forward over reverse (a Hessian-vector product), as numgan.spectrum's operators take it
    hvp = lambda fn: torch.func.jvp(torch.func.grad(lambda t: (fn(t) * w).square().sum() + (fn(t) ** 3).sum()),  # noqa: E731
                                    (x.detach(),), (v,))[1]
    torch.testing.assert_close(hvp(ours), hvp(ref), rtol=1e-11, atol=1e-10)


def test_tf_batchnorm_closed_form_gives_torchs_conopt_update(float64):
    """A dcgan4 ConOpt step (batch norm in G and D) with numgan's batch-norm second derivatives equals the
    one with torch's (float64), and a one-value-per-channel batch is a clear error."""
    from numgan.optim import make_game_optimizer
    gen = torch.Generator().manual_seed(4)
    z, x = torch.randn(6, 8, generator=gen), torch.rand(6, 3, 16, 16, generator=gen) * 2 - 1
    ends = []
    for closed in (True, False):
        torch.manual_seed(0)
        G, D = build_models("dcgan4", 16, z_dim=8, f_dim=4)
        for m in list(G.modules()) + list(D.modules()):
            if isinstance(m, TFBatchNorm):
                m.closed_form = closed
        opt = make_game_optimizer("conopt", G.parameters(), D.parameters(), gamma=0.7,
                                  optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))

        def closure(need_d=True, need_g=True):
            d_fake = D(G(z))
            return F.softplus(-D(x)).mean() + F.softplus(d_fake).mean(), F.softplus(-d_fake).mean()

        opt.step(closure)
        ends.append([p.detach().clone() for p in list(G.parameters()) + list(D.parameters())]
                    + [b.clone() for b in list(G.buffers()) + list(D.buffers())])
    for a, b in zip(*ends):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="more than one value per channel"):
        TFBatchNorm(3).double()(torch.randn(1, 3))


@pytest.mark.parametrize("k, s, p, n", [(3, 1, 1, 6), (3, 1, 0, 5), (5, 2, 2, 7), (5, 2, 1, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_adjoint_convolutions_with_padding_have_torchs_derivatives(k, s, p, n, channels_last):
    """numgan.conv's Conv / ConvT / WGrad with cuDNN-side padding (the stride-1 ResNet layers of the fast path):
    values as F.conv2d / conv_transpose2d, first and second derivatives by gradcheck / gradgradcheck, in
    float64, also on channels-last inputs (what the GEMM layers hand them)."""
    from numgan import conv

    gen = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    x = torch.randn(2, 3, n, n, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 3, k, k, dtype=torch.float64, generator=gen)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    y = conv.Conv.apply(x, w, s, p)
    torch.testing.assert_close(y, F.conv2d(x, w, stride=s, padding=p))
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(conv.ConvT.apply(g, w, s, p, (n, n)),
                               torch.autograd.grad(F.conv2d(x.requires_grad_(), w, stride=s, padding=p), x, g)[0])
    torch.testing.assert_close(conv.WGrad.apply(x, g, s, p, tuple(w.shape)),
                               torch.autograd.grad(F.conv2d(x, w.requires_grad_(), stride=s, padding=p), w, g)[0])
    x, w, g = (t.detach().requires_grad_() for t in (x, w, g))
    for fn, args in ((lambda a, b: conv.Conv.apply(a, b, s, p), (x, w)),
                     (lambda a, b: conv.ConvT.apply(a, b, s, p, (n, n)), (g, w)),
                     (lambda a, b: conv.WGrad.apply(a, b, s, p, tuple(w.shape)), (x, g))):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
