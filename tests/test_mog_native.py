"""The compiled CPU MoG engine (numgan.mog_native) against numgan.mog_fused and the autograd reference.

numgan.mog_fused is itself checked against autograd (tests/test_mog_fused.py); here the C engine must
give the same numbers in float64 on fresh random parameters and batches, including batch sizes that
exercise every remainder path of its 4-row blocks and 64-row chunks.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from numgan import mog, mog_fused as mf, mog_native as mn

from test_mog_fused import _batch, _conopt_reference, _models, assert_train_matches_autograd

F64 = torch.float64

if not mn.available():   # this project's CI machine has gcc; say loudly why anywhere else
    pytest.skip(f"numgan.mog_native unavailable: {mn.unavailable_reason()}", allow_module_level=True)


def _random_case(S, B, dtype=F64, seed=0):
    """Flat parameters with varied ReLU masks (weights ~ N(0, 0.5), biases ~ N(0, 0.3)) and a batch."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(S, mf.N_PARAMS, generator=g, dtype=F64)
    x_real = mog.sample_real(S, B, generator=g, dtype=F64) + 0.3 * torch.randn(S, B, 2, generator=g, dtype=F64)
    z = torch.randn(S, B, mog.Z_DIM, generator=g, dtype=F64)
    return x.to(dtype), x_real.to(dtype), z.to(dtype)


@pytest.mark.parametrize("B", [1, 3, 64, 67, 130])
def test_direction_equals_fused_float64(B):
    S = 3
    x, xr, z = _random_case(S, B, seed=B)
    ld, lg, u = mf.player_grads(x, xr, z)
    got_u, got_l = mn.direction(x, xr, z, None)
    torch.testing.assert_close(got_u, u, rtol=1e-12, atol=1e-14)
    # torch's softplus returns x itself for x > 20 (an error up to exp(-20) = 2e-9 per term); C's is exact
    torch.testing.assert_close(got_l[:, 0], ld, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got_l[:, 1], lg, rtol=1e-8, atol=1e-12)
    ref = mf.conopt_direction(x, xr, z, 10.0)
    got, _ = mn.direction(x, xr, z, 10.0)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)
    # the consensus term is a real contribution in both players' blocks, and every layer's block is
    # nonzero (a layer the C code skipped or mislaid would leave zeros or the wrong values)
    assert (ref - u)[:, :mf.N_G].abs().max() > 1e-4 and (ref - u)[:, mf.N_G:].abs().max() > 1e-4
    HG, HD = mf.layer_views(got - u)
    assert all(h.abs().amax(dim=(1, 2)).min() > 0 for h in HG + HD)


def test_direction_equals_double_backprop_of_the_autograd_models():
    """Straight against autograd (no mog_fused in between): u + gamma grad(1/2 ||u||^2)."""
    S, gamma = 2, 10.0
    G, D = _models(S)
    x_real, z = _batch(S, 70)
    ref, _, (LD, LG) = _conopt_reference(G, D, x_real, z, gamma)
    got, losses = mn.direction(mf.pack(G, D), x_real.contiguous(), z.contiguous(), gamma)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(losses.sum(0), torch.stack([LD, LG]), rtol=1e-12, atol=0)


def test_float32_is_float64_up_to_rounding():
    x, xr, z = _random_case(2, 512, seed=5)
    ref, _ = mn.direction(x, xr, z, 10.0)
    ref = ref.clone()
    got, _ = mn.direction(x.float(), xr.float(), z.float(), 10.0)
    err = (got.double() - ref).norm() / ref.norm()
    assert err < 1e-5, err


