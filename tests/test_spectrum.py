"""Tests for numgan.spectrum: exact Jacobians, consensus matrices, ARPACK top-k, and the step-size
algebra behind Figure 1 (paper Lemma 4, Prop. 3, Lemma 9; spec Fig. 1 table)."""
import warnings

import numpy as np
import pytest
import torch

from numgan import spectrum as S
from numgan.game import flat_field

F64 = torch.float64


def _match(a, b, tol):
    """Every value of a is within tol of some value of b and vice versa (multisets of equal size)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    d = np.abs(a[:, None] - b[None, :])
    assert d.min(axis=1).max() < tol and d.min(axis=0).max() < tol


# ---------------------------------------------------------------- games

def bilinear_field():
    """f = theta*phi is G's utility, -theta*phi D's: L_G = -theta*phi, L_D = theta*phi."""
    return flat_field(lambda t, p: -(t["theta"] * p["phi"]).sum(),
                      lambda t, p: (t["theta"] * p["phi"]).sum(),
                      {"theta": (1,)}, {"phi": (1,)})


def quadratic_game(seed=0):
    """L_G = 1/2 th^T P th + th^T B ph, L_D = 1/2 ph^T Q ph - th^T C ph with th = (w, b) in R^3, ph = u in R^2,
    so v = (-P th - B ph, C^T th - Q ph) and J = [[-P, -B], [C^T, -Q]] (not normal, not zero-sum)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(3, 3, generator=g, dtype=F64)
    N = torch.randn(2, 2, generator=g, dtype=F64)
    P, Q = M @ M.T / 3, N @ N.T / 2
    B = torch.randn(3, 2, generator=g, dtype=F64)
    C = B + 0.3 * torch.randn(3, 2, generator=g, dtype=F64)  # close to zero-sum: rotational, complex eigs

    def th(t):
        return torch.cat([t["w"], t["b"]])

    loss_g = lambda t, p: 0.5 * th(t) @ P @ th(t) + th(t) @ B @ p["u"]
    loss_d = lambda t, p: 0.5 * p["u"] @ Q @ p["u"] - th(t) @ C @ p["u"]
    field = flat_field(loss_g, loss_d, {"w": (2,), "b": (1,)}, {"u": (2,)})
    J = torch.cat([torch.cat([-P, -B], 1), torch.cat([C.T, -Q], 1)], 0)
    return field, J


def cubic_field():
    """A nonlinear game with a stationary point at 0: v = (ph - 1.5 th^2 sum(ph), -th - ph^2)."""
    loss_g = lambda t, p: -(t["th"] * p["ph"]).sum() + 0.5 * (t["th"] ** 3).sum() * p["ph"].sum()
    loss_d = lambda t, p: (t["th"] * p["ph"]).sum() + (p["ph"] ** 3).sum() / 3
    return flat_field(loss_g, loss_d, {"th": (2,)}, {"ph": (2,)})


# ---------------------------------------------------------------- exact Jacobians

def test_bilinear_jacobian_and_consensus():
    J = S.jacobian(bilinear_field(), torch.tensor([0.3, -0.2], dtype=F64))
    assert torch.equal(J, torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64))
    _match(S.eigenvalues(J), [1j, -1j], 1e-14)
    for gamma in (0.1, 1.0, 3.0):
        _match(S.eigenvalues(S.consensus_matrix(J, gamma)), [-gamma + 1j, -gamma - 1j], 1e-12)
    # SimGA diverges for every h; consensus converges for h < 2 gamma / (gamma^2 + 1) (spec Fig. 1)
    assert S.spectral_radius_after_step(S.eigenvalues(J), 1e-3) > 1
    assert S.max_step_size(-1.0 + 1j) == pytest.approx(1.0)


def test_quadratic_game_jacobian_is_exact_and_non_normal():
    field, J_true = quadratic_game()
    x = torch.randn(5, dtype=F64)
    J = S.jacobian(field, x)
    torch.testing.assert_close(J, J_true, rtol=0, atol=1e-13)  # generator block first, same order
    assert (J @ J.T - J.T @ J).abs().max() > 0.1
    _match(S.eigenvalues(J), np.linalg.eigvals(J_true.numpy()), 1e-10)
    assert np.iscomplexobj(S.eigenvalues(J)) and np.abs(S.eigenvalues(J).imag).max() > 0


