"""Spectra of the game Jacobian: exact J for small nets, top-k for large ones, and the step-size algebra
of paper Sec. 3-4 (Figures 1 and 3).

Sign convention (numgan/__init__.py): v(x) = (-grad_theta L_G, -grad_phi L_D) is the paper's ascent field
and J = v'(x) = dv/dx, rows = components of v, columns = parameters, both in the order (theta, phi).
A stable equilibrium has Re eig(J) < 0 (paper Sec. 3). Consensus optimisation uses
w(x) = v(x) - gamma J(x)^T v(x) (Eq. 12-13), whose Jacobian is

    w'(x) = J - gamma (J^T J + sum_i v_i Hess v_i),

which equals ``consensus_matrix(J, gamma) = J - gamma J^T J`` at a stationary point (v = 0; paper
Lemma 6 / Eq. 16 with A = I - gamma J^T). The paper's Fig. 3 plots J - gamma J^T J everywhere (spec D-3);
``regularized_field`` gives the exact w' when the dropped Hessian term matters. A peer computed J of
the *loss gradients* u = -v and then formed J - gamma J^T J, which is the wrong sign for u (it should be
J_u + gamma J_u^T J_u); keeping everything in terms of v avoids that.

Step-size helpers (paper Prop. 3, Lemma 4, Eq. 10): for Re lam < 0, |1 + h lam| < 1  <=>
h < 2|Re lam| / |lam|^2 = (2/|Re lam|) / (1 + q^2) with q = |Im lam / Re lam|; Lemma 9 bounds the
quotient q of A - gamma A^T A (see ``lemma9_bound`` for a correction of its statement).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse.linalg
import torch
from torch import Tensor

Field = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------------
# Exact Jacobians (small nets: the MoG toy has n = 2003)
# ----------------------------------------------------------------------------------------------------

def _check_point(x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor (a flat parameter vector), got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"x must be a flat 1-D parameter vector, got shape {tuple(x.shape)}; "
                         "flatten the parameters (numgan.game.flat_field works on flat vectors)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return x.detach()


def jacobian(field: Field, x: Tensor, chunk_size: Optional[int] = 128) -> Tensor:
    """Exact Jacobian v'(x) of a flat field ``x -> v(x)`` (e.g. from ``numgan.game.flat_field``).

    Uses ``torch.func.jacrev``: reverse passes vmapped over ``chunk_size`` rows at a time (None: all
    at once). Chunks of 128 were about 3x faster than one vmap over all 2003 rows of the MoG game on a
    2-core CPU, at the same peak memory. Returns an [n, n] tensor in x's dtype: row i = gradient of
    v_i, column j = parameter x_j, same order as x.
    """
    x = _check_point(x)
    J = torch.func.jacrev(field, chunk_size=chunk_size)(x)
    if J.shape != (x.numel(), x.numel()):
        raise ValueError(f"field must map R^n -> R^n with n = {x.numel()}; its Jacobian has shape "
                         f"{tuple(J.shape)}")
    return J


def averaged_jacobian(fields: Sequence[Field], x: Tensor) -> Tensor:
    """Mean of ``jacobian(f, x)`` over several fields, each built on its own fixed minibatch.

    Spec Fig. 3 step 3: the paper averages J over 10 independent minibatches.
    """
    fields = list(fields)
    if not fields:
        raise ValueError("averaged_jacobian needs at least one field (one per minibatch)")
    total = jacobian(fields[0], x)
    for f in fields[1:]:
        total = total + jacobian(f, x)
    return total / len(fields)


def _as_square(J, name: str = "J") -> np.ndarray:
    if isinstance(J, Tensor):
        J = J.detach().cpu().numpy()
    J = np.asarray(J)
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {J.shape}")
    if not np.all(np.isfinite(J)):
        raise ValueError(f"{name} contains NaN or inf entries")
    return J


def eigenvalues(J) -> np.ndarray:
    """All eigenvalues of a square (non-symmetric) matrix, as a complex128 numpy array.

    Accepts a torch tensor or an array; computed in float64 with ``numpy.linalg.eigvals``, unsorted.
    """
    return np.linalg.eigvals(_as_square(J).astype(np.float64)).astype(np.complex128)


def consensus_matrix(J, gamma: float):
    """J - gamma J^T J: the Jacobian of w = v - gamma J^T v at a stationary point (paper Eq. 16, spec D-3).

    Returns the same type as ``J`` (torch tensor or numpy array).
    """
    if isinstance(J, Tensor):
        if J.dim() != 2 or J.shape[0] != J.shape[1]:
            raise ValueError(f"J must be a square matrix, got shape {tuple(J.shape)}")
        return J - gamma * (J.mT @ J)
    J = _as_square(J)
    return J - gamma * (J.T @ J)


def regularized_field(field: Field, gamma: float) -> Field:
    """The consensus field x -> w(x) = v(x) - gamma J(x)^T v(x) (paper Eq. 12-13), as a pure function.

    J^T v is one ``torch.func.vjp``; the result composes with torch.func again, so ``jacobian(w, x)``
    gives the exact w'(x) = J - gamma (J^T J + sum_i v_i Hess v_i), including the Hessian term that
    ``consensus_matrix`` drops.
    """
    def w(x: Tensor) -> Tensor:
        v, vjp_fn = torch.func.vjp(field, x)
        (jtv,) = vjp_fn(v)
        return v - gamma * jtv

    return w


# ----------------------------------------------------------------------------------------------------
# Top-k eigenvalues for large nets (matrix-free, ARPACK)
# ----------------------------------------------------------------------------------------------------

def jvp_operator(field: Field, x: Tensor, linearize: bool = True) -> scipy.sparse.linalg.LinearOperator:
    """J = v'(x) as a scipy LinearOperator: matvec p -> J p, rmatvec p -> J^T p.

    J p is a forward-mode Jacobian-vector product through the field (forward-over-reverse, since the
    field itself is a reverse-mode gradient). With ``linearize=True`` (default) the field is traced
    once with ``torch.func.linearize`` and every matvec replays the traced JVP (about 10x less overhead
    than calling ``torch.func.jvp`` each time, which ARPACK does hundreds of times); if tracing fails
    (e.g. data-dependent control flow) it warns and falls back to ``torch.func.jvp`` per call.
    J^T p is one ``torch.func.vjp`` (forward pass taken on first use). Works in x's dtype and on x's
    device (float64 -> a float64 operator); complex vectors are split into real and imaginary parts.
    """
    x = _check_point(x)
    n = x.numel()
    np_dtype = np.float64 if x.dtype == torch.float64 else np.float32

    def jp_direct(t):
        return torch.func.jvp(field, (x,), (t,))[1]

    jp = jp_direct
    if linearize:
        try:
            with warnings.catch_warnings():  # torch's constant folding warns about captured tensors
                warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
                _, jp = torch.func.linearize(field, x)
        except Exception as err:  # tracing is best-effort; the per-call jvp is always valid
            warnings.warn(f"jvp_operator: torch.func.linearize failed ({type(err).__name__}: {err}); "
                          "using torch.func.jvp per matvec", stacklevel=2)
            jp = jp_direct
    vjp_cache = []

    def jtp(t):
        if not vjp_cache:
            vjp_cache.append(torch.func.vjp(field, x)[1])
        return vjp_cache[0](t)[0]

    def _apply(fn, p):
        p = np.asarray(p).reshape(-1)
        if p.shape[0] != n:
            raise ValueError(f"vector has {p.shape[0]} entries, the operator acts on {n}")
        if np.iscomplexobj(p):
            return _apply(fn, p.real) + 1j * _apply(fn, p.imag)
        t = torch.as_tensor(np.ascontiguousarray(p), device=x.device).to(x.dtype)
        return fn(t).detach().cpu().numpy().astype(np_dtype, copy=False)

    return scipy.sparse.linalg.LinearOperator(
        (n, n), matvec=lambda p: _apply(jp, p), rmatvec=lambda p: _apply(jtp, p), dtype=np_dtype)


# which -> (ARPACK 'which', sort key: ascending = first returned)
_WHICH = {
    "LM": ("LM", lambda lam: -np.abs(lam)),          # largest modulus
    "LR": ("LR", lambda lam: -lam.real),             # largest real part (most unstable / closest to the axis)
    "SR": ("SR", lambda lam: lam.real),              # smallest (most negative) real part
    "LI": ("LI", lambda lam: -np.abs(lam.imag)),     # largest |imaginary part|
    "SM_real": ("LR", lambda lam: np.abs(lam.real)),  # closest to the imaginary axis, via 'LR' (see below)
}


def top_eigenvalues(field: Field, x: Tensor, k: int = 20, which: str = "LM", tol: float = 0.0,
                    maxiter: int | None = None, ncv: int | None = None, seed: int = 0,
                    linearize: bool = True) -> np.ndarray:
    """k eigenvalues of J = v'(x) selected by ``which``, matrix-free (ARPACK on ``jvp_operator``).

    which:
      * ``"LM"``: largest modulus; ``"LR"``: largest real part; ``"SR"``: smallest real part;
        ``"LI"``: largest |imaginary part| (conjugate pairs).
      * ``"SM_real"``: the eigenvalues closest to the imaginary axis (smallest |Re|), the paper's
        troublesome ones. ARPACK cannot target interior eigenvalues without shift-invert, which needs a
        factorisation of J (impossible matrix-free), so this runs ARPACK ``'LR'`` and sorts by |Re|.
        At an (approximately) stable point every eigenvalue has Re <= 0, and then the k largest real
        parts *are* the k smallest |Re|. If some returned eigenvalue has Re > 0 the point is not
        stable, the result is the k largest real parts (the unstable directions first), and a
        warning says so. For small n use ``eigenvalues(jacobian(field, x))`` instead.

    Returns a complex128 array of length k sorted by the criterion (most extreme first; ties broken by
    the imaginary part). ``seed`` fixes ARPACK's start vector, so results are reproducible; ``linearize``
    is passed to ``jvp_operator``. Requires
    1 <= k < n - 1; raises RuntimeError if ARPACK does not converge (raise ``maxiter`` or ``ncv``).
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {sorted(_WHICH)}, got {which!r}")
    op = jvp_operator(field, x, linearize=linearize)
    n = op.shape[0]
    if not 1 <= k < n - 1:
        raise ValueError(f"ARPACK needs 1 <= k < n - 1 (n = {n}), got k = {k}; "
                         "for small n use eigenvalues(jacobian(field, x))")
    arpack_which, key = _WHICH[which]
    v0 = np.random.default_rng(seed).standard_normal(n).astype(op.dtype)
    try:
        vals = scipy.sparse.linalg.eigs(op, k=k, which=arpack_which, tol=tol, maxiter=maxiter, ncv=ncv,
                                        v0=v0, return_eigenvectors=False)
    except scipy.sparse.linalg.ArpackNoConvergence as err:
        raise RuntimeError(f"ARPACK converged {len(err.eigenvalues)} of {k} eigenvalues (which={which!r}); "
                           "raise maxiter or ncv, or loosen tol") from err
    vals = np.asarray(vals, dtype=np.complex128)
    vals = vals[np.lexsort((vals.imag, key(vals)))]
    if which == "SM_real" and vals.real.max() > 0:
        warnings.warn("top_eigenvalues(which='SM_real'): some eigenvalues have Re > 0 (not a stable point); "
                      "returned the k largest real parts, which may differ from the k smallest |Re|",
                      stacklevel=2)
    return vals


