"""Inception Score (as the paper computed it) and FID.

Spec: /work/shared/spec/FIGURES.md section 1.7 and discrepancy D-13. The paper reports the Inception
Score [23] of CIFAR-10 generators (P Fig 5, S Fig 11, S Figs 6-8, "6400 samples").

Protocol of the paper's code (OpenAI improved-GAN IS code, TF graph ``inception-2015-12-05``)
------------------------------------------------------------------------------------------
1. Samples: 100 calls of the **eval-mode** generator at batch size 64 = 6,400 samples, fresh z each.
2. Conversion: x in [-1, 1] -> (x + 1) * 127.5 -> **truncated** to an integer (not rounded)
   -> fed as float in [0, 255].  See `to_uint8`.
3. Network: the graph resizes bilinearly (TF1 semantics) to 299 x 299 and maps [0, 255] -> [-1, 1].
   Logits = pool_3 (2048-d) @ W of the softmax layer **without its bias**, 1008 classes; softmax.
   torch-fidelity's ``inception-v3-compat`` extractor is an exact port of that graph: its
   ``logits_unbiased`` feature is these logits and its ``2048`` feature is pool_3, the standard FID
   feature (TTUR).  Inference batch size 100.
4. Score: 10 consecutive splits of 640 (no shuffling); per split exp(mean_i KL(p(y|x_i) || p(y))),
   with p(y) the split's mean prediction.  Logged: mean over splits, and the (population) std.

Caveats
-------
* The 6,400-sample / 10-split protocol is **biased low** compared with the common 50k-sample /
  10-split protocol: each split's marginal p(y) is estimated from 640 rather than 5,000 samples, and
  the entropy of an empirical marginal is biased low (IS = exp(H[p(y)] - E H[p(y|x)])).  Compare
  numbers only under the same protocol.  Anchors (50k protocol, TF Inception): real CIFAR-10 training
  images score 11.24 (torch-fidelity: 11.237 +- 0.095); DCGAN-class models about 6.0-6.7.
* **Never use torchvision's Inception-v3** (different weights, 1000 classes, different resize):
  it gives about 9.4-9.7 on real CIFAR-10 and its numbers are not comparable with the paper's.
* FID is not in the paper.  We compute it from the same samples (pool_3 features, TTUR formula).
  FID is biased upward at small n, so FID at 6.4k samples is only comparable with FID at 6.4k.
* On CUDA, the forward pass disables TF32 convolutions (PyTorch enables them by default for cuDNN;
  TF's graph ran in full float32).

Weights
-------
No weights ship with torch-fidelity: it downloads ``INCEPTION_WEIGHTS_FILENAME`` from
``INCEPTION_WEIGHTS_URL`` at run time.  `inception_weights_path` resolves, in order: an explicit
path, the environment variable ``NUMGAN_INCEPTION_WEIGHTS``, torch.hub's cache (where a previous
torch-fidelity download lands), and a download when the network works.  Otherwise it raises
`InceptionWeightsMissing` (a FileNotFoundError) quickly, saying which file to supply and how.

Model interface
---------------
Every metric function takes ``model=``: any callable mapping uint8 images [N, 3, H, W] either to a
dict with ``"logits_unbiased"`` [N, 1008] and ``"pool"`` [N, 2048], or to a single tensor used as
whatever the metric needs (logits for IS, features for FID).  ``model=None`` builds the real network
with `make_inception`.  Tests inject fakes this way.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import threading
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import scipy.linalg
import scipy.special
import torch
from torch import nn

__all__ = [
    "ENV_WEIGHTS",
    "INCEPTION_WEIGHTS_URL",
    "INCEPTION_WEIGHTS_FILENAME",
    "PAPER_N_SAMPLES",
    "PAPER_SPLITS",
    "PAPER_SAMPLE_BATCH",
    "PAPER_INFERENCE_BATCH",
    "InceptionWeightsMissing",
    "inception_weights_path",
    "InceptionFeatures",
    "make_inception",
    "to_uint8",
    "sample_images",
    "extract_features",
    "inception_score_from_probs",
    "inception_score_from_logits",
    "inception_score",
    "feature_stats",
    "fid_from_stats",
    "save_stats",
    "load_stats",
    "dataset_stats",
    "fid",
    "Evaluator",
]

ENV_WEIGHTS = "NUMGAN_INCEPTION_WEIGHTS"
# Copied from torch_fidelity/feature_extractor_inceptionv3.py (URL_INCEPTION_V3, torch-fidelity 0.4.0);
# tests/test_metrics.py checks that the installed torch-fidelity still uses the same URL.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILENAME = os.path.basename(urlparse(INCEPTION_WEIGHTS_URL).path)

PAPER_N_SAMPLES = 6400  # 100 generator calls x 64
PAPER_SPLITS = 10
PAPER_SAMPLE_BATCH = 64  # generator batch size
PAPER_INFERENCE_BATCH = 100  # Inception batch size

_FEATURE_NAME = "inception-v3-compat"
_NETWORK_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
class InceptionWeightsMissing(FileNotFoundError):
    """The TF-ported Inception weights (torch-fidelity's file) are not available."""


def _missing_message(reason: str) -> str:
    return (
        f"Inception weights not available: {reason}.\n"
        f"The Inception Score / FID need torch-fidelity's port of the TF graph inception-2015-12-05, "
        f"the file '{INCEPTION_WEIGHTS_FILENAME}', which torch-fidelity downloads from\n"
        f"  {INCEPTION_WEIGHTS_URL}\n"
        f"Download it on a machine with internet access and supply it by either\n"
        f"  * setting the environment variable {ENV_WEIGHTS}=/path/to/{INCEPTION_WEIGHTS_FILENAME}, or\n"
        f"  * passing weights='/path/to/{INCEPTION_WEIGHTS_FILENAME}' (make_inception / Evaluator), or\n"
        f"  * placing it at {_hub_checkpoint_path()} (torch.hub's cache, used by torch-fidelity too).\n"
        f"Do not substitute torchvision's Inception-v3: its scores are not comparable with the paper's."
    )


def _hub_checkpoint_path() -> Path:
    """Where torch.hub (and hence torch-fidelity) caches the downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def _network_available(url: str = INCEPTION_WEIGHTS_URL, timeout: float = _NETWORK_TIMEOUT_S) -> bool:
    """True if a TCP connection to the URL's host opens within `timeout` seconds.

    The connection attempt runs in a daemon thread so that a slow DNS lookup (which ignores socket
    timeouts) cannot block the caller for longer than `timeout`.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):  # urllib would go through the proxy: probe it
        p = urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname, p.port or 80
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result["ok"]


