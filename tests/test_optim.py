"""Game optimisers and TF-1 RMSProp against hand-derived values (spec 1.2, 1.3; paper Sec. 3-4)."""
import math

import pytest
import torch

from numgan import objectives
from numgan.game import consensus_estimates
from numgan.optim import OPTIMIZERS, AltGA, Clip, ConOpt, SimGA, Smoothing, make_game_optimizer
from numgan.rmsprop import TF1RMSprop



# exact comparisons in float64 (conftest.float64), restored after each test (other modules run in float32)
pytestmark = pytest.mark.usefixtures("float64")

SGD1 = lambda params: torch.optim.SGD(params, lr=1.0)  # noqa: E731  the update is then exactly -direction


def scalars(theta0, phi0):
    return torch.tensor(float(theta0), requires_grad=True), torch.tensor(float(phi0), requires_grad=True)


def bilinear(theta, phi):
    """Generator utility theta*phi, discriminator utility -theta*phi: v = (phi, -theta), v' = [[0,1],[-1,0]]."""
    def closure(need_d=True, need_g=True):
        return (theta * phi if need_d else None), (-theta * phi if need_g else None)
    return closure


def quadratic(theta, phi, a=1.0, b=2.0, c=0.5, d=3.0):
    """L_G = a/2 theta^2 + b theta phi, L_D = c/2 phi^2 - d theta phi (not zero-sum).
    u = (a theta + b phi, c phi - d theta), J_u = [[a, b], [-d, c]]."""
    def closure(need_d=True, need_g=True):
        lg = 0.5 * a * theta ** 2 + b * theta * phi
        ld = 0.5 * c * phi ** 2 - d * theta * phi
        return ld, lg
    return closure


def step_delta(opt_cls, closure_fn, theta0=0.7, phi0=-1.3, **kw):
    theta, phi = scalars(theta0, phi0)
    opt = opt_cls([theta], [phi], optimizer=SGD1, **kw)
    opt.step(closure_fn(theta, phi))
    return theta.item() - theta0, phi.item() - phi0


# ---------------------------------------------------------------- TF-1 RMSProp
def test_tf1_rmsprop_matches_hand_computed_sequence():
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = TF1RMSprop([p], lr=0.1)
    grads = [torch.tensor([0.5, 3.0]), torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 1.0])]
    ms, expected = [1.0, 1.0], [1.0, -2.0]
    for g in grads:
        p.grad = g.clone()
        opt.step()
        for i in range(2):
            ms[i] = 0.9 * ms[i] + 0.1 * g[i].item() ** 2
            expected[i] -= 0.1 * g[i].item() / math.sqrt(ms[i] + 1e-10)
    assert torch.allclose(p.detach(), torch.tensor(expected), atol=1e-12)
    assert torch.allclose(opt.state[p]["square_avg"], torch.tensor(ms), atol=1e-12)


def test_tf1_rmsprop_first_step_is_damped_unlike_torch_default():
    p1 = torch.tensor([0.0], requires_grad=True)
    p2 = torch.tensor([0.0], requires_grad=True)
    o1, o2 = TF1RMSprop([p1], lr=1e-3), torch.optim.RMSprop([p2], lr=1e-3)
    for p, o in ((p1, o1), (p2, o2)):
        p.grad = torch.tensor([1e-3])
        o.step()
    # TF-1: ms = 0.9 + 0.1e-6 -> step ~ lr * g / 0.95 = 1e-6; torch: ms = 0.01 g^2 -> step ~ 10 lr
    assert abs(p1.item()) == pytest.approx(1e-3 * 1e-3 / math.sqrt(0.9 + 1e-7), rel=1e-9)
    assert abs(p2.item()) > 1000 * abs(p1.item())


def test_tf1_rmsprop_state_dict_resume_is_exact():
    torch.manual_seed(0)
    gs = [torch.randn(3) for _ in range(6)]
    a = torch.zeros(3, requires_grad=True)
    oa = TF1RMSprop([a], lr=0.01, momentum=0.5)
    for g in gs:
        a.grad = g.clone()
        oa.step()
    b = torch.zeros(3, requires_grad=True)
    ob = TF1RMSprop([b], lr=0.01, momentum=0.5)
    for g in gs[:3]:
        b.grad = g.clone()
        ob.step()
    state, saved = ob.state_dict(), b.detach().clone()
    c = saved.clone().requires_grad_(True)
    oc = TF1RMSprop([c], lr=0.01, momentum=0.5)
    oc.load_state_dict(state)
    for g in gs[3:]:
        c.grad = g.clone()
        oc.step()
    assert torch.equal(a.detach(), c.detach())