# ----------------------------------------------------------------------------------------------------
# Step-size algebra (paper Prop. 3, Lemma 4, Lemma 9; Figure 1)
# ----------------------------------------------------------------------------------------------------

def _as_complex(lams) -> np.ndarray:
    if isinstance(lams, Tensor):
        lams = lams.detach().cpu().numpy()
    return np.asarray(lams, dtype=np.complex128)


def max_step_size(lam):
    """Largest h with |1 + h lam| < 1 (paper Lemma 4, Eq. 10): 2|Re lam| / |lam|^2, elementwise.

    Returns 0 where Re lam >= 0 (no positive step contracts that direction). Scalar in, float out.
    For a whole spectrum the admissible range is h < ``max_step_size(lams).min()``.
    """
    lam = _as_complex(lam)
    mod2 = np.abs(lam) ** 2
    stable = lam.real < 0
    out = np.where(stable, 2.0 * np.abs(lam.real) / np.where(stable, mod2, 1.0), 0.0)
    return float(out) if out.ndim == 0 else out


def spectral_radius_after_step(lams, h):
    """max_i |1 + h lam_i|: the spectral radius of I + hA, i.e. the linear convergence rate of
    x <- x + h v(x) near the fixed point (paper Prop. 3, Eq. 9). ``h`` may be an array (one radius each)."""
    lams = _as_complex(lams).reshape(-1)
    if lams.size == 0:
        raise ValueError("lams is empty")
    h_arr = np.asarray(h, dtype=np.float64)
    out = np.abs(1.0 + h_arr[..., None] * lams).max(axis=-1)
    return float(out) if out.ndim == 0 else out


