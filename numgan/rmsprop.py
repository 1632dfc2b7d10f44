"""The TensorFlow-1 RMSProp the paper used (spec 1.3, D-16).

``tf.train.RMSPropOptimizer(lr)`` with its TF-1 defaults differs from ``torch.optim.RMSprop``:

==========================  ===================  ==========================
item                        TF-1 (this class)    torch.optim.RMSprop default
==========================  ===================  ==========================
decay rho                   0.9                  alpha = 0.99
epsilon                     1e-10, inside sqrt   1e-8, outside sqrt
initial mean square         1.0                  0.0
momentum / centered         0 / False            0 / False
==========================  ===================  ==========================

Per element:  ms <- rho ms + (1 - rho) g^2;   p <- p - lr g / sqrt(ms + eps).
Because ms starts at 1, the first ~50-100 steps are damped, SGD-like steps (0.9^50 ~ 0.005).

**One pass over the parameters** (issue 4). torch's multi-tensor kernels make five passes over every
parameter tensor (ms *= rho; ms += (1 - rho) g^2; d = ms + eps; d = sqrt(d); p -= lr g / d), and ConOpt
a sixth before them to form its direction u + gamma J^T u. On CUDA (``fused``, where Triton is available)
one Triton kernel does it all for up to eight parameter tensors at a time (their addresses are kernel
arguments, so a CUDA graph captures them as they are): it reads p, ms and the gradient (and the direction's
second term, ``apply_gradients(..., extra, alpha)``) once and writes p and ms once. The image GANs' step
is memory bound here: for dcgan4 (9.1 million parameters) 17 reads or writes per parameter become 6.
The arithmetic is the same, float32 with IEEE square root and division; the test compares it with the
multi-tensor path.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._triton import INTERPRET, device_guard, tl, triton

_BLOCK = 1024   # elements per program of the fused kernel
_SLOTS = 8      # parameter tensors per launch (the kernel's pointer arguments: captured with a CUDA graph as they are)


if triton is not None:
    @triton.jit
    def _tf1_rmsprop_block(p, g, e, ms, n, block, lr, decay, one_minus_decay, eps, alpha,
                           HAS_E: tl.constexpr, BLOCK: tl.constexpr):
        # ms <- decay ms + (1 - decay) d^2;  p <- p - lr d / sqrt(ms + eps),  d = g (+ alpha e)
        offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        d = tl.load(g + offs, mask=mask, other=0.0)
        if HAS_E:
            d = d + alpha * tl.load(e + offs, mask=mask, other=0.0)
        m = tl.load(ms + offs, mask=mask, other=1.0) * decay + one_minus_decay * (d * d)
        tl.store(ms + offs, m, mask=mask)
        x = tl.load(p + offs, mask=mask, other=0.0)
        tl.store(p + offs, x - lr * tl.div_rn(d, tl.sqrt_rn(m + eps)), mask=mask)

    @triton.jit
    def _tf1_rmsprop_kernel(p0, g0, e0, m0, n0, p1, g1, e1, m1, n1, p2, g2, e2, m2, n2, p3, g3, e3, m3, n3,
                            p4, g4, e4, m4, n4, p5, g5, e5, m5, n5, p6, g6, e6, m6, n6, p7, g7, e7, m7, n7,
                            s1, s2, s3, s4, s5, s6, s7, lr, decay, one_minus_decay, eps, alpha,
                            HAS_E: tl.constexpr, BLOCK: tl.constexpr):
        # up to _SLOTS tensors: program ids [s_k, s_k+1) update tensor k (s_0 = 0; unused slots start at the end)
        pid = tl.program_id(0)
        h = (lr, decay, one_minus_decay, eps, alpha)
        if pid < s1:
            _tf1_rmsprop_block(p0, g0, e0, m0, n0, pid, *h, HAS_E, BLOCK)
        elif pid < s2:
            _tf1_rmsprop_block(p1, g1, e1, m1, n1, pid - s1, *h, HAS_E, BLOCK)
        elif pid < s3:
            _tf1_rmsprop_block(p2, g2, e2, m2, n2, pid - s2, *h, HAS_E, BLOCK)
        elif pid < s4:
            _tf1_rmsprop_block(p3, g3, e3, m3, n3, pid - s3, *h, HAS_E, BLOCK)
        elif pid < s5:
            _tf1_rmsprop_block(p4, g4, e4, m4, n4, pid - s4, *h, HAS_E, BLOCK)
        elif pid < s6:
            _tf1_rmsprop_block(p5, g5, e5, m5, n5, pid - s5, *h, HAS_E, BLOCK)
        elif pid < s7:
            _tf1_rmsprop_block(p6, g6, e6, m6, n6, pid - s6, *h, HAS_E, BLOCK)
        else:
            _tf1_rmsprop_block(p7, g7, e7, m7, n7, pid - s7, *h, HAS_E, BLOCK)


def _launch(items: list, lr: float, decay: float, eps: float, alpha: float, has_e: bool) -> None:
    """One kernel launch for up to _SLOTS (p, g, e, ms) tensors (of one device, laid out alike)."""
    args, starts, total = [], [], 0
    for p, g, e, m in items:
        starts.append(total)
        total += triton.cdiv(p.numel(), _BLOCK)
        args += [p, g, g if e is None else e, m, p.numel()]
    for _ in range(_SLOTS - len(items)):     # unused slots: no programs
        p, g, e, m = items[0]
        starts.append(total)
        args += [p, g, g, m, 0]
    with device_guard(items[0][0]):
        _tf1_rmsprop_kernel[(total,)](*args, *starts[1:], lr, decay, 1.0 - decay, eps, alpha,
                                      HAS_E=has_e, BLOCK=_BLOCK)


def fused_available() -> bool:
    """Whether the one-kernel update can run: Triton importable (it ships with torch's Linux CUDA wheels)."""
    return triton is not None


def _dense(t: Tensor) -> bool:
    """t's elements fill t.numel() consecutive memory cells (contiguous, channels-last, any permutation)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def fusable(p: Tensor, square_avg: Tensor) -> bool:
    """Whether the one-kernel update can take this parameter on its device: dense float32 (fp32 arithmetic,
    one flat index for p, its gradient and its mean square), mean square laid out alike."""
    return p.dtype == torch.float32 and _dense(p) and same_layout(square_avg, p)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Equal shapes with equal strides wherever a dimension has more than one element."""
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def laid_out_as(t: Tensor, p: Tensor) -> Tensor:
    """t (detached) with p's memory layout, dtype and device: itself when it has them, else a copy (torch's
    multi-tensor kernels take their fast path, and the fused kernel can run, only on tensors laid out alike)."""
    t = t.detach()
    return t if t.dtype == p.dtype and t.device == p.device and same_layout(t, p) else torch.empty_like(p).copy_(t)


def combine(directions: Sequence[Tensor], extra: Sequence[Optional[Tensor]], alpha: float) -> list[Tensor]:
    """``d + alpha e`` for every pair (``d`` where ``e`` is None), detached; one multi-tensor add on CUDA."""
    out = [d.detach() for d in directions]
    idx = [i for i, e in enumerate(extra) if e is not None]
    if idx:
        for i, s in zip(idx, torch._foreach_add([out[i] for i in idx], [extra[i].detach() for i in idx],
                                                alpha=alpha)):
            out[i] = s
    return out


class TF1RMSprop(torch.optim.Optimizer):
    """RMSProp with TensorFlow-1 semantics (accumulator starts at 1, epsilon inside the root).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the paper: 1e-4 everywhere).
        decay: discount of the mean-square accumulator (TF ``decay``, default 0.9).
        eps: added to the accumulator inside the square root (default 1e-10).
        momentum: TF momentum (0 in the paper); ``mom <- momentum mom + lr g / sqrt(ms + eps)``.
        initial_accumulator: starting value of the mean square (1.0 in TF-1).
        fused: one Triton kernel per eight parameter tensors (module docstring). None (default): for float32 CUDA
            tensors without momentum when Triton is available, torch's multi-tensor kernels otherwise;
            True: required (an error where it cannot run); False: never.
    Besides ``step()`` (gradients in ``p.grad``), :meth:`apply_gradients` takes them as arguments.
    """

    def __init__(self, params, lr: float = 1e-4, decay: float = 0.9, eps: float = 1e-10,
                 momentum: float = 0.0, initial_accumulator: float = 1.0, fused: Optional[bool] = None):
        if lr < 0 or not 0.0 <= decay < 1.0 or eps < 0 or momentum < 0:
            raise ValueError(f"invalid TF1RMSprop settings: lr={lr}, decay={decay}, eps={eps}, momentum={momentum}")
        if fused and (momentum > 0 or not fused_available()):
            raise ValueError("TF1RMSprop(fused=True) needs Triton (it ships with torch's Linux CUDA wheels) and "
                             "momentum=0; use fused=None to fall back to torch's kernels")
        defaults = dict(lr=lr, decay=decay, eps=eps, momentum=momentum,
                        initial_accumulator=initial_accumulator)
        super().__init__(params, defaults)
        self.fused = fused      # not a group setting: checkpoints stay what they were

    fused: Optional[bool] = None   # for optimisers pickled before the setting existed

    def load_state_dict(self, state_dict) -> None:
        """torch's loading, then each mean square laid out as its parameter (a checkpoint from a run whose
        weights had another memory layout, e.g. numgan.models.set_conv_impl's channels-last GEMM layers,
        would otherwise keep the foreach kernels off their fast path)."""
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            for k in ("square_avg", "momentum_buffer"):
                t = st.get(k)
                if isinstance(t, torch.Tensor) and t.shape == p.shape and not same_layout(t, p):
                    st[k] = torch.empty_like(p).copy_(t)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("TF1RMSprop does not support sparse gradients")
            if params:
                self._update(group, params, [p.grad for p in params], None, 1.0)
        return loss

    @torch.no_grad()
    def apply_gradients(self, params: Sequence[Tensor], grads: Sequence[Tensor],
                        extra: Optional[Sequence[Optional[Tensor]]] = None, alpha: float = 1.0) -> None:
        """One update of ``params`` with the gradients ``grads[i] + alpha * extra[i]`` (an ``extra`` entry None
        adds nothing), as TF's ``apply_gradients``; ``p.grad`` is neither read nor written. With ``fused`` the
        sum is formed inside the update kernel (ConOpt's u + gamma J^T u, numgan.optim). Unlike ``step()`` it
        runs no optimizer step hooks."""
        extra = [None] * len(params) if extra is None else list(extra)
        if not len(params) == len(grads) == len(extra):
            raise ValueError("apply_gradients needs one gradient (and one extra entry) per parameter")
        if any(g.shape != p.shape or (e is not None and e.shape != p.shape) for p, g, e in zip(params, grads, extra)):
            raise ValueError("apply_gradients: every gradient (and extra entry) must have its parameter's shape")
        group_of = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        items = [[] for _ in self.param_groups]
        for p, g, e in zip(params, grads, extra):
            if id(p) not in group_of:
                raise ValueError("apply_gradients: a parameter that this optimiser does not hold")
            items[group_of[id(p)]].append((p, g, e))
        for group, its in zip(self.param_groups, items):
            if its:
                ps, gs, es = (list(c) for c in zip(*its))
                self._update(group, ps, gs, es, alpha)

    def _fuses(self, group, params: list[Tensor]) -> list[bool]:
        """Per parameter: whether the one-kernel update runs on it (a dense float32 CUDA tensor whose mean
        square is laid out alike; on CPU tensors only under Triton's interpreter, for the tests)."""
        if self.fused is False or group["momentum"] > 0 or triton is None:
            ok = [False] * len(params)
        else:
            ok = [fusable(p, self.state[p]["square_avg"]) and (p.is_cuda or (INTERPRET and p.device.type == "cpu"))
                  for p in params]
        if self.fused and not all(ok):
            raise RuntimeError("TF1RMSprop(fused=True): every parameter must be a dense float32 CUDA tensor "
                               "(use fused=None to fall back to torch's kernels where it cannot run)")
        return ok

    def _update(self, group, params: list[Tensor], grads: list[Tensor], extra, alpha: float) -> None:
        squares, moms = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["square_avg"] = torch.full_like(p, group["initial_accumulator"],
                                                      memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            squares.append(state["square_avg"])
            if group["momentum"] > 0:
                moms.append(state["momentum_buffer"])
        decay, eps, lr = group["decay"], group["eps"], group["lr"]
        extra = [None] * len(params) if extra is None else extra
        fuses = self._fuses(group, params)
        for has_e in (False, True):      # launches of up to _SLOTS tensors alike (one device, extra term or not)
            todo = [(p, laid_out_as(g, p), None if e is None else laid_out_as(e, p), m)
                    for p, g, e, m, fuse in zip(params, grads, extra, squares, fuses)
                    if fuse and p.numel() and (e is not None) == has_e]
            for dev in dict.fromkeys(p.device for p, *_ in todo):
                on_dev = [it for it in todo if it[0].device == dev]
                for i in range(0, len(on_dev), _SLOTS):
                    _launch(on_dev[i:i + _SLOTS], lr, decay, eps, alpha, has_e)
            for p, _, _, m in todo:   # in-place updates, as torch's own would register them for autograd
                torch.autograd.graph.increment_version(p)
                torch.autograd.graph.increment_version(m)
        if all(fuses):
            return
        rest = [i for i, fuse in enumerate(fuses) if not fuse]     # torch's multi-tensor kernels
        params, squares = [params[i] for i in rest], [squares[i] for i in rest]
        grads, extra = [grads[i] for i in rest], [extra[i] for i in rest]
        if moms:
            moms = [moms[i] for i in rest]
        if any(e is not None for e in extra):
            grads = combine(grads, extra, alpha)
        grads = [laid_out_as(g, p) for g, p in zip(grads, params)]
        # ms <- decay ms + (1 - decay) g^2
        torch._foreach_mul_(squares, decay)
        torch._foreach_addcmul_(squares, grads, grads, value=1.0 - decay)
        denom = torch._foreach_add(squares, eps)
        torch._foreach_sqrt_(denom)
        if group["momentum"] > 0:
            torch._foreach_mul_(moms, group["momentum"])
            torch._foreach_addcdiv_(moms, grads, denom, value=lr)
            torch._foreach_sub_(params, moms)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)