def test_tf1_rmsprop_rejects_bad_settings():
    with pytest.raises(ValueError):
        TF1RMSprop([torch.zeros(1, requires_grad=True)], lr=-1.0)


# ---------------------------------------------------------------- SimGA / ConOpt on a bilinear game
def test_simga_on_bilinear_game_spirals_out_by_sqrt_1_plus_h2():
    h = 0.1
    theta, phi = scalars(1.0, 0.0)
    opt = SimGA([theta], [phi], optimizer=lambda ps: torch.optim.SGD(ps, lr=h))
    closure = bilinear(theta, phi)
    r0 = 1.0
    for _ in range(50):
        opt.step(closure)
    r = math.hypot(theta.item(), phi.item())
    assert r == pytest.approx(r0 * (1 + h * h) ** 25, rel=1e-10)  # |1 + h(+-i)| = sqrt(1+h^2) > 1
    assert r > 1.2


def test_conopt_on_bilinear_game_converges_at_the_predicted_rate():
    h, gamma = 0.1, 1.0
    theta, phi = scalars(1.0, 0.0)
    opt = ConOpt([theta], [phi], optimizer=lambda ps: torch.optim.SGD(ps, lr=h), gamma=gamma)
    closure = bilinear(theta, phi)
    for _ in range(50):
        opt.step(closure)
    r = math.hypot(theta.item(), phi.item())
    rate = math.hypot(1 - h * gamma, h)  # eigenvalues of v' - gamma v'^T v' are -gamma +- i
    assert r == pytest.approx(rate ** 50, rel=1e-10)
    assert r < 0.2


def test_conopt_direction_on_quadratic_game_is_u_plus_gamma_JT_u():
    a, b, c, d, gamma, t, f = 1.0, 2.0, 0.5, 3.0, 0.3, 0.7, -1.3
    u = [a * t + b * f, c * f - d * t]
    jt_u = [a * u[0] - d * u[1], b * u[0] + c * u[1]]  # J_u^T u with J_u = [[a, b], [-d, c]]
    dt, dp = step_delta(ConOpt, quadratic, t, f, gamma=gamma)
    assert dt == pytest.approx(-(u[0] + gamma * jt_u[0]), abs=1e-12)
    assert dp == pytest.approx(-(u[1] + gamma * jt_u[1]), abs=1e-12)


def test_simga_direction_on_quadratic_game_is_own_gradients_only():
    dt, dp = step_delta(SimGA, quadratic, 0.7, -1.3)
    assert dt == pytest.approx(-(0.7 + 2.0 * -1.3), abs=1e-12)
    assert dp == pytest.approx(-(0.5 * -1.3 - 3.0 * 0.7), abs=1e-12)


def test_conopt_does_not_detach_fake_samples():
    """G(z) = theta z, D(x) = phi x: the generator's regulariser gradient includes the path through
    grad_phi L_D; detaching x_f would drop it."""
    theta, phi = scalars(0.5, 0.8)
    z, x_r = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 1.1, -0.4])

    def closure(need_d=True, need_g=True):
        x_f = theta * z
        return objectives.loss_d(phi * x_r, phi * x_f), objectives.loss_g(phi * x_f)

    opt = ConOpt([theta], [phi], optimizer=SGD1, gamma=1.0)
    opt.step(closure)
    # reference: full Jacobian of u(theta, phi) by double autograd on fresh leaves
    t, p = scalars(0.5, 0.8)
    ld, lg = objectives.loss_d(p * x_r, p * t * z), objectives.loss_g(p * t * z)
    ug = torch.autograd.grad(lg, t, create_graph=True)[0]
    ud = torch.autograd.grad(ld, p, create_graph=True)[0]
    reg_t, reg_p = torch.autograd.grad(0.5 * (ug ** 2 + ud ** 2), (t, p), retain_graph=True)
    assert theta.item() == pytest.approx(0.5 - (ug + reg_t).item(), abs=1e-12)
    assert phi.item() == pytest.approx(0.8 - (ud + reg_p).item(), abs=1e-12)
    # and the generator's regulariser really has a part coming through grad_phi L_D
    reg_t_no_d = torch.autograd.grad(0.5 * ug ** 2, t, retain_graph=True)[0]
    assert abs(reg_t.item() - reg_t_no_d.item()) > 1e-3


