"""Tests for numgan.metrics: IS / FID arithmetic against hand-derived values, the sampling and batching
protocol with an injected fake classifier, torch-fidelity's Inception network with random weights,
and the weights-resolution errors.  No test touches the network (see the autouse fixture)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numgan.metrics as M


# --------------------------------------------------------------------------------------------------
# Fixtures and fakes
# --------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every route to the network fails loudly; env var unset; torch.hub's cache is an empty tmp dir."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def forbidden(*args, **kwargs):
        raise AssertionError("a test attempted network access")

    monkeypatch.setattr(M, "_network_available", forbidden)
    monkeypatch.setattr(M, "_download_weights", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", forbidden)
    monkeypatch.delenv(M.ENV_WEIGHTS, raising=False)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))


class FakeNet:
    """Fixed random linear classifier on 4x4-average-pooled pixels; records its batch sizes."""

    def __init__(self, n_classes=10, seed=0, tag="fake-v1"):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(48, n_classes, generator=g, dtype=torch.float64)
        self.batches = []
        self.tag = tag

    def features(self, images):
        x = images.to(torch.float64) / 255.0
        return F.avg_pool2d(x, 8).flatten(1)  # [N, 48] for 32x32 input

    def __call__(self, images):
        assert images.dtype == torch.uint8
        self.batches.append(images.shape[0])
        f = self.features(images)
        return {"logits_unbiased": 6.0 * (f - 0.5) @ self.W, "pool": f}


class PoolSampler:
    """sample_fn(n) handing out consecutive images of a fixed pool in [-1, 1]; records call sizes."""

    def __init__(self, n=300, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.tanh(1.5 * torch.randn(n, 3, 32, 32, generator=g))
        self.pos, self.calls = 0, []

    def __call__(self, n):
        self.calls.append(n)
        out = self.pool[self.pos:self.pos + n]
        self.pos += n
        return out


def is_by_hand(logits, splits):
    """Straight transcription of the OpenAI improved-GAN formula (float64 numpy)."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


# --------------------------------------------------------------------------------------------------
# Inception Score arithmetic
# --------------------------------------------------------------------------------------------------
def test_is_uniform_predictions_is_one():
    mean, std = M.inception_score_from_probs(np.full((50, 7), 1 / 7), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_confident_and_balanced_is_k():
    # row r predicts class r % K with certainty; 4 splits of 10 rows each hold every class twice,
    # so p(y) is uniform and KL = log K for every row: IS = K in every split, std 0.
    K, N = 5, 40
    probs = np.eye(K)[np.arange(N) % K]
    mean, std = M.inception_score_from_probs(probs, splits=4)
    assert mean == pytest.approx(K, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_two_class_mixture_closed_form():
    # Rows alternate (a, 1-a) and (1-a, a): p(y) = (1/2, 1/2) in every split and every row has
    # KL = log 2 - H(a), so IS = 2 exp(-H(a)) = 2 a^a (1-a)^(1-a).
    a = 0.9
    probs = np.array([[a, 1 - a], [1 - a, a]] * 10)
    mean, std = M.inception_score_from_probs(probs, splits=10)
    assert mean == pytest.approx(2 * a**a * (1 - a) ** (1 - a), rel=1e-12)  # = 2 exp(-0.325083) = 1.444935
    assert mean == pytest.approx(1.4449348, rel=1e-6)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_is_asymmetric_mixture_closed_form():
    # Rows alternate one-hot (1, 0) and uniform (1/2, 1/2): p(y) = (3/4, 1/4).
    # KL(one-hot) = log(4/3); KL(uniform) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3).
    # mean KL = 3/4 log(4/3), IS = (4/3)^(3/4).
    probs = np.array([[1.0, 0.0], [0.5, 0.5]] * 6)
    mean, _ = M.inception_score_from_probs(probs, splits=3)
    assert mean == pytest.approx((4 / 3) ** 0.75, rel=1e-12)


def test_is_splits_are_consecutive_and_std_is_population_std():
    # split 1: one-hot over K classes (IS = K); split 2: uniform (IS = 1).  No shuffling, so
    # mean = (K + 1) / 2 and population std = (K - 1) / 2.
    K = 4
    probs = np.vstack([np.eye(K), np.full((K, K), 1 / K)])
    mean, std = M.inception_score_from_probs(probs, splits=2)
    assert mean == pytest.approx((K + 1) / 2) and std == pytest.approx((K - 1) / 2)


def test_is_uneven_split_sizes_follow_openai_boundaries():
    # N = 7, 3 splits -> rows [0, 2), [2, 4), [4, 7): IS 2 (two distinct one-hots), 1 (identical rows),
    # 3 (three distinct one-hots): mean 2, std sqrt(2/3).
    e = np.eye(3)
    probs = np.stack([e[0], e[1], e[2], e[2], e[0], e[1], e[2]])
    mean, std = M.inception_score_from_probs(probs, splits=3)
    assert mean == pytest.approx(2.0) and std == pytest.approx(math.sqrt(2 / 3))


def test_is_from_logits_matches_probs_and_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((200, 1008))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = M.inception_score_from_probs(p, splits=10)
    got = M.inception_score_from_logits(torch.tensor(logits, dtype=torch.float32), splits=10)
    assert got == pytest.approx(ref, rel=1e-5)
    shifted = M.inception_score_from_logits(logits + rng.standard_normal((200, 1)) * 50, splits=10)
    assert shifted == pytest.approx(M.inception_score_from_logits(logits, splits=10), rel=1e-9)
    tf = isc_features_to_metric(torch.tensor(logits), splits=10, shuffle=False)  # independent implementation
    assert got[0] == pytest.approx(tf["inception_score_mean"], rel=1e-5)
    assert got[1] == pytest.approx(tf["inception_score_std"], rel=1e-4)


def test_is_rejects_bad_input():
    with pytest.raises(ValueError, match="sum to 1"):
        M.inception_score_from_probs(np.ones((10, 3)))
    with pytest.raises(ValueError, match="per split"):
        M.inception_score_from_probs(np.full((5, 2), 0.5), splits=10)
    with pytest.raises(ValueError):
        M.inception_score_from_logits(np.zeros(10))


# --------------------------------------------------------------------------------------------------
# to_uint8
# --------------------------------------------------------------------------------------------------
def test_to_uint8_truncates_like_the_paper():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, -1.5, 1.5, 0.5])
    # (x+1)*127.5 = 0, 0.1275, 127.5, 254.8725, 255, <0, >255, 191.25
    expected = torch.tensor([0, 0, 127, 254, 255, 0, 255, 191], dtype=torch.uint8)
    assert torch.equal(M.to_uint8(x), expected)
    assert torch.equal(M.to_uint8(x.double()), expected)
    assert M.to_uint8(torch.zeros(2, 3, 4, 4)).dtype == torch.uint8