def _download_weights(url: str, dst: Path) -> None:
    """Download `url` to `dst` (torch.hub writes a temporary file and renames it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    # torch.hub could verify the sha256 prefix in the file name (hash_prefix="6726825d"), but
    # torch-fidelity itself does not check it and we cannot confirm offline that the prefix is the
    # sha256 one, so we do not enforce it.
    torch.hub.download_url_to_file(url, str(dst), progress=False)


def inception_weights_path(path: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Resolve the local file of torch-fidelity's Inception weights.

    Order: `path` if given; else ``$NUMGAN_INCEPTION_WEIGHTS`` if set; else torch.hub's cache
    (``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``); else, if `download`
    and the host answers within a few seconds, download into that cache.  An explicit path or env var
    that names a missing file is an error (no silent fallback).

    Raises:
        InceptionWeightsMissing: with a message naming the expected file, its URL and how to supply it.
    """
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        raise InceptionWeightsMissing(_missing_message(f"the file given as weights ({p}) does not exist"))
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        raise InceptionWeightsMissing(_missing_message(f"{ENV_WEIGHTS}={env} does not name an existing file"))
    cached = _hub_checkpoint_path()
    if cached.is_file():
        return cached
    if not download:
        raise InceptionWeightsMissing(_missing_message(f"{ENV_WEIGHTS} is not set, not in {cached}, download disabled"))
    if not _network_available(INCEPTION_WEIGHTS_URL):
        raise InceptionWeightsMissing(
            _missing_message(f"{ENV_WEIGHTS} is not set, not in {cached}, and {urlparse(INCEPTION_WEIGHTS_URL).hostname} "
                             f"cannot be reached")
        )
    try:
        _download_weights(INCEPTION_WEIGHTS_URL, cached)
    except Exception as exc:  # network errors of all kinds (URLError, HTTPError, timeouts, ...)
        raise InceptionWeightsMissing(_missing_message(f"download failed ({exc!r})")) from exc
    return cached


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
@contextmanager
def _fp32_strict(device: torch.device):
    """Disable TF32 for cuDNN convolutions inside the block (CUDA only), restoring the setting after."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 API
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:  # older torch
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


class InceptionFeatures(nn.Module):
    """uint8 images [N, 3, H, W] -> dict(logits_unbiased=[N, 1008], pool=[N, 2048]) (float32).

    Wraps torch-fidelity's ``FeatureExtractorInceptionV3`` ("inception-v3-compat"), which resizes
    to 299 with TF1 bilinear semantics and scales [0, 255] -> [-1, 1] itself.  Build it with
    `make_inception`.  `tag` names the weights (stored with cached dataset statistics).
    """

    def __init__(self, extractor: nn.Module, tag: str):
        super().__init__()
        self.extractor = extractor
        self.tag = tag

    @property
    def device(self) -> torch.device:
        return next(self.extractor.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_uint8_images(images)
        device = self.device
        with _fp32_strict(device):
            pool, logits = self.extractor(images.to(device))
        return {"logits_unbiased": logits, "pool": pool}


def _build_extractor(seed: int | None):
    """torch-fidelity's extractor with freshly initialised (not loaded) weights.

    torch-fidelity's constructor always loads weights (downloading when no path is given).  We
    subclass it so that a sentinel state dict skips loading, and hand it that sentinel instead of
    letting it download; the real weights are then loaded by `make_inception` itself.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from unittest import mock

    sentinel = object()

    class _Extractor(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is sentinel:
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    def no_download(*args, **kwargs):
        return sentinel

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        with mock.patch.object(tfi, "load_state_dict_from_url", no_download):
            extractor = _Extractor(_FEATURE_NAME, ["2048", "logits_unbiased"], verbose=False)
        if seed is not None:
            # PyTorch's default init shrinks activations ~6x per layer (pool features ~1e-8); a
            # ReLU-Kaiming init keeps them O(1) so a random network gives non-trivial predictions.
            for m in extractor.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(extractor.fc.weight, std=1.0 / math.sqrt(extractor.fc.in_features))
    return extractor


def make_inception(
    device: str | torch.device | None = None,
    weights: str | os.PathLike | None = None,
    *,
    random_init: bool = False,
    seed: int = 0,
) -> InceptionFeatures:
    """Build the TF-ported Inception network (torch-fidelity "inception-v3-compat").

    Args:
        device: where to run it; default CUDA when available, else CPU.
        weights: weights file; default resolution in `inception_weights_path`.
        random_init: skip the weights and initialise randomly (seeded by `seed`).  For tests and
            smoke runs only: the resulting scores mean nothing.

    Raises:
        InceptionWeightsMissing: weights cannot be found (raised before anything heavy is built).
        ValueError: the file is not a state dict of this network.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if random_init:
        extractor = _build_extractor(seed)
        tag = f"random-init(seed={seed})"
    else:
        path = inception_weights_path(weights)
        extractor = _build_extractor(None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            extractor.load_state_dict(state)
        except Exception as exc:
            raise ValueError(
                f"{path} is not a usable state dict of torch-fidelity's Inception "
                f"(expected the file {INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL}): {exc}"
            ) from exc
        tag = f"{_FEATURE_NAME}:{INCEPTION_WEIGHTS_FILENAME}"
    extractor.requires_grad_(False).eval()
    return InceptionFeatures(extractor, tag).to(device).eval()


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def _check_uint8_images(images) -> None:
    if not torch.is_tensor(images):
        raise ValueError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"expected uint8 images in [0, 255], got dtype {images.dtype}; "
            f"convert generator output in [-1, 1] with numgan.metrics.to_uint8"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        hint = " (channels last? use images.permute(0, 3, 1, 2))" if images.dim() == 4 and images.shape[-1] == 3 else ""
        raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}{hint}")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map generator output in [-1, 1] to uint8 exactly as the paper's code: (x + 1) * 127.5, truncated.

    The arithmetic is done in the input's float dtype (float32 generator output, as in the TF code),
    then clamped to [0, 255] and floored (= truncation for non-negative values; 127.5 -> 127).

    Raises:
        ValueError: non-floating input, or NaN/inf values (e.g. a diverged generator).
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"to_uint8 expects floating images in [-1, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("to_uint8: images contain NaN or inf (did the generator diverge?)")
    y = (x + 1) * 127.5
    return y.clamp_(0, 255).floor_().to(torch.uint8)


@torch.no_grad()
def sample_images(sample_fn: Callable[[int], torch.Tensor], n: int, sample_batch_size: int = PAPER_SAMPLE_BATCH) -> torch.Tensor:
    """Call `sample_fn(m)` (float images in [-1, 1], [m, 3, H, W]) in chunks of `sample_batch_size`
    until `n` images exist (the last chunk is smaller when needed); return them as uint8 on the CPU.

    `sample_fn` should use the generator in eval mode (as the paper did) and a fresh z per call.
    """
    if n < 1 or sample_batch_size < 1:
        raise ValueError(f"n and sample_batch_size must be positive, got {n}, {sample_batch_size}")
    chunks, done = [], 0
    while done < n:
        m = min(sample_batch_size, n - done)
        x = sample_fn(m)
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[0] != m or x.shape[1] != 3:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"sample_fn({m}) must return a float tensor [{m}, 3, H, W] in [-1, 1], got {shape}")
        chunks.append(to_uint8(x).cpu())
        done += m
    return torch.cat(chunks)


def _as_images(sample_fn_or_images, n_samples: int | None, sample_batch_size: int) -> torch.Tensor:
    """uint8 images from either a uint8 tensor (first n_samples, default all) or a sample_fn (default 6400)."""
    if torch.is_tensor(sample_fn_or_images):
        images = sample_fn_or_images
        _check_uint8_images(images)
        if n_samples is not None:
            if n_samples > images.shape[0]:
                raise ValueError(f"n_samples={n_samples} but only {images.shape[0]} images were given")
            images = images[:n_samples]
        return images
    if callable(sample_fn_or_images):
        n = PAPER_N_SAMPLES if n_samples is None else n_samples
        return sample_images(sample_fn_or_images, n, sample_batch_size)
    raise ValueError(
        "expected a uint8 image tensor [N, 3, H, W] or a sample_fn(n) -> float images in [-1, 1], "
        f"got {type(sample_fn_or_images).__name__}"
    )


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return None


@torch.no_grad()
def extract_features(
    images: torch.Tensor,
    model,
    keys: tuple[str, ...] = ("logits_unbiased", "pool"),
    batch_size: int = PAPER_INFERENCE_BATCH,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Run `model` over uint8 `images` in batches of `batch_size`; return {key: float64 array [N, d]}.

    A model returning a single tensor serves every key with it.  Images are moved to `device`
    (default: the model's parameter device, if it has one).
    """
    _check_uint8_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        if device is not None:
            batch = batch.to(device)
        result = model(batch)
        for k in keys:
            if isinstance(result, Mapping):
                if k not in result:
                    raise ValueError(f"model output has no '{k}' entry (it has {sorted(result)})")
                t = result[k]
            else:
                t = result
            if not torch.is_tensor(t) or t.dim() != 2 or t.shape[0] != batch.shape[0]:
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"model output '{k}' must be a tensor [{batch.shape[0]}, d], got {shape}")
            out[k].append(t.detach().to("cpu", torch.float64))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------