# ---------------------------------------------------------------- AltGA, smoothing, clipping
def test_altga_updates_discriminator_first_and_generator_sees_new_d():
    h = 0.5
    theta, phi = scalars(1.0, 1.0)
    calls = []

    def closure(need_d=True, need_g=True):
        calls.append((need_d, need_g))
        return theta * phi if need_d else None, -theta * phi if need_g else None

    opt = AltGA([theta], [phi], optimizer=lambda ps: torch.optim.SGD(ps, lr=h))
    opt.step(closure)
    phi1 = 1.0 - h * 1.0            # D: phi <- phi - h dL_D/dphi = phi - h theta
    theta1 = 1.0 + h * phi1         # G uses the updated phi
    assert phi.item() == pytest.approx(phi1) and theta.item() == pytest.approx(theta1)
    assert calls == [(True, False), (False, True)]


def test_altga_step_counts():
    theta, phi = scalars(1.0, 1.0)
    n = []

    def closure(need_d=True, need_g=True):
        n.append(need_d)
        return theta * phi if need_d else None, -theta * phi if need_g else None

    AltGA([theta], [phi], optimizer=SGD1, d_steps=3, g_steps=2).step(closure)
    assert n == [True, True, True, False, False]
    with pytest.raises(ValueError):
        AltGA([theta], [phi], d_steps=0)


def test_smoothing_code_and_paper_variants():
    a, b, c, d, gamma, t, f = 1.0, 2.0, 0.5, 3.0, 0.3, 0.7, -1.3
    ug, ud = a * t + b * f, c * f - d * t
    dt, dp = step_delta(Smoothing, quadratic, t, f, gamma=gamma, variant="code")
    assert dt == pytest.approx(-ug, abs=1e-12)                       # G plain
    assert dp == pytest.approx(-(ud + gamma * b * ug), abs=1e-12)    # D: grad_phi 1/2 (grad_theta L_G)^2
    dt, dp = step_delta(Smoothing, quadratic, t, f, gamma=gamma, variant="paper")
    assert dt == pytest.approx(-ug, abs=1e-12)
    assert dp == pytest.approx(-(ud + gamma * (b * ug + c * ud)), abs=1e-12)  # grad_phi 1/2 ||u||^2
    with pytest.raises(ValueError):
        step_delta(Smoothing, quadratic, variant="nope")


def test_clip_scales_each_player_to_the_global_norm():
    dt, dp = step_delta(Clip, quadratic, 0.7, -1.3, gamma=0.5)
    ug, ud = 0.7 + 2.0 * -1.3, 0.5 * -1.3 - 3.0 * 0.7     # |ug| = 1.9, |ud| = 2.75: both clipped
    assert dt == pytest.approx(-0.5 * math.copysign(1, ug), abs=1e-12)
    assert dp == pytest.approx(-0.5 * math.copysign(1, ud), abs=1e-12)
    dt, dp = step_delta(Clip, quadratic, 0.7, -1.3, gamma=10.0)        # no clipping
    assert dt == pytest.approx(-ug, abs=1e-12) and dp == pytest.approx(-ud, abs=1e-12)


def test_make_game_optimizer_registry_and_errors():
    theta, phi = scalars(0.0, 0.0)
    assert set(OPTIMIZERS) == {"simga", "altga", "conopt", "smooth", "clip"}
    assert isinstance(make_game_optimizer("conopt", [theta], [phi], gamma=2.0), ConOpt)
    with pytest.raises(ValueError, match="unknown game optimizer"):
        make_game_optimizer("adam", [theta], [phi])
    with pytest.raises(ValueError):
        ConOpt([theta], [phi], gamma=-1.0)


def test_any_torch_optimizer_plugs_in_and_state_dict_round_trips():
    theta, phi = scalars(1.0, 0.0)
    opt = ConOpt([theta], [phi], optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01), gamma=1.0)
    opt.step(bilinear(theta, phi))
    state = opt.state_dict()
    assert "both" in state and state["both"]["state"][0]["step"] == 1
    opt.load_state_dict(state)