def test_to_uint8_rejects_bad_input():
    with pytest.raises(ValueError, match="floating"):
        M.to_uint8(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        M.to_uint8(torch.tensor([0.0, float("nan")]))


# --------------------------------------------------------------------------------------------------
# FID arithmetic
# --------------------------------------------------------------------------------------------------
def _spd(d, rng):
    A = rng.standard_normal((d, d))
    return A @ A.T / d + 0.1 * np.eye(d)


def _fid_symmetric(mu1, s1, mu2, s2):
    """tr((S1^1/2 S2 S1^1/2)^1/2) via eigh: an independent route to the same number."""
    def psd_sqrt(S):
        w, V = np.linalg.eigh((S + S.T) / 2)
        return (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    r1 = psd_sqrt(s1)
    tr = np.trace(psd_sqrt(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_fid_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, S = rng.standard_normal(16), _spd(16, rng)
    assert M.fid_from_stats(mu, S, mu, S) == pytest.approx(0.0, abs=1e-8)


def test_fid_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    # = (1 + 0 + 6.25) + (1 + 9 - 6) + (4 + 1 - 4) + 0 = 12.25
    assert expected == pytest.approx(12.25)
    assert M.fid_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(12.25, rel=1e-12)


def test_fid_general_symmetric_and_matches_independent_formulas():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    s1, s2 = _spd(20, rng), _spd(20, rng)
    f12, f21 = M.fid_from_stats(mu1, s1, mu2, s2), M.fid_from_stats(mu2, s2, mu1, s1)
    assert f12 > 0
    assert f12 == pytest.approx(f21, rel=1e-10)
    assert f12 == pytest.approx(_fid_symmetric(mu1, s1, mu2, s2), rel=1e-9)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert f12 == pytest.approx(tf["frechet_inception_distance"], rel=1e-9)
    assert M.fid_from_stats(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_fid_rank_deficient_covariances_stay_finite():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 12)), rng.standard_normal((6, 12)) + 0.5  # rank <= 4 and <= 5 in 12-d
    (mu1, s1), (mu2, s2) = M.feature_stats(a), M.feature_stats(b)
    value = M.fid_from_stats(mu1, s1, mu2, s2)
    assert np.isfinite(value)
    assert value == pytest.approx(_fid_symmetric(mu1, s1, mu2, s2), rel=1e-3)


def test_fid_shape_errors_and_feature_stats():
    with pytest.raises(ValueError, match="inconsistent"):
        M.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        M.feature_stats(np.zeros((1, 4)))
    f = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, S = M.feature_stats(f)
    assert np.allclose(mu, [2.0, 2.0])
    assert np.allclose(S, np.cov(f.T))  # unbiased (N - 1), as TTUR


# --------------------------------------------------------------------------------------------------
# End to end with an injected fake classifier
# --------------------------------------------------------------------------------------------------
def test_inception_score_end_to_end_with_fake_model():
    sampler, net = PoolSampler(), FakeNet()
    got = M.inception_score(sampler, model=net, n_samples=250, splits=10, batch_size=100, sample_batch_size=64)
    assert sampler.calls == [64, 64, 64, 58]  # the last generator call only tops up to n_samples
    assert net.batches == [100, 100, 50]  # inference batches of 100, remainder last

    # by hand: the first 250 pool images, truncated in float32 as the paper's numpy code did
    imgs = np.floor((sampler.pool[:250].numpy() + 1) * 127.5).astype(np.uint8)
    logits = FakeNet()(torch.from_numpy(imgs))["logits_unbiased"].numpy()
    expected = is_by_hand(logits, splits=10)
    assert got == pytest.approx(expected, rel=1e-10)
    assert 1.0 < got[0] < 10.0  # non-trivial

    # a uint8 tensor: all of it by default, the first n_samples when given
    u8 = torch.from_numpy(imgs)
    assert M.inception_score(u8, model=FakeNet(), splits=10) == pytest.approx(expected, rel=1e-10)
    assert M.inception_score(u8, model=FakeNet(), n_samples=100, splits=10) == pytest.approx(
        is_by_hand(logits[:100], splits=10), rel=1e-10)


def test_model_may_return_a_plain_tensor():
    net = FakeNet()
    u8 = M.to_uint8(PoolSampler().pool[:40])
    via_dict = M.inception_score(u8, model=net, splits=4)
    via_tensor = M.inception_score(u8, model=lambda x: net(x)["logits_unbiased"], splits=4)
    assert via_dict == pytest.approx(via_tensor, rel=1e-12)


def test_metric_inputs_are_validated():
    net = FakeNet()
    with pytest.raises(ValueError, match="to_uint8"):
        M.inception_score(torch.zeros(10, 3, 32, 32), model=net)  # float tensor, not uint8
    with pytest.raises(ValueError, match="permute"):
        M.inception_score(torch.zeros(10, 32, 32, 3, dtype=torch.uint8), model=net)
    with pytest.raises(ValueError, match="sample_fn"):
        M.inception_score(lambda n: torch.zeros(n, 32, 32), model=net, n_samples=10)
    with pytest.raises(ValueError, match="'pool'"):
        M.fid(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), (np.zeros(2), np.eye(2)),
              model=lambda x: {"logits_unbiased": torch.zeros(x.shape[0], 3)})


def test_fid_end_to_end_with_fake_model():
    sampler, net = PoolSampler(), FakeNet()
    ref_imgs = M.to_uint8(sampler.pool[250:])
    ref = M.feature_stats(net.features(ref_imgs))
    got = M.fid(sampler, ref, model=net, n_samples=250, sample_batch_size=64)
    assert sampler.calls == [64, 64, 64, 58]
    own = M.feature_stats(net.features(M.to_uint8(sampler.pool[:250])))
    assert got == pytest.approx(M.fid_from_stats(*own, *ref), rel=1e-10)
    assert got > 0
    # the same images against their own statistics
    assert M.fid(M.to_uint8(sampler.pool[:250]), own, model=net) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# dataset_stats cache
# --------------------------------------------------------------------------------------------------
def test_dataset_stats_cache_roundtrip(tmp_path):
    imgs = M.to_uint8(PoolSampler(n=60).pool)
    cache = tmp_path / "stats" / "ref.npz"
    net = FakeNet()
    mu, sigma = M.dataset_stats(imgs, net, cache_path=cache)
    assert cache.is_file() and sorted(os.listdir(cache.parent)) == ["ref.npz"]  # no temp file left
    assert mu.shape == (48,) and sigma.shape == (48, 48)

    def must_not_run(x):
        raise AssertionError("cache miss")
    must_not_run.tag = net.tag
    mu2, sigma2 = M.dataset_stats(imgs, must_not_run, cache_path=cache)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    mu3, sigma3 = M.load_stats(cache)
    assert np.array_equal(mu, mu3) and np.array_equal(sigma, sigma3)
    assert np.array_equal(M.dataset_stats(None, cache_path=cache)[0], mu)

    # different image count or different model tag -> recomputed and overwritten
    other = FakeNet(seed=0, tag="fake-v2")
    M.dataset_stats(imgs[:50], other, cache_path=cache)
    assert other.batches == [50]
    M.dataset_stats(imgs[:50], FakeNet(tag="fake-v1"), cache_path=cache)  # tag changed back: recompute
    with np.load(cache) as z:
        assert int(z["n"]) == 50 and str(z["model_tag"]) == "fake-v1"


def test_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_stats"):
        M.load_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="cache_path"):
        M.dataset_stats(None)


# --------------------------------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------------------------------
def test_evaluator_matches_the_functions_and_switches(tmp_path):
    ref_imgs = M.to_uint8(PoolSampler(n=80, seed=3).pool)
    ev = M.Evaluator(ref_images=ref_imgs, ref_cache_path=tmp_path / "ref.npz", model=FakeNet(),
                     n_samples=120, splits=4, sample_batch_size=50)
    res = ev.evaluate(PoolSampler())
    assert set(res) == {"is_mean", "is_std", "fid"}
    u8 = M.to_uint8(PoolSampler().pool[:120])
    assert (res["is_mean"], res["is_std"]) == pytest.approx(M.inception_score(u8, model=FakeNet(), splits=4), rel=1e-12)
    ref = M.dataset_stats(ref_imgs, FakeNet())
    assert res["fid"] == pytest.approx(M.fid(u8, ref, model=FakeNet()), rel=1e-10)
    assert (tmp_path / "ref.npz").is_file()

    only_is = M.Evaluator(fid=False, model=FakeNet(), n_samples=40, splits=4).evaluate(PoolSampler())
    assert only_is["fid"] is None and only_is["is_mean"] > 1

    sampler = PoolSampler()
    nothing = M.Evaluator(inception=False, fid=False).evaluate(sampler)
    assert nothing == {"is_mean": None, "is_std": None, "fid": None} and sampler.calls == []

    with pytest.raises(ValueError, match="ref_stats"):
        M.Evaluator(fid=True)


def test_evaluator_raises_missing_weights_before_sampling(monkeypatch, tmp_path):
    monkeypatch.setenv(M.ENV_WEIGHTS, str(tmp_path / "nope.pth"))
    sampler = PoolSampler()
    ev = M.Evaluator(fid=False, device="cpu")  # constructing is free: the model is lazy
    with pytest.raises(M.InceptionWeightsMissing):
        ev.evaluate(sampler)
    assert sampler.calls == []


# --------------------------------------------------------------------------------------------------
# Weights resolution
# --------------------------------------------------------------------------------------------------
def test_weights_constants_match_torch_fidelity():
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    assert M.INCEPTION_WEIGHTS_URL == tfi.URL_INCEPTION_V3
    assert M.INCEPTION_WEIGHTS_FILENAME == "weights-inception-2015-12-05-6726825d.pth"


def test_missing_weights_env_var_points_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv(M.ENV_WEIGHTS, str(tmp_path / "nope.pth"))
    with pytest.raises(M.InceptionWeightsMissing) as err:
        M.inception_weights_path()
    msg = str(err.value)
    assert M.ENV_WEIGHTS in msg and M.INCEPTION_WEIGHTS_FILENAME in msg and M.INCEPTION_WEIGHTS_URL in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(M.InceptionWeightsMissing):
        M.make_inception("cpu")  # fails before building anything
    with pytest.raises(M.InceptionWeightsMissing, match="nope2"):
        M.inception_weights_path(tmp_path / "nope2.pth")


def test_missing_weights_without_network(monkeypatch):
    monkeypatch.setattr(M, "_network_available", lambda *a, **k: False)
    with pytest.raises(M.InceptionWeightsMissing, match="cannot be reached") as err:
        M.inception_weights_path()
    assert M.ENV_WEIGHTS in str(err.value) and M.INCEPTION_WEIGHTS_FILENAME in str(err.value)
    with pytest.raises(M.InceptionWeightsMissing, match="download disabled"):
        M.inception_weights_path(download=False)


def test_failed_download_is_reported(monkeypatch):
    def broken(url, dst):
        raise OSError("connection reset")
    monkeypatch.setattr(M, "_network_available", lambda *a, **k: True)
    monkeypatch.setattr(M, "_download_weights", broken)
    with pytest.raises(M.InceptionWeightsMissing, match="connection reset") as err:
        M.inception_weights_path()
    assert isinstance(err.value.__cause__, OSError)


def test_weights_resolution_order(monkeypatch, tmp_path):
    explicit, env = tmp_path / "a.pth", tmp_path / "b.pth"
    explicit.write_bytes(b"x")
    env.write_bytes(b"x")
    monkeypatch.setenv(M.ENV_WEIGHTS, str(env))
    assert M.inception_weights_path(explicit) == explicit
    assert M.inception_weights_path() == env
    monkeypatch.delenv(M.ENV_WEIGHTS)
    downloaded = []

    def fake_download(url, dst):
        downloaded.append(url)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"w")
    monkeypatch.setattr(M, "_network_available", lambda *a, **k: True)
    monkeypatch.setattr(M, "_download_weights", fake_download)
    path = M.inception_weights_path()
    assert path == M._hub_checkpoint_path() and path.name == M.INCEPTION_WEIGHTS_FILENAME
    assert downloaded == [M.INCEPTION_WEIGHTS_URL]
    assert M.inception_weights_path() == path and len(downloaded) == 1  # cached now


