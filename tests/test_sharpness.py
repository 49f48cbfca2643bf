import copy
import itertools
import json
import math

import numpy as np
import pytest
import scipy.optimize
import torch
import xarray as xr

from landscape.curvature.loss import LossFunction
from landscape.analyses.sharpness import SharpnessSettings, sharpness_analysis
from landscape.curvature.sharpness import (
    DEFAULT_STEPS,
    apgd_checkpoints,
    average_case_sharpness,
    first_order_sharpness,
    m_sharpness,
    sharpness_scale,
    trust_region_maximizer,
    worst_case_sharpness,
)

F64 = torch.float64


def _quadratic(n=8, seed=0, eigenvalues=None):
    """L(w) = 1/2 (w - w*)^T A (w - w*) with a known spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.tensor(eigenvalues if eigenvalues is not None else np.geomspace(3.0, 0.1, n), dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    w_star = torch.randn(n, generator=g, dtype=torch.float64)

    def loss(w):
        return 0.5 * (w - w_star) @ a @ (w - w_star)

    def loss_and_grad(w):
        return loss(w), a @ (w - w_star)

    return a, w_star, loss, loss_and_grad


def _trust_region_maximum(g, a, rho):
    """max_{||u|| <= rho} g^T u + 1/2 u^T A u for PSD A: u = (mu I - A)^{-1} g on the sphere, mu > lambda_max."""
    lam, v = np.linalg.eigh(a)
    gt = v.T @ g
    radius = lambda mu: np.linalg.norm(gt / (mu - lam)) - rho  # noqa: E731
    mu = scipy.optimize.brentq(radius, lam[-1] + 1e-12, lam[-1] + 1e8, xtol=1e-14, rtol=1e-15)
    u = v @ (gt / (mu - lam))
    return g @ u + 0.5 * u @ a @ u


def test_worst_case_l2_at_a_minimum_is_half_rho_squared_lambda_max():
    a, w_star, _, loss_and_grad = _quadratic()
    result = worst_case_sharpness(loss_and_grad, w_star, 0.1, p="2", steps=60)
    assert result.sharpness == pytest.approx(0.1**2 * 3.0 / 2, rel=1e-10)
    assert torch.linalg.vector_norm(result.delta) == pytest.approx(0.1, rel=1e-12)


def test_worst_case_l2_away_from_the_minimum_solves_the_trust_region_problem():
    a, w_star, _, loss_and_grad = _quadratic(seed=1)
    w = w_star + 0.3 * torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = (a @ (w - w_star)).numpy()
    for rho in (0.05, 0.5):
        exact = _trust_region_maximum(g, a.numpy(), rho)
        result = worst_case_sharpness(loss_and_grad, w, rho, p="2", steps=60)
        assert result.sharpness == pytest.approx(exact, rel=1e-10)
        assert result.sharpness > result.sam_sharpness  # more steps than SAM's single one find a higher loss


def test_first_step_is_the_sam_perturbation():
    a, w_star, loss, loss_and_grad = _quadratic(seed=2)
    w = w_star + torch.ones(8, dtype=F64)
    g = a @ (w - w_star)
    for rho in (0.01, 0.2):
        sam = float(loss(w + rho * g / g.norm()) - loss(w))
        assert worst_case_sharpness(loss_and_grad, w, rho, steps=1).sam_sharpness == pytest.approx(sam, rel=1e-12)


def test_adaptive_linf_on_a_separable_quadratic_is_the_corner_value():
    # L = sum_i g_i x_i + a_i x_i^2 / 2 with x = delta: each coordinate is maximised at x_i = rho c_i sign(g_i).
    n = 6
    gen = torch.Generator().manual_seed(3)
    diag, w = torch.rand(n, generator=gen, dtype=F64) + 0.5, torch.randn(n, generator=gen, dtype=F64)
    b = torch.randn(n, generator=gen, dtype=F64)

    def loss_and_grad(v):
        return b @ v + 0.5 * (diag * v) @ v, b + diag * v

    c = sharpness_scale(w, adaptive=True, eta=0.1)
    g = b + diag * w
    exact = float((0.2 * c * g.abs() + 0.5 * diag * (0.2 * c) ** 2).sum())
    result = worst_case_sharpness(loss_and_grad, w, 0.2, p="inf", scale=c, steps=10)
    assert result.sharpness == pytest.approx(exact, rel=1e-12)


def test_linf_ascent_stays_in_the_box_and_never_beats_the_best_vertex():
    # A convex quadratic attains its maximum over a box at a vertex: enumerate all 2^6 of them. Sign ascent is a
    # local method, so its value lies between the first (SAM) vertex and the global best vertex.
    a, w_star, loss, loss_and_grad = _quadratic(n=6, seed=4, eigenvalues=[2.0, 1.0, 0.8, 0.5, 0.3, 0.1])
    w = w_star + 0.05 * torch.ones(6, dtype=F64)
    rho = 0.3
    vertices = [rho * torch.tensor(s, dtype=F64) for s in itertools.product((-1.0, 1.0), repeat=6)]
    best = max(float(loss(w + v) - loss(w)) for v in vertices)
    result = worst_case_sharpness(loss_and_grad, w, rho, p="inf", steps=30)
    assert float(result.delta.abs().max()) <= rho
    assert result.sam_sharpness <= result.sharpness <= best
    assert result.sharpness == pytest.approx(float(loss(w + result.delta) - loss(w)), rel=1e-12)


@pytest.mark.parametrize("p", ["2", "inf"])
def test_for_a_linear_loss_worst_case_equals_the_first_order_estimate(p):
    gen = torch.Generator().manual_seed(6)
    b, w = torch.randn(10, generator=gen, dtype=F64), torch.randn(10, generator=gen, dtype=F64)
    c = sharpness_scale(w, adaptive=True, eta=0.01)
    first = first_order_sharpness(b, 0.1, p=p, scale=c)
    expected = 0.1 * float((c * b).norm() if p == "2" else (c * b).abs().sum())
    assert first == pytest.approx(expected, rel=1e-14)
    result = worst_case_sharpness(lambda v: (b @ v, b.clone()), w, 0.1, p=p, scale=c, steps=5)
    assert result.sharpness == pytest.approx(expected, rel=1e-12)


def test_average_case_matches_half_rho_squared_trace_of_c_a_c():
    a, w_star, loss, _ = _quadratic(seed=7)
    w = w_star + 0.5 * torch.ones(8, dtype=F64)  # away from the minimum: antithetic pairs cancel the gradient term
    c = sharpness_scale(w, adaptive=True, eta=0.1)
    rho, samples = 0.3, 4000
    exact = 0.5 * rho**2 * float((torch.diag(a) * c**2).sum())
    mean, stderr = average_case_sharpness(loss, w, rho, scale=c, draws=samples, seed=0)
    assert abs(mean - exact) < 4 * stderr
    # each pair mean is z^T M z / 2 with M = rho^2 C A C, whose variance is tr(M^2) / 2
    m = rho**2 * torch.diag(c) @ a @ torch.diag(c)
    assert stderr == pytest.approx(math.sqrt(0.5 * float(torch.trace(m @ m)) / samples), rel=0.1)
    assert average_case_sharpness(loss, w, rho, scale=c, draws=5, seed=1) == average_case_sharpness(
        loss, w, rho, scale=c, draws=5, seed=1)


def test_m_sharpness_averages_the_per_batch_maxima():
    batches = [_quadratic(seed=s, eigenvalues=[top, 0.4 * top, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1])
               for s, top in ((8, 1.0), (9, 4.0))]
    shared_w = torch.zeros(8, dtype=F64)
    closures = []
    for a, w_star, loss, _ in batches:
        # every batch has its minimum at the shared point, so each maximum is rho^2 lambda_max / 2
        closures.append((lambda v, a=a: (0.5 * v @ a @ v, a @ v), None))
    mean, stderr = m_sharpness(closures, shared_w, 0.1, steps=60)
    assert mean == pytest.approx(0.5 * 0.01 * (1.0 + 4.0) / 2, rel=1e-9)
    assert stderr == pytest.approx(0.5 * 0.01 * 1.5, rel=1e-9)


# -- the search against the exact trust-region maximum -----------------------------------------------------------
def _indefinite_quadratic(n, condition, seed):
    """g, H with eigenvalue magnitudes log-uniform in [1, condition] (both ends present) and random signs."""
    r = np.random.default_rng(seed)
    magnitudes = np.exp(r.uniform(0, math.log(condition), n))
    magnitudes[:2] = 1.0, condition
    q, _ = np.linalg.qr(r.standard_normal((n, n)))
    h = q @ np.diag(magnitudes * r.choice([-1.0, 1.0], n)) @ q.T
    g = r.standard_normal(n) * 10 ** r.uniform(-3, 2)
    return g, h, 10 ** r.uniform(-2, 0.5)


def _quadratic_value(g, h, u):
    return float(g @ u + 0.5 * u @ h @ u)


def _search_quadratic(g, h, rho, **kwargs):
    gt, ht = torch.tensor(g), torch.tensor(h)
    return worst_case_sharpness(lambda u: (gt @ u + 0.5 * u @ ht @ u, gt + ht @ u), torch.zeros(len(g), dtype=F64),
                                rho, **kwargs)


def test_trust_region_maximizer_beats_every_point_of_a_fine_polar_grid_in_2d():
    for seed in range(6):
        r = np.random.default_rng(seed)
        h = np.diag(r.uniform(-3, 3, 2)) if seed % 2 else r.standard_normal((2, 2)) * 2
        h = 0.5 * (h + h.T)
        g = r.standard_normal(2) * (0.0 if seed == 4 else 1.0)
        rho = 0.7
        u = trust_region_maximizer(g, h, rho)
        radius, angle = np.meshgrid(np.linspace(0, rho, 400), np.linspace(0, 2 * np.pi, 1441))
        points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1).reshape(-1, 2)
        grid_best = np.max(points @ g + 0.5 * np.einsum("ni,ij,nj->n", points, h, points))
        assert np.linalg.norm(u) <= rho * (1 + 1e-12)
        assert grid_best - 1e-12 <= _quadratic_value(g, h, u) <= grid_best + 1e-4 * (1 + abs(grid_best))


def test_trust_region_maximizer_in_the_hard_case_fills_the_radius_with_the_top_eigenvector():
    # g has no component on the top eigenvector e1 and (mu I - H)^{-1} g at mu = lambda_max is inside the ball.
    h, g, rho = np.diag([3.0, 1.0, -2.0]), np.array([0.0, 1.0, 0.5]), 1.0
    u = trust_region_maximizer(g, h, rho)
    rest = np.array([0.0, 1.0 / 2.0, 0.5 / 5.0])
    expected = _quadratic_value(g, h, rest + np.array([math.sqrt(1 - rest @ rest), 0, 0]))
    assert _quadratic_value(g, h, u) == pytest.approx(expected, rel=1e-12)
    assert np.linalg.norm(u) == pytest.approx(rho, rel=1e-12)


def test_trust_region_maximizer_stays_inside_for_a_concave_quadratic_with_an_inner_maximum():
    h, g = -np.diag([4.0, 1.0]), np.array([0.4, 0.2])
    np.testing.assert_allclose(trust_region_maximizer(g, h, 1.0), [0.1, 0.2], rtol=1e-14)


@pytest.mark.parametrize("n", [10, 50, 200])
@pytest.mark.parametrize("condition", [1e2, 1e3, 1e4])
def test_default_steps_reach_99_percent_of_the_exact_maximum_on_indefinite_quadratics(n, condition):
    for seed in range(2):
        g, h, rho = _indefinite_quadratic(n, condition, seed=1000 * n + int(math.log10(condition)) * 10 + seed)
        exact = _quadratic_value(g, h, trust_region_maximizer(g, h, rho))
        result = _search_quadratic(g, h, rho, seed=seed)
        assert result.iterations == DEFAULT_STEPS
        assert 0.99 * exact <= result.sharpness <= exact * (1 + 1e-9)
        assert _quadratic_value(g, h, result.delta.numpy()) == pytest.approx(result.sharpness, rel=1e-9)
        assert float(result.delta.norm()) <= rho * (1 + 1e-12)


@pytest.mark.parametrize("rho, at_least", [(0.1, 6.049e-3), (1.0, 0.510)])
def test_strong_negative_curvature_next_to_the_gradient_does_not_trap_the_search(rho, at_least):
    # L(d) = g.d + d^T diag(-100, 1) d / 2: projected ascent with a constant step of length rho 2-cycles along e1
    # (9.1e-5 at rho = 0.1); the maximum lies almost along e2 (6.0495e-3 at rho = 0.1, 0.51005 at rho = 1).
    g, h = np.array([0.1, 0.01]), np.diag([-100.0, 1.0])
    exact = _quadratic_value(g, h, trust_region_maximizer(g, h, rho))
    assert exact >= at_least
    for p_steps in (DEFAULT_STEPS, 4):
        result = _search_quadratic(g, h, rho, steps=p_steps)
        assert result.sharpness >= 0.99 * exact


def test_adaptive_l2_search_reaches_the_maximum_over_the_ellipsoid():
    # In u = delta / c the ellipsoid ||delta / c||_2 <= rho is a ball and the loss g.(c u) + (c u)^T H (c u) / 2 a
    # quadratic with gradient c g and Hessian C H C: its exact maximum is the trust-region one of (c g, C H C).
    g, h, rho = _indefinite_quadratic(30, 1e3, seed=11)
    w = np.random.default_rng(3).standard_normal(30)
    c = np.abs(w) + 0.05
    exact = _quadratic_value(c * g, c[:, None] * h * c[None, :], trust_region_maximizer(c * g, c[:, None] * h * c[None, :], rho))
    gt, ht, wt = torch.tensor(g), torch.tensor(h), torch.tensor(w)

    def loss_and_grad(v):
        d = v - wt
        return gt @ d + 0.5 * d @ ht @ d, gt + ht @ d

    result = worst_case_sharpness(loss_and_grad, wt, rho, scale=torch.tensor(c))
    assert 0.99 * exact <= result.sharpness <= exact * (1 + 1e-9)
    assert float((result.delta / torch.tensor(c)).norm()) <= rho * (1 + 1e-12)


def test_linf_search_climbs_past_the_sam_vertex_toward_the_best_vertex_of_a_convex_quadratic():
    # The maximum of a convex quadratic over a box is NP-hard in general: no 99% claim for p = inf (95% here).
    a, w_star, loss, loss_and_grad = _quadratic(n=10, seed=12, eigenvalues=np.geomspace(5.0, 0.05, 10))
    w = w_star + 0.02 * torch.randn(10, generator=torch.Generator().manual_seed(1), dtype=F64)
    rho = 0.3
    vertices = torch.tensor(list(itertools.product((-rho, rho), repeat=10)), dtype=F64)
    d = vertices + (w - w_star)
    best = float((0.5 * torch.einsum("ni,ij,nj->n", d, a, d)).max() - loss(w))
    result = worst_case_sharpness(loss_and_grad, w, rho, p="inf")
    assert result.sam_sharpness < result.sharpness <= best * (1 + 1e-12)
    assert result.sharpness >= 0.95 * best


def _tanh_mlp(seed):
    """A 3-3-2 tanh MLP under cross-entropy on 16 points: w0, loss_and_grad in torch and in numpy, the data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g, dtype=F64)
    y = torch.randint(0, 2, (16,), generator=g)
    w0 = 0.5 * torch.randn(20, generator=g, dtype=F64)
    xn, onehot = x.numpy(), np.eye(2)[y.numpy()]

    def numpy_loss_and_grad(w):  # by hand, so that 60 L-BFGS-B runs take a second
        w1, b1, w2, b2 = w[:9].reshape(3, 3), w[9:12], w[12:18].reshape(2, 3), w[18:20]
        h = np.tanh(xn @ w1.T + b1)
        z = h @ w2.T + b2
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        dz = (np.exp(logp) - onehot) / len(xn)
        dh = (dz @ w2) * (1 - h ** 2)
        grad = np.concatenate([(dh.T @ xn).ravel(), dh.sum(0), (dz.T @ h).ravel(), dz.sum(0)])
        return float(-(onehot * logp).sum() / len(xn)), grad

    def loss_and_grad(w):
        loss, grad = numpy_loss_and_grad(w.numpy())
        return loss, torch.from_numpy(grad)

    return w0, loss_and_grad, numpy_loss_and_grad, (x, y)


