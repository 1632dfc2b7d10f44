"""The paper's image-GAN runs (spec table 4a), by id, at each scale; shared across figures via the cache.

Every CIFAR-10 run uses z = 256, f = 64, batch 64, TF-1 RMSProp lr 1e-4, 150,000 iterations, an
evaluation every 1000 iterations with the Inception Score (6,400 samples, 10 splits), unless its row
says otherwise. Figures refer to runs by id, so a run that appears in several figures (e.g. CMP-con-1 in
Figs. 6, 7, 11 and 13) is trained once.

==============  ===============================================  ===================
ids             what                                             figures
==============  ===============================================  ===================
C3-con, C3-alt  dcgan3_nobn ConOpt (gamma 0.1) / dcgan3 AltGA    4a, 5, 12, 13
CMP-{m}-{j}     m in sim/alt/con/smo, job j = 0..3:              6, 7, 9, 11, 12, 13
                0 dcgan4, 1 dcgan4_nobn, 2 dcgan4_nobn_cf,
                3 dcgan4_nobn_cf + JS objective; gamma 10
DIV-ind         dcgan4_nobn_cf, indicator objective, ConOpt      9c
FC-{m}-{j}      as CMP with an extra FC-512 layer in D           8 [DEFAULT]
LR-alt-{3,4}-lr AltGA dcgan3 / dcgan4 at lr 2e-4, 5e-4           12 [DEFAULT]
LR-con-{3,4}-lr ConOpt dcgan3_nobn (0.1) / dcgan4_nobn (10)      13 [DEFAULT]
GM-{3,4}-g      ConOpt at lr 2e-4, gamma grid                    14 [DEFAULT]
CEL-{sim,alt,   CelebA 64x64, crop 160, constant-filter ResNet   4b, 10
con}            f 128, batch 128, 150k, no IS (spec Fig. 10)
==============  ===============================================  ===================

Scales: ``full`` is the table above. ``smoke`` keeps every architecture, objective and method but
shrinks widths, batch, iterations and data so that a notebook runs in seconds on a CPU; it uses real
images when a dataset is found (``NUMGAN_DATA``) and a synthetic image set otherwise, and replaces the
Inception network by a small randomly initialised feature network (:func:`smoke_evaluator`) so the
whole evaluation pipeline runs; its "scores" mean nothing and figures say so.
"""
import copy
from typing import Optional

import torch
import torch.nn as nn

from .train import TrainConfig

CIFAR = dict(dataset="cifar10", image_size=32, z_dim=256, f_dim=64, batch_size=64, lr=1e-4, n_iters=150_000,
             eval_every=1000, inception=True, fid=True)
# Training-set sizes a full-scale run insists on (spec 1.4): a subset would silently change the experiment.
FULL_SIZE = {"cifar10": 50_000, "celeba": 192_599}
CELEBA = dict(dataset="celeba", image_size=64, crop=160, z_dim=256, f_dim=128, batch_size=128, lr=1e-4,
              n_iters=150_000, eval_every=1000, inception=False, arch="resnet_cf", gamma=10.0)

METHODS = {"sim": "simga", "alt": "altga", "con": "conopt", "smo": "smooth"}
JOBS = {0: ("dcgan4", "standard"), 1: ("dcgan4_nobn", "standard"), 2: ("dcgan4_nobn_cf", "standard"),
        3: ("dcgan4_nobn_cf", "JS")}
JOB_LABELS = {0: "DCGAN (BN)", 1: "no BN", 2: "no BN, constant filters", 3: "no BN, constant filters, JS"}