def test_bad_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / M.INCEPTION_WEIGHTS_FILENAME
    bad.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="not a usable state dict"):
        M.make_inception("cpu", weights=bad)


def test_fp32_strict_toggles_and_restores_cudnn_tf32():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with M._fp32_strict(torch.device("cuda")):
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
    with M._fp32_strict(torch.device("cpu")):
        assert conv.fp32_precision == before


# --------------------------------------------------------------------------------------------------
# torch-fidelity's network with random weights
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_random_init_torch_fidelity_inception(tmp_path):
    # torch-fidelity always loads weights in its constructor; make_inception(random_init=True) builds
    # it without them (no download: the autouse fixture would fail the test).  ~1 s per image on CPU,
    # so the whole test pushes only 3 images through the network.
    net = M.make_inception("cpu", random_init=True, seed=0)
    assert net.tag.startswith("random-init")
    imgs = M.to_uint8(PoolSampler(n=2).pool)
    outputs = []

    def recording(x):
        outputs.append(net(x))
        return outputs[-1]
    mean, std = M.inception_score(imgs, model=recording, splits=1, batch_size=1)
    assert [o["pool"].shape[0] for o in outputs] == [1, 1]
    logits = torch.cat([o["logits_unbiased"] for o in outputs])
    pool = torch.cat([o["pool"] for o in outputs])
    assert logits.shape == (2, 1008) and pool.shape == (2, 2048)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all() and torch.isfinite(pool).all()
    assert logits.std() > 1e-3  # the re-initialisation gives non-degenerate outputs
    assert np.isfinite(mean) and np.isfinite(std) and mean >= 1.0 - 1e-9
    assert (mean, std) == pytest.approx(is_by_hand(logits.double().numpy(), splits=1), rel=1e-5)

    # the real-weights path: a state dict on disk goes through torch.load(weights_only) + load_state_dict
    path = tmp_path / M.INCEPTION_WEIGHTS_FILENAME
    torch.save(net.extractor.state_dict(), path)
    loaded = M.make_inception("cpu", weights=path)
    assert loaded.tag.endswith(M.INCEPTION_WEIGHTS_FILENAME)
    again = loaded(imgs[:1])
    assert torch.allclose(again["logits_unbiased"], logits[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,d", [(400, 32), (50, 64)])   # full-rank and rank-deficient covariances
def test_fid_eigh_equals_the_ttur_sqrtm_formula(n, d):
    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 0.7 * rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.3
    (m1, s1), (m2, s2) = M.feature_stats(a), M.feature_stats(b)
    fast = M.fid_from_stats(m1, s1, m2, s2)
    ref = M.fid_from_stats(m1, s1, m2, s2, method="sqrtm")
    assert fast == pytest.approx(ref, rel=1e-6)
    assert fast > 1.0
    with pytest.raises(ValueError, match="unknown FID method"):
        M.fid_from_stats(m1, s1, m2, s2, method="svd")
