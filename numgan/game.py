"""The game vector field and its sign convention (paper Sec. 2.2-3, Eq. 1, 16-17).

Two players: the generator with parameters theta minimises L_G(theta, phi), the discriminator with
parameters phi minimises L_D(theta, phi). numgan uses **one** convention everywhere: the paper's
ascent field on x = (theta, phi), generator block first,

    v(x) = ( -grad_theta L_G ,  -grad_phi L_D ).

* SimGA:  x <- x + h v(x)                                        (paper Alg. 1)
* ConOpt: x <- x + h w(x),  w = v - gamma grad L,  L = 1/2 ||v||^2,  grad L = v'(x)^T v(x)   (Eq. 16-17;
  :func:`vjp`)

Torch optimizers *minimise*, so the update direction handed to them (``p.grad``, or the gradients of
TF1RMSprop.apply_gradients) is ``-v`` (and ``-w`` for ConOpt): ``u + gamma J_u^T u`` with ``u = -v`` the
players' own loss gradients. Since ``L = 1/2 ||u||^2`` too, ``grad L = J_u^T u = v'^T v`` whichever sign
is used for the field.

This module holds the autograd helpers shared by the optimizers (numgan.optim) and the functional
form of the field used by the spectrum tools (numgan.spectrum).
"""
from typing import Callable, Sequence

import torch
from torch import Tensor


def player_gradients(loss_g: Tensor, loss_d: Tensor, gen_params: Sequence[Tensor],
                     disc_params: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    """u = (grad_theta L_G, grad_phi L_D) = -v, as a list of tensors, generator first.

    Each player's gradient is taken with respect to its own parameters only. With
    ``create_graph=True`` the result can be differentiated again (ConOpt's double backprop);
    the fake samples are *not* detached, so grad_phi L_D depends on theta through x_f = G(z).
    """
    # the two losses share the graph through x_f = G(z): keep it for the second call
    g = torch.autograd.grad(loss_g, list(gen_params), create_graph=create_graph, retain_graph=True,
                            allow_unused=True)
    d = torch.autograd.grad(loss_d, list(disc_params), create_graph=create_graph, allow_unused=True)
    params = list(gen_params) + list(disc_params)
    return [torch.zeros_like(p) if gr is None else gr for gr, p in zip(list(g) + list(d), params)]


def grad_or_zero(scalar: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Gradient of ``scalar`` w.r.t. ``params``; a parameter it does not depend on gets 0.

    TF drops such a parameter from the update entirely; this only happens to the last D bias under
    linear losses, whose gradient is exactly 0 anyway (spec 1.2), so 0 gives the same result.
    """
    if not scalar.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(scalar, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def vjp(outputs: Sequence[Tensor], inputs: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """sum_k J_k^T c_k for ``vectors`` c_k held fixed, J_k the Jacobian of ``outputs[k]`` w.r.t. ``inputs``: the
    gradient of sum_k <outputs_k(x), c_k>, by one backward pass seeded with the c_k (zero for an input that
    no output depends on).

    ConOpt's consensus gradient (paper Eq. 16-17): for L = 1/2 ||v||^2 = 1/2 ||u||^2 (u = -v),
    grad L = v'(x)^T v(x) = J_u^T u, i.e. ``vjp(u, params, u)``, the player gradients of the first backward
    pass (``create_graph=True``) seeded with their own values. This is exactly what differentiating
    1/2 sum_p ||u_p||^2 gives (the derivative of the norm is u itself), without forming the norm, nor its
    derivative over every parameter (issue 4: on the image GANs a sum over 9 million entries and three
    elementwise kernels over all of them, each step). The unbiased estimate (supplement Lemma 15),
    grad 1/2 <u1, u2> = 1/2 (J_1^T u2 + J_2^T u1), is ``vjp(u1 + u2, params, u2 + u1)`` halved.
    """
    if len(outputs) != len(vectors) or any(o.shape != c.shape for o, c in zip(outputs, vectors)):
        raise ValueError("vjp needs one vector of the same shape per output")
    pairs = [(o, c.detach()) for o, c in zip(outputs, vectors) if o.requires_grad]
    if not pairs:       # e.g. every output a constant zero gradient (grad_or_zero)
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], list(inputs), grad_outputs=[c for _, c in pairs],
                                allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def flat_field(loss_g_fn: Callable[[dict, dict], Tensor], loss_d_fn: Callable[[dict, dict], Tensor],
               gen_shapes: dict, disc_shapes: dict) -> Callable[[Tensor], Tensor]:
    """The field v as a pure function of one flat parameter vector x = (theta, phi).

    ``loss_g_fn(theta, phi)`` and ``loss_d_fn(theta, phi)`` take dicts of named tensors (as for
    ``torch.func.functional_call``) and must use a *fixed* minibatch, so that v is a deterministic
    function of x. ``gen_shapes`` / ``disc_shapes`` map names to shapes, in the flattening order.
    The returned function composes with torch.func (jacrev, jvp, vjp, vmap).
    """
    g_names, d_names = list(gen_shapes), list(disc_shapes)
    sizes = [int(torch.Size(s).numel()) for s in list(gen_shapes.values()) + list(disc_shapes.values())]
    shapes = list(gen_shapes.values()) + list(disc_shapes.values())
    n_g = len(g_names)

    def unflatten(x: Tensor):
        parts = [p.reshape(s) for p, s in zip(torch.split(x, sizes), shapes)]
        return dict(zip(g_names, parts[:n_g])), dict(zip(d_names, parts[n_g:]))

    def field(x: Tensor) -> Tensor:
        theta, phi = unflatten(x)
        grad_theta = torch.func.grad(lambda t: loss_g_fn(t, phi))(theta)
        grad_phi = torch.func.grad(lambda f: loss_d_fn(theta, f))(phi)
        return -torch.cat([grad_theta[n].reshape(-1) for n in g_names]
                          + [grad_phi[n].reshape(-1) for n in d_names])

    field.unflatten = unflatten
    field.size = sum(sizes)
    return field


def consensus_estimates(per_example_fields: Tensor) -> tuple[Tensor, Tensor]:
    """Biased and unbiased minibatch estimates of L = 1/2 ||v||^2 (supplement, Lemma 15).

    ``per_example_fields`` [..., B, n] holds i.i.d. unbiased estimates v_i of v. The plain estimate
    L_B = 1/2 ||mean_i v_i||^2 has E[L_B] = L + Var[v_1] / (2B) (Eq. 49). Subtracting 1/(2B - 2) times
    the (1/B-normalised) sample variance S^2 = 1/B sum_i ||v_i - mean v||^2 removes the bias, since
    E[S^2] = (B - 1)/B Var[v_1]. Returns (L_B, L_B - S^2 / (2B - 2)).
    """
    b = per_example_fields.shape[-2]
    if b < 2:
        raise ValueError("the unbiased estimate needs at least two examples per batch")
    mean = per_example_fields.mean(-2)
    biased = 0.5 * (mean * mean).sum(-1)
    s2 = ((per_example_fields - mean.unsqueeze(-2)) ** 2).sum(-1).mean(-1)
    return biased, biased - s2 / (2 * b - 2)