# ---------------------------------------------------------------- Lemma 15: the bias of the consensus term
def test_lemma15_bias_formula_and_unbiased_estimate():
    torch.manual_seed(0)
    m, sd, B, draws = torch.tensor([0.5, -1.0, 0.2]), torch.tensor([1.0, 0.5, 2.0]), 8, 200_000
    v = m + sd * torch.randn(draws, B, 3)
    biased, unbiased = consensus_estimates(v)
    L, var = 0.5 * (m * m).sum(), (sd * sd).sum()
    se = biased.std() / math.sqrt(draws)
    assert biased.mean() == pytest.approx((L + var / (2 * B)).item(), abs=5 * se.item())   # Eq. 49
    assert unbiased.mean() == pytest.approx(L.item(), abs=5 * unbiased.std().item() / math.sqrt(draws))
    assert biased.mean() - L > 10 * se   # the bias is really there
    with pytest.raises(ValueError):
        consensus_estimates(torch.zeros(1, 3))


def test_unbiased_conopt_removes_the_regulariser_bias():
    """u_phi = xi * phi with E xi = 1, Var xi = s^2: grad 1/2 (E u)^2 = phi, while the plain estimate
    has expectation (1 + s^2) phi. The two-minibatch ConOpt estimate is unbiased. n independent
    copies of the game are stepped at once (phi is a vector, each entry its own noise)."""
    torch.manual_seed(1)
    s, n = 0.8, 200_000
    means = {}
    for unbiased in (False, True):
        theta, phi = torch.zeros(1, requires_grad=True), torch.ones(n, requires_grad=True)

        def closure(need_d=True, need_g=True):
            xi = 1 + s * torch.randn(n)
            return 0.5 * (xi * phi ** 2).sum(), 0.0 * theta.sum()

        ConOpt([theta], [phi], optimizer=SGD1, gamma=1.0, unbiased=unbiased).step(closure)
        step = -(phi.detach() - 1.0)           # = u + gamma * (grad L estimate), E u = 1
        means[unbiased] = (step.mean() - 1.0).item()
    assert means[False] == pytest.approx(1 + s * s, abs=0.02)
    assert means[True] == pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------- objectives
@pytest.mark.parametrize("objective", ["JS", "tv", "indicator"])
def test_zero_sum_objectives_have_opposite_generator_gradients(objective):
    theta = torch.tensor(0.3, requires_grad=True)
    phi = torch.tensor(-0.7, requires_grad=True)
    x_r = torch.tensor([0.2, 1.0])
    d_fake, d_real = phi * theta * torch.tensor([1.0, 2.0]), phi * x_r
    gd = torch.autograd.grad(objectives.loss_d(d_real, d_fake, objective), theta, retain_graph=True)[0]
    gg = torch.autograd.grad(objectives.loss_g(d_fake, objective), theta)[0]
    assert gg.item() == pytest.approx(-gd.item(), abs=1e-12)


def test_objective_values():
    d_real, d_fake = torch.tensor([0.0]), torch.tensor([0.0])
    assert objectives.loss_d(d_real, d_fake).item() == pytest.approx(2 * math.log(2))
    assert objectives.loss_g(torch.tensor([2.0]), "standard").item() == pytest.approx(math.log1p(math.exp(-2)))
    assert objectives.loss_g(torch.tensor([2.0]), "KL").item() == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="unknown GAN objective"):
        objectives.loss_g(d_fake, "wasserstein")


def test_vjp_is_the_gradient_of_the_consensus_term_for_any_layout():
    """game.vjp(u, x, u) = grad_x 1/2 sum_p ||u_p||^2 (double backprop of the definition), for outputs laid out
    contiguous, channels-last, transposed or non-dense; the unbiased form; outputs that are constants."""
    from numgan.game import vjp
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(4, 3, 5, 5, generator=gen, requires_grad=True), torch.randn(6, 7, generator=gen, requires_grad=True),
         torch.randn(9, generator=gen, requires_grad=True)]
    a = torch.randn(8, 6, generator=gen)

    def field(s):   # a nonlinear u(x) with mixed layouts, every output depending on several inputs
        w, m, b = x
        return [(torch.tanh(w) * (1 + s * m.sum())).contiguous(memory_format=torch.channels_last),
                (torch.sin(m) * b[:6, None] * s).t().contiguous().t(), b * b * w.mean() + s,
                (torch.cos(a * m.sum()) * b.sum())[:, ::2]]

    u = field(1.0)
    assert not u[0].is_contiguous() and not u[1].is_contiguous() and not u[3].is_contiguous()
    ref = torch.autograd.grad(0.5 * sum((t * t).sum() for t in u), x, retain_graph=True)
    for got, want in zip(vjp(u, x, u), ref):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
        assert want.abs().max() > 1e-3
    u, u2 = field(1.0), field(-0.7)
    ref = torch.autograd.grad(0.5 * sum((t * o).sum() for t, o in zip(u, u2)), x, retain_graph=True)
    for got, want in zip(vjp(u + u2, x, u2 + u), ref):
        torch.testing.assert_close(0.5 * got, want, rtol=1e-13, atol=1e-15)
    # a constant output (grad_or_zero's zeros) adds nothing; only constants: zeros
    u = field(1.0)
    ref = torch.autograd.grad(0.5 * sum((t * t).sum() for t in u), x, retain_graph=True)
    for g, want in zip(vjp(u + [torch.ones(3)], x, u + [torch.ones(3)]), ref):
        torch.testing.assert_close(g, want, rtol=1e-13, atol=1e-15)
    assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(vjp([torch.ones(3)], x, [torch.ones(3)]), x))
    with pytest.raises(ValueError, match="same shape"):
        vjp(u[1:2], x, [u[1].t()])


