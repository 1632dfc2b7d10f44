"""One training iteration of an image GAN, eager or replayed from a CUDA graph (issue 4).

A game optimiser's step (numgan.optim) is a fixed sequence of GPU kernels: forward passes, first and,
for ConOpt, second derivatives, and the RMSProp update. Launched one by one from Python it is
dispatch bound (shared/notes/perf-leads.md: 29 ms of wall time for 12 ms of GPU work), so
:class:`GanStep` records the whole step once as a CUDA graph and replays it every iteration.

The graph computes the same function as the eager step. Its inputs are static buffers: before each
replay the step draws exactly what the eager closure would have drawn, in the same order and from the
same generators (a latent batch from ``draw_z`` for every closure call, a real batch from ``draw_real``
for every call that needs L_D), and copies them in. Parameters, optimiser state and batch-norm
statistics are updated in place by the replay, so checkpoints, evaluation and resuming work
unchanged. The first ``warmup`` iterations run eagerly on a side stream (they are real training
iterations; they also create the optimiser state and let cuBLAS/cuDNN initialise), the next one is
captured and then replayed.

On the CPU, or with ``graph=False``, the step is plain eager. ``static=True`` runs the graph path's
data flow (static input buffers, recorded call pattern) eagerly, without a graph: this is how the CPU
tests check the buffer logic against the eager closure.
"""
import threading
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import objectives
from .models import TFBatchNorm
from .optim import GameOptimizer

# Runs trained in parallel threads (run_concurrently) share PyTorch's autograd engine thread: a capture
# must not overlap another run's eager autograd work (CUDA: "capturing stream has unjoined work"), so
# the eager warm-up steps and the captures of graphed steps take this lock. Replays do not.
_CAPTURE_LOCK = threading.RLock()
_BATCH_NORMS = (TFBatchNorm, torch.nn.modules.batchnorm._BatchNorm)
_PATTERN_CHANGED = ("the game optimiser's closure calls changed between steps; "
                    "CUDA-graph replay needs the same calls every step (use graph=False)")