def test_linf_search_on_a_small_mlp_finds_a_local_maximum_that_restarts_raise():
    # The README's example (section on sharpness) of why p = inf values are compared at equal settings: the numbers
    # it quotes are the ones asserted here.
    w0, loss_and_grad, numpy_loss_and_grad, inputs = _tanh_mlp(5)
    rho = 1.0
    loss0 = numpy_loss_and_grad(w0.numpy())[0]
    w1, b1, w2, b2 = w0[:9].view(3, 3), w0[9:12], w0[12:18].view(2, 3), w0[18:20]
    x, y = inputs
    assert loss0 == pytest.approx(float(torch.nn.functional.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)),
                                  rel=1e-12)  # the hand-written loss and gradient are right
    numeric = scipy.optimize.approx_fprime(w0.numpy(), lambda v: numpy_loss_and_grad(v)[0], 1e-7)
    np.testing.assert_allclose(numpy_loss_and_grad(w0.numpy())[1], numeric, atol=1e-6)
    rng = np.random.default_rng(0)
    box = []
    for _ in range(60):
        start = w0.numpy() + rng.uniform(-rho, rho, 20)
        found = scipy.optimize.minimize(lambda v: tuple(-t for t in numpy_loss_and_grad(v)), start, jac=True,
                                        method="L-BFGS-B", bounds=[(float(c) - rho, float(c) + rho) for c in w0])
        box.append(-found.fun - loss0)
    best = max(box)
    default = worst_case_sharpness(loss_and_grad, w0, rho, p="inf")
    restarted = worst_case_sharpness(loss_and_grad, w0, rho, p="inf", restarts=4)
    assert float(default.delta.abs().max()) <= rho and float(restarted.delta.abs().max()) <= rho
    assert default.sharpness < 0.85 * best  # a local maximum, well below the box's best
    assert default.sharpness < restarted.sharpness <= best * (1 + 1e-9)
    assert (round(default.sharpness, 2), round(best, 2), round(restarted.sharpness, 2)) == (3.71, 4.57, 4.51)


