"""The 2-D mixture-of-Gaussians experiment (paper Sec. 5 / Fig. 2-3; spec 1.4, 1.5 "MoG MLPs", Fig. 2).

* Data: 8 Gaussians on the unit circle at angles 2 pi k / 8, std 0.01. A batch of 512 holds
  exactly 64 points per mode: point i belongs to mode i mod 8 (deterministic, as in the notebook).
* Networks: G = z(16) -> 4 x [FC 16, ReLU] -> FC 2 (1122 params); D = x(2) -> 4 x [FC 16, ReLU] -> FC 1
  (881 params); Xavier-uniform weights, zero biases: 2003 parameters in all.
* Objective ``standard`` (non-saturating), TF-1 RMSProp lr 1e-4, SimGA or ConOpt with gamma = 10.

Runs are vectorised over seeds: :class:`EnsembleMLP` holds S independent networks with a leading seed
dimension, and the losses are *sums* over seeds of per-seed batch means. Seeds never interact, so the
gradient of the summed loss with respect to seed s's parameters is seed s's own gradient, and the
consensus term 1/2 sum_s ||u_s||^2 has gradient J_s^T u_s per seed: one game optimiser step updates
all S runs exactly as S separate runs would (checked in tests/test_mog.py).

``train(engine=...)``: "autograd" runs the reference code above (EnsembleMLP + numgan.optim);
"fused" runs numgan.mog_fused, the same computation with hand-derived gradients and Hessian-vector
products in a flat parameter buffer (about 4x faster on a CPU, CUDA-graph capturable; issue 4);
"native" runs the same algebra compiled from C for the CPU (numgan.mog_native; about 2.3x "fused",
built on first use with the system C compiler); "triton" runs the same algebra, in float32, in numgan.mog_triton's on-chip kernels (CUDA only; ~2x "fused"
on an H100); "triton-tf32" the same kernels with TF32 products (~3x "fused", about 1e-2 relative error in
each step's direction against float32's ~4e-5; benchmarks/results/bench_mog-cuda.md): a precision change,
so it is opt-in and its runs are cached apart. "auto" picks "triton" on CUDA where Triton is installed,
"native" on the CPU where a C compiler builds it, "fused" otherwise, whenever they support the
configuration.
"""
import functools
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from . import objectives, runs
from .game import flat_field

N_MODES, RADIUS, STD = 8, 1.0, 0.01
Z_DIM, HIDDEN, DEPTH = 16, 16, 4


