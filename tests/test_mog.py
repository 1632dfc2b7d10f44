"""The mixture-of-Gaussians experiment (numgan.mog; spec 1.4, 1.5 "MoG MLPs", Figures 2-3)."""
import math

import numpy as np
import pytest
import torch

import numgan.optim
from numgan import mog
from numgan.game import player_gradients
from numgan.optim import make_game_optimizer


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------

def test_sample_real_shape_modes_and_noise():
    g = torch.Generator().manual_seed(0)
    x = mog.sample_real(3, 512, generator=g)
    assert x.shape == (3, 512, 2) and x.dtype == torch.float32
    c = torch.as_tensor(mog.centres(), dtype=torch.float32)
    nearest = torch.cdist(x.reshape(-1, 2), c).argmin(1).reshape(3, 512)
    # point i belongs to mode i mod 8: exactly 64 per mode, deterministic assignment
    assert torch.equal(nearest, (torch.arange(512) % 8).expand(3, -1))
    assert torch.equal(torch.bincount(nearest[0], minlength=8), torch.full((8,), 64))
    noise = x - c[torch.arange(512) % 8]
    assert abs(noise.std().item() - 0.01) < 0.0005
    assert abs(noise.mean().item()) < 0.001


def test_centres_on_unit_circle():
    c = mog.centres()
    assert c.shape == (8, 2)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0)
    np.testing.assert_allclose(c[0], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(c[2], [0.0, 1.0], atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------

def test_make_models_parameter_counts_and_init():
    G, D = mog.make_models(2, seed=0)
    assert G.n_params_per_model() == 1122 and D.n_params_per_model() == 881
    assert G.flat(0).numel() + D.flat(0).numel() == 2003
    for net in (G, D):
        for w in net.weights:
            fan_in, fan_out = w.shape[1:]
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= limit
            assert w.abs().max() > 0.8 * limit  # uniform over the whole range, not a narrower init
        for b in net.biases:
            assert torch.count_nonzero(b) == 0
    # the two runs of the ensemble start from different initialisations
    assert not torch.allclose(G.flat(0), G.flat(1))
    assert not torch.allclose(D.flat(0), D.flat(1))


def test_ensemble_member_equals_single_model_with_shifted_seed():
    G, D = mog.make_models(3, seed=5)
    for s in range(3):
        G1, D1 = mog.make_models(1, seed=5 + s)
        assert torch.equal(G.flat(s), G1.flat(0))
        assert torch.equal(D.flat(s), D1.flat(0))


def test_flat_roundtrip():
    G, _ = mog.make_models(2, seed=0)
    v = torch.randn(G.n_params_per_model())
    G.load_flat(1, v)
    assert torch.equal(G.flat(1), v)
    assert not torch.equal(G.flat(0), v)


# ---------------------------------------------------------------------------------------------------
# the ensemble trick: one step on S runs == S separate steps
# ---------------------------------------------------------------------------------------------------

def _fixed_batches(n_seeds, batch, n_steps, dtype):
    g = torch.Generator().manual_seed(123)
    xs = [mog.sample_real(n_seeds, batch, generator=g, dtype=dtype) for _ in range(n_steps)]
    zs = [torch.randn(n_seeds, batch, mog.Z_DIM, generator=g, dtype=dtype) for _ in range(n_steps)]
    return xs, zs


@pytest.mark.parametrize("method", ["simga", "conopt"])
def test_ensemble_step_equals_separate_steps(method):
    S, batch, n_steps = 3, 64, 2  # two steps, so that the RMSProp state is exercised too
    xs, zs = _fixed_batches(S, batch, n_steps, torch.float64)

    def train(G, D, sl):
        opt = make_game_optimizer(method, G.parameters(), D.parameters(), lr=1e-2, gamma=10.0)
        for x, z in zip(xs, zs):
            opt.step(lambda need_d=True, need_g=True, x=x, z=z:
                     mog.game_losses(G, D, x[sl], z[sl], need_d=need_d, need_g=need_g))

    G, D = (m.double() for m in mog.make_models(S, seed=0))
    start = torch.cat([G.flat(0), D.flat(0)])
    train(G, D, slice(None))
    moved = False
    for s in range(S):
        G1, D1 = (m.double() for m in mog.make_models(1, seed=s))
        train(G1, D1, slice(s, s + 1))
        torch.testing.assert_close(G.flat(s), G1.flat(0), rtol=0, atol=1e-10)
        torch.testing.assert_close(D.flat(s), D1.flat(0), rtol=0, atol=1e-10)
        moved |= not torch.allclose(torch.cat([G1.flat(0), D1.flat(0)]), start)
    assert moved


def test_conopt_differs_from_simga_on_the_ensemble():
    """Guards the test above: the consensus term must actually change the step."""
    xs, zs = _fixed_batches(2, 64, 1, torch.float64)
    out = {}
    for method in ("simga", "conopt"):
        G, D = (m.double() for m in mog.make_models(2, seed=0))
        opt = make_game_optimizer(method, G.parameters(), D.parameters(), lr=1e-2, gamma=10.0)
        opt.step(lambda need_d=True, need_g=True: mog.game_losses(G, D, xs[0], zs[0]))
        out[method] = torch.cat([G.flat(1), D.flat(1)])
    assert (out["simga"] - out["conopt"]).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------------
# the field of one run, for the Jacobians of Figure 3
# ---------------------------------------------------------------------------------------------------

def test_field_for_seed_is_minus_player_gradients():
    S, idx = 3, 1
    G, D = (m.double() for m in mog.make_models(S, seed=0))
    xs, zs = _fixed_batches(S, 128, 1, torch.float64)
    x_real, z = xs[0], zs[0]
    ld, lg = mog.game_losses(G, D, x_real, z)
    gen_params, disc_params = list(G.parameters()), list(D.parameters())
    u = player_gradients(lg, ld, gen_params, disc_params)
    grad_of = {id(p): g for p, g in zip(gen_params + disc_params, u)}
    u_flat = torch.cat([grad_of[id(p)][idx].reshape(-1) for net in (G, D) for p in net._ordered()])

    field = mog.field_for_seed(G, D, idx, x_real[idx], z[idx])
    x = torch.cat([G.flat(idx), D.flat(idx)]).detach()
    assert field.size == 2003
    v = field(x)
    assert v.shape == (2003,) and v.dtype == torch.float64
    torch.testing.assert_close(v, -u_flat, rtol=1e-10, atol=1e-12)
    # the generator block is not trivially zero (the fake samples are not detached)
    assert v[:1122].abs().max() > 1e-6 and v[1122:].abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------

def test_mode_stats_on_hand_made_samples():
    c = mog.centres()
    at_centres = np.repeat(c, 100, axis=0)
    st = mog.mode_stats(at_centres)
    assert st["modes"] == 8 and st["hq"] == 1.0 and st["mean_dist"] < 1e-12
    assert st["counts"].tolist() == [100] * 8

    st = mog.mode_stats(np.zeros((800, 2)))
    assert st["modes"] == 0 and st["hq"] == 0.0
    assert st["mean_dist"] == pytest.approx(1.0)

    half = np.concatenate([np.repeat(c[:4], 100, axis=0), np.zeros((400, 2))])
    st = mog.mode_stats(half)
    assert st["modes"] == 4 and st["hq"] == pytest.approx(0.5)

    # 2 sigma off is high quality, 4 sigma off is not
    off = c + np.array([[0.02, 0.0]])
    assert mog.mode_stats(np.repeat(off, 10, axis=0))["hq"] > 0.0
    far = c * 1.04
    assert mog.mode_stats(np.repeat(far, 10, axis=0))["hq"] == 0.0


def test_mode_stats_min_frac():
    """A mode with fewer than 1% of the samples does not count as covered."""
    c = mog.centres()
    samples = np.concatenate([np.repeat(c[:1], 995, axis=0), np.repeat(c[1:2], 5, axis=0)])
    st = mog.mode_stats(samples)
    assert st["modes"] == 1 and st["hq"] == 1.0


# ---------------------------------------------------------------------------------------------------
# training loop: shapes, snapshots, resume after interruption
# ---------------------------------------------------------------------------------------------------

TRAIN_KW = dict(n_seeds=2, n_iters=12, snapshot_every=4, n_eval_batches=1, batch_size=64, log_every=3,
                checkpoint_every=5)


def test_train_shapes_and_snapshots():
    r = mog.train("simga", **TRAIN_KW)
    assert r["iters"].tolist() == [0, 4, 8, 12]  # after the update of 0, 4, 8 and after the last one
    assert r["samples"].shape == (4, 2, 64, 2)
    assert r["params"].shape == (4, 2, 2003)
    assert r["modes"].shape == r["hq"].shape == (4, 2)
    assert r["log_iters"].tolist() == [0, 3, 6, 9]
    assert r["loss_d"].shape == r["loss_g"].shape == (4, 2)
    assert r["real"].shape == (64, 2)
    assert r["diverged_at"].tolist() == [-1, -1]
    assert np.isfinite(r["samples"]).all() and np.isfinite(r["loss_d"]).all()
    assert not np.array_equal(r["params"][0], r["params"][-1])


class _Interrupt(Exception):
    pass


def test_train_resumes_from_checkpoint(tmp_path, monkeypatch):
    ref = mog.train("conopt", engine="autograd", **TRAIN_KW)  # uninterrupted, no run_dir

    real_factory = numgan.optim.make_game_optimizer

    def interrupting_factory(*args, **kwargs):
        opt = real_factory(*args, **kwargs)
        step, calls = opt.step, [0]

        def step_then_die(closure):
            if calls[0] == 7:  # dies during iteration 7, after the checkpoint at 5
                raise _Interrupt
            calls[0] += 1
            return step(closure)

        opt.step = step_then_die
        return opt

    monkeypatch.setattr(numgan.optim, "make_game_optimizer", interrupting_factory)
    with pytest.raises(_Interrupt):
        mog.train("conopt", run_dir=tmp_path, engine="autograd", **TRAIN_KW)
    assert (tmp_path / "checkpoint.pt").exists()
    monkeypatch.setattr(numgan.optim, "make_game_optimizer", real_factory)
    resumed = mog.train("conopt", run_dir=tmp_path, engine="autograd", **TRAIN_KW)

    for key in ("iters", "samples", "params", "modes", "hq", "log_iters", "loss_d", "loss_g", "diverged_at",
                "real"):
        np.testing.assert_array_equal(resumed[key], ref[key], err_msg=key)


def test_run_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMGAN_RUNS", str(tmp_path))
    kw = dict(n_seeds=1, n_iters=3, snapshot_every=2)
    a = mog.run("simga", **kw)
    calls = []
    monkeypatch.setattr(mog, "train", lambda **k: calls.append(k))
    b = mog.run("simga", **kw)
    assert not calls  # a cache hit, train is not called
    np.testing.assert_array_equal(a["params"], b["params"])
    assert list((tmp_path / "mog").iterdir())[0].name.startswith("simga-")