def test_results_record_iterations_restarts_and_whether_the_loss_was_still_rising():
    g, h, rho = _indefinite_quadratic(20, 1e2, seed=5)
    converged = _search_quadratic(g, h, rho, restarts=2, random_start=True, seed=1)
    assert converged.restarts == 2 and converged.iterations == 3 * DEFAULT_STEPS + 1  # + the Krylov maximiser
    assert not converged.still_rising
    assert len(converged.rises) == converged.iterations
    # a concave bowl whose top lies inside the box: sign steps halve toward it, and 10 steps are not enough
    top = torch.tensor([0.013, -0.021, 0.007], dtype=F64)
    rising = worst_case_sharpness(lambda u: (-0.5 * ((u - top) ** 2).sum(), -(u - top)), torch.zeros(3, dtype=F64),
                                  0.1, p="inf", steps=10)
    assert rising.still_rising and rising.iterations == 10
    again = worst_case_sharpness(lambda u: (-0.5 * ((u - top) ** 2).sum(), -(u - top)), torch.zeros(3, dtype=F64),
                                 0.1, p="inf", steps=200)
    assert not again.still_rising and again.sharpness > rising.sharpness


def test_random_starts_are_seeded():
    g, h, rho = _indefinite_quadratic(10, 1e2, seed=6)
    a = _search_quadratic(g, h, rho, p="inf", restarts=1, random_start=True, seed=3, steps=12)
    b = _search_quadratic(g, h, rho, p="inf", restarts=1, random_start=True, seed=3, steps=12)
    assert a.rises == b.rises and torch.equal(a.delta, b.delta)