def best_step_size(lams) -> float:
    """The h > 0 minimising the spectral radius max_i |1 + h lam_i| of I + hA.

    0.0 if some Re lam >= 0 (then no h > 0 brings the radius below 1). The squared radius is a maximum of
    convex quadratics 1 + 2h Re lam + h^2 |lam|^2, so it is convex in h: a bounded 1-D minimisation on
    (0, min h_max) followed by an exact refinement over the active quadratics (their vertices -Re/|lam|^2
    and pairwise crossings). For a single pair this is the closed form h = -Re lam / |lam|^2.
    """
    lams = _as_complex(lams).reshape(-1)
    if lams.size == 0:
        raise ValueError("lams is empty")
    if np.any(lams.real >= 0):
        return 0.0
    pts = np.unique(np.stack([lams.real, np.abs(lams) ** 2], axis=1), axis=0)  # conjugates coincide
    a, m = pts[:, 0], pts[:, 1]
    h_ub = float(np.min(2.0 * np.abs(a) / m))

    def sq_radius(h):  # |1 + h lam|^2 - 1, without the 1 (keeps the flat minimum resolvable in floats)
        return float(np.max(h * (2.0 * a + h * m)))

    res = scipy.optimize.minimize_scalar(sq_radius, bounds=(0.0, h_ub), method="bounded",
                                         options={"xatol": 1e-12 * h_ub})
    cands = [float(res.x)]
    vals = res.x * (2.0 * a + res.x * m)
    act = np.argsort(-vals)[:8]
    for i in act:
        cands.append(-a[i] / m[i])
        for j in act:
            if i < j and m[i] != m[j]:
                cands.append(2.0 * (a[j] - a[i]) / (m[i] - m[j]))
    cands = [h for h in cands if 0.0 < h < h_ub]
    return float(min(cands, key=sq_radius))


