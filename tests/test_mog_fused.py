"""The fused MoG engine (numgan.mog_fused) against the autograd reference (numgan.mog + numgan.optim)."""
import numpy as np
import pytest
import torch

from numgan import mog, mog_fused as mf, spectrum
from numgan.game import grad_or_zero, player_gradients
from numgan.optim import make_game_optimizer

F64 = torch.float64


def _models(S, seed=0):
    """float64 ensembles away from the init: biases and weights perturbed so that ReLU masks vary."""
    G, D = (m.double() for m in mog.make_models(S, seed))
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        for p in list(G.parameters()) + list(D.parameters()):
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=F64))
    return G, D


def _batch(S, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return mog.sample_real(S, B, generator=g, dtype=F64), torch.randn(S, B, mog.Z_DIM, generator=g, dtype=F64)


def _flat(tensors, G, D):
    """Per-seed flat [S, 2003] of a list of per-parameter tensors in G.parameters() + D.parameters() order."""
    by_id = {id(p): t for p, t in zip(list(G.parameters()) + list(D.parameters()), tensors)}
    ps = list(G._ordered()) + list(D._ordered())
    return torch.cat([by_id[id(p)].reshape(p.shape[0], -1) for p in ps], 1)


def test_layout_pack_unpack_and_views():
    G, D = _models(2)
    x = mf.pack(G, D)
    assert x.shape == (2, mf.N_PARAMS) and mf.N_G == 1122 and mf.N_PARAMS == 2003
    for s in range(2):
        torch.testing.assert_close(x[s], torch.cat([G.flat(s), D.flat(s)]), rtol=0, atol=0)
    PG, PD = mf.layer_views(x)
    torch.testing.assert_close(PG[0][:, :-1], G.weights[0], rtol=0, atol=0)
    torch.testing.assert_close(PD[4][:, -1:], D.biases[4], rtol=0, atol=0)
    G2, D2 = _models(2, seed=7)
    mf.unpack_into(x, G2, D2)
    torch.testing.assert_close(mf.pack(G2, D2), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2003"):
        mf.layer_views(torch.zeros(3, 5))


def test_player_grads_equal_autograd():
    S = 3
    G, D = _models(S)
    x_real, z = _batch(S, 96)
    ld, lg, u = mf.player_grads(mf.pack(G, D), x_real, z)
    LD, LG = mog.game_losses(G, D, x_real, z)
    ref = _flat(player_gradients(LG, LD, list(G.parameters()), list(D.parameters())), G, D)
    torch.testing.assert_close(u, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ld.sum(), LD, rtol=1e-12, atol=0)
    torch.testing.assert_close(lg.sum(), LG, rtol=1e-12, atol=0)
    assert u[:, :mf.N_G].abs().max() > 1e-4 and u[:, mf.N_G:].abs().max() > 1e-4


def _conopt_reference(G, D, x_real, z, gamma):
    """(u + gamma J_u^T u, u, (L_D, L_G)) flat [S, 2003], by autograd double backprop on the ensembles."""
    params = list(G.parameters()) + list(D.parameters())
    LD, LG = mog.game_losses(G, D, x_real, z)
    u = player_gradients(LG, LD, list(G.parameters()), list(D.parameters()), create_graph=True)
    jtu = grad_or_zero(0.5 * sum((t * t).sum() for t in u), params)   # grad 1/2 ||u||^2 by definition
    ref = _flat([a.detach() + gamma * b for a, b in zip(u, jtu)], G, D)
    return ref, _flat([a.detach() for a in u], G, D), (LD.detach(), LG.detach())


def test_conopt_direction_equals_double_backprop():
    S, gamma = 3, 10.0
    G, D = _models(S)
    x_real, z = _batch(S, 96)
    ref, u_only, _ = _conopt_reference(G, D, x_real, z, gamma)
    got = mf.conopt_direction(mf.pack(G, D), x_real, z, gamma)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)
    # the consensus part is a real contribution in both players' blocks
    assert (got - u_only)[:, :mf.N_G].abs().max() > 1e-4 and (got - u_only)[:, mf.N_G:].abs().max() > 1e-4


@pytest.mark.parametrize("method", ["simga", "conopt"])
def test_fused_steps_equal_numgan_optim(method):
    S, B, n_steps = 3, 64, 4
    G, D = _models(S)
    eng = mf.FusedMoG(mf.pack(G, D), method, gamma=10.0, lr=1e-2)
    opt = make_game_optimizer(method, G.parameters(), D.parameters(), lr=1e-2, gamma=10.0)
    start = eng.params.clone()
    for i in range(n_steps):
        x_real, z = _batch(S, B, seed=10 + i)
        ld, lg = eng.step(x_real, z)
        out = opt.step(lambda need_d=True, need_g=True: mog.game_losses(G, D, x_real, z, need_d=need_d,
                                                                           need_g=need_g))
        torch.testing.assert_close(ld.sum(), out["loss_d"], rtol=1e-10, atol=0)
        torch.testing.assert_close(lg.sum(), out["loss_g"], rtol=1e-10, atol=0)
    torch.testing.assert_close(eng.params, mf.pack(G, D), rtol=1e-10, atol=1e-12)
    assert (eng.params - start).abs().max() > 1e-3
    # the RMSProp state goes to / comes from numgan.optim's format
    opt2 = make_game_optimizer(method, G.parameters(), D.parameters(), lr=1e-2)
    mf.store_rmsprop_state(eng, opt2, G, D, n_steps)
    eng2 = mf.FusedMoG(eng.params, method, lr=1e-2)
    mf.load_rmsprop_state(eng2, opt2, G, D)
    torch.testing.assert_close(eng2.square_avg, eng.square_avg, rtol=0, atol=0)
    ref_sq = _flat([opt.optimizers["both"].state[p]["square_avg"] for p in opt.params], G, D)
    torch.testing.assert_close(eng.square_avg, ref_sq, rtol=1e-10, atol=1e-14)


def test_hvp_is_symmetric_hessian_blocks():
    """<t2, J_u^T t1> = <J_u t2, t1>: checked through the Jacobian on random tangents."""
    G, D = _models(1)
    x_real, z = _batch(1, 48)
    x = mf.pack(G, D)
    t = torch.randn(1, 3, mf.N_PARAMS, dtype=F64, generator=torch.Generator().manual_seed(3))
    hv = mf.hvp(x, x_real, z, t)
    Ju = -mf.jacobian(x[0], x_real[0], z[0], chunk_size=500)
    torch.testing.assert_close(hv[0], t[0] @ Ju, rtol=1e-10, atol=1e-12)


def test_jacobian_equals_spectrum_jacobian():
    G, D = _models(2)
    x_real, z = _batch(2, 48)
    x = torch.cat([G.flat(1), D.flat(1)]).detach()
    ref = spectrum.jacobian(mog.field_for_seed(G, D, 1, x_real[1], z[1]), x)
    got = mf.jacobian(x, x_real[1], z[1], chunk_size=300)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    got32 = mog.jacobian_for_seed(x.float().numpy(), x_real[1].float().numpy(), z[1].float().numpy())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    with pytest.raises(ValueError, match="flat"):
        mf.jacobian(x[:10], x_real[1], z[1])


TRAIN_KW = dict(n_seeds=2, n_iters=24, snapshot_every=8, n_eval_batches=1, batch_size=64, log_every=5,
                checkpoint_every=10)


def assert_train_matches_autograd(method, engine):
    """mog.train with ``engine`` logs the same run as with autograd (the reference), up to float32 rounding."""
    a = mog.train(method, engine="autograd", **TRAIN_KW)
    b = mog.train(method, engine=engine, **TRAIN_KW)
    for key in ("iters", "log_iters", "diverged_at", "real"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in ("params", "samples", "loss_d", "loss_g"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert not np.array_equal(b["params"][0], b["params"][-1])


@pytest.mark.parametrize("method", ["simga", "conopt"])
def test_train_fused_matches_autograd(method):
    assert_train_matches_autograd(method, "fused")


def test_sample_real_draws_bitwise_its_definition():
    """sample_real (with its cached row centres) gives bitwise centre[i mod 8] + std * noise, as before the cache,
    so runs cached before it keep their numbers; the second call reuses the cached centres."""
    for _ in range(2):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        got = mog.sample_real(3, 64, generator=g1)
        c = torch.as_tensor(mog.centres(), dtype=torch.float32)
        ref = c[torch.arange(64) % mog.N_MODES] + mog.STD * torch.randn(3, 64, 2, generator=g2)
        assert torch.equal(got, ref)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("engines", [("fused", "fused"), ("autograd", "fused"), ("fused", "autograd")])
def test_train_fused_resume(tmp_path, monkeypatch, engines):
    """Interrupted after the checkpoint at 10 and resumed (possibly with the other engine) == uninterrupted."""
    first, second = engines
    ref = mog.train("conopt", engine=second, **TRAIN_KW)
    real_randn, calls = torch.randn, [0]

    def randn_then_die(*args, **kwargs):  # each iteration draws twice from gen: dies in iteration 14
        if kwargs.get("generator") is not None and kwargs["generator"].initial_seed() == 10_000:
            calls[0] += 1
            if calls[0] > 2 * 14:
                raise _Interrupt
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", randn_then_die)
    with pytest.raises(_Interrupt):
        mog.train("conopt", engine=first, run_dir=tmp_path, **TRAIN_KW)
    monkeypatch.setattr(torch, "randn", real_randn)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = mog.train("conopt", engine=second, run_dir=tmp_path, **TRAIN_KW)
    for key in ("iters", "log_iters", "diverged_at", "real", "modes"):
        np.testing.assert_array_equal(resumed[key], ref[key], err_msg=key)
    tol = dict(rtol=0, atol=0) if first == second else dict(rtol=1e-4, atol=1e-6)
    for key in ("params", "samples", "loss_d", "loss_g"):
        np.testing.assert_allclose(resumed[key], ref[key], err_msg=key, **tol)


def test_bad_engine_and_unsupported_settings():
    with pytest.raises(ValueError, match="unknown MoG engine"):
        mog.train("conopt", engine="jax", **TRAIN_KW)
    with pytest.raises(ValueError, match="fused MoG engine supports"):
        mog.train("conopt", objective="JS", engine="fused", **TRAIN_KW)
    with pytest.raises(ValueError, match="fused MoG engine supports"):
        mog.train("altga", engine="fused", **TRAIN_KW)
    assert mog.resolve_engine("auto", "altga") == "autograd"
    assert mog.resolve_engine("auto", "conopt", "JS") == "autograd"
    from numgan import mog_native
    assert mog.resolve_engine("auto", "conopt") == ("native" if mog_native.available() else "fused")
    with pytest.raises(ValueError, match="supports methods"):
        mf.FusedMoG(torch.zeros(1, mf.N_PARAMS), "smooth")
    with pytest.raises(ValueError, match="CUDA"):
        mf.FusedMoG(torch.zeros(1, mf.N_PARAMS)).make_graphed_steps(2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_steps_equal_eager_steps_on_cuda():
    S, B, k = 4, 128, 3
    G, D = mog.make_models(S, 0)
    x0 = mf.pack(G, D).cuda()
    eager = mf.FusedMoG(x0, "conopt", lr=1e-3)
    graphed = mf.FusedMoG(x0, "conopt", lr=1e-3)
    gs = graphed.make_graphed_steps(k, batch_size=B)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(2):
        xs = mog.sample_real(k * S, B, generator=g, device="cuda").view(k, S, B, 2)
        zs = torch.randn(k, S, B, mog.Z_DIM, generator=g, device="cuda")
        gs.x_real.copy_(xs)
        gs.z.copy_(zs)
        gs.replay()
        for i in range(k):
            eager.step(xs[i], zs[i])
    torch.cuda.synchronize()
    torch.testing.assert_close(graphed.params, eager.params, rtol=1e-5, atol=1e-6)
    assert (graphed.params - x0).abs().max() > 1e-4