class GanStep:
    """``step() -> {"loss_d", "loss_g"}``: one iteration of ``opt`` on fresh minibatches.

    Args:
        G, D: the players (modules); ``D(x)`` returns logits [B].
        opt: a numgan.optim game optimiser over G's and D's parameters.
        objective: the GAN objective (numgan.objectives).
        draw_z: ``() -> z [B, z_dim]``, a fresh latent batch on the device.
        draw_real: ``() -> x [B, C, H, W]``, a fresh real batch on the device.
        graph: capture and replay a CUDA graph (CUDA only; ignored on the CPU).
        warmup: eager iterations before the capture (at least 1: the optimiser state must exist).
        static: run the graph path's data flow without a graph (testing).
        capture_error_mode: passed to ``torch.cuda.graph``; "thread_local" when other threads use the
            GPU at the same time (:func:`run_concurrently`).
        joint_d: evaluate D once on the real and fake batch stacked, instead of twice. The same function
            when D treats examples independently, with half the D kernels in every derivative; with
            batch norm the two calls are kept apart (spec 1.2: each batch has its own statistics). None
            (default): joint exactly when D has no batch-norm layer, the only layer of numgan's models
            that couples examples; pass False for a D of your own that couples them otherwise (minibatch
            statistics, per-call random state).
    The returned losses are fresh tensors (safe to keep); they stay on the device, so reading them is
    the caller's choice of when to synchronise.
    """

    def __init__(self, G, D, opt: GameOptimizer, objective: str, draw_z: Callable[[], Tensor],
                 draw_real: Callable[[], Tensor], graph: bool = True, warmup: int = 3, static: bool = False,
                 capture_error_mode: str = "global", joint_d: Optional[bool] = None):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.G, self.D, self.opt, self.objective = G, D, opt, objective
        self.draw_z, self.draw_real = draw_z, draw_real
        device = next(G.parameters()).device
        self.graph = bool(graph) and device.type == "cuda"
        self.static = bool(static) or self.graph
        self.warmup = warmup
        self.capture_error_mode = capture_error_mode
        has_bn = any(isinstance(m, _BATCH_NORMS) for m in D.modules())
        if joint_d and has_bn:
            raise ValueError("joint_d=True needs a discriminator without batch norm (spec 1.2: the real and the "
                             "fake batch are normalised with their own statistics)")
        self.joint_d = (not has_bn) if joint_d is None else bool(joint_d)
        self.n_steps = 0
        self._pattern: Optional[list] = None     # [(need_d, need_g)] per closure call of one step
        self._buffers: list = []                 # static (z, x_real or None) per call
        self._cuda_graph = None
        self._side = None                        # CUDA: the side stream of warm-up and capture (_work_stream)
        self._out = None
        self._step_counts: dict = {}

    # -- the losses on given inputs (shared by every path) ------------------------------------------
    def losses(self, z: Tensor, x_real: Optional[Tensor], need_d: bool = True, need_g: bool = True):
        """(L_D, L_G) on one latent and one real batch. With batch norm in D, D is called separately on
        the fake and the real batch (spec 1.2); without, once on both stacked (``joint_d``)."""
        x_fake = self.G(z)
        if need_d and self.joint_d:
            logits = self.D(torch.cat([x_real, x_fake])).reshape(-1)
            ld, lg = objectives.joint_losses(logits, x_real.shape[0], self.objective)
            return ld, (lg if need_g else None)
        d_fake = self.D(x_fake)
        ld = objectives.loss_d(self.D(x_real), d_fake, self.objective) if need_d else None
        lg = objectives.loss_g(d_fake, self.objective) if need_g else None
        return ld, lg

    def _eager_closure(self, pattern: Optional[list] = None):
        def closure(need_d=True, need_g=True):
            z = self.draw_z()
            x = self.draw_real() if need_d else None
            if pattern is not None:
                pattern.append((need_d, need_g, z, x))
            return self.losses(z, x, need_d, need_g)
        return closure

    def _static_closure(self):
        calls = iter(range(len(self._buffers)))

        def closure(need_d=True, need_g=True):
            i = next(calls, None)
            if i is None or self._pattern[i] != (need_d, need_g):  # pragma: no cover - optimiser misuse
                raise RuntimeError(_PATTERN_CHANGED)
            z, x = self._buffers[i]
            return self.losses(z, x, need_d, need_g)
        return closure

    def _fill(self) -> None:
        """Draw this iteration's inputs, in the eager order, into the static buffers."""
        for (need_d, _), (z, x) in zip(self._pattern, self._buffers):
            z.copy_(self.draw_z())
            if need_d:
                x.copy_(self.draw_real())

    # -- optimiser step counters (TF1RMSprop keeps one per parameter; a replay does not run Python) --
    def _counters(self) -> dict:
        """{(inner optimiser, parameter id): step count} of every parameter state that has one."""
        return {(key, id(p)): st["step"] for key, o in self.opt.optimizers.items()
                for p, st in o.state.items() if "step" in st}

    def _shift_counters(self, delta: dict) -> None:
        """Add ``delta[(inner optimiser, parameter id)]`` to those step counts."""
        for key, o in self.opt.optimizers.items():
            for p, st in o.state.items():
                inc = delta.get((key, id(p)), 0)
                if inc:
                    st["step"] = st["step"] + inc

    # -- one iteration ---------------------------------------------------------------------------
    def __call__(self) -> dict:
        if not self.static:
            out = self.opt.step(self._eager_closure())
        elif self.n_steps < self.warmup or self._pattern is None:
            if self.graph:
                with _CAPTURE_LOCK:
                    out = self._warmup_step()
            else:
                out = self._warmup_step()
        else:
            out = self._replay_step()
        self.n_steps += 1
        return out

    step = __call__

    def _work_stream(self):
        """The stream of this step's warm-up and capture: the caller's, unless that is the default stream
        (which cannot be captured), then one side stream of this step's own.

        Not torch.cuda.graph's default, which is one stream shared by every capture in the process: cuBLAS
        workspaces are keyed by (handle, stream), and the backward GEMMs of every run share the autograd
        engine thread's handle, so graphs captured on one stream would share their cuBLAS workspaces and
        race when replayed at the same time (:func:`run_concurrently`). On an H100 that hung the GPU."""
        cur = torch.cuda.current_stream()
        if cur != torch.cuda.default_stream(cur.device):
            return cur
        if self._side is None:
            self._side = torch.cuda.Stream(cur.device)
        return self._side

    def _warmup_step(self) -> dict:
        calls, before = [], self._counters()
        if self.graph:
            side, cur = self._work_stream(), torch.cuda.current_stream()
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                out = self.opt.step(self._eager_closure(calls))
            cur.wait_stream(side)
        else:
            out = self.opt.step(self._eager_closure(calls))
        pattern = [(need_d, need_g) for need_d, need_g, _, _ in calls]
        if self._pattern is not None and pattern != self._pattern:
            raise RuntimeError(_PATTERN_CHANGED)
        if self._pattern is None:
            self._pattern = pattern
            self._buffers = [(torch.empty_like(z), None if x is None else torch.empty_like(x))
                             for _, _, z, x in calls]
        after = self._counters()
        self._step_counts = {k: v - before.get(k, 0) for k, v in after.items()}
        return out

    def _replay_step(self) -> dict:
        if self.graph and self._cuda_graph is None:
            self._capture()
        self._fill()
        if self.graph:
            self._cuda_graph.replay()
            self._shift_counters(self._step_counts)
            return {k: v.clone() for k, v in self._out.items()}
        return self.opt.step(self._static_closure())

    def _capture(self) -> None:
        counters = self._counters()
        with _CAPTURE_LOCK:
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=self._work_stream(), capture_error_mode=self.capture_error_mode):
                self._out = self.opt.step(self._static_closure())
            torch.cuda.synchronize()
        # the capture ran the step's Python without executing it: undo its counter increments
        self._shift_counters({k: counters[k] - v for k, v in self._counters().items() if k in counters})
        self._cuda_graph = g


