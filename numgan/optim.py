"""Game optimisers: SimGA, AltGA, ConOpt, the smoothing and clipping baselines (spec 1.2).

All share one interface so a training loop can swap them::

    opt = ConOpt(G.parameters(), D.parameters(), lr=1e-4, gamma=10.0)
    losses = opt.step(closure)        # one iteration of the paper's algorithm

``closure(need_d=True, need_g=True) -> (loss_d, loss_g)`` evaluates the losses on a **fresh**
minibatch (a new real batch and a new latent batch) each time it is called, returning ``None`` for
a loss that was not asked for. SimGA, ConOpt, smoothing and clipping call it once per step; AltGA
calls it once per player step (D first, spec D-14); the unbiased ConOpt estimate calls it twice.

The inner optimiser defaults to TensorFlow-1 RMSProp (numgan.rmsprop, spec 1.3); any
``torch.optim.Optimizer`` plugs in through ``optimizer=lambda params: torch.optim.Adam(params, 1e-4)``.
SimGA, ConOpt, smoothing and clipping use one instance over both players; AltGA one per player.
Sign convention: numgan.game (``p.grad`` receives -v, resp. -w for ConOpt).
"""
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from .game import grad_or_zero, player_gradients, vjp
from .rmsprop import TF1RMSprop, combine, laid_out_as

Closure = Callable[..., tuple]
OptimizerFactory = Callable[[list], torch.optim.Optimizer]


class GameOptimizer:
    """Base class: holds the two players' parameters and the inner (minimising) optimiser(s)."""

    name = "game"

    def __init__(self, gen_params: Iterable[Tensor], disc_params: Iterable[Tensor], lr: float = 1e-4,
                 optimizer: Optional[OptimizerFactory] = None):
        self.gen_params = [p for p in gen_params if p.requires_grad]
        self.disc_params = [p for p in disc_params if p.requires_grad]
        if not self.gen_params or not self.disc_params:
            raise ValueError("both players need at least one trainable parameter")
        self.lr = lr
        self._factory = optimizer or (lambda params: TF1RMSprop(params, lr=lr))
        self.optimizers = self._make_optimizers()

    @property
    def params(self) -> list[Tensor]:
        return self.gen_params + self.disc_params

    def _make_optimizers(self) -> dict:
        return {"both": self._factory(self.params)}

    def _apply(self, directions: list[Tensor], params: list[Tensor], key: str = "both",
               extra: Optional[list[Tensor]] = None, alpha: float = 1.0) -> None:
        """Hand the (loss-form) directions ``directions + alpha * extra`` to the inner optimiser and take one
        step. TF1RMSprop takes them as they are (``apply_gradients``); other optimisers through ``p.grad``."""
        opt = self.optimizers[key]
        if isinstance(opt, TF1RMSprop):
            opt.apply_gradients(params, directions, extra, alpha)
            return
        if extra is not None:
            directions = combine(directions, extra, alpha)
        for p, d in zip(params, directions):
            p.grad = laid_out_as(d, p)     # torch's multi-tensor kernels are fast on tensors laid out alike
        opt.step()
        for p in params:
            p.grad = None

    def step(self, closure: Closure) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


def _losses(loss_d: Tensor, loss_g: Tensor) -> dict:
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}


class SimGA(GameOptimizer):
    """Simultaneous gradient ascent (paper Alg. 1): both players step on the same minibatch."""

    name = "simga"

    def step(self, closure: Closure) -> dict:
        loss_d, loss_g = closure()
        u = player_gradients(loss_g, loss_d, self.gen_params, self.disc_params)
        self._apply(u, self.params)
        return _losses(loss_d, loss_g)


class AltGA(GameOptimizer):
    """Alternating gradient ascent: ``d_steps`` discriminator steps, then ``g_steps`` generator steps.

    D goes first, as in the authors' code (spec 1.2, D-14; the paper's Alg. 3 lists G first). Each
    player step draws a fresh minibatch, and the G step sees the already updated D.
    """

    name = "altga"

    def __init__(self, gen_params, disc_params, lr: float = 1e-4, optimizer=None,
                 d_steps: int = 1, g_steps: int = 1):
        if d_steps < 1 or g_steps < 1:
            raise ValueError("d_steps and g_steps must be >= 1")
        self.d_steps, self.g_steps = d_steps, g_steps
        super().__init__(gen_params, disc_params, lr, optimizer)

    def _make_optimizers(self) -> dict:
        return {"d": self._factory(self.disc_params), "g": self._factory(self.gen_params)}

    def step(self, closure: Closure) -> dict:
        for _ in range(self.d_steps):
            loss_d, _ = closure(need_g=False)
            self._apply(grad_or_zero(loss_d, self.disc_params), self.disc_params, "d")
        for _ in range(self.g_steps):
            _, loss_g = closure(need_d=False)
            self._apply(grad_or_zero(loss_g, self.gen_params), self.gen_params, "g")
        return _losses(loss_d, loss_g)