def test_averaged_jacobian_is_the_mean():
    (f1, J1), (f2, J2) = quadratic_game(1), quadratic_game(2)
    Jm = S.averaged_jacobian([f1, f2], torch.zeros(5, dtype=F64))
    torch.testing.assert_close(Jm, (J1 + J2) / 2)
    with pytest.raises(ValueError, match="at least one"):
        S.averaged_jacobian([], torch.zeros(5, dtype=F64))


def test_regularized_field_jacobian_at_stationary_point_equals_consensus_matrix():
    field, J_true = quadratic_game()
    Jw = S.jacobian(S.regularized_field(field, 0.7), torch.zeros(5, dtype=F64))
    torch.testing.assert_close(Jw, S.consensus_matrix(J_true, 0.7), rtol=0, atol=1e-12)
    # also for the nonlinear game at its stationary point 0 (the Hessian term is multiplied by v = 0)
    field = cubic_field()
    x0 = torch.zeros(4, dtype=F64)
    torch.testing.assert_close(S.jacobian(S.regularized_field(field, 2.0), x0),
                               S.consensus_matrix(S.jacobian(field, x0), 2.0), rtol=0, atol=1e-12)


def test_regularized_field_jacobian_away_from_stationary_point():
    field, gamma = cubic_field(), 0.5
    w = S.regularized_field(field, gamma)
    x = torch.tensor([0.4, -0.3, 0.6, 0.2], dtype=F64)
    Jw = S.jacobian(w, x)
    # central finite differences of w
    eps = 1e-6
    fd = torch.stack([(w(x + eps * e) - w(x - eps * e)) / (2 * eps) for e in torch.eye(4, dtype=F64)], 1)
    torch.testing.assert_close(Jw, fd, rtol=0, atol=1e-7)
    # the closed form J - gamma (J^T J + sum_i v_i Hess v_i)
    J, v = S.jacobian(field, x), field(x)
    hess = torch.stack([torch.func.hessian(lambda y, i=i: field(y)[i])(x) for i in range(4)])
    torch.testing.assert_close(Jw, J - gamma * (J.T @ J + torch.einsum("i,ijk->jk", v, hess)),
                               rtol=0, atol=1e-12)
    # ... which differs from J - gamma J^T J, the paper's approximation (spec D-3)
    assert (Jw - S.consensus_matrix(J, gamma)).abs().max() > 0.1


