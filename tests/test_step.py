"""The issue-4 fast path for image GANs computes the same function as the plain eager step.

* GEMM convolutions (numgan.models.set_conv_impl) vs torch's native ones: values, first derivatives
  and ConOpt's second derivatives, in float64, on fresh random parameters and inputs.
* numgan.step.GanStep: the CUDA-graph data flow (static input buffers filled in the eager draw order,
  recorded closure pattern), run without a graph on the CPU, gives bit-identical training to the eager
  closure for every game optimiser.
The CUDA graph itself needs a GPU: benchmarks/bench_step.py checks it against the eager step there.
"""
import numpy as np
import pytest
import torch

from numgan import experiments
from numgan.data import ImageSampler, load_images
from numgan.models import build_models, set_conv_impl
from numgan.optim import make_game_optimizer
from numgan.step import GanStep
from numgan.train import TrainConfig, train


def _perturb(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("impl", ["adjoint", "gemm", "gemm+adjoint"])   # the last: strided, stride-1 (numgan.train)
@pytest.mark.parametrize("arch,size", [("dcgan4_nobn", 32), ("dcgan3", 32), ("resnet_cf", 32), ("dcgan4_nobn", 48)])
def test_fast_convolutions_equal_native_values_and_conopt_directions(float64, arch, size, impl):
    gen = torch.Generator().manual_seed(hash(arch) % 1000 + size)
    G, D = build_models(arch, size, z_dim=8, f_dim=4)
    _perturb(G, gen), _perturb(D, gen)   # non-zero biases, random BN betas
    z = torch.randn(6, 8, generator=gen)
    x = torch.rand(6, 3, size, size, generator=gen) * 2 - 1
    state = ({k: v.clone() for k, v in G.state_dict().items()}, {k: v.clone() for k, v in D.state_dict().items()})

    def conopt_update(impl):
        G.load_state_dict(state[0]), D.load_state_dict(state[1])
        strided, _, unstrided = impl.partition("+")
        for m in (G, D):
            set_conv_impl(m, strided, unstrided=unstrided or strided)
        # SGD with lr 1: the parameter change is minus ConOpt's direction u + gamma J^T u
        opt = make_game_optimizer("conopt", G.parameters(), D.parameters(), gamma=0.7,
                                  optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
        out = (G(z).detach(), D(x).detach())

        def closure(need_d=True, need_g=True):
            d_fake = D(G(z))
            return (torch.nn.functional.softplus(-D(x)).mean() + torch.nn.functional.softplus(d_fake).mean(),
                    torch.nn.functional.softplus(-d_fake).mean())

        opt.step(closure)
        return out, [p.detach().clone() for p in list(G.parameters()) + list(D.parameters())]

    (g_n, d_n), p_n = conopt_update("native")
    (g_g, d_g), p_g = conopt_update(impl)
    torch.testing.assert_close(g_g, g_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_g, d_n, rtol=1e-12, atol=1e-12)
    for a, b in zip(p_g, p_n):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the step really moved the parameters (the comparison is not between two no-ops)
    names = [n for n, _ in G.named_parameters()] + [n for n, _ in D.named_parameters()]
    starts = [state[0][n] for n, _ in G.named_parameters()] + [state[1][n] for n, _ in D.named_parameters()]
    assert len(names) == len(p_n) and all(not torch.equal(a, b) for a, b in zip(p_n, starts))


def test_gemm_layers_compute_their_neighbouring_leaky_relus():
    """set_conv_impl("gemm") fuses each leaky ReLU next to a GEMM layer into it (dcgan4_nobn: the three after G's
    hidden deconvolutions, the three before D's convolutions 2-4; not the ones after an FC or before D's FC
    layer, nor any with batch norm between it and the GEMM layer, nor one before a transposed convolution, which
    reads its input without im2col); "native" undoes it; the function is the same."""
    from numgan.activations import LeakyReLU
    from numgan.models import SameConv2d, SameConvTranspose2d
    for arch, fused_g, fused_d in (("dcgan4_nobn", 3, 3), ("dcgan4", 0, 3), ("resnet_cf", 0, 3)):
        G, D = build_models(arch, 32, z_dim=8, f_dim=4)
        z, x = torch.randn(3, 8), torch.rand(3, 3, 32, 32)
        ref = (G(z), D(x))
        for impl in ("gemm", "native", "gemm"):
            set_conv_impl(G, impl), set_conv_impl(D, impl)
            n_g = sum(m.fused for m in G.modules() if isinstance(m, LeakyReLU))
            n_d = sum(m.fused for m in D.modules() if isinstance(m, LeakyReLU))
            assert (n_g, n_d) == ((fused_g, fused_d) if impl == "gemm" else (0, 0)), (arch, impl)
            assert sum(m.out_slope is not None for m in G.modules() if isinstance(m, SameConvTranspose2d)) == n_g
            assert sum(m.in_slope is not None for m in D.modules() if isinstance(m, SameConv2d)) == n_d
            torch.testing.assert_close((G(z), D(x)), ref, rtol=1e-5, atol=1e-5)
        if fused_g:
            assert "fused into" in repr(G)
    # the fusion never changes the function: a layer switched back by hand keeps its activation; a module used
    # twice, or a non-positive slope after a transposed convolution (col2im masks by the output's sign), is left
    G, D = build_models("dcgan4_nobn", 32, z_dim=8, f_dim=4)
    z, x = torch.randn(3, 8), torch.rand(3, 3, 32, 32)
    ref = (G(z), D(x))
    set_conv_impl(G, "gemm"), set_conv_impl(D, "gemm")
    for m in list(G.modules()) + list(D.modules()):
        if isinstance(m, (SameConv2d, SameConvTranspose2d)):
            m.impl = "native"
    torch.testing.assert_close((G(z), D(x)), ref, rtol=1e-5, atol=1e-5)
    shared = LeakyReLU(0.2)
    conv_t, conv_t2 = SameConvTranspose2d(4, 4, 5, 2), SameConvTranspose2d(4, 4, 5, 2)
    net = torch.nn.Sequential(conv_t, shared, conv_t2, shared, SameConvTranspose2d(4, 4, 5, 2), LeakyReLU(-0.5))
    set_conv_impl(net, "gemm")
    assert not any(m.fused for m in net.modules() if isinstance(m, LeakyReLU))


def test_set_conv_impl_rejects_unknown_and_keeps_stride_one_native():
    G, D = build_models("resnet_cf", 32, z_dim=8, f_dim=4)
    with pytest.raises(ValueError, match="unknown conv implementation"):
        set_conv_impl(D, "winograd")
    with pytest.raises(ValueError, match="unknown conv implementation 'fft'"):
        set_conv_impl(D, "gemm", unstrided="fft")
    set_conv_impl(D, "adjoint")
    impls = {m.stride[0]: m.impl for m in D.modules() if hasattr(m, "impl")}
    assert impls == {2: "adjoint", 1: "native"}
    set_conv_impl(D, "gemm", unstrided="adjoint")
    assert {m.stride[0]: m.impl for m in D.modules() if hasattr(m, "impl")} == {2: "gemm", 1: "adjoint"}
    set_conv_impl(D, "gemm", strided_only=False)
    assert {m.stride[0]: m.impl for m in D.modules() if hasattr(m, "impl")} == {2: "gemm", 1: "gemm"}
    assert set(G.state_dict()) == set(build_models("resnet_cf", 32, z_dim=8, f_dim=4)[0].state_dict())


def _conv_kernel_sizes(G, D, z, x):
    """The spatial kernel size of every convolution a ConOpt step of (G, D) launches, derivatives included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                seen.append(tuple(args[1].shape[-2:]))
            elif func is torch.ops.aten.convolution_backward.default:
                seen.append(tuple(args[2].shape[-2:]))
            return func(*args, **(kwargs or {}))

    opt = make_game_optimizer("conopt", G.parameters(), D.parameters(), gamma=1.0)

    def closure(need_d=True, need_g=True):
        d_fake = D(G(z))
        return (torch.nn.functional.softplus(-D(x)).mean() + torch.nn.functional.softplus(d_fake).mean(),
                torch.nn.functional.softplus(-d_fake).mean())

    with Trace():
        opt.step(closure)
    return seen


def test_stride_one_adjoint_convolutions_keep_every_derivative_on_small_kernels():
    """Why numgan.train gives the ResNets' 3x3 blocks the "adjoint" form for ConOpt: PyTorch's own double
    backward of a stride-1 convolution forms the input gradient's derivative with respect to the weight as a
    convolution whose kernel is a whole feature map (cuDNN runs such a convolution, but as nothing like its usual algorithms); the adjoint
    Functions launch only convolutions with the layers' own 3x3 and 5x5 kernels, in every derivative order."""
    G, D = build_models("resnet_cf", 32, z_dim=8, f_dim=4)
    z, x = torch.randn(4, 8), torch.rand(4, 3, 32, 32) * 2 - 1
    set_conv_impl(G, "gemm"), set_conv_impl(D, "gemm")          # stride 1 native
    native = _conv_kernel_sizes(G, D, z, x)
    assert max(native) >= (16, 16)                              # feature-map-sized "kernels"
    set_conv_impl(G, "gemm", unstrided="adjoint"), set_conv_impl(D, "gemm", unstrided="adjoint")
    adjoint = _conv_kernel_sizes(G, D, z, x)
    assert set(adjoint) == {(3, 3)} and len(adjoint) > len(native) / 2


def _make_step(method, static, seed=0, **opt_kw):
    torch.manual_seed(seed)
    G, D = build_models("dcgan3", 16, z_dim=8, f_dim=4)   # with batch norm: running statistics must match too
    opt = make_game_optimizer(method, G.parameters(), D.parameters(), lr=1e-3, gamma=0.5, **opt_kw)
    images = load_images("synthetic", limit=40, image_size=16)
    sampler = ImageSampler(images, 8, seed=seed)
    zgen = torch.Generator().manual_seed(seed + 1)
    step = GanStep(G, D, opt, "standard", draw_z=lambda: torch.randn(8, 8, generator=zgen), draw_real=sampler,
                   graph=False, static=static, warmup=2)
    return step, G, D, opt


@pytest.mark.parametrize("method,kw", [("simga", {}), ("conopt", {}), ("conopt", {"unbiased": True}),
                                       ("altga", {"d_steps": 2}), ("smooth", {}), ("clip", {})])
def test_static_buffer_path_is_bit_identical_to_the_eager_closure(method, kw):
    eager, G1, D1, opt1 = _make_step(method, static=False, **kw)
    static, G2, D2, opt2 = _make_step(method, static=True, **kw)
    for _ in range(5):   # 2 warm-up steps, then 3 from static buffers
        l1, l2 = eager(), static()
        assert torch.equal(l1["loss_d"], l2["loss_d"]) and torch.equal(l1["loss_g"], l2["loss_g"])
    for a, b in zip(list(G1.state_dict().values()) + list(D1.state_dict().values()),
                    list(G2.state_dict().values()) + list(D2.state_dict().values())):
        assert torch.equal(a, b)
    assert static._pattern is not None and len(static._buffers) == len(static._pattern)
    s1, s2 = opt1.state_dict(), opt2.state_dict()
    for key in s1:
        for i, st in s1[key]["state"].items():
            assert st["step"] == s2[key]["state"][i]["step"] == 5 * (kw.get("d_steps", 1) if key == "d" else 1)


def test_gan_step_rejects_zero_warmup():
    G, D = build_models("dcgan3", 16, z_dim=8, f_dim=4)
    opt = make_game_optimizer("simga", G.parameters(), D.parameters())
    with pytest.raises(ValueError, match="warmup"):
        GanStep(G, D, opt, "standard", lambda: None, lambda: None, warmup=0)


def test_fast_training_on_cpu_matches_the_reference_to_rounding(tmp_path):
    images = load_images("synthetic", limit=64)
    cfg = TrainConfig(dataset="synthetic", arch="dcgan4_nobn", method="conopt", f_dim=4, z_dim=8, batch_size=8,
                      n_iters=6, eval_every=3, log_every=1, inception=False, gamma=1.0)
    ref = train(cfg, tmp_path / "ref", images=images, fast=False)
    fast = train(cfg, tmp_path / "fast", images=images, fast=True)
    np.testing.assert_allclose(fast["loss_d"], ref["loss_d"], rtol=1e-4)
    np.testing.assert_allclose(fast["loss_g"], ref["loss_g"], rtol=1e-4)
    assert np.abs(fast["grids"].astype(int) - ref["grids"].astype(int)).max() <= 1


def test_tf32_choice_is_part_of_the_configuration():
    a, b = TrainConfig(), TrainConfig(tf32=False)
    assert a.tf32 is True and a.key_dict() != b.key_dict()


def test_run_many_on_cpu_equals_one_run_at_a_time(monkeypatch):
    calls = []

    def fake_run(rid, **kw):
        calls.append((rid, kw.get("capture_error_mode", "global")))
        return {"run_id": rid}

    monkeypatch.setattr(experiments, "run", fake_run)
    out = experiments.run_many(["C3-con", "C3-alt"], "smoke", device="cpu", concurrent=4)
    assert list(out) == ["C3-con", "C3-alt"] and out["C3-alt"] == {"run_id": "C3-alt"}
    assert calls == [("C3-con", "global"), ("C3-alt", "global")]   # sequential on the CPU
    with pytest.raises(ValueError, match="concurrent"):
        experiments.run_many(["C3-con"], "smoke", concurrent=0)
    assert experiments.default_concurrency("cpu") == 1 and experiments.default_concurrency("cuda") == 4
    assert experiments.concurrency_for("CMP-con-1", "cuda") == 4 and experiments.concurrency_for("CEL-con", "cuda") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_concurrent_runs_equal_runs_one_at_a_time_on_cuda():
    """Runs trained together (threads, streams, graphs replayed at once) give the losses they give alone.
    ConOpt with the GEMM convolutions and the joint D pass: graphs captured on one shared stream shared
    cuBLAS workspaces and hung the GPU (numgan.step.GanStep._work_stream)."""
    from numgan.step import run_concurrently

    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    cfgs = [TrainConfig(dataset="synthetic", arch="dcgan4_nobn", method=m, n_iters=60, eval_every=10 ** 9,
                        inception=False, seed=s) for s, m in enumerate(["conopt", "conopt", "altga", "conopt"])]
    jobs = [lambda mode, c=c: train(c, None, "cuda", images=images, capture_error_mode=mode) for c in cfgs]
    alone = run_concurrently(jobs, "cuda", 1)
    together = run_concurrently(jobs, "cuda", 3)   # 4 jobs on 3 workers: a worker's stream is used twice
    for a, b in zip(alone, together):
        assert a["status"] == b["status"] == "ok" and b["iters_done"] == a["iters_done"]
        np.testing.assert_allclose(b["loss_d"], a["loss_d"], rtol=1e-5)
        np.testing.assert_allclose(b["loss_g"], a["loss_g"], rtol=1e-5)


def test_run_many_trains_celeba_runs_one_at_a_time(monkeypatch):
    from numgan import step

    seen = []

    def fake_concurrently(jobs, device, n):
        seen.append((n, len(jobs)))
        return [job("global") for job in jobs]

    monkeypatch.setattr(step, "run_concurrently", fake_concurrently)
    monkeypatch.setattr(experiments, "run", lambda rid, **kw: {"run_id": rid})
    out = experiments.run_many(["C3-con", "CEL-con", "CMP-con-1"], "full", device="cuda")
    assert list(out) == ["C3-con", "CEL-con", "CMP-con-1"]
    assert sorted(seen) == [(1, 1), (4, 2)]


def test_fast_path_picks_gemm_convolutions_only_for_second_order_methods():
    from numgan.train import fast_conv_impl

    assert [fast_conv_impl(m) for m in ("conopt", "smooth", "simga", "altga", "clip")] == \
        ["gemm", "gemm", "native", "native", "native"]
    assert [fast_conv_impl(m, strided=False) for m in ("conopt", "smooth", "simga", "altga", "clip")] == \
        ["adjoint", "adjoint", "native", "native", "native"]


def test_every_image_run_belongs_to_a_figure():
    used = {experiments.resolve(r) for ids in experiments.FIGURE_RUNS.values() for r in ids}
    assert used == set(experiments.RUNS)
    assert set(experiments.FIGURE_RUNS) == set(range(4, 15))


def test_joint_discriminator_pass_is_the_same_function(float64):
    """Without batch norm GanStep evaluates D once on [real; fake]: the same losses and ConOpt updates as
    two separate calls (float64); with batch norm the calls stay apart, and forcing it is an error."""
    results = []
    for joint in (False, True):
        torch.manual_seed(0)
        G, D = build_models("dcgan4_nobn", 16, z_dim=8, f_dim=4)
        _perturb(G, torch.Generator().manual_seed(1)), _perturb(D, torch.Generator().manual_seed(2))
        set_conv_impl(G, "gemm"), set_conv_impl(D, "gemm")
        opt = make_game_optimizer("conopt", G.parameters(), D.parameters(), lr=1e-2, gamma=0.5)
        sampler = ImageSampler(load_images("synthetic", limit=40, image_size=16), 8, seed=0)
        zgen = torch.Generator().manual_seed(3)
        step = GanStep(G, D, opt, "standard", draw_z=lambda: torch.randn(8, 8, generator=zgen),
                       draw_real=lambda: sampler().double(), graph=False, joint_d=joint)
        assert step.joint_d is joint
        losses = [step() for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in list(G.parameters()) + list(D.parameters())]))
    (l0, p0), (l1, p1) = results
    for a, b in zip(l0, l1):
        torch.testing.assert_close(a["loss_d"], b["loss_d"], rtol=1e-12, atol=0)
        torch.testing.assert_close(a["loss_g"], b["loss_g"], rtol=1e-12, atol=0)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    G, D = build_models("dcgan4", 16, z_dim=8, f_dim=4)   # batch norm in D
    opt = make_game_optimizer("simga", G.parameters(), D.parameters())
    assert GanStep(G, D, opt, "standard", lambda: None, lambda: None).joint_d is False
    with pytest.raises(ValueError, match="batch norm"):
        GanStep(G, D, opt, "standard", lambda: None, lambda: None, joint_d=True)
    G, D = build_models("dcgan4_nobn", 16, z_dim=8, f_dim=4)
    opt = make_game_optimizer("simga", G.parameters(), D.parameters())
    assert GanStep(G, D, opt, "standard", lambda: None, lambda: None).joint_d is True


