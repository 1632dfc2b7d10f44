"""Image-GAN training (spec 1.6; paper Sec. 5 and supplement): any objective x any game optimiser x any
architecture, configured by one small :class:`TrainConfig` that is saved with the run.

One loop iteration = one game-optimiser step (for AltGA: one D step and one G step). Every
``log_every`` iterations the two losses of that step's minibatch are logged ([DEFAULT] 10; the authors'
TensorBoard logged every 15 s of wall clock on a fresh batch, spec D-11: we log the step's own losses,
which needs no extra forward pass that would also move the batch-norm statistics). Evaluation fires
when ``iteration % eval_every == 0`` after that iteration's update (so "iteration 0" is after one
update, as in the authors' code): an 8x8 sample grid from a fixed latent batch z_test, G in eval mode,
and, when enabled, the Inception Score under the paper's protocol and FID (numgan.metrics). Only the
time spent in training steps is accumulated as ``wall_clock`` (logged next to the scores, spec 1.6).

Robustness: the state is checkpointed atomically (temporary file + ``os.replace``) every
``checkpoint_every`` iterations into the run directory and a rerun resumes exactly where it stopped
(models, optimiser, data order and random-number state), so an interrupted run loses at most the work
since the last checkpoint. A run whose losses become non-finite or exceed ``explode_at`` in absolute
value is stopped and recorded as diverged at that iteration (``status = "diverged"``), keeping
everything logged so far.
"""
import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import objectives, runs
from .data import ImageSampler, load_images, resolve_dataset
from .models import build_models
from .optim import OPTIMIZERS, make_game_optimizer
from .step import GanStep


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's CIFAR-10 settings (spec 1.8: z 256, f 64, batch 64,
    lr 1e-4, 150k iterations, evaluation every 1000); ``gamma`` is used by ConOpt and smoothing only."""

    dataset: str = "cifar10"        # "cifar10", "celeba", "synthetic" or a folder/zip of images
    arch: str = "dcgan4_nobn"       # numgan.models.ARCHITECTURES
    method: str = "conopt"          # simga | altga | conopt | smooth | clip
    objective: str = "standard"     # standard | JS | KL | tv | indicator
    lr: float = 1e-4                # TF-1 RMSProp learning rate
    gamma: float = 10.0             # consensus weight (ConOpt, smoothing) or clip norm
    batch_size: int = 64
    n_iters: int = 150_000
    z_dim: int = 256
    f_dim: int = 64
    image_size: int = 32            # 32 for CIFAR-10, 64 for CelebA
    crop: Optional[int] = None      # CelebA centre-crop side for 178x218 images (spec: 160)
    data_limit: Optional[int] = None  # use only the first N images (smoke runs)
    eval_every: int = 1000          # ntest: sample grid (+ IS/FID) every this many iterations
    log_every: int = 10             # loss logging interval
    inception: bool = True          # Inception Score at each evaluation (CIFAR runs in the paper)
    fid: bool = False               # FID against the training set's statistics
    n_eval_samples: int = 6400      # paper: 100 x 64 samples, 10 splits
    is_splits: int = 10
    altga_d_steps: int = 1
    altga_g_steps: int = 1
    unbiased: bool = False          # ConOpt: unbiased two-minibatch estimate (supplement, Lemma 15)
    smoothing_variant: str = "code"  # smoothing: "code" (the figures) or "paper" (spec D-5)
    seed: int = 0
    checkpoint_every: int = 5000
    explode_at: float = 1e6         # |loss| above this counts as diverged
    keep_grids: int = 0             # sample grids kept in the result: 0 = all evaluations
    # CUDA only: TF32 tensor-core matrix products and convolutions (10-bit mantissa inputs, float32
    # accumulation). On for the paper runs: their noise (~3e-4 relative per product) is far below the
    # minibatch noise of a GAN step, and it makes a full reproduction several times cheaper. The
    # spectrum tools never use it (float64 Jacobians); tests compare the fast path with TF32 off.
    tf32: bool = True

    def validate(self) -> "TrainConfig":
        from .models import ARCHITECTURES

        if self.method not in OPTIMIZERS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.objective not in objectives.OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {objectives.OBJECTIVES}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {sorted(ARCHITECTURES)}")
        for name in ("batch_size", "n_iters", "eval_every", "log_every", "checkpoint_every", "z_dim", "f_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        return self

    def key_dict(self) -> dict:
        """The configuration as a dict (what the run cache keys on)."""
        return dataclasses.asdict(self)


def _optimizer_kwargs(cfg: TrainConfig) -> dict:
    if cfg.method == "altga":
        return {"d_steps": cfg.altga_d_steps, "g_steps": cfg.altga_g_steps}
    if cfg.method == "conopt":
        return {"unbiased": cfg.unbiased}
    if cfg.method == "smooth":
        return {"variant": cfg.smoothing_variant}
    return {}


class Diverged(Exception):
    pass


# runs trained in parallel threads (numgan.step.run_concurrently) must not interleave their seeded inits
_INIT_LOCK = threading.Lock()


def fast_conv_impl(method: str, strided: bool = True) -> str:
    """The convolution form of the fast path (numgan.models.set_conv_impl) for a game optimiser, for its
    strided convolutions, or with ``strided=False`` for its stride-1 ones (the ResNets' 3x3 blocks).

    Methods that differentiate the players' gradients again (ConOpt, smoothing) use the im2col/GEMM
    form for strided convolutions, whose second derivatives avoid PyTorch's slow strided-convolution double
    backward, and the "adjoint" form for stride-1 ones, whose derivatives of every order are cuDNN's three
    usual algorithms (PyTorch's own double backward convolves with a feature-map-sized kernel:
    numgan.models.set_conv_impl). First-order methods keep torch's native (cuDNN) convolutions, which were as
    fast or faster for them on an H100 (benchmarks/results/step-cuda.md, cost-cuda.md)."""
    if method not in ("conopt", "smooth"):
        return "native"
    return "gemm" if strided else "adjoint"


def set_precision(device, tf32: bool) -> None:
    """Apply the TF32 choice (TrainConfig.tf32) to CUDA matrix products and cuDNN convolutions.

    Process-wide torch flags: runs trained together (numgan.step.run_concurrently) must agree, which they
    do when they come from the same experiment table."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)


@dataclass
class Training:
    """What one run trains with (:func:`build_training`)."""

    G: torch.nn.Module
    D: torch.nn.Module
    opt: object          # numgan.optim game optimiser
    sampler: ImageSampler
    zgen: torch.Generator
    step: GanStep        # one iteration on fresh minibatches


def build_training(cfg: TrainConfig, images: torch.Tensor, device, fast: Optional[bool] = None,
                   capture_error_mode: str = "global", joint_d: Optional[bool] = None) -> Training:
    """The players (seeded initialisation), game optimiser, minibatch sampler, latent generator and step of
    one run, exactly as :func:`train` trains it (the benchmarks time this too). ``fast`` as in :func:`train`;
    ``joint_d`` as in numgan.step.GanStep (None: its default);
    applies ``cfg.tf32`` (:func:`set_precision`)."""
    device = torch.device(device)
    with _INIT_LOCK:   # the initialisation draws from torch's global generator: one run at a time
        torch.manual_seed(cfg.seed)
        G, D = build_models(cfg.arch, image_size=cfg.image_size, z_dim=cfg.z_dim, f_dim=cfg.f_dim,
                            channels=images.shape[1])
    G, D = G.to(device), D.to(device)
    fast = device.type == "cuda" if fast is None else bool(fast)
    set_precision(device, cfg.tf32)
    if fast:
        from .models import set_conv_impl

        impls = dict(impl=fast_conv_impl(cfg.method), unstrided=fast_conv_impl(cfg.method, strided=False))
        set_conv_impl(G, **impls), set_conv_impl(D, **impls)
    opt = make_game_optimizer(cfg.method, G.parameters(), D.parameters(), lr=cfg.lr, gamma=cfg.gamma,
                              **_optimizer_kwargs(cfg))
    sampler = ImageSampler(images, cfg.batch_size, device=device, seed=cfg.seed)
    zgen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    # one iteration on fresh minibatches: a latent batch per closure call, a real batch per call that
    # needs L_D (numgan.step; eager, or replayed from a CUDA graph when fast on CUDA)
    step = GanStep(G, D, opt, cfg.objective,
                   draw_z=lambda: torch.randn(cfg.batch_size, cfg.z_dim, generator=zgen, device=device),
                   draw_real=sampler, graph=fast, capture_error_mode=capture_error_mode, joint_d=joint_d)
    return Training(G, D, opt, sampler, zgen, step)


def train(cfg: TrainConfig, run_dir=None, device="cpu", images: Optional[torch.Tensor] = None,
          evaluator=None, progress: bool = False, data_root=None, max_iters: Optional[int] = None,
          fast: Optional[bool] = None, capture_error_mode: str = "global") -> dict:
    """Train one GAN and return its history as a flat dict of arrays and scalars.

    Args:
        cfg: the run's configuration.
        run_dir: directory for checkpoints (resumed from if one exists) and the final generator.
        device: torch device for models and data (the uint8 training set is moved there once).
        images: uint8 training images [N, C, H, W]; loaded from ``cfg.dataset`` if not given.
        evaluator: a numgan.metrics.Evaluator (or anything with ``evaluate(sample_fn) -> dict``); built
            from ``cfg.inception`` / ``cfg.fid`` when None and either is on.
        max_iters: stop after this iteration (checkpointing first) even if ``cfg.n_iters`` is larger:
            for splitting a long run over several time-limited jobs. The result is then marked
            ``status = "partial"``.
        fast: the issue-4 fast path, default on for CUDA: the whole step replayed from a CUDA graph
            (numgan.step) and, for ConOpt and smoothing, strided convolutions as im2col + matrix products and
            stride-1 ones as cuDNN calls closed under differentiation (:func:`fast_conv_impl`;
            benchmarks/results/step-cuda.md).
            It computes the same function as the eager step (tests/test_step.py), so it is not part of
            the run's cache key; ``fast=False`` is the plain eager reference.
    Returns keys: ``eval_iters``, ``grids`` (uint8 [K, 64, C, H, W]), ``is_mean``, ``is_std``, ``fid``,
    ``wall_clock`` [K]; ``log_iters``, ``loss_d``, ``loss_g`` [L]; ``status`` ("ok", "diverged",
    "partial"), ``diverged_at`` (-1 if not), ``iters_done``, ``seconds_per_iter``, ``config``.
    """
    cfg.validate()
    device = torch.device(device)
    if images is None:
        images = load_images(cfg.dataset, data_root, image_size=cfg.image_size, crop=cfg.crop, limit=cfg.data_limit)
    if images.shape[-1] != cfg.image_size:
        raise ValueError(f"images are {tuple(images.shape[-2:])}, config says image_size={cfg.image_size}")
    run = build_training(cfg, images, device, fast, capture_error_mode)
    G, D, opt, sampler, zgen, step = run.G, run.D, run.opt, run.sampler, run.zgen, run.step
    z_test = torch.randn(64, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 2)).to(device)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + 3)
    if evaluator is None and (cfg.inception or cfg.fid):
        from .metrics import Evaluator

        evaluator = Evaluator(ref_images=images if cfg.fid else None, inception=cfg.inception, fid=cfg.fid,
                              n_samples=cfg.n_eval_samples, splits=cfg.is_splits, device=device,
                              ref_cache_path=Path(run_dir) / "fid_ref.npz" if (run_dir and cfg.fid) else None)
    if evaluator is not None and hasattr(evaluator, "prepare"):
        evaluator.prepare()   # fail now (missing Inception weights), not after the first 1000 iterations

    hist = {k: [] for k in ("eval_iters", "grids", "is_mean", "is_std", "fid", "wall_clock",
                            "log_iters", "loss_d", "loss_g")}
    start, seconds, status, diverged_at = 0, 0.0, "ok", -1
    ckpt = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["config"] != cfg.key_dict():
            raise ValueError(f"checkpoint {ckpt} belongs to another configuration; delete it or use force")
        G.load_state_dict(state["G"]), D.load_state_dict(state["D"]), opt.load_state_dict(state["opt"])
        sampler.load_state_dict(state["sampler"])
        zgen.set_state(state["zgen"]), sample_gen.set_state(state["sample_gen"])
        torch.set_rng_state(state["torch_rng"])
        hist, start, seconds = state["hist"], state["iter"], state["seconds"]
        status, diverged_at = state.get("status", "ok"), state.get("diverged_at", -1)
        status = "ok" if status == "partial" else status   # a stopped run goes on; a diverged one stays

    def sample_fn(n):
        z = torch.randn(n, cfg.z_dim, generator=sample_gen, device=device)
        x = G(z)
        if not torch.isfinite(x).all():
            raise Diverged(current["it"])
        return x

    current = {"it": 0}

    def evaluate(it):
        current["it"] = it
        was_training = G.training
        G.eval()
        with torch.no_grad():
            grid = G(z_test)
            if not torch.isfinite(grid).all():
                G.train(was_training)
                raise Diverged(it)
            scores = evaluator.evaluate(sample_fn) if evaluator is not None else {}
        G.train(was_training)
        hist["eval_iters"].append(it)
        hist["grids"].append(((grid.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).cpu().numpy())
        for k in ("is_mean", "is_std", "fid"):
            v = scores.get(k)
            hist[k].append(np.nan if v is None else float(v))
        hist["wall_clock"].append(seconds)

    def save_checkpoint(it):
        state = {"config": cfg.key_dict(), "G": G.state_dict(), "D": D.state_dict(), "opt": opt.state_dict(),
                 "sampler": sampler.state_dict(), "zgen": zgen.get_state(), "sample_gen": sample_gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "hist": hist, "iter": it, "seconds": seconds,
                 "status": status, "diverged_at": diverged_at}
        runs.atomic_torch_save(state, ckpt)

    stop = cfg.n_iters if max_iters is None else min(cfg.n_iters, max_iters)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.n_iters, initial=start, desc=f"{cfg.arch} {cfg.method}", mininterval=2.0,
                   unit="it", dynamic_ncols=True)
    it = start
    pending = []   # (iteration, loss tensors) not yet synchronised to the host
    G.train(), D.train()
    try:
        for it in range(start, stop if status == "ok" else start):
            t0 = time.perf_counter()
            losses = step()
            if it % cfg.log_every == 0:
                pending.append((it, losses["loss_d"], losses["loss_g"]))
            flush = len(pending) >= 10 or it % cfg.eval_every == 0 or it == stop - 1
            if device.type == "cuda" and flush:
                # wait for the GPU only where the losses are read anyway (every ~10 iterations), so the
                # next step's launch overlaps this one's execution; a stream (not device) sync, since
                # another thread may be capturing a CUDA graph (numgan.step.run_concurrently)
                torch.cuda.current_stream(device).synchronize()
            seconds += time.perf_counter() - t0
            if flush:
                for i, ld, lg in pending:
                    ld, lg = float(ld), float(lg)
                    hist["log_iters"].append(i), hist["loss_d"].append(ld), hist["loss_g"].append(lg)
                    if not (np.isfinite(ld) and np.isfinite(lg)) or max(abs(ld), abs(lg)) > cfg.explode_at:
                        diverged_at = i
                        raise Diverged
                pending.clear()
                if bar is not None:
                    bar.set_postfix(loss_d=f"{hist['loss_d'][-1]:.3f}", loss_g=f"{hist['loss_g'][-1]:.3f}",
                                    refresh=False)
            if it % cfg.eval_every == 0:
                evaluate(it)
            if bar is not None:
                bar.update(1)
            if ckpt is not None and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < stop:
                save_checkpoint(it + 1)
        it = stop
    except Diverged as exc:
        status = "diverged"
        if exc.args:
            diverged_at = exc.args[0]
        it = it + 1
    finally:
        if bar is not None:
            bar.close()
    if status == "ok" and stop < cfg.n_iters:
        status = "partial"
    if ckpt is not None:
        save_checkpoint(it)
        if status != "partial":
            torch.save(G.state_dict(), Path(run_dir) / "generator.pt")
    grids = hist["grids"][-cfg.keep_grids:] if cfg.keep_grids else hist["grids"]
    eval_iters = np.array(hist["eval_iters"], dtype=np.int64)
    n_done = max(it - start, 1)
    return {
        "eval_iters": eval_iters,
        "grid_iters": eval_iters[len(eval_iters) - len(grids):],
        "grids": np.stack(grids) if grids else np.zeros((0, 64, images.shape[1], cfg.image_size, cfg.image_size),
                                                        np.uint8),
        "is_mean": np.array(hist["is_mean"], dtype=np.float64), "is_std": np.array(hist["is_std"], dtype=np.float64),
        "fid": np.array(hist["fid"], dtype=np.float64), "wall_clock": np.array(hist["wall_clock"]),
        "log_iters": np.array(hist["log_iters"], dtype=np.int64),
        "loss_d": np.array(hist["loss_d"]), "loss_g": np.array(hist["loss_g"]),
        "status": status, "diverged_at": int(diverged_at), "iters_done": int(it),
        "seconds_per_iter": seconds / max(it, 1),
        "seconds": seconds, "config": cfg.key_dict(), "steps_this_call": int(n_done),
    }


