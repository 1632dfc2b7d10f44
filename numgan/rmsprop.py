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
"""
import torch


class TF1RMSprop(torch.optim.Optimizer):
    """RMSProp with TensorFlow-1 semantics (accumulator starts at 1, epsilon inside the root).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the paper: 1e-4 everywhere).
        decay: discount of the mean-square accumulator (TF ``decay``, default 0.9).
        eps: added to the accumulator inside the square root (default 1e-10).
        momentum: TF momentum (0 in the paper); ``mom <- momentum mom + lr g / sqrt(ms + eps)``.
        initial_accumulator: starting value of the mean square (1.0 in TF-1).
    """

    def __init__(self, params, lr: float = 1e-4, decay: float = 0.9, eps: float = 1e-10,
                 momentum: float = 0.0, initial_accumulator: float = 1.0):
        if lr < 0 or not 0.0 <= decay < 1.0 or eps < 0 or momentum < 0:
            raise ValueError(f"invalid TF1RMSprop settings: lr={lr}, decay={decay}, eps={eps}, momentum={momentum}")
        defaults = dict(lr=lr, decay=decay, eps=eps, momentum=momentum,
                        initial_accumulator=initial_accumulator)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict) -> None:
        """torch's loading, then each mean square laid out as its parameter (a checkpoint from a run whose
        weights had another memory layout, e.g. numgan.models.set_conv_impl's channels-last GEMM layers,
        would otherwise keep the foreach kernels off their fast path)."""
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            for k in ("square_avg", "momentum_buffer"):
                t = st.get(k)
                if isinstance(t, torch.Tensor) and t.shape == p.shape and t.stride() != p.stride():
                    st[k] = torch.empty_like(p).copy_(t)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, squares, moms = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("TF1RMSprop does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.full_like(p, group["initial_accumulator"],
                                                          memory_format=torch.preserve_format)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                squares.append(state["square_avg"])
                if group["momentum"] > 0:
                    moms.append(state["momentum_buffer"])
            if not params:
                continue
            decay, eps, lr = group["decay"], group["eps"], group["lr"]
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
        return loss