def run_concurrently(jobs: Sequence[Callable[[str], object]], device, concurrent: int) -> list:
    """Run ``jobs`` (each ``job(capture_error_mode) -> result``) ``concurrent`` at a time on one GPU.

    Each job runs in a worker thread on that worker's CUDA stream (``concurrent`` distinct streams, made
    here) and is told to capture its CUDA graph with ``capture_error_mode="thread_local"`` (captures are
    serialised by a lock; the other threads keep replaying meanwhile). A job captures on its worker's
    stream (GanStep._work_stream), so that no two runs that replay at the same time share a stream, and
    with it cuBLAS workspaces. On the CPU, or with ``concurrent=1``, the jobs run one after another in this
    thread with ``"global"``. Results come back in order; the first error is re-raised after every
    job has finished, so the others' results (and checkpoints) are kept.
    """
    if concurrent < 1:
        raise ValueError(f"concurrent must be >= 1, got {concurrent}")
    device = torch.device(device)
    if concurrent == 1 or len(jobs) <= 1 or device.type != "cuda":
        return [job("global") for job in jobs]

    import queue
    from concurrent.futures import ThreadPoolExecutor

    n = min(concurrent, len(jobs))
    # torch hands out streams round-robin from a pool of 32: made together, n <= 32 of them are distinct
    streams = [torch.cuda.Stream(device) for _ in range(n)]
    if len({s.cuda_stream for s in streams}) != n:
        raise ValueError(f"concurrent={concurrent}: torch's CUDA stream pool did not give {n} distinct streams "
                         "(it has 32, handed out in turn to every thread); choose at most 32, and start no "
                         "streams in other threads meanwhile")
    free = queue.SimpleQueue()
    for s in streams:
        free.put(s)

    def one(job):
        stream = free.get()   # at most n jobs run at once, so one is always free
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                out = job("thread_local")
                stream.synchronize()
        finally:
            free.put(stream)
        return out

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]