def test_consensus_matrix_numpy_and_bad_input():
    A = np.array([[1.0, 2.0], [0.0, 3.0]])
    np.testing.assert_allclose(S.consensus_matrix(A, 2.0), A - 2 * A.T @ A)
    with pytest.raises(ValueError, match="square"):
        S.eigenvalues(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        S.eigenvalues(np.array([[np.nan, 0], [0, 1]]))
    with pytest.raises(ValueError, match="flat 1-D"):
        S.jacobian(bilinear_field(), torch.zeros(1, 2))


# ---------------------------------------------------------------- matrix-free operator and ARPACK

@pytest.mark.parametrize("linearize", [True, False])
def test_jvp_operator_matches_jacobian(linearize):
    field = cubic_field()
    x = torch.tensor([0.4, -0.3, 0.6, 0.2], dtype=F64)
    J = S.jacobian(field, x).numpy()
    op = S.jvp_operator(field, x, linearize=linearize)
    assert op.shape == (4, 4) and op.dtype == np.float64
    p = np.array([1.0, -2.0, 0.5, 3.0])
    np.testing.assert_allclose(op.matvec(p), J @ p, atol=1e-12)
    np.testing.assert_allclose(op.rmatvec(p), J.T @ p, atol=1e-12)
    np.testing.assert_allclose(op.matvec(p + 1j * p[::-1]), J @ (p + 1j * p[::-1]), atol=1e-12)


@pytest.fixture(scope="module")
def random_linear_game():
    g = torch.Generator().manual_seed(0)
    n = 200
    A = torch.randn(n, n, generator=g, dtype=F64) / n ** 0.5
    return (lambda x: A @ x), torch.zeros(n, dtype=F64), np.linalg.eigvals(A.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("which, key", [("LM", lambda l: -np.abs(l)), ("LR", lambda l: -l.real),
                                        ("LI", lambda l: -np.abs(l.imag))])
def test_top_eigenvalues_match_numpy(random_linear_game, which, key):
    field, x, ref = random_linear_game
    k = 20
    got = S.top_eigenvalues(field, x, k=k, which=which)
    assert got.shape == (k,) and got.dtype == np.complex128
    want = ref[np.argsort(key(ref), kind="stable")]
    # sorted by the criterion, and the criterion values are numpy's top k
    assert np.all(np.diff(key(got)) >= -1e-12)
    np.testing.assert_allclose(key(got), key(want)[:k], atol=1e-6)
    # every returned value is a true eigenvalue
    assert np.abs(got[:, None] - ref[None, :]).min(axis=1).max() < 1e-6


def test_top_eigenvalues_closest_to_axis_at_stable_point():
    g = torch.Generator().manual_seed(1)
    n = 60
    A = torch.randn(n, n, generator=g, dtype=F64) / n ** 0.5
    A = A - 1.5 * torch.eye(n, dtype=F64)           # all Re < 0: a stable point
    ref = np.linalg.eigvals(A.numpy())
    assert ref.real.max() < 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # no "not a stable point" warning here
        got = S.top_eigenvalues(lambda x: A @ x, torch.zeros(n, dtype=F64), k=6, which="SM_real")
    np.testing.assert_allclose(np.abs(got.real), np.sort(np.abs(ref.real))[:6], atol=1e-8)
    # at an unstable point the same call warns
    with pytest.warns(UserWarning, match="not a stable point"):
        S.top_eigenvalues(lambda x: -A @ x, torch.zeros(n, dtype=F64), k=6, which="SM_real")


def test_top_eigenvalues_bad_arguments():
    field, x = (lambda x: 2 * x), torch.zeros(10, dtype=F64)
    with pytest.raises(ValueError, match="which"):
        S.top_eigenvalues(field, x, k=2, which="XX")
    with pytest.raises(ValueError, match="k < n - 1"):
        S.top_eigenvalues(field, x, k=9)


# ---------------------------------------------------------------- Figure 1 numbers (spec table)

A_B = np.array([[-0.05, 1.0], [-1.0, -0.05]])
A_A = np.zeros((5, 5))
A_A[:2, :2] = [[-1, 0.5], [-0.5, -1]]
A_A[2:4, 2:4] = [[-0.5, 1], [-1, -0.5]]
A_A[4, 4] = -1.5


def test_lemma4_step_size_formula():
    lam = -0.05 + 1j
    assert round(S.max_step_size(lam), 4) == 0.0998
    # |1 + h lam| < 1 exactly for h < h_max (Lemma 4), checked on both sides
    h = S.max_step_size(lam)
    assert abs(1 + 0.999 * h * lam) < 1 < abs(1 + 1.001 * h * lam)
    # Eq. 10 form: (2/|Re|) / (1 + q^2), and h_max = 0 for Re >= 0
    lams = np.array([-0.3 + 2j, -1 - 0.1j, 0.2 + 1j, 3j])
    q = np.abs(lams[:2].imag / lams[:2].real)
    np.testing.assert_allclose(S.max_step_size(lams)[:2], 2 / np.abs(lams[:2].real) / (1 + q ** 2))
    assert list(S.max_step_size(lams)[2:]) == [0.0, 0.0]


def test_figure1_panel_a_and_b_numbers():
    lam_a = S.eigenvalues(A_A)
    _match(lam_a, [-1 + 0.5j, -1 - 0.5j, -0.5 + 1j, -0.5 - 1j, -1.5], 1e-12)
    _match(S.max_step_size(lam_a), [1.6, 1.6, 0.8, 0.8, 4 / 3], 1e-12)
    images = 1 + 0.5 * lam_a
    assert np.abs(images).max() < 1
    _match(np.abs(images), [0.559017, 0.559017, 0.901388, 0.901388, 0.25], 1e-6)

    lam_b = S.eigenvalues(A_B)
    assert round(S.spectral_radius_after_step(lam_b, 0.09), 5) == 0.99956
    assert round(S.spectral_radius_after_step(lam_b, 0.5), 3) == 1.096
    h_best = S.best_step_size(lam_b)
    assert h_best == pytest.approx(0.05 / 1.0025, rel=1e-10)  # closed form -Re / |lam|^2
    assert round(S.spectral_radius_after_step(lam_b, h_best), 5) == 0.99875


def test_figure1_panel_c_consensus_numbers():
    lam_c = S.consensus_eigenvalues(A_B, 1.0)
    _match(lam_c, [-1.0525 + 1j, -1.0525 - 1j], 1e-12)
    assert round(S.max_step_size(lam_c).min(), 4) == 0.9987
    assert round(S.spectral_radius_after_step(lam_c, 0.5), 3) == 0.689
    assert round(S.max_step_size(S.consensus_eigenvalues(A_B, 0.1)).min(), 3) == 0.294
    assert round(S.max_step_size(S.consensus_eigenvalues(A_B, 10.0)).min(), 3) == 0.197
    # A_b is normal, so each lam moves to lam - gamma |lam|^2
    for gamma in (0.1, 1.0, 10.0):
        lam = S.eigenvalues(A_B)
        _match(S.consensus_eigenvalues(A_B, gamma), lam - gamma * np.abs(lam) ** 2, 1e-12)


def test_best_step_size_is_the_minimum():
    rng = np.random.default_rng(0)
    for _ in range(5):
        lams = -rng.uniform(0.05, 2, 7) + 1j * rng.normal(0, 2, 7)
        h = S.best_step_size(lams)
        grid = np.linspace(0, S.max_step_size(lams).min(), 20001)
        assert S.spectral_radius_after_step(lams, h) <= S.spectral_radius_after_step(lams, grid).min() + 1e-12
        assert S.spectral_radius_after_step(lams, h) < 1
    assert S.best_step_size([-1.0, 0.1 + 1j]) == 0.0  # an unstable eigenvalue: no contracting step


# ---------------------------------------------------------------- Lemma 9 (and Lemma 7)

def _random_nsd(rng, n):
    """A with negative semi-definite symmetric part: -M M^T plus a skew part, random scales."""
    M = rng.normal(size=(n, n)) * rng.uniform(0.05, 1)
    G = rng.normal(size=(n, n)) * rng.uniform(0.1, 3)
    return -M @ M.T + (G - G.T)


def test_lemma9_corrected_bound_holds_on_random_matrices():
    rng = np.random.default_rng(0)
    for _ in range(40):
        A = _random_nsd(rng, int(rng.integers(2, 9)))
        c, rho, delta = S.lemma9_constants(A)
        for gamma in (0.0, 0.1, 1.0, 10.0):
            lams = S.consensus_eigenvalues(A, gamma)
            assert S.imag_real_quotient(lams) <= S.lemma9_bound(A, gamma) * (1 + 1e-8) + 1e-12
            # Lemma 7 (via the same identity): Re lam <= -gamma rho^2, so consensus moves everything left
            assert lams.real.max() <= -gamma * rho ** 2 + 1e-9
        # the paper's literal Eq. 18 holds once A is scaled so that ||A - A^T||_2 <= 1
        As = A / delta
        for gamma in (0.1, 1.0, 10.0):
            assert (S.imag_real_quotient(S.consensus_eigenvalues(As, gamma))
                    <= S.lemma9_bound(As, gamma, paper_form=True) * (1 + 1e-8))


def test_lemma9_literal_statement_fails_for_A_b():
    """Erratum: Eq. 18 as printed is violated by the spec's panel-b matrix; the corrected bound is tight."""
    c, rho, delta = S.lemma9_constants(A_B)
    assert c == pytest.approx(0.05) and rho ** 2 == pytest.approx(1.0025) and delta == pytest.approx(2.0)
    q = S.imag_real_quotient(S.consensus_eigenvalues(A_B, 1.0))
    assert q == pytest.approx(1 / 1.0525)
    assert q > S.lemma9_bound(A_B, 1.0, paper_form=True) + 0.4  # 0.950 > 0.487
    assert q == pytest.approx(S.lemma9_bound(A_B, 1.0), rel=1e-10)


def test_lemma9_rejects_bad_matrices():
    with pytest.raises(ValueError, match="negative semi-definite"):
        S.lemma9_bound(np.eye(2), 1.0)
    with pytest.raises(ValueError, match="invertible"):
        S.lemma9_bound(np.array([[0.0, 0.0], [0.0, -1.0]]), 1.0)
    assert S.lemma9_bound(-np.eye(3), 1.0) == 0.0  # symmetric: real spectrum