def test_default_search_settings_are_left_out_of_the_stored_settings():
    assert not {"restarts", "random_start"} & set(SharpnessSettings().determining())
    assert SharpnessSettings(restarts=2).determining()["restarts"] == 2


def test_apgd_checkpoints_follow_croce_and_hein():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


# -- on networks ----------------------------------------------------------------------------------------------------
def _relu_mlp_and_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)).double()
    x = torch.randn(64, 5, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (64,), generator=gen)
    return model, x, y


def _rescaled(model, a):
    """Layer 1 (weight and bias) times a > 0, layer 2's weight times 1/a: the same function (ReLU is 1-homogeneous)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(a)
        other[0].bias.mul_(a)
        other[2].weight.div_(a)
    return other


@pytest.mark.parametrize("p", ["2", "inf"])
def test_adaptive_sharpness_is_invariant_to_relu_rescaling_while_plain_sharpness_is_not(p):
    # Dinh et al. 2017: w -> T w with T = diag(a, .., 1/a, ..) keeps L; with c = |w| the ball {c u : ||u||_p <= rho}
    # maps onto itself under T, and L(Tw + Tc u) = L(w + c u) makes the whole ascent identical in u.
    model, x, y = _relu_mlp_and_data()
    other = _rescaled(model, 8.0)
    common = dict(rhos=(0.05, 0.3), p=p, steps=4, m=32, draws=3, batch_size=24)
    adaptive = SharpnessSettings(adaptive=True, eta=0.0, **common)
    a, b = sharpness_analysis(model, x, y, adaptive), sharpness_analysis(other, x, y, adaptive)
    assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-12)
    for name in ("worst_case", "sam", "first_order", "average_case", "m_sharpness"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-8, err_msg=name)
    plain = SharpnessSettings(adaptive=False, **common)
    a, b = sharpness_analysis(model, x, y, plain), sharpness_analysis(other, x, y, plain)
    for name in ("worst_case", "first_order", "average_case"):
        assert np.all(np.abs(b[name].values / a[name].values - 1) > 0.1), name


def test_sharpness_analysis_agrees_with_its_definitions_on_a_network():
    model, x, y = _relu_mlp_and_data(seed=1)
    settings = SharpnessSettings(rhos=(0.1,), steps=3, m=64, draws=0, batch_size=16)
    ds = sharpness_analysis(model, x, y, settings)
    closure = LossFunction(model, x, y)
    loss, grad = closure.loss_and_gradient()
    assert float(ds["loss"]) == pytest.approx(loss, rel=1e-12)
    assert float(ds["first_order"].sel(rho=0.1)) == pytest.approx(0.1 * float(grad.norm()), rel=1e-10)
    sam = closure.loss(closure.parameter_vector() + 0.1 * grad / grad.norm()) - loss
    assert float(ds["sam"].sel(rho=0.1)) == pytest.approx(sam, rel=1e-9)
    # one batch of m = all examples: m-sharpness is the worst case on the whole set
    assert float(ds["m_sharpness"].sel(rho=0.1)) == pytest.approx(float(ds["worst_case"].sel(rho=0.1)), rel=1e-10)
    assert "average_case" not in ds and int(ds["m_batches"]) == 1
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    sharpness_analysis(model, x, y, settings)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())  # the model is never modified


def test_cli_sharpness_writes_a_resumable_file(tmp_path):
    from click.testing import CliRunner

    from landscape.checkpoints import save_checkpoint
    from landscape.cli import cli
    from landscape.models import create_model
    from landscape.runs import Run

    kwargs = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    run = Run.create(tmp_path / "run")
    run.save_config({"model": {"name": "vit_tiny_patch16_224", "kwargs": kwargs}, "data": {"name": "digits"},
                     "seed": 0})
    model = create_model("vit_tiny_patch16_224", **kwargs)
    for epoch in (1, 2):
        save_checkpoint(run.checkpoint_path(epoch=epoch), model.state_dict(), model="vit_tiny_patch16_224",
                        model_kwargs=kwargs, epoch=epoch, step=epoch)
    args = ["analyze", "sharpness", str(run.root), "--rho", "0.01,0.1", "--steps", "2", "--samples", "32",
            "--draws", "2", "--m", "16", "--adaptive"]
    result = CliRunner().invoke(cli, args + ["--checkpoints", "last"])
    assert result.exit_code == 0, result.output
    ds = xr.open_dataset(run.analysis_path("sharpness-adaptive"), engine="h5netcdf")
    assert ds["worst_case"].dims == ("checkpoint", "rho") and list(ds["rho"].values) == [0.01, 0.1]
    settings = json.loads(ds.attrs["settings"])
    assert settings["adaptive"] and settings["m"] == 16 and settings["p"] == "2"
    assert "torch" in ds.attrs["library_versions"]
    seconds = float(ds["seconds"].sel(checkpoint="epoch-0002"))
    ds.close()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    with xr.open_dataset(run.analysis_path("sharpness-adaptive"), engine="h5netcdf") as ds:
        assert list(ds["checkpoint"].values) == ["epoch-0001", "epoch-0002"]
        assert float(ds["seconds"].sel(checkpoint="epoch-0002")) == seconds  # finished checkpoints are skipped
    result = CliRunner().invoke(cli, args + ["--p", "inf"])
    assert result.exit_code == 1 and "other settings" in result.output
    result = CliRunner().invoke(cli, ["analyze", "sharpness", str(run.root), "--rho", "-0.1"])
    assert result.exit_code == 1 and "--rho must be positive" in result.output


def test_eta_without_adaptive_is_refused_since_plain_sharpness_has_no_scale_to_offset():
    from landscape.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--eta 5 offsets the adaptive scale \|w\| \+ eta, which plain sharpness "
                                          r"does not use; add --adaptive"):
        SharpnessSettings(eta=5.0)
    assert SharpnessSettings(adaptive=True, eta=5.0).eta == 5.0


@pytest.mark.parametrize("p", ["2", "inf"])
def test_a_perturbation_that_overflows_the_model_is_one_sentence_not_a_nan_result(p):
    # a radius of 1e6 or an adaptive eta of 1e30 overflowed float32 logits: a traceback from scipy's brentq (NaN),
    # or a NaN average-case sharpness saved as the measure
    from landscape.errors import LandscapeError

    w = torch.ones(4, dtype=torch.float32)

    def loss(v):
        return torch.exp(v.sum())  # finite at w, infinite a long way off

    def loss_and_grad(v):
        value = loss(v)
        return value, value * torch.ones_like(v)

    assert math.isfinite(float(loss(w)))
    with pytest.raises(LandscapeError, match="is not finite at a perturbation of norm .* give a smaller radius"):
        worst_case_sharpness(loss_and_grad, w, 1e6, p=p, steps=4, loss_fn=loss)
    with pytest.raises(LandscapeError, match=r"not finite at a perturbation of norm .* \(radius 1e\+06\)"):
        average_case_sharpness(loss, w, 1e6, draws=2)
    assert math.isfinite(average_case_sharpness(loss, w, 1e-3, draws=2)[0])


def test_the_table_says_when_a_sharpness_is_below_the_losss_rounding():
    # at --rho 1e-12 the float32 worst case came out 0 and the average case negative, with nothing said
    import landscape as ls
    from landscape.analyses.sharpness import sharpness_summary
    from tiny_models import data, tiny_mlp

    def table(rho, dtype=torch.float32):
        ds = ls.sharpness(model.to(dtype), (x.to(dtype), y), rho=rho, steps=3, draws=2)
        ds = ds.expand_dims(checkpoint=["epoch-0001"]).assign(epoch=("checkpoint", [1]))  # as a run's file holds it
        return {row["rho"]: row for row in sharpness_summary(ds)}

    x, y = data(16)
    model = tiny_mlp()
    rows = table(rho=[1e-12, 0.05])
    assert "below the loss's float32 rounding" in rows[1e-12]["note"] and "--dtype float64" in rows[1e-12]["note"]
    assert "rounding" not in rows[0.05].get("note", "")
    exact = table(rho=[1e-12], dtype=torch.float64)
    assert "rounding" not in exact[1e-12].get("note", "")  # float64 resolves it: the first-order rise is 1e-12 |g|
    assert exact[1e-12]["worst_case"] == pytest.approx(exact[1e-12]["first_order"], rel=1e-2)