class ConOpt(GameOptimizer):
    """Consensus optimisation (paper Sec. 4, Eq. 16-17, Alg. 2).

    Direction for every parameter of **both** players: ``u_p + gamma (J^T u)_p`` with ``u = -v`` and
    ``J^T u = grad_x 1/2 ||u||^2`` by double backprop over all parameters; the fake samples are not
    detached, so the generator block includes the path through grad_phi L_D.

    ``unbiased=True`` uses the supplement's unbiased estimate of grad L (Lemma 15 and the remark after
    it): two independent minibatches give u1, u2, and ``1/2 <u1, u2>`` is an unbiased estimate of
    L = 1/2 ||E u||^2 (the plain 1/2 ||u_B||^2 is biased up by Var[u_1] / 2B). The plain-field part
    then uses the mean of u1 and u2. Costs two closure calls per step.
    """

    name = "conopt"

    def __init__(self, gen_params, disc_params, lr: float = 1e-4, optimizer=None, gamma: float = 10.0,
                 unbiased: bool = False):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma, self.unbiased = gamma, unbiased
        super().__init__(gen_params, disc_params, lr, optimizer)

    def step(self, closure: Closure) -> dict:
        params = self.params
        loss_d, loss_g = closure()
        u = player_gradients(loss_g, loss_d, self.gen_params, self.disc_params, create_graph=True)
        if self.unbiased:
            loss_d2, loss_g2 = closure()
            u2 = player_gradients(loss_g2, loss_d2, self.gen_params, self.disc_params, create_graph=True)
            # grad 1/2 <u1, u2> = 1/2 (J_1^T u2 + J_2^T u1)
            jtu, alpha = vjp(u + u2, params, u2 + u), 0.5 * self.gamma
            u = [0.5 * (a.detach() + b.detach()) for a, b in zip(u, u2)]
        else:
            jtu, alpha = vjp(u, params, u), self.gamma    # J^T u = grad 1/2 ||u||^2
        # u + gamma J^T u, formed by the inner optimiser (TF1RMSprop: inside its one update kernel on CUDA)
        self._apply([ui.detach() for ui in u], params, extra=jtu, alpha=alpha)
        return _losses(loss_d, loss_g)


class Smoothing(GameOptimizer):
    """The smoothing baseline (supplement, Figs. 7-8; spec 1.2 and D-5).

    ``variant="code"`` (default, as in the authors' code that produced the figures): the generator
    steps on plain grad_theta L_G; the discriminator steps on grad_phi L_D + gamma grad_phi L_s with
    L_s = 1/2 ||grad_theta L_G||^2. ``variant="paper"`` is the paper's wording: the regulariser is
    removed from G's update and kept for D's, i.e. D gets gamma grad_phi 1/2 ||v||^2.
    """

    name = "smooth"
    VARIANTS = ("code", "paper")

    def __init__(self, gen_params, disc_params, lr: float = 1e-4, optimizer=None, gamma: float = 10.0,
                 variant: str = "code"):
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown smoothing variant {variant!r}; choose one of {self.VARIANTS}")
        self.gamma, self.variant = gamma, variant
        super().__init__(gen_params, disc_params, lr, optimizer)

    def step(self, closure: Closure) -> dict:
        loss_d, loss_g = closure()
        u = player_gradients(loss_g, loss_d, self.gen_params, self.disc_params, create_graph=True)
        n_g = len(self.gen_params)
        reg_of = u[:n_g] if self.variant == "code" else u
        reg_d = vjp(reg_of, self.disc_params, reg_of)        # grad_phi of the regulariser 1/2 ||reg_of||^2
        extra = [None] * n_g + reg_d                          # G: its plain gradient
        self._apply([ui.detach() for ui in u], self.params, extra=extra, alpha=self.gamma)
        return _losses(loss_d, loss_g)


class Clip(GameOptimizer):
    """Gradient clipping baseline (spec 1.2, `clip`): each player's gradient list is clipped to global
    norm ``gamma`` (as ``tf.clip_by_global_norm``), then one simultaneous step. Used in no figure."""

    name = "clip"

    def __init__(self, gen_params, disc_params, lr: float = 1e-4, optimizer=None, gamma: float = 10.0):
        if gamma <= 0:
            raise ValueError(f"clip norm gamma must be > 0, got {gamma}")
        self.gamma = gamma
        super().__init__(gen_params, disc_params, lr, optimizer)

    def step(self, closure: Closure) -> dict:
        loss_d, loss_g = closure()
        u = player_gradients(loss_g, loss_d, self.gen_params, self.disc_params)
        n_g = len(self.gen_params)
        clipped = []
        for block in (u[:n_g], u[n_g:]):
            norm = torch.sqrt(sum((g * g).sum() for g in block))
            scale = self.gamma / torch.clamp(norm, min=self.gamma)
            clipped += [g * scale for g in block]
        self._apply(clipped, self.params)
        return _losses(loss_d, loss_g)


OPTIMIZERS = {cls.name: cls for cls in (SimGA, AltGA, ConOpt, Smoothing, Clip)}


def make_game_optimizer(name: str, gen_params, disc_params, lr: float = 1e-4, gamma: float = 10.0,
                        optimizer: Optional[OptimizerFactory] = None, **kwargs) -> GameOptimizer:
    """Build a game optimiser by name: one of ``OPTIMIZERS`` ("simga", "altga", "conopt", "smooth", "clip").

    ``gamma`` is ignored by SimGA and AltGA (as in the authors' scripts, which pass it anyway).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown game optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    if cls in (ConOpt, Smoothing, Clip):
        kwargs["gamma"] = gamma
    return cls(gen_params, disc_params, lr=lr, optimizer=optimizer, **kwargs)
