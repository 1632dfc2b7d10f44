"""Training loop: exact checkpoint/resume, divergence handling, the run cache, the run table."""
import numpy as np
import pytest
import torch

from numgan import experiments, runs
from numgan.data import load_images
from numgan.train import TrainConfig, run, train


@pytest.fixture(scope="module")
def images():
    return load_images("synthetic", limit=64)


def small(**kw):
    base = dict(dataset="synthetic", arch="dcgan3_nobn", method="conopt", f_dim=4, z_dim=8, batch_size=8,
                n_iters=12, eval_every=4, log_every=1, checkpoint_every=5, inception=False, gamma=1.0)
    base.update(kw)
    return TrainConfig(**base)


def assert_same(a, b):
    for k in ("loss_d", "loss_g", "log_iters", "eval_iters", "grids"):
        assert np.array_equal(a[k], b[k]), k
    assert a["status"] == b["status"] and a["iters_done"] == b["iters_done"]


@pytest.mark.parametrize("method,arch", [("conopt", "dcgan3_nobn"), ("altga", "dcgan4"), ("simga", "dcgan3")])
def test_resume_after_stop_equals_uninterrupted_run(tmp_path, images, method, arch):
    cfg = small(method=method, arch=arch)
    full = train(cfg, tmp_path / "a", images=images)
    part = train(cfg, tmp_path / "b", images=images, max_iters=7)
    assert part["status"] == "partial" and part["iters_done"] == 7
    resumed = train(cfg, tmp_path / "b", images=images)
    assert_same(full, resumed)
    ga = torch.load(tmp_path / "a" / "generator.pt")
    gb = torch.load(tmp_path / "b" / "generator.pt")
    assert all(torch.equal(ga[k], gb[k]) for k in ga)   # BN running statistics included for dcgan4


def test_crash_loses_only_the_work_since_the_last_checkpoint(tmp_path, images):
    cfg = small()
    full = train(cfg, tmp_path / "a", images=images)

    class Crash:
        def evaluate(self, sample_fn):
            raise KeyboardInterrupt

    class Fine:
        def evaluate(self, sample_fn):
            return {}

    calls = {"n": 0}

    class CrashAtThirdEval:
        def evaluate(self, sample_fn):
            calls["n"] += 1
            if calls["n"] == 3:     # evaluation of iteration 8, after the checkpoint at 5
                raise KeyboardInterrupt
            return {}

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", images=images, evaluator=CrashAtThirdEval())
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert state["iter"] == 5
    resumed = train(cfg, tmp_path / "b", images=images, evaluator=Fine())
    assert_same(full, resumed)


def test_checkpoint_of_another_config_is_refused(tmp_path, images):
    train(small(), tmp_path, images=images, max_iters=3)
    with pytest.raises(ValueError, match="another configuration"):
        train(small(lr=2e-4), tmp_path, images=images)


def test_diverging_run_is_stopped_and_recorded(tmp_path, images):
    cfg = small(method="simga", lr=1e30, n_iters=50)
    r = train(cfg, tmp_path, images=images)
    assert r["status"] == "diverged"
    assert 0 <= r["diverged_at"] < 50 and r["iters_done"] <= 50
    # everything logged up to the divergence is kept (losses or samples turned non-finite there)
    assert list(r["log_iters"]) == list(range(r["log_iters"][-1] + 1)) and r["log_iters"][-1] <= r["diverged_at"]
    last = np.array([r["loss_d"][-1], r["loss_g"][-1]])
    assert not np.all(np.isfinite(last)) or np.abs(last).max() > cfg.explode_at or r["diverged_at"] in r["eval_iters"] \
        or r["diverged_at"] % cfg.eval_every == 0
    assert (tmp_path / "checkpoint.pt").exists()
    again = train(cfg, tmp_path, images=images)               # a rerun does not train on
    assert again["status"] == "diverged" and again["diverged_at"] == r["diverged_at"]


def test_explode_threshold(images):
    r = train(small(explode_at=1e-3), images=images)
    assert r["status"] == "diverged" and r["diverged_at"] == 0


def test_run_cache_and_clean_diverged_outcome(tmp_path, monkeypatch, images):
    monkeypatch.setenv("NUMGAN_RUNS", str(tmp_path))
    cfg = small(method="simga", lr=1e30, n_iters=30)
    r1 = run(cfg, images=images)
    assert r1["status"] == "diverged"
    import numgan.train as T

    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("a cached run must not retrain"))
    r2 = run(cfg, images=images)
    assert r2["status"] == "diverged" and np.array_equal(r1["loss_d"], r2["loss_d"], equal_nan=True)
    assert len(list(tmp_path.glob("synthetic/*/DONE"))) == 1


def test_evaluator_scores_are_recorded(images):
    class Const:
        def evaluate(self, sample_fn):
            x = sample_fn(5)
            assert x.shape == (5, 3, 32, 32)
            return {"is_mean": 2.5, "is_std": 0.1, "fid": 7.0}

    r = train(small(), images=images, evaluator=Const())
    assert list(r["eval_iters"]) == [0, 4, 8]
    assert np.all(r["is_mean"] == 2.5) and np.all(r["fid"] == 7.0)
    assert r["grids"].shape == (3, 64, 3, 32, 32) and r["grids"].dtype == np.uint8
    assert np.all(np.diff(r["wall_clock"]) >= 0)


@pytest.mark.parametrize("field,value", [("method", "adam"), ("arch", "vgg"), ("objective", "wgan"),
                                         ("batch_size", 0), ("lr", -1.0)])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        TrainConfig(**{field: value}).validate()


def test_run_table_matches_the_spec():
    cifar = [r for r in experiments.RUNS.values() if r["dataset"] == "cifar10"]
    celeba = [r for r in experiments.RUNS.values() if r["dataset"] == "celeba"]
    assert (len(cifar), len(celeba)) == (47, 3)                       # spec 4(a): 47 CIFAR + 3 CelebA
    assert sum(r["n_iters"] for r in experiments.RUNS.values()) + 2 * 20_000 == 7_540_000
    keys = {runs.config_key(experiments.config(rid).key_dict()) for rid in experiments.RUNS}
    assert len(keys) == 50                                            # all distinct configurations
    assert experiments.config("C3-con").gamma == 0.1 and experiments.config("C3-con").arch == "dcgan3_nobn"
    assert experiments.config("CMP-con-3").objective == "JS"
    assert experiments.resolve("LR-con-4-1e-4") == "CMP-con-1"
    for alias, target in experiments.ALIASES.items():
        assert experiments.config(alias) == experiments.config(target)
    with pytest.raises(ValueError, match="unknown run id"):
        experiments.config("nope")
    with pytest.raises(ValueError, match="unknown scale"):
        experiments.config("C3-con", "huge")
    smoke = experiments.config("CMP-smo-3", "smoke")
    assert (smoke.method, smoke.objective, smoke.arch) == ("smooth", "JS", "dcgan4_nobn_cf")