def _is_splits(p: np.ndarray, plogp_rowsum: np.ndarray, splits: int) -> tuple[float, float]:
    """IS over consecutive splits (OpenAI layout: split i = rows [i N // s, (i+1) N // s))."""
    n = p.shape[0]
    if not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    if n < splits:
        raise ValueError(f"need at least one sample per split: {n} samples, {splits} splits")
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        part = p[lo:hi]
        q = part.mean(axis=0)
        # KL(p_i || q) = sum_k p_ik log p_ik - p_ik log q_k, with 0 log 0 = 0
        kl = plogp_rowsum[lo:hi] - scipy.special.xlogy(part, q[None, :]).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_probs(probs, splits: int = PAPER_SPLITS) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` consecutive splits) from class probabilities [N, K].

    Per split: exp(mean_i KL(p(y|x_i) || p(y))), p(y) the split's mean prediction; float64, no shuffle.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, K], got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("probs must be finite, non-negative, and each row must sum to 1")
    return _is_splits(p, scipy.special.xlogy(p, p).sum(axis=1), splits)


def inception_score_from_logits(logits, splits: int = PAPER_SPLITS) -> tuple[float, float]:
    """Inception Score (mean, std) from logits [N, K]; the softmax is taken in float64."""
    z = logits.detach().cpu().double().numpy() if torch.is_tensor(logits) else np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or not np.isfinite(z).all():
        raise ValueError(f"logits must be a finite [N, K] array, got shape {z.shape}")
    logp = z - scipy.special.logsumexp(z, axis=1, keepdims=True)
    p = np.exp(logp)
    return _is_splits(p, (p * logp).sum(axis=1), splits)


def inception_score(
    sample_fn_or_images,
    model=None,
    n_samples: int | None = None,
    splits: int = PAPER_SPLITS,
    batch_size: int = PAPER_INFERENCE_BATCH,
    device: str | torch.device | None = None,
    sample_batch_size: int = PAPER_SAMPLE_BATCH,
) -> tuple[float, float]:
    """Inception Score (mean, std) under the paper's protocol.

    Args:
        sample_fn_or_images: `sample_fn(n)` -> float images in [-1, 1] (eval-mode generator; called in
            chunks of `sample_batch_size`, default n_samples 6400), or a uint8 tensor [N, 3, H, W]
            (all images used unless `n_samples` is given).
        model: see the module docstring; default `make_inception(device)`.
        batch_size: inference batch size (100 as in the paper).
    """
    images = _as_images(sample_fn_or_images, n_samples, sample_batch_size)
    if model is None:
        model = make_inception(device)
    feats = extract_features(images, model, ("logits_unbiased",), batch_size, device)
    return inception_score_from_logits(feats["logits_unbiased"], splits)


# --------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------
def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], covariance [d, d]) of features [N, d] in float64 (unbiased covariance, as TTUR)."""
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, d] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (S1 S2)^(1/2) for symmetric PSD S1, S2 from two symmetric eigendecompositions.

    S1 S2 is similar to M = S1^(1/2) S2 S1^(1/2), which is symmetric PSD, so tr (S1 S2)^(1/2) =
    sum_i sqrt(lambda_i(M)). Same value as the TTUR formula's scipy.linalg.sqrtm (Schur based) to
    round-off (tests/test_metrics.py), about 10x faster at 2048 x 2048: FID was most of the time of an
    evaluation (issue 4, benchmarks/results/cost-cuda.md).
    """
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    lam = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def fid_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh") -> float:
    """Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    ``method="eigh"`` (default) computes tr (S1 S2)^(1/2) from symmetric eigendecompositions
    (`_trace_sqrt_product`). ``method="sqrtm"`` is the TTUR / pytorch-fid computation: scipy.linalg.sqrtm
    in float64; if the product is singular enough that sqrtm fails, `eps` is added to both diagonals,
    and imaginary parts from round-off are dropped.

    Raises:
        ValueError: shape mismatch, unknown method, or (sqrtm) a significant imaginary diagonal part.
    """
    if method not in ("eigh", "sqrtm"):
        raise ValueError(f"unknown FID method {method!r}; choose 'eigh' or 'sqrtm'")
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"inconsistent shapes: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        if not (np.isfinite(s1).all() and np.isfinite(s2).all()):
            raise ValueError("FID: the covariances are not finite")
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular input; we check the result below
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("FID: the matrix square root is not finite even after adding eps to the covariances")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrt of S1 S2 has an imaginary diagonal part of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def save_stats(path: str | os.PathLike, mu, sigma, **meta) -> Path:
    """Write (mu, sigma, meta) to an .npz atomically (temporary file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                     **{k: np.asarray(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz written by `save_stats` (or any .npz with 'mu' and 'sigma')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics file {path} does not exist; create it with numgan.metrics.dataset_stats")
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path} has no 'mu' / 'sigma' arrays (has {list(z.keys())})")
        return z["mu"], z["sigma"]


def _model_tag(model) -> str:
    return str(getattr(model, "tag", ""))


def dataset_stats(
    images_uint8: torch.Tensor | None,
    model=None,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = PAPER_INFERENCE_BATCH,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FID reference statistics (mu, sigma) of real uint8 images [N, 3, H, W] (pool features).

    With `cache_path`: reuse the .npz there if it was made from the same number of images with the
    same model tag (`model.tag`, e.g. which weights); otherwise compute and write it atomically.
    `images_uint8=None` loads an existing cache without checks.
    """
    if images_uint8 is None:
        if cache_path is None:
            raise ValueError("dataset_stats needs images_uint8, or a cache_path of previously computed statistics")
        return load_stats(cache_path)
    _check_uint8_images(images_uint8)
    if model is None:
        model = make_inception(device)
    tag, n = _model_tag(model), int(images_uint8.shape[0])
    if cache_path is not None and Path(cache_path).is_file():
        with np.load(cache_path) as z:
            if "mu" in z and "sigma" in z and int(z.get("n", -1)) == n and str(z.get("model_tag", "")) == tag:
                return z["mu"], z["sigma"]
    feats = extract_features(images_uint8, model, ("pool",), batch_size, device)
    mu, sigma = feature_stats(feats["pool"])
    if cache_path is not None:
        save_stats(cache_path, mu, sigma, n=n, model_tag=tag)
    return mu, sigma


def _resolve_ref_stats(ref_stats) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(ref_stats, (str, os.PathLike)):
        return load_stats(ref_stats)
    if isinstance(ref_stats, (tuple, list)) and len(ref_stats) == 2:
        return np.asarray(ref_stats[0], np.float64), np.asarray(ref_stats[1], np.float64)
    raise ValueError("ref_stats must be (mu, sigma) or the path of an .npz from dataset_stats / save_stats")


def fid(
    sample_fn_or_images,
    ref_stats,
    model=None,
    n_samples: int | None = None,
    batch_size: int = PAPER_INFERENCE_BATCH,
    device: str | torch.device | None = None,
    sample_batch_size: int = PAPER_SAMPLE_BATCH,
) -> float:
    """FID between generated images (sample_fn or uint8 tensor, as in `inception_score`) and
    reference statistics `ref_stats` ((mu, sigma) or an .npz path)."""
    mu2, sigma2 = _resolve_ref_stats(ref_stats)
    images = _as_images(sample_fn_or_images, n_samples, sample_batch_size)
    if model is None:
        model = make_inception(device)
    feats = extract_features(images, model, ("pool",), batch_size, device)
    return fid_from_stats(*feature_stats(feats["pool"]), mu2, sigma2)


# --------------------------------------------------------------------------------------------------
# Evaluator for the training loop
# --------------------------------------------------------------------------------------------------
class Evaluator:
    """Periodic IS / FID evaluation of a generator, sharing one set of samples and one forward pass.

    The network is built lazily at the first `evaluate` (or `prepare`), so a missing weights file
    raises `InceptionWeightsMissing` there, before any sample is drawn.

    Args:
        ref_stats: FID reference (mu, sigma) or .npz path; or give `ref_images` (uint8, real data)
            with an optional `ref_cache_path`, computed lazily with `dataset_stats`.
        inception, fid: switch each metric on or off.
        n_samples, splits, batch_size, sample_batch_size: protocol (paper: 6400, 10, 100, 64).
        device, weights: passed to `make_inception`; `model` injects a ready model instead.
    """

    def __init__(
        self,
        ref_stats=None,
        *,
        ref_images: torch.Tensor | None = None,
        ref_cache_path: str | os.PathLike | None = None,
        inception: bool = True,
        fid: bool = True,
        n_samples: int = PAPER_N_SAMPLES,
        splits: int = PAPER_SPLITS,
        batch_size: int = PAPER_INFERENCE_BATCH,
        sample_batch_size: int = PAPER_SAMPLE_BATCH,
        device: str | torch.device | None = None,
        weights: str | os.PathLike | None = None,
        model=None,
    ):
        if fid and ref_stats is None and ref_images is None and ref_cache_path is None:
            raise ValueError("fid=True needs ref_stats, ref_images or ref_cache_path (or pass fid=False)")
        if inception and n_samples < splits:
            raise ValueError(f"n_samples={n_samples} is smaller than splits={splits}")
        self.inception, self.fid = bool(inception), bool(fid)
        self.n_samples, self.splits = int(n_samples), int(splits)
        self.batch_size, self.sample_batch_size = int(batch_size), int(sample_batch_size)
        self.device, self.weights = device, weights
        self._model = model
        self._ref_stats = None if ref_stats is None else _resolve_ref_stats(ref_stats)
        self._ref_images, self._ref_cache_path = ref_images, ref_cache_path

    @property
    def model(self):
        """The feature network, built on first access (may raise InceptionWeightsMissing)."""
        if self._model is None:
            self._model = make_inception(self.device, self.weights)
        return self._model

    @property
    def ref_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """FID reference statistics, computed (or loaded from the cache) on first access."""
        if self._ref_stats is None:
            self._ref_stats = dataset_stats(self._ref_images, self.model, self._ref_cache_path,
                                            self.batch_size, self.device)
        return self._ref_stats

    def prepare(self) -> "Evaluator":
        """Build the network and the reference statistics now (fail early instead of at first eval)."""
        if self.inception or self.fid:
            _ = self.model
        if self.fid:
            _ = self.ref_stats
        return self

    def evaluate(self, sample_fn: Callable[[int], torch.Tensor]) -> dict[str, float | None]:
        """{'is_mean', 'is_std', 'fid'} for `sample_fn(n)` -> float images in [-1, 1]; disabled ones are None."""
        result: dict[str, float | None] = {"is_mean": None, "is_std": None, "fid": None}
        if not (self.inception or self.fid):
            return result
        self.prepare()
        images = sample_images(sample_fn, self.n_samples, self.sample_batch_size)
        keys = (("logits_unbiased",) if self.inception else ()) + (("pool",) if self.fid else ())
        feats = extract_features(images, self.model, keys, self.batch_size, self.device)
        if self.inception:
            result["is_mean"], result["is_std"] = inception_score_from_logits(feats["logits_unbiased"], self.splits)
        if self.fid:
            result["fid"] = fid_from_stats(*feature_stats(feats["pool"]), *self.ref_stats)
        return result