def test_gemm_layers_store_their_weights_as_the_gemm_matrix():
    """set_conv_impl("gemm") keeps the values and makes each weight channels-last, whose memory is the GEMM's
    [out, k k in] matrix (no copy in the forward pass); the other implementations keep NCHW weights."""
    from numgan import conv
    from numgan.models import SameConv2d, SameConvTranspose2d
    G, D = build_models("dcgan4_nobn", 32, z_dim=8, f_dim=4)
    before = {k: v.clone() for k, v in list(G.state_dict().items()) + list(D.state_dict().items())}
    set_conv_impl(G, "gemm"), set_conv_impl(D, "gemm")
    convs = [m for m in list(G.modules()) + list(D.modules()) if isinstance(m, (SameConv2d, SameConvTranspose2d))]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    # no copy, except where k k in is not a multiple of conv.ALIGN (3-channel layers: zero columns appended)
    aligned = [m for m in convs if m.weight[0].numel() % conv.ALIGN == 0]    # the matrix is [len(w), w[0].numel()]
    assert 0 < len(aligned) < len(convs) and conv.ALIGN == 4
    assert all(conv._weight_matrix(m.weight, conv.COLS_LAYOUT).data_ptr() == m.weight.data_ptr() for m in aligned)
    after = {k: v for k, v in list(G.state_dict().items()) + list(D.state_dict().items())}
    assert all(torch.equal(before[k], after[k]) for k in before)
    set_conv_impl(G, "native"), set_conv_impl(D, "adjoint")
    assert all(m.weight.is_contiguous() for m in convs)