def centres(n_modes: int = N_MODES, radius: float = RADIUS) -> np.ndarray:
    """Mode centres (radius cos 2 pi k/n, radius sin 2 pi k/n), shape [n_modes, 2]."""
    a = 2 * np.pi * np.arange(n_modes) / n_modes
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def sample_real(n_seeds: int, batch_size: int = 512, std: float = STD, n_modes: int = N_MODES,
                generator: Optional[torch.Generator] = None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Real batch [n_seeds, batch_size, 2]: sample i from mode i mod n_modes plus N(0, std^2 I) noise."""
    noise = torch.randn(n_seeds, batch_size, 2, generator=generator, device=device, dtype=dtype)
    return noise.mul_(std).add_(_row_centres(batch_size, n_modes, dtype, torch.device(device)))


@functools.lru_cache(maxsize=32)
def _row_centres(batch_size: int, n_modes: int, dtype, device) -> torch.Tensor:
    """The mode centre of every batch row [batch_size, 2] (row i: mode i mod n_modes), built once per
    shape/device: rebuilding it on every draw cost ~0.1 ms, several percent of a fused MoG step."""
    c = torch.as_tensor(centres(n_modes), dtype=dtype, device=device)
    return c[torch.arange(batch_size, device=device) % n_modes]


class EnsembleMLP(nn.Module):
    """S independent ReLU MLPs evaluated together: x [S, B, in] -> [S, B, out].

    Layer l has weight [S, in_l, out_l] and bias [S, 1, out_l]; Xavier-uniform weights
    (limit sqrt(6 / (fan_in + fan_out)), as TF-slim's default) and zero biases.
    """

    def __init__(self, n_models: int, in_dim: int, out_dim: int, hidden: int = HIDDEN, depth: int = DEPTH,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        dims = [in_dim] + [hidden] * depth + [out_dim]
        self.n_models = n_models
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            limit = math.sqrt(6.0 / (a + b))
            w = (torch.rand(n_models, a, b, generator=generator) * 2 - 1) * limit
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n_models, 1, b)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < n - 1:
                x = torch.relu(x)
        return x

    def n_params_per_model(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def flat(self, index: int) -> torch.Tensor:
        """Parameters of model ``index`` as one flat vector (layer order, weight before bias)."""
        return torch.cat([p[index].reshape(-1) for p in self._ordered()])

    def load_flat(self, index: int, flat: torch.Tensor) -> None:
        """Inverse of :meth:`flat`."""
        i = 0
        with torch.no_grad():
            for p in self._ordered():
                n = p[index].numel()
                p[index].copy_(flat[i:i + n].reshape(p[index].shape))
                i += n

    def _ordered(self):
        for w, b in zip(self.weights, self.biases):
            yield w
            yield b


def make_models(n_seeds: int, seed: int = 0, device="cpu") -> tuple[EnsembleMLP, EnsembleMLP]:
    """G (z 16 -> 2) and D (2 -> 1 logit) for ``n_seeds`` runs; run s is initialised from seed ``seed + s``."""
    gens, discs = [], []
    for s in range(n_seeds):
        g = torch.Generator().manual_seed(seed + s)
        gens.append(EnsembleMLP(1, Z_DIM, 2, generator=g))
        discs.append(EnsembleMLP(1, 2, 1, generator=g))
    G, D = EnsembleMLP(n_seeds, Z_DIM, 2), EnsembleMLP(n_seeds, 2, 1)
    with torch.no_grad():
        for net, parts in ((G, gens), (D, discs)):
            for p, *ps in zip(net.parameters(), *[q.parameters() for q in parts]):
                p.copy_(torch.cat(ps, 0))
    return G.to(device), D.to(device)


def game_losses(G: EnsembleMLP, D: EnsembleMLP, x_real: torch.Tensor, z: torch.Tensor,
                objective: str = "standard", need_d: bool = True, need_g: bool = True):
    """(L_D, L_G) summed over seeds, each seed contributing its own batch-mean loss (None if not needed).

    All objectives are batch means, so the mean over [S, B] times S is the sum of per-seed means.
    """
    d_fake = D(G(z))[..., 0]
    n = d_fake.shape[0]
    ld = n * objectives.loss_d(D(x_real)[..., 0], d_fake, objective) if need_d else None
    lg = n * objectives.loss_g(d_fake, objective) if need_g else None
    return ld, lg


def mode_stats(samples: np.ndarray, std: float = STD, n_modes: int = N_MODES, radius: float = RADIUS,
               n_std: float = 3.0, min_frac: float = 0.01) -> dict:
    """The standard MoG metrics for one set of samples [N, 2].

    A sample is *high quality* if it lies within ``n_std`` standard deviations of its nearest mode
    centre (3 sigma = 0.03 for sigma = 0.01). A mode is *covered* if at least ``min_frac`` of all
    samples are high-quality samples of that mode (1% of 2,560 samples = 26 points; a uniform share
    is 12.5%).
    Returns ``modes`` (number covered), ``hq`` (fraction of high-quality samples), ``counts`` (hq
    samples per mode) and ``mean_dist`` (mean distance to the nearest centre).
    """
    c = centres(n_modes, radius)
    dist = np.linalg.norm(samples[:, None, :] - c[None], axis=-1)
    nearest, dmin = dist.argmin(1), dist.min(1)
    hq = dmin < n_std * std
    counts = np.bincount(nearest[hq], minlength=n_modes)
    return {"modes": int((counts >= min_frac * len(samples)).sum()), "hq": float(hq.mean()),
            "counts": counts, "mean_dist": float(dmin.mean())}


def field_for_seed(G: EnsembleMLP, D: EnsembleMLP, index: int, x_real: torch.Tensor, z: torch.Tensor,
                   objective: str = "standard"):
    """The game field v of run ``index`` on a fixed minibatch, as a function of its flat parameters.

    ``x_real`` [B, 2], ``z`` [B, 16]. The flat order is G's layers then D's (weight, bias per layer), the
    same as ``torch.cat([G.flat(index), D.flat(index)])``. Composes with numgan.spectrum.
    """
    def order(net):
        names = {}
        for j in range(len(net.weights)):
            names[f"w.{j}"] = net.weights[j][index].shape
            names[f"b.{j}"] = net.biases[j][index].shape
        return names

    def mlp(params: dict, x: torch.Tensor) -> torch.Tensor:
        n = len(params) // 2
        for j in range(n):
            x = x @ params[f"w.{j}"] + params[f"b.{j}"]
            if j < n - 1:
                x = torch.relu(x)
        return x

    def loss_g(theta, phi):
        return objectives.loss_g(mlp(phi, mlp(theta, z))[:, 0], objective)

    def loss_d(theta, phi):
        return objectives.loss_d(mlp(phi, x_real)[:, 0], mlp(phi, mlp(theta, z))[:, 0], objective)

    return flat_field(loss_g, loss_d, order(G), order(D))


ENGINES = ("auto", "autograd", "fused", "native", "triton", "triton-tf32")
_FUSED_ENGINES = ("fused", "native", "triton", "triton-tf32")  # numgan.mog_fused.FusedMoG with one of its backends
_BACKEND = {"fused": "torch", "native": "native", "triton": "triton", "triton-tf32": "triton"}


def resolve_engine(engine: str, method: str, objective: str = "standard", device=None) -> str:
    """The engine :func:`train` uses: "autograd", "fused", "native", "triton" or "triton-tf32" (module
    docstring).

    "auto" gives, for the configurations numgan.mog_fused supports (methods simga / conopt, objective
    standard, TF-1 RMSProp), "triton" when ``device`` is CUDA and Triton is importable, "native" on the
    CPU when numgan.mog_native builds, else "fused"; and "autograd" otherwise. Asking for a fused engine
    with anything else raises ValueError; the Triton engines also need a CUDA device and "native" the CPU
    and a C compiler (:func:`train` says so).
    """
    from . import mog_fused

    if engine not in ENGINES:
        raise ValueError(f"unknown MoG engine {engine!r}; choose one of {ENGINES}")
    ok = method in mog_fused.SUPPORTED_METHODS and objective in mog_fused.SUPPORTED_OBJECTIVES
    if engine in _FUSED_ENGINES and not ok:
        raise ValueError(f"the {engine} MoG engine supports methods {mog_fused.SUPPORTED_METHODS} with objective "
                         f"{mog_fused.SUPPORTED_OBJECTIVES} only, got method={method!r}, objective={objective!r}; "
                         "use engine='autograd' (or 'auto') for other settings")
    if engine == "auto":
        if not ok:
            return "autograd"
        from . import mog_triton
        kind = "cpu" if device is None else torch.device(device).type
        if kind == "cuda":
            return "triton" if mog_triton.available() else "fused"
        if kind == "cpu":
            from . import mog_native
            return "native" if mog_native.available() else "fused"
        return "fused"  # other devices (mps, xpu, ...): the batched-product engine
    return engine


def jacobian_for_seed(params, x_real, z, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Exact game Jacobian v'(x) [2003, 2003] of one run at flat parameters ``params`` [2003] (G then D, as
    ``train``'s ``params`` snapshots) on the fixed minibatch ``x_real`` [B, 2], ``z`` [B, 16]; objective
    ``standard``. The same matrix as ``numgan.spectrum.jacobian(field_for_seed(G, D, s, x_real, z), params)``,
    computed from hand-written Hessian-vector products several times faster: by numgan.mog_native on the CPU
    (where it builds; rows over torch's threads), else by numgan.mog_fused (``chunk_size`` rows per pass).
    Numpy or torch input; computed in the dtype of ``params`` (use float64 for eigenvalues) and on its device.
    """
    from . import mog_fused, mog_native

    x = torch.as_tensor(params)
    x_real, z = torch.as_tensor(x_real, device=x.device), torch.as_tensor(z, device=x.device)
    if x.device.type == "cpu" and x.dtype in mog_native.DTYPES and chunk_size is None and mog_native.available(x.dtype):
        return mog_native.jacobian(x, x_real, z)
    return mog_fused.jacobian(x, x_real, z, chunk_size=chunk_size)


def train(method: str = "conopt", n_seeds: int = 1, n_iters: int = 20_000, seed: int = 0, lr: float = 1e-4,
          gamma: float = 10.0, batch_size: int = 512, objective: str = "standard", snapshot_every: int = 500,
          n_eval_batches: int = 5, log_every: int = 100, device="cpu", run_dir=None,
          checkpoint_every: int = 5_000, progress: bool = False, engine: str = "auto") -> dict:
    """Train ``n_seeds`` independent MoG GANs with one game optimiser (paper Fig. 2 setting by default).

    Snapshots after the update of iterations 0, snapshot_every, 2 snapshot_every, ... and after the
    last update (labelled ``n_iters``): the generator's samples on ``n_eval_batches`` fixed latent
    batches (drawn once before training, 5 x 512 = 2,560 points, as the authors' notebook) and every
    run's flat parameters (for the Jacobians of Fig. 3).

    With ``run_dir`` the state is checkpointed atomically every ``checkpoint_every`` iterations and a
    rerun resumes from it. A run whose losses become non-finite is recorded as diverged at that
    iteration (``diverged_at``, -1 if never); the other seeds are unaffected.

    Returns a flat dict of numpy arrays: ``iters`` [K], ``samples`` [K, S, N, 2], ``params`` [K, S, 2003],
    ``modes`` / ``hq`` [K, S], ``log_iters`` [L], ``loss_d`` / ``loss_g`` [L, S], ``diverged_at`` [S],
    ``real`` [N, 2] (target samples drawn the same way), and ``seconds`` (training wall-clock).

    ``engine`` ("auto", "autograd", "fused", "native", "triton" or "triton-tf32", see :func:`resolve_engine`) only
    changes how the step is computed: all engines draw the same minibatches in the same order and compute
    the same update (equal up to float rounding; "triton-tf32" with TF32 products), and their checkpoints
    are interchangeable.
    """
    import time
    from pathlib import Path

    from .optim import make_game_optimizer

    device = torch.device(device)
    engine = resolve_engine(engine, method, objective, device)
    if engine.startswith("triton") and device.type != "cuda":
        raise ValueError(f"engine={engine!r} runs on CUDA, got device={device}; use engine='fused' (or 'auto')")
    if engine == "native" and device.type != "cpu":
        raise ValueError(f"engine='native' runs on the CPU, got device={device}; use engine='triton' (or 'auto')")
    G, D = make_models(n_seeds, seed, device)
    optimizers = []

    def game_optimizer():
        # made when first needed: every step with the autograd engine; with a fused one only to resume or
        # write a checkpoint (its state is the checkpoint format). Constructing a torch optimizer imports
        # torch._dynamo the first time in a process, ~2 s on the 2-core CPU.
        if not optimizers:
            optimizers.append(make_game_optimizer(method, G.parameters(), D.parameters(), lr=lr, gamma=gamma))
        return optimizers[0]

    gen = torch.Generator(device=device).manual_seed(10_000 + seed)
    eval_gen = torch.Generator(device=device).manual_seed(20_000 + seed)
    z_eval = torch.randn(n_eval_batches * batch_size, Z_DIM, generator=eval_gen, device=device)
    real = sample_real(n_eval_batches, batch_size, generator=eval_gen, device=device).reshape(-1, 2)
    hist = {"iters": [], "samples": [], "params": [], "log_iters": [], "loss_d": [], "loss_g": []}
    diverged = np.full(n_seeds, -1)
    start, seconds = 0, 0.0
    ckpt = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        G.load_state_dict(state["G"]), D.load_state_dict(state["D"]), game_optimizer().load_state_dict(state["opt"])
        gen.set_state(state["rng"].cpu() if device.type == "cpu" else state["rng"])
        if "eval_rng" in state:  # the loss-logging batches come from eval_gen: resume its stream too
            eval_gen.set_state(state["eval_rng"].cpu() if device.type == "cpu" else state["eval_rng"])
        hist, diverged, start, seconds = state["hist"], state["diverged"], state["iter"], state["seconds"]

    fused = None
    if engine in _FUSED_ENGINES:
        from . import mog_fused
        options = None
        if engine == "triton-tf32":
            from .mog_triton import TF32_OPTIONS as options
        fused = mog_fused.FusedMoG(mog_fused.pack(G, D), method, gamma=gamma, lr=lr,
                                   backend=_BACKEND[engine], triton_options=options)
        if optimizers:   # resumed; a fresh optimiser has no state and the engine starts from the same
            mog_fused.load_rmsprop_state(fused, optimizers[0], G, D)

        def fused_step():
            # the draws of the autograd closure, in its order: sample_real, then z
            x_real = sample_real(n_seeds, batch_size, generator=gen, device=device)
            z = torch.randn(n_seeds, batch_size, Z_DIM, generator=gen, device=device)
            fused.step(x_real, z, losses=False)

        def sync_modules():  # G, D <- the fused engine's flat parameters
            mog_fused.unpack_into(fused.params, G, D)

    def closure(need_d=True, need_g=True):
        x_real = sample_real(n_seeds, batch_size, generator=gen, device=device)
        z = torch.randn(n_seeds, batch_size, Z_DIM, generator=gen, device=device)
        ld, lg = game_losses(G, D, x_real, z, objective, need_d, need_g)
        return ld, lg

    def snapshot(it):
        with torch.no_grad():
            x = G(z_eval.expand(n_seeds, -1, -1))
        hist["iters"].append(it)
        hist["samples"].append(x.cpu().numpy().astype(np.float32))
        hist["params"].append(torch.stack([torch.cat([G.flat(s), D.flat(s)]) for s in range(n_seeds)])
                              .detach().cpu().numpy())

    def save_checkpoint(it):
        if fused is not None:   # G, D are in sync (the loop syncs before every checkpoint); the RMSProp state
            mog_fused.store_rmsprop_state(fused, game_optimizer(), G, D, it)
        state = {"G": G.state_dict(), "D": D.state_dict(), "opt": game_optimizer().state_dict(),
                 "rng": gen.get_state(), "eval_rng": eval_gen.get_state(), "hist": hist, "diverged": diverged,
                 "iter": it, "seconds": seconds}
        runs.atomic_torch_save(state, ckpt)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_iters, initial=start, desc=f"MoG {method} x{n_seeds}", mininterval=1.0)
    for it in range(start, n_iters):
        t0 = time.perf_counter()
        out = game_optimizer().step(closure) if fused is None else fused_step()
        seconds += time.perf_counter() - t0
        if fused is not None and (it % log_every == 0 or it % snapshot_every == 0 or (
                ckpt is not None and (it + 1) % checkpoint_every == 0)):
            sync_modules()
        if it % log_every == 0:
            # losses of this iteration's minibatch, per seed (the sums divided back are per-seed means)
            with torch.no_grad():
                x_real = sample_real(n_seeds, batch_size, generator=eval_gen, device=device)
                z = torch.randn(n_seeds, batch_size, Z_DIM, generator=eval_gen, device=device)
                d_fake = D(G(z))[..., 0]
                d_real = D(x_real)[..., 0]
                ld = torch.stack([objectives.loss_d(d_real[s], d_fake[s], objective) for s in range(n_seeds)])
                lg = torch.stack([objectives.loss_g(d_fake[s], objective) for s in range(n_seeds)])
            hist["log_iters"].append(it)
            hist["loss_d"].append(ld.cpu().numpy())
            hist["loss_g"].append(lg.cpu().numpy())
            bad = ~(np.isfinite(hist["loss_d"][-1]) & np.isfinite(hist["loss_g"][-1]))
            diverged[(diverged < 0) & bad] = it
            if bar is not None:
                bar.set_postfix(loss_d=f"{np.nanmean(hist['loss_d'][-1]):.3f}",
                                loss_g=f"{np.nanmean(hist['loss_g'][-1]):.3f}", refresh=False)
        if it % snapshot_every == 0:
            snapshot(it)
        if bar is not None:
            bar.update(1)
        if ckpt is not None and (it + 1) % checkpoint_every == 0 and it + 1 < n_iters:
            save_checkpoint(it + 1)
        del out
    if bar is not None:
        bar.close()
    if fused is not None:
        sync_modules()
    if not hist["iters"] or hist["iters"][-1] != n_iters:
        snapshot(n_iters)
    samples = np.stack(hist["samples"])
    stats = [[mode_stats(samples[k, s]) for s in range(n_seeds)] for k in range(len(samples))]
    return {
        "iters": np.array(hist["iters"]), "samples": samples, "params": np.stack(hist["params"]),
        "modes": np.array([[st["modes"] for st in row] for row in stats]),
        "hq": np.array([[st["hq"] for st in row] for row in stats]),
        "log_iters": np.array(hist["log_iters"]), "loss_d": np.stack(hist["loss_d"]),
        "loss_g": np.stack(hist["loss_g"]), "diverged_at": diverged, "real": real.cpu().numpy(),
        "seconds": seconds,
    }


def run(method: str, n_seeds: int = 1, n_iters: int = 20_000, seed: int = 0, lr: float = 1e-4,
        gamma: float = 10.0, batch_size: int = 512, objective: str = "standard", snapshot_every: int = 500,
        device="cpu", force: bool = False, progress: bool = False, engine: str = "auto") -> dict:
    """:func:`train` through the run cache (group ``mog``), checkpointing into the run directory.

    Figures 2 and 3 call this with the same configuration and so share one run (spec table 4a, M-con).
    Neither the device nor the float32 ``engine`` ("autograd", "fused", "native", "triton") is part of the cache key:
    they compute the same function (same draws, same updates up to float rounding) and resume each other's
    checkpoints. "triton-tf32" computes with TF32 products, so its runs are cached apart (``precision`` key).
    """
    resolved = resolve_engine(engine, method, objective, device)  # a bad engine fails before the cache
    cfg = dict(method=method, n_seeds=n_seeds, n_iters=n_iters, seed=seed, lr=lr, gamma=gamma,
               batch_size=batch_size, objective=objective, snapshot_every=snapshot_every)
    key = dict(cfg, precision="tf32") if resolved == "triton-tf32" else cfg
    return runs.cached("mog", method, key, lambda d: train(**cfg, device=device, run_dir=d, progress=progress,
                                                           engine=engine), force=force)