def _table() -> dict:
    t = {
        "C3-con": dict(CIFAR, arch="dcgan3_nobn", method="conopt", gamma=0.1),
        "C3-alt": dict(CIFAR, arch="dcgan3", method="altga", gamma=10.0),
        "DIV-ind": dict(CIFAR, arch="dcgan4_nobn_cf", method="conopt", objective="indicator", gamma=10.0),
    }
    for short, method in METHODS.items():
        for job, (arch, objective) in JOBS.items():
            t[f"CMP-{short}-{job}"] = dict(CIFAR, arch=arch, method=method, objective=objective, gamma=10.0)
            t[f"FC-{short}-{job}"] = dict(CIFAR, arch=f"{arch}_fc", method=method, objective=objective, gamma=10.0)
    for lr in ("2e-4", "5e-4"):
        t[f"LR-alt-3-{lr}"] = dict(CIFAR, arch="dcgan3", method="altga", lr=float(lr), gamma=10.0)
        t[f"LR-alt-4-{lr}"] = dict(CIFAR, arch="dcgan4", method="altga", lr=float(lr), gamma=10.0)
        t[f"LR-con-3-{lr}"] = dict(CIFAR, arch="dcgan3_nobn", method="conopt", lr=float(lr), gamma=0.1)
        t[f"LR-con-4-{lr}"] = dict(CIFAR, arch="dcgan4_nobn", method="conopt", lr=float(lr), gamma=10.0)
    for g in ("1", "10"):
        t[f"GM-3-{g}"] = dict(CIFAR, arch="dcgan3_nobn", method="conopt", lr=2e-4, gamma=float(g))
    for g in ("0.1", "1"):
        t[f"GM-4-{g}"] = dict(CIFAR, arch="dcgan4_nobn", method="conopt", lr=2e-4, gamma=float(g))
    for short in ("sim", "alt", "con"):
        t[f"CEL-{short}"] = dict(CELEBA, method=METHODS[short])
    return t


RUNS = _table()

# Aliases: runs of Figs. 12-14 that the spec reuses from other figures.
ALIASES = {"LR-alt-3-1e-4": "C3-alt", "LR-alt-4-1e-4": "CMP-alt-0", "LR-con-3-1e-4": "C3-con",
           "LR-con-4-1e-4": "CMP-con-1", "GM-3-0.1": "LR-con-3-2e-4", "GM-4-10": "LR-con-4-2e-4",
           "DIV-std": "CMP-con-2", "DIV-JS": "CMP-con-3"}

# The image runs each paper figure needs (Figs. 1-3 are the CPU-sized MoG experiments).
_CMP = tuple(f"CMP-{m}-{j}" for j in JOBS for m in METHODS)
FIGURE_RUNS = {
    4: ("C3-con", "CMP-con-1", "CEL-con"),
    5: ("C3-alt", "C3-con"),
    6: _CMP,
    7: _CMP,
    8: tuple(f"FC-{m}-{j}" for j in JOBS for m in METHODS),
    9: ("DIV-std", "DIV-JS", "DIV-ind"),
    10: ("CEL-sim", "CEL-alt", "CEL-con"),
    11: ("CMP-con-1", "CMP-alt-0", "C3-con", "C3-alt"),
    12: tuple(f"LR-alt-{a}-{lr}" for a in (3, 4) for lr in ("1e-4", "2e-4", "5e-4")),
    13: tuple(f"LR-con-{a}-{lr}" for a in (3, 4) for lr in ("1e-4", "2e-4", "5e-4")),
    14: tuple(f"GM-{a}-{g}" for a, gs in ((3, ("0.1", "1", "10")), (4, ("0.1", "1", "10"))) for g in gs),
}

SCALES = {
    # smoke: every notebook in seconds on a 2-core CPU (CI). Widths and batch shrink; the run table's
    # architecture, objective, method, lr and gamma stay.
    "smoke": dict(f_dim=8, z_dim=16, batch_size=16, n_iters=12, eval_every=4, log_every=1, data_limit=256,
                  n_eval_samples=32, is_splits=2, checkpoint_every=1000),
    # full: the paper's settings (table above)
    "full": dict(),
}


def resolve(run_id: str) -> str:
    """The canonical id of ``run_id`` (aliases of Figs. 9 and 12-14 map to the run they reuse)."""
    rid = ALIASES.get(run_id, run_id)
    if rid not in RUNS:
        raise ValueError(f"unknown run id {run_id!r}; known: {sorted(RUNS)} and aliases {sorted(ALIASES)}")
    return rid