def run(cfg: TrainConfig, device="cpu", force: bool = False, progress: bool = False, data_root=None,
        images: Optional[torch.Tensor] = None, evaluator=None, max_iters: Optional[int] = None,
        key_extra: Optional[dict] = None, fast: Optional[bool] = None, capture_error_mode: str = "global") -> dict:
    """Train ``cfg`` through the run cache (numgan.runs): a finished run is loaded, an interrupted one
    resumes from its checkpoint. Runs are grouped by dataset, so figures that share a configuration
    share the run (spec table 4a). A ``partial`` result (``max_iters``) is returned but not cached.
    ``key_extra`` adds entries to the cache key (e.g. which feature network scored the samples). The
    result's ``run_dir`` names the run directory."""
    cfg.validate()
    if images is None:
        images = load_images(cfg.dataset, data_root, image_size=cfg.image_size, crop=cfg.crop, limit=cfg.data_limit)
    kind, _ = resolve_dataset(cfg.dataset, data_root)
    key = {**cfg.key_dict(), "data_source": kind, "n_images": int(images.shape[0]), **(key_extra or {})}
    group = Path(cfg.dataset).name if os.sep in cfg.dataset else cfg.dataset.split(":")[0]
    name = f"{cfg.arch}-{cfg.method}-{cfg.objective}"
    path = runs.run_path(group, name, key)
    result = {}

    def fn(run_dir):
        result.update(train(cfg, run_dir, device, images=images, evaluator=evaluator, progress=progress,
                            max_iters=max_iters, fast=fast, capture_error_mode=capture_error_mode))
        if result["status"] == "partial":
            raise _Partial
        return {k: v for k, v in result.items() if k != "config"}

    try:
        out = runs.cached(group, name, key, fn, force=force)
    except _Partial:
        out = result
    out["run_dir"] = str(path)
    out["config"] = cfg.key_dict()
    return out


class _Partial(Exception):
    pass