def test_directions_reach_the_optimiser_in_the_parameters_layout():
    """GameOptimizer._apply hands p.grad laid out as p (foreach fast path), copying only when it differs."""
    w = torch.nn.Parameter(torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last))
    b = torch.nn.Parameter(torch.randn(4))
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.update({id(p): p.grad for p in self.param_groups[0]["params"]})
            return super().step(closure)

    opt = SimGA([w], [b], optimizer=lambda ps: Spy(ps, lr=1.0))
    same = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    opt._apply([same, torch.randn(4)], opt.params)
    assert seen[id(w)].data_ptr() == same.data_ptr()      # no copy
    nchw = torch.randn(4, 3, 5, 5)
    opt._apply([nchw, torch.randn(4)], opt.params)    # NCHW direction: re-laid out, same values
    assert seen[id(w)].stride() == w.stride() and torch.equal(seen[id(w)], nchw) and w.grad is None
    # TF1RMSprop re-lays a checkpoint's mean squares out as its parameters
    src = torch.nn.Parameter(w.detach().contiguous())
    o1 = TF1RMSprop([src])
    src.grad = torch.randn(4, 3, 5, 5)
    o1.step()
    o2 = TF1RMSprop([w])
    o2.load_state_dict(o1.state_dict())
    sa = o2.state[w]["square_avg"]
    assert sa.stride() == w.stride() and torch.equal(sa, o1.state[src]["square_avg"])


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_joint_losses_equal_the_separate_losses_to_every_order(objective):
    """objectives.joint_losses on stacked logits [real; fake]: loss_d / loss_g's values, gradients (each loss
    alone, as player_gradients takes them), ConOpt-style second derivatives, and third derivatives."""
    gen = torch.Generator().manual_seed(1)
    d = (3 * torch.randn(11, generator=gen)).requires_grad_()
    n_real = 4
    with pytest.raises(ValueError, match="both parts non-empty"):
        objectives.joint_losses(d, 11, objective)
    ld, lg = objectives.joint_losses(d, n_real, objective)
    rd, rg = objectives.loss_d(d[:n_real], d[n_real:], objective), objectives.loss_g(d[n_real:], objective)
    torch.testing.assert_close(torch.stack([ld, lg]), torch.stack([rd, rg]), rtol=1e-14, atol=1e-15)

    def second(pair):   # a ConOpt-like scalar: weighted squared gradients of both losses, differentiated again
        l_d, l_g = pair
        gd, = torch.autograd.grad(l_d, d, create_graph=True)
        gg, = torch.autograd.grad(l_g, d, create_graph=True)
        return gd, gg, (gd.square() * torch.arange(11.0)).sum() + (gg * gd).sum() + gg.square().sum()

    gd, gg, s = second((ld, lg))
    rgd, rgg, rs = second((rd, rg))
    torch.testing.assert_close(gd, rgd, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(gg, rgg, rtol=1e-13, atol=1e-15)
    if objective == "indicator":   # linear in the logits: constant gradients, nothing more to compare
        assert not s.requires_grad and not rs.requires_grad
        return
    h, = torch.autograd.grad(s, d, create_graph=True)
    rh, = torch.autograd.grad(rs, d, create_graph=True)
    torch.testing.assert_close(h, rh, rtol=1e-12, atol=1e-14)
    assert h.abs().max() > 0
    t, = torch.autograd.grad((h * torch.linspace(-1, 1, 11)).sum(), d)
    rt, = torch.autograd.grad((rh * torch.linspace(-1, 1, 11)).sum(), d)
    torch.testing.assert_close(t, rt, rtol=1e-11, atol=1e-13)