def config(run_id: str, scale: str = "full", seed: int = 0, **overrides) -> TrainConfig:
    """The TrainConfig of a run at ``scale`` ("smoke" or "full"), with optional field overrides
    (e.g. ``n_iters=3000`` for a preview of a full-settings run)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    spec = dict(RUNS[resolve(run_id)], seed=seed)
    spec.update(SCALES[scale])
    if scale == "smoke" and spec["dataset"] == "celeba":
        spec.update(f_dim=4, batch_size=8)
    spec.update(overrides)
    return TrainConfig(**spec).validate()


def smoke_dataset(dataset: str, data_root=None) -> str:
    """``dataset`` if its files are found, else "synthetic" (smoke runs work offline with no data)."""
    from .data import resolve_dataset

    try:
        resolve_dataset(dataset, data_root)
        return dataset
    except (FileNotFoundError, ValueError):
        return "synthetic"


SMOKE_FEATURES = "random-conv-64-v1"   # part of smoke runs' cache key: change it when _RandomFeatures changes


class _RandomFeatures(nn.Module):
    """A small randomly initialised conv net with the Inception feature interface (uint8 images ->
    {"logits_unbiased": [N, 1008], "pool": [N, 2048]}), for smoke runs only."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # 64 "pool" features instead of Inception's 2048: FID's matrix square root stays cheap
        self.conv = nn.Conv2d(3, 32, 5, stride=2)
        self.pool_proj = nn.Linear(32 * 4 * 4, 64)
        self.fc = nn.Linear(64, 1008, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0))

    def forward(self, images: torch.Tensor) -> dict:
        x = images.float() / 127.5 - 1
        h = torch.relu(self.conv(x))
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        pool = torch.relu(self.pool_proj(h))
        return {"logits_unbiased": 30 * self.fc(pool) / pool.norm(dim=1, keepdim=True).clamp_min(1e-6),
                "pool": pool}


def smoke_evaluator(cfg: TrainConfig, images: torch.Tensor):
    """An Evaluator with the paper's arithmetic but a random feature network (smoke scale only)."""
    from .metrics import Evaluator

    return Evaluator(ref_images=images if cfg.fid else None, inception=cfg.inception, fid=cfg.fid,
                     n_samples=cfg.n_eval_samples, splits=cfg.is_splits, batch_size=64, device="cpu",
                     model=_RandomFeatures())


def run(run_id: str, scale: str = "full", device="cpu", seed: int = 0, force: bool = False,
        progress: bool = False, data_root=None, allow_partial_data: bool = False,
        capture_error_mode: str = "global", **overrides) -> dict:
    """Train (or load from the cache) the run ``run_id`` at ``scale``.

    At smoke scale the dataset falls back to synthetic images when none is found, and the Inception
    network to :func:`smoke_evaluator`; the result's ``data_source`` / ``metric_source`` say which.
    At full scale a missing or incomplete dataset (fewer images than the official training set) and
    missing Inception weights raise a clear error.
    """
    from . import train as train_mod
    from .data import load_images

    cfg = config(run_id, scale, seed, **overrides)
    evaluator = None
    if scale == "smoke":
        dataset = smoke_dataset(cfg.dataset, data_root)
        if dataset != cfg.dataset:
            cfg = copy.replace(cfg, dataset=dataset) if hasattr(copy, "replace") else \
                TrainConfig(**{**cfg.key_dict(), "dataset": dataset})
        images = load_images(cfg.dataset, data_root if dataset != "synthetic" else None,
                             image_size=cfg.image_size, crop=cfg.crop, limit=cfg.data_limit)
        if cfg.inception or cfg.fid:
            evaluator = smoke_evaluator(cfg, images)
    else:
        # CIFAR-10 downloads through torchvision when it is missing and a network is there
        images = load_images(cfg.dataset, data_root, image_size=cfg.image_size, crop=cfg.crop,
                             limit=cfg.data_limit, download=cfg.dataset == "cifar10")
        need = FULL_SIZE.get(cfg.dataset)
        if need and cfg.data_limit is None and images.shape[0] < need and not allow_partial_data:
            from .data import resolve_dataset

            kind, path = resolve_dataset(cfg.dataset, data_root)
            raise FileNotFoundError(
                f"full scale needs the whole {cfg.dataset} training set ({need:,} images), but {path} ({kind}) "
                f"holds {images.shape[0]:,}. Put the official files in {data_root or 'data/' + cfg.dataset} "
                f"or point NUMGAN_DATA at them (see data/README.md); pass allow_partial_data=True to run anyway.")
    result = train_mod.run(cfg, device=device, force=force, progress=progress, data_root=data_root,
                           images=images, evaluator=evaluator,
                           key_extra={"metric": SMOKE_FEATURES} if evaluator is not None else None,
                           capture_error_mode=capture_error_mode)
    result["data_source"] = "synthetic" if cfg.dataset == "synthetic" else cfg.dataset
    result["metric_source"] = "random features (smoke)" if evaluator is not None else \
        ("Inception (TF 2015-12-05)" if cfg.inception else "none")
    result["run_id"] = resolve(run_id)
    return result