@pytest.mark.parametrize("method", ["simga", "conopt"])
def test_steps_equal_fused_steps_and_threads_do_not_change_them(method):
    S, B, n_steps = 3, 64, 4
    x, _, _ = _random_case(S, B, seed=9)
    ref = mf.FusedMoG(x, method, gamma=10.0, lr=1e-2)
    one = mf.FusedMoG(x, method, gamma=10.0, lr=1e-2, backend="native")
    one._plan = mn.Workspace(S, B, F64, threads=1)
    two = mf.FusedMoG(x, method, gamma=10.0, lr=1e-2, backend="native")
    two._plan = mn.Workspace(S, B, F64, threads=2)
    assert len(two._plan.slices) == 2
    for i in range(n_steps):
        _, xr, z = _random_case(S, B, seed=100 + i)
        ld, lg = ref.step(xr, z)
        ld1, lg1 = one.step(xr, z)
        ld2, lg2 = two.step(xr, z)
        torch.testing.assert_close(ld1, ld, rtol=1e-8, atol=0)  # softplus threshold, as above
        torch.testing.assert_close(lg1, lg, rtol=1e-8, atol=0)
        assert torch.equal(ld1, ld2) and torch.equal(lg1, lg2)
    torch.testing.assert_close(one.params, ref.params, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(one.square_avg, ref.square_avg, rtol=1e-10, atol=1e-14)
    assert torch.equal(one.params, two.params) and torch.equal(one.square_avg, two.square_avg)
    assert (one.params - x).abs().max() > 1e-3
    ref.params.copy_(one.params)  # the direction at the same point (the runs differ by rounding by now)
    d1, _ = one.direction(xr, z)
    d0, _ = ref.direction(xr, z)
    # entries that are sums with cancellation: absolute error relative to the direction's scale
    torch.testing.assert_close(d1, d0, rtol=1e-11, atol=1e-11 * d0.abs().max().item())


@pytest.mark.parametrize("method", ["simga", "conopt"])
def test_train_native_matches_autograd(method):
    assert_train_matches_autograd(method, "native")


@pytest.mark.parametrize("engines", [("native", "native"), ("fused", "native"), ("native", "autograd")])
def test_train_native_resume(tmp_path, monkeypatch, engines):
    from test_mog_fused import test_train_fused_resume
    test_train_fused_resume(tmp_path, monkeypatch, engines)


def test_a_diverging_run_is_recorded_not_crashed():
    """Infinite parameters give NaN losses (the ReLU keeps NaN), which mog.train records as divergence."""
    x, xr, z = _random_case(2, 16, dtype=torch.float32)
    x[1, 5] = float("inf")
    _, losses = mn.direction(x, xr, z, 10.0)
    assert torch.isfinite(losses[0]).all() and not torch.isfinite(losses[1]).all()
    r = mog.train("conopt", n_seeds=2, n_iters=6, snapshot_every=3, n_eval_batches=1, batch_size=16, log_every=1,
                  lr=1e30, engine="native")
    assert (r["diverged_at"] >= 0).all()


def test_bad_input_gets_clear_errors():
    x, xr, z = _random_case(2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="float32 or float64"):
        mn.direction(x.half(), xr.half(), z.half(), 10.0)
    with pytest.raises(ValueError, match="dtype"):
        mn.direction(x, xr.double(), z, 10.0)
    with pytest.raises(ValueError, match="x_real"):
        mn.direction(x, xr[:, :, :1].contiguous(), z, 10.0)
    with pytest.raises(ValueError, match="z must be"):
        mn.direction(x, xr, z[:, :4].contiguous(), 10.0)
    with pytest.raises(ValueError, match="x_real"):
        mn.direction(x, xr[:, :0].contiguous(), z[:, :0].contiguous(), 10.0)
    with pytest.raises(ValueError, match="contiguous"):
        mn.direction(x, xr.transpose(1, 2).contiguous().transpose(1, 2), z, 10.0)
    with pytest.raises(ValueError, match="CPU"):
        mn.direction(x.to("meta"), xr.to("meta"), z.to("meta"), 10.0)
    with pytest.raises(ValueError, match="gamma"):
        mn.direction(x, xr, z, -1.0)
    with pytest.raises(ValueError, match="square_avg"):
        mn.step(x, torch.ones(1, mf.N_PARAMS), xr, z, 10.0, 1e-4, 0.9, 1e-10)
    with pytest.raises(ValueError, match="CPU"):
        mf.FusedMoG(x.to("meta"), backend="native")
    with pytest.raises(ValueError, match="CPU"):
        mog.train("conopt", n_iters=2, engine="native", device="meta")
    with pytest.raises(ValueError, match="S >= 1"):
        mn.direction(x[:0], xr[:0], z[:0], 10.0)
    # "auto" picks the C engine on the CPU only; other non-CUDA devices keep the batched-product engine
    assert mog.resolve_engine("auto", "conopt", device="cpu") == "native"
    assert mog.resolve_engine("auto", "conopt", device="meta") == "fused"


def _fresh_python(code, env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_without_a_compiler_auto_falls_back_and_native_says_why(tmp_path):
    code = """
        import torch
        from numgan import mog, mog_fused as mf, mog_native as mn
        assert not mn.available()
        print("REASON", mn.unavailable_reason())
        assert mog.resolve_engine("auto", "conopt") == "fused"
        try:
            mf.FusedMoG(torch.zeros(1, mf.N_PARAMS), backend="native")
        except ValueError as e:
            print("ERROR", e)
    """
    empty = tmp_path / "bin"
    empty.mkdir()
    res = _fresh_python(code, {"PATH": str(empty), "CC": "", "NUMGAN_NATIVE_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "REASON no C compiler found" in res.stdout and "ERROR backend='native' is unavailable" in res.stdout
    res = _fresh_python(code, {"CC": str(tmp_path / "no-such-cc"), "NUMGAN_NATIVE_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "compiling mog_native.c" in res.stdout
    blocker = tmp_path / "a-file"   # the cache folder cannot be made where a file is
    blocker.write_text("")
    res = _fresh_python(code, {"NUMGAN_NATIVE_CACHE": str(blocker / "cache")})
    assert res.returncode == 0, res.stderr
    assert "build cache" in res.stdout and "NUMGAN_NATIVE_CACHE" in res.stdout


def test_the_build_is_cached_by_source_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMGAN_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", f"{mn.compiler()[0]} -pipe")   # a compiler command with arguments, as shells allow
    first = mn._build(torch.float32)
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.name.startswith("mog_native-float-")
    assert mn._build(torch.float32) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert mn._build(torch.float64) != first
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith("mog_native-")]  # no temp files left


def test_step_without_losses_updates_the_same():
    x, xr, z = _random_case(2, 40, dtype=torch.float32, seed=3)
    a, b = x.clone(), x.clone()
    sa, sb = torch.ones_like(x), torch.ones_like(x)
    ls = mn.step(a, sa, xr, z, 10.0, 1e-3, 0.9, 1e-10)
    assert ls.shape == (2, 2) and torch.isfinite(ls).all()
    assert mn.step(b, sb, xr, z, 10.0, 1e-3, 0.9, 1e-10, losses=False) is None
    assert torch.equal(a, b) and torch.equal(sa, sb) and not torch.equal(a, x)


@pytest.mark.parametrize("B", [5, 70])
def test_jacobian_equals_fused_jacobian(B):
    """Every row (all 10 layers' weights and biases of both players), float64, one and two threads."""
    x, xr, z = _random_case(1, B, seed=20 + B)
    ref = mf.jacobian(x[0], xr[0], z[0], chunk_size=500)
    got = mn.jacobian(x[0], xr[0], z[0], threads=1)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-12 * ref.abs().max().item())
    assert torch.equal(mn.jacobian(x[0], xr[0], z[0], threads=3), got)
    # mog.jacobian_for_seed takes this path on the CPU, with numpy input too
    via = mog.jacobian_for_seed(x[0].numpy(), xr[0].numpy(), z[0].numpy())
    assert torch.equal(via, got)
    # both players' blocks, including the cross terms, are nonzero
    G = mf.N_G
    assert all(blk.abs().max() > 1e-6 for blk in (got[:G, :G], got[:G, G:], got[G:, :G], got[G:, G:]))


def test_jacobian_bad_input():
    x, xr, z = _random_case(1, 8)
    with pytest.raises(ValueError, match="flat"):
        mn.jacobian(x[0, :10], xr[0], z[0])
    with pytest.raises(ValueError, match="one run's batch"):
        mn.jacobian(x[0], xr, z)
    with pytest.raises(ValueError, match="z must be"):
        mn.jacobian(x[0], xr[0], z[0, :3])