def consensus_eigenvalues(A, gamma: float) -> np.ndarray:
    """Eigenvalues of A - gamma A^T A (consensus optimisation's Jacobian at a stationary point)."""
    return eigenvalues(consensus_matrix(_as_square(A, "A").astype(np.float64), gamma))


def imag_real_quotient(lams) -> float:
    """q = max |Im lam| / |Re lam| over the eigenvalues (paper Lemma 4 / Lemma 9).

    inf if some eigenvalue with Im != 0 has Re = 0; an eigenvalue 0 counts as q = 0.
    """
    lams = _as_complex(lams).reshape(-1)
    if lams.size == 0:
        raise ValueError("lams is empty")
    re, im = np.abs(lams.real), np.abs(lams.imag)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(im == 0, 0.0, im / re)
    return float(q.max())


def lemma9_constants(A) -> tuple[float, float, float]:
    """(c, rho, delta) for paper Lemma 9 and A with negative semi-definite symmetric part.

    c     = min over unit complex v of |v^H (A + A^T) v| / |v^H (A - A^T) v|  (Eq. 17), computed as
            1 / max |mu| over the generalised eigenvalues of (-i(A - A^T), -(A + A^T)); inf if A is
            symmetric; 0 (a valid lower bound, so the bound below stays valid) if A + A^T is singular.
    rho   = smallest singular value of A (|Av| >= rho |v|).
    delta = ||A - A^T||_2 = max over unit v of |v^H (A - A^T) v| (A - A^T is normal).
    """
    A = _as_square(A, "A").astype(np.float64)
    S, K = A + A.T, A - A.T
    s_eigs = np.linalg.eigvalsh(S)
    scale = max(np.abs(A).max(), 1e-300)
    if s_eigs.max() > 1e-10 * scale:
        raise ValueError("Lemma 9 needs A negative semi-definite (A + A^T <= 0); "
                         f"A + A^T has eigenvalue {s_eigs.max():.3g} > 0")
    rho = float(np.linalg.svd(A, compute_uv=False).min())
    delta = float(np.linalg.norm(K, 2))
    if delta == 0.0:
        c = np.inf
    elif -s_eigs.max() <= 1e-12 * scale:  # A + A^T singular: use c = 0
        c = 0.0
    else:
        mu = scipy.linalg.eigh(-1j * K, -S, eigvals_only=True)
        c = float(1.0 / np.abs(mu).max())
    return float(c), rho, delta


def lemma9_bound(A, gamma: float, paper_form: bool = False) -> float:
    """Upper bound on q(gamma) = max |Im/Re| over the eigenvalues of A - gamma A^T A (paper Lemma 9).

    The paper states q(gamma) <= 1 / (c + 2 rho^2 gamma) (Eq. 18). Its proof (supplement, Eq. 32) divides by
    |v^H (A - A^T) v| and silently takes it <= 1 (it also writes ||Av||^2 >= rho where rho^2 is meant).
    The statement is false without that normalisation: for A_b = [[-0.05, 1], [-1, -0.05]] and gamma = 1,
    q = 0.950 but 1/(c + 2 rho^2 gamma) = 0.487. The scale-correct bound, returned by default, is

        q(gamma) <= 1 / (c + 2 rho^2 gamma / delta),   delta = ||A - A^T||_2,

    which reduces to the paper's form when delta <= 1 (and is attained by A_b). ``paper_form=True``
    returns the literal Eq. 18. Returns 0.0 for symmetric A (all eigenvalues real).
    Raises ValueError unless A + A^T <= 0 and A is invertible (rho > 0).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    c, rho, delta = lemma9_constants(A)
    if rho <= 0.0:
        raise ValueError("Lemma 9 needs A invertible (rho > 0)")
    if delta == 0.0:
        return 0.0
    return float(1.0 / (c + 2.0 * rho ** 2 * gamma / (1.0 if paper_form else delta)))