def default_concurrency(device) -> int:
    """How many CIFAR-10 runs :func:`run_many` trains at once: 4 on a GPU, 1 on the CPU.

    A batch-64 DC-GAN step leaves part of an H100 idle (small kernels); four runs on four CUDA streams
    raise the total throughput by 1.28x (ConOpt) to 1.60x (AltGA) (benchmarks/results/sweep-cuda.md).
    The CPU gains nothing from it."""
    return 4 if torch.device(device).type == "cuda" else 1


def concurrency_for(run_id: str, device) -> int:
    """How many runs :func:`run_many` trains at once when ``run_id`` is among them: 1 for a CelebA run
    (a batch-128 64x64 ResNet step already keeps the GPU busy, 88 ms per ConOpt iteration in
    benchmarks/results/cost-cuda.md, and its double-backprop graph is large: several at once would gain
    little and risk running out of memory, not measured), else :func:`default_concurrency`."""
    return 1 if RUNS[resolve(run_id)]["dataset"] == "celeba" else default_concurrency(device)


def run_many(run_ids, scale: str = "full", device="cpu", seed: int = 0, force: bool = False,
             progress: bool = False, data_root=None, allow_partial_data: bool = False,
             concurrent: Optional[int] = None, **overrides) -> dict:
    """:func:`run` for several runs, ``concurrent`` at a time on one GPU; returns {run_id: result}.

    Each concurrent run trains in its own thread on its own CUDA stream, with its step replayed from
    a CUDA graph (numgan.step), so the GPU interleaves the kernels of several small runs. Every run
    is the same as when trained alone: same configuration, same random streams, its own cache entry
    and checkpoints. ``concurrent`` defaults to :func:`concurrency_for` (CelebA runs one at a time). The
    first error is
    re-raised after the other runs have finished (their results stay cached).
    """
    run_ids = list(run_ids)
    if concurrent is not None and int(concurrent) < 1:
        raise ValueError(f"concurrent must be >= 1, got {concurrent}")
    kwargs = dict(scale=scale, device=device, seed=seed, force=force, progress=progress, data_root=data_root,
                  allow_partial_data=allow_partial_data, **overrides)
    from .step import run_concurrently

    groups = {}   # concurrency -> runs: the CIFAR-10 runs together, the CelebA runs one at a time
    for rid in run_ids:
        n = concurrency_for(rid, device) if concurrent is None else int(concurrent)
        groups.setdefault(n, []).append(rid)
    results = {}
    for n, ids in groups.items():
        jobs = [lambda mode, rid=rid: run(rid, capture_error_mode=mode, **kwargs) for rid in ids]
        results.update(zip(ids, run_concurrently(jobs, device, n)))
    return {rid: results[rid] for rid in run_ids}