def test_fast_conopt_step_launches_half_the_kernels_of_the_plain_port():
    """The fast path's point on a GPU is few kernels per iteration (benchmarks/count_kernels.py, which counts
    them on the CPU with the CUDA path's substitutions). Guard: the fast ConOpt step of dcgan4_nobn launches at
    most 60% of the plain port's kernels (298 of 570 when written, 266 with the fused optimiser and activations;
    before the reductions it launched more than the plain port, 646), and its consensus and combination launch
    no kernel of their own."""
    import sys
    from pathlib import Path
    saved_path = list(sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_step import build
        from count_kernels import count_step
    finally:
        sys.path[:] = saved_path
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    counts = {}
    with torch.random.fork_rng(devices=[]):   # build() seeds the global generator
        for variant in ("plain", "fast"):
            step, G, D = build(variant, "conopt", "dcgan4_nobn", 4, images, torch.device("cpu"))
            step(), step()
            counts[variant], nbytes = count_step(step, with_bytes=True)
    n_params = len(list(G.parameters())) + len(list(D.parameters()))
    # count_kernels --bytes: ConOpt's fused update reads p, ms, u, J^T u and writes p, ms (6 passes); im2col's
    # and col2im's traffic is theirs, not that of the CPU fallback's operators
    param_bytes = sum(p.numel() * p.element_size() for p in list(G.parameters()) + list(D.parameters()))
    assert nbytes["tf1_rmsprop"] == 6 * param_bytes
    assert nbytes["im2col"] > 0 and nbytes["col2im"] > 0 and "unfold_backward" not in nbytes
    plain, fast = sum(counts["plain"].values()), sum(counts["fast"].values())
    assert fast <= 0.6 * plain, (fast, plain)
    # the consensus gradient is one seeded backward pass (game.vjp: no dot product, no concatenation of the
    # gradients), u + gamma J^T u is formed inside the optimiser's update, one kernel per 8 parameter tensors
    fast_ops = counts["fast"]
    assert fast_ops["zeros_like"] == 0 and fast_ops["dot"] == 0 and fast_ops["cat"] <= 1   # [real; fake] only
    assert fast_ops["tf1_rmsprop"] == -(-n_params // 8) and not any(op.startswith("_foreach") for op in fast_ops)
