"""Sharpness: how much the loss can rise within a small neighbourhood of the weights.

For weights :math:`w \\in \\mathbb{R}^n`, a loss :math:`L` (the mean over the fixed analysis subset), a radius
:math:`\\rho` and a per-coordinate scale :math:`c \\in \\mathbb{R}^n_{>0}`:

- **worst-case sharpness** :math:`S_p(\\rho) = \\max_{\\|\\delta / c\\|_p \\le \\rho} L(w + \\delta) - L(w)` for
  :math:`p \\in \\{2, \\infty\\}`, with :math:`c = 1` (SAM, Foret et al. 2021) or :math:`c = |w| + \\eta`
  (adaptive sharpness, Kwon et al. 2021; with :math:`\\eta = 0` it is invariant to the rescalings
  :math:`w \\mapsto T w` by positive diagonal :math:`T` that leave the network function unchanged, e.g. a ReLU layer
  scaled by :math:`a` and the next by :math:`1/a`, Dinh et al. 2017);
- **m-sharpness**: the same maximum taken separately on consecutive batches of :math:`m` examples of the subset and
  averaged (Foret et al. 2021; Andriushchenko et al. 2023);
- **average-case sharpness** :math:`E_{\\delta \\sim N(0, \\rho^2 \\operatorname{diag}(c^2))} [L(w + \\delta) - L(w)]`,
  a Monte Carlo mean with its standard error;
- the **first-order estimate** :math:`\\rho \\|c \\odot g\\|_q` with :math:`g = \\nabla L(w)` and :math:`q` the dual
  exponent (:math:`q = 2` for :math:`p = 2`, :math:`q = 1` for :math:`p = \\infty`): the exact maximum of the
  linearised loss over the ball; for :math:`c = 1, p = 2` it is SAM's :math:`\\rho \\|g\\|`.

The maximum is searched in the scaled coordinates :math:`u = \\delta / c`, where the ball is a plain ball
:math:`\\|u\\|_p \\le \\rho` (so the adaptive :math:`\\ell_2` ball, an ellipsoid in :math:`\\delta`, is handled
exactly: projecting :math:`u` onto the sphere is the exact projection onto the ellipsoid in the metric
:math:`\\|\\delta / c\\|_2`), on :math:`f(u) = L(w + c \\odot u)`, whose gradient is :math:`c \\odot \\nabla L(w + c
\\odot u)`. Each evaluated point costs one gradient over the subset; ``steps`` points in all (default 40, about
40 gradients per radius), plus ``steps`` per restart:

- :math:`p = 2`, first half of the steps: a **secant Lanczos trust-region model** (in the spirit of GLTR, Gould,
  Lucidi, Roma & Toint 1999). Starting from :math:`v_1 = \\nabla f(0) / \\|\\nabla f(0)\\|`, each step evaluates the
  gradient at :math:`\\rho v_j` on the sphere, takes :math:`(\\nabla f(\\rho v_j) - \\nabla f(0)) / \\rho` as the
  curvature product :math:`H v_j` (exact for a quadratic loss, a secant average of the Hessian over the ball
  otherwise) and extends an orthonormal Krylov basis :math:`V` (full reorthogonalisation; a seeded random vector
  where the space is exhausted, which also covers :math:`\\nabla f(0) = 0` and the hard case). The quadratic model
  :math:`\\max_{\\|y\\| \\le \\rho} (V g)^\\top y + \\tfrac12 y^\\top (V H V^\\top) y` is solved exactly
  (:func:`trust_region_maximizer`: eigendecomposition and the secular equation). The first point,
  :math:`\\rho v_1`, is SAM's perturbation :math:`\\delta = \\rho c^2 g / \\|c g\\|_2`, so ``steps=1`` measures SAM
  alone.
- then **Auto-PGD** (Croce & Hein 2020, the search of Andriushchenko et al. 2023) from the model's maximiser, and for
  :math:`p = \\infty` from :math:`u_0 = 0` for all the steps: step :math:`\\eta_0 = 2\\rho` along
  :math:`\\nabla f / \\|\\nabla f\\|_2` (:math:`p = 2`) or :math:`\\operatorname{sign} \\nabla f` (:math:`p =
  \\infty`), projected, with momentum :math:`u_{k+1} = \\Pi(u_k + \\alpha (z_{k+1} - u_k) + (1 - \\alpha)(u_k -
  u_{k-1}))`, :math:`\\alpha = 0.75`; at the checkpoints :func:`apgd_checkpoints` the step is halved and the search
  restarts from the best point when fewer than 75% of the steps since the last checkpoint raised the loss, or
  when neither the step nor the best value changed. From :math:`u_0 = 0` at :math:`p = \\infty` the first point is
  SAM's :math:`\\rho c \\operatorname{sign}(g)`. ``random_start`` starts Auto-PGD from a uniform point of the ball
  (box); ``restarts`` adds runs of ``steps`` points from further random points.
- the result is the largest :math:`L(w + c \\odot u) - L(w)` over every evaluated point and :math:`u = 0` (never
  negative): a lower bound of the true maximum. On quadratics :math:`g^\\top u + \\tfrac12 u^\\top H u` the exact
  maximum over the :math:`\\ell_2` ball is known (:func:`trust_region_maximizer`); the default 40 steps reach at
  least 99% of it on random indefinite quadratics of dimension 10 to 200 with condition numbers up to
  :math:`10^4` (``tests/test_sharpness.py``), where plain projected ascent with a constant step can cycle far
  below it. No first-order method is guaranteed to find the global maximum of a non-convex loss; the results
  record the points evaluated (``worst_case_iterations``), the restarts, and whether the best value was still
  rising over the last tenth of the steps (``worst_case_still_rising``: then raise ``--steps``).

Definition next to Andriushchenko et al. (2023), "A modern look at the relationship between sharpness and
generalization". Both maximise the rise of the training loss :math:`L(w + \\delta) - L(w)` over
:math:`\\|\\delta / c\\|_p \\le \\rho` with :math:`c = |w|` (their adaptive, "elementwise" scaling; ours adds
:math:`\\eta`, 0 by default) or :math:`c = 1`, for :math:`p \\in \\{2, \\infty\\}`, by Auto-PGD. Where ours differs:
their worst case is an m-sharpness, the maximum taken separately on batches of :math:`m` examples and averaged,
while ``worst_case`` here maximises the mean loss of the whole evaluation subset at once (their definition is
``m_sharpness``, with ``--m``); our :math:`\\ell_2` search adds the Krylov phase before Auto-PGD; and our average case
is always Gaussian, :math:`\\delta \\sim N(0, \\rho^2 \\operatorname{diag}(c^2))` whatever ``p`` (``--p`` changes the
worst case only, so ``average_case`` at :math:`p = \\infty` is not an average over the box).

Average-case sharpness uses antithetic pairs: each draw :math:`z \\sim N(0, I)` is evaluated at
:math:`\\delta = \\pm \\rho c \\odot z`, which cancels the first-order term :math:`g^\\top \\delta` exactly and leaves
an unbiased estimate; the standard error is the sample standard deviation of the pair means over
:math:`\\sqrt{\\text{draws}}`.

The functions take closures over a flat parameter vector and know nothing about networks;
:func:`landscape.analyses.sharpness.sharpness_analysis` binds them to a model and the evaluation set through
:class:`~landscape.curvature.loss.LossFunction`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

DEFAULT_STEPS = 40
"""Points the worst-case search evaluates by default (one gradient each): 20 secant Lanczos steps and 20 Auto-PGD
steps for p = 2, 40 Auto-PGD steps for p = inf."""

LossFn = Callable[[torch.Tensor], "float | torch.Tensor"]
"""Flat parameters ``(n,)`` -> the loss (a float or a 0-d tensor)."""
LossAndGradFn = Callable[[torch.Tensor], "tuple[float | torch.Tensor, torch.Tensor]"]
"""Flat parameters ``(n,)`` -> (the loss, its gradient ``(n,)``)."""


def parse_norm(p: str | float | int) -> str:
    """``2`` or ``inf`` as the canonical string; anything else is a :class:`LandscapeError`."""
    from landscape.errors import LandscapeError

    text = str(p).strip().lower()
    if text in ("2", "2.0", "l2"):
        return "2"
    if text in ("inf", "infinity", "linf", "math.inf"):
        return "inf"
    raise LandscapeError(f"Unknown sharpness norm {p!r}; accepted are 2 and inf.")


def sharpness_scale(w: torch.Tensor, *, adaptive: bool, eta: float = 0.0) -> torch.Tensor | None:
    """The per-coordinate scale :math:`c`: ``None`` (meaning :math:`c = 1`) for SAM, :math:`|w| + \\eta` if adaptive.

    Every coordinate is scaled, biases and normalisation parameters included, as in Andriushchenko et al. (2023);
    the ASAM code of Kwon et al. (2021) scales each parameter whose name contains ``weight`` (norm scales included)
    by :math:`|w| + 0.01` and leaves the others (biases, class token, position embedding) at :math:`c = 1`.
    """
    if not adaptive:
        return None
    return w.abs() + eta


def _scaled(v: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return v if scale is None else v * scale


def dual_norm(v: torch.Tensor, p: str) -> torch.Tensor:
    """:math:`\\|v\\|_q` with :math:`1/p + 1/q = 1`: the 2-norm for ``p="2"``, the 1-norm for ``p="inf"``."""
    return torch.linalg.vector_norm(v, 2 if p == "2" else 1)


def first_order_sharpness(grad: torch.Tensor, rho: float, *, p: str = "2", scale: torch.Tensor | None = None) -> float:
    """:math:`\\rho \\|c \\odot g\\|_q`: the maximum of :math:`g^\\top \\delta` over
    :math:`\\|\\delta / c\\|_p \\le \\rho`."""
    return float(rho * dual_norm(_scaled(grad, scale), parse_norm(p)))


@dataclass
class WorstCase:
    """Result of :func:`worst_case_sharpness`.

    ``sharpness`` is the largest :math:`L(w + \\delta) - L(w)` over every point the search evaluated (with
    :math:`\\delta = 0` among them, so it is never negative), ``loss`` is :math:`L(w)`, ``sam_sharpness`` the rise
    at the SAM perturbation alone, ``rises`` the rise at every evaluated point in order, ``delta`` the best
    perturbation (shape ``(n,)``); ``iterations`` the points evaluated after :math:`w` (one gradient each, the
    final one a loss only), ``restarts`` the Auto-PGD runs from a random start after the first, and
    ``still_rising`` whether the best rise grew by more than 0.1% during the last tenth of the last run's steps
    (more steps would probably find more).
    """

    sharpness: float
    loss: float
    sam_sharpness: float
    rises: list[float]
    delta: torch.Tensor
    iterations: int = 0
    restarts: int = 0
    still_rising: bool = False


def _random_direction(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    z = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)


def trust_region_maximizer(g: np.ndarray, h: np.ndarray, rho: float) -> np.ndarray:
    """The exact :math:`\\arg\\max_{\\|u\\|_2 \\le \\rho} g^\\top u + \\tfrac12 u^\\top H u` for a dense symmetric
    ``h`` ``(k, k)`` and ``g`` ``(k,)`` (float64 numpy), hard case included.

    With :math:`H = Q \\Lambda Q^\\top` and :math:`\\tilde g = Q^\\top g`, the maximiser is :math:`u(\\mu) = Q
    (\\mu I - \\Lambda)^{-1} \\tilde g` with :math:`\\mu \\ge \\max(\\lambda_{\\max}, 0)` and :math:`\\mu (\\rho -
    \\|u\\|) = 0` (Moré & Sorensen 1983, with the signs of a maximisation): inside the ball when :math:`H` is
    negative definite and :math:`-H^{-1} g` fits, otherwise on the sphere, where :math:`\\mu` solves the secular
    equation :math:`\\|u(\\mu)\\| = \\rho` (bracketed, Brent's method). In the hard case (:math:`\\tilde g` has no
    component along the top eigenvector and :math:`\\|u(\\lambda_{\\max})\\| < \\rho`) the top eigenvector fills
    the rest of the radius.
    """
    import scipy.optimize

    g = np.asarray(g, dtype=np.float64)
    h = 0.5 * (np.asarray(h, dtype=np.float64) + np.asarray(h, dtype=np.float64).T)
    lam, q = np.linalg.eigh(h)
    gt = q.T @ g
    scale = max(float(np.abs(lam).max()), 1e-300)
    if lam[-1] < 0:
        inside = -gt / lam
        if np.linalg.norm(inside) <= rho:
            return q @ inside
    low = max(float(lam[-1]), 0.0)
    top = lam >= lam[-1] - 1e-12 * scale
    g_norm = float(np.linalg.norm(gt))
    if lam[-1] >= 0 and float(np.linalg.norm(gt[top])) <= 1e-12 * max(g_norm, 1e-300):
        coef = np.zeros_like(gt)
        coef[~top] = gt[~top] / (lam[-1] - lam[~top])
        rest = float(np.linalg.norm(coef))
        if rest <= rho:  # the hard case
            coef[np.flatnonzero(top)[0]] = math.sqrt(max(rho**2 - rest**2, 0.0))
            return q @ coef

    def excess(mu: float) -> float:
        return float(np.linalg.norm(gt / (mu - lam))) - rho

    a = low + 1e-14 * max(scale, g_norm / rho)  # mu's scale: the curvature, or |g| / rho for a flat model
    if g_norm == 0 or excess(a) <= 0:
        u = q @ (gt / (a - lam)) if g_norm else q[:, -1] * rho
    else:
        b = a + max(g_norm / rho, 1e-300)
        while excess(b) > 0:
            b = a + 2 * (b - a)
        mu = scipy.optimize.brentq(excess, a, b, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=1000)
        u = q @ (gt / (mu - lam))
    norm = float(np.linalg.norm(u))
    return u * (rho / norm) if norm > rho else u


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which Auto-PGD may halve its step (Croce & Hein 2020): :math:`\\lceil p_j K \\rceil` with
    :math:`p_0 = 0`, :math:`p_1 = 0.22`, :math:`p_{j+1} = p_j + \\max(p_j - p_{j-1} - 0.03, 0.06)`."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({max(1, math.ceil(round(q * steps, 9))) for q in p[1:]})


def _check_finite_loss(loss: float, delta: torch.Tensor, rho: float | None = None, *, what: str = "the loss") -> None:
    """Refuse a sharpness whose perturbed loss (or gradient) is not finite: the perturbation ``delta`` overflows the
    model in its precision (a radius of 1e6, or an adaptive scale |w| + eta with a huge eta), and a NaN or infinite
    rise would be saved as the measure."""
    if math.isfinite(loss):
        return
    from landscape.errors import LandscapeError

    size = float(torch.linalg.vector_norm(delta.double()))
    raise LandscapeError(
        f"{what[0].upper() + what[1:]} is not finite at a perturbation of norm {size:.3g} from the weights"
        f"{f' (radius {rho:g})' if rho is not None else ''}: the model overflows there in its precision, so "
        "sharpness cannot be measured at this radius; give a smaller radius (or a smaller eta of the adaptive "
        "scale).")


class _Search:
    """The bookkeeping every phase of the worst-case search shares: the evaluated points and the best one."""

    def __init__(self, loss_and_grad: LossAndGradFn, evaluate: LossFn, w: torch.Tensor, scale: torch.Tensor | None,
                 loss0: float):
        self.loss_and_grad, self.evaluate, self.w, self.scale, self.loss0 = loss_and_grad, evaluate, w, scale, loss0
        self.rises: list[float] = []
        self.best, self.best_u = 0.0, torch.zeros_like(w)

    def _record(self, u: torch.Tensor, loss: float) -> float:
        if not math.isfinite(loss):  # the perturbation's norm only for the sentence (not on every evaluation)
            _check_finite_loss(loss, _scaled(u, self.scale))
        rise = float(loss) - self.loss0
        self.rises.append(rise)
        if rise > self.best:
            self.best, self.best_u = rise, u
        return rise

    def gradient(self, u: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(rise, gradient in the scaled coordinates :math:`c \\odot \\nabla L(w + c \\odot u)`) at ``u``."""
        loss, grad = self.loss_and_grad(self.w + _scaled(u, self.scale))
        rise = self._record(u, float(loss))
        if not bool(torch.isfinite(grad).all()):
            _check_finite_loss(math.nan, _scaled(u, self.scale), what="the loss's gradient")
        return rise, _scaled(grad, self.scale)

    def rise(self, u: torch.Tensor) -> float:
        return self._record(u, float(self.evaluate(self.w + _scaled(u, self.scale))))


def _project(u: torch.Tensor, rho: float, p: str) -> torch.Tensor:
    if p == "inf":
        return torch.clamp(u, -rho, rho)
    radius = torch.linalg.vector_norm(u)
    return u * (rho / radius) if radius > rho else u


def _ascent_direction(grad: torch.Tensor, p: str, generator: torch.Generator) -> torch.Tensor:
    """The steepest ascent direction of unit p-norm step: :math:`g / \\|g\\|_2`, or :math:`\\operatorname{sign}(g)`."""
    if p == "inf":
        s = torch.sign(grad)
        return s if bool(s.any()) else torch.sign(_random_direction(grad, generator))
    norm = torch.linalg.vector_norm(grad)
    if not torch.isfinite(norm) or norm == 0:
        grad = _random_direction(grad, generator)
        norm = torch.linalg.vector_norm(grad)
    return grad / norm


def _random_point(like: torch.Tensor, rho: float, p: str, generator: torch.Generator) -> torch.Tensor:
    """A uniformly distributed point of the ball (p = 2) or box (p = inf) of radius ``rho``."""
    if p == "inf":
        return rho * (2 * torch.rand(like.shape, generator=generator, dtype=torch.float64) - 1).to(like)
    z = _random_direction(like, generator)
    radius = rho * float(torch.rand((), generator=generator, dtype=torch.float64)) ** (1.0 / max(like.numel(), 1))
    return z * (radius / torch.linalg.vector_norm(z))


def _secant_lanczos(search: _Search, g0: torch.Tensor, rho: float, steps: int, generator: torch.Generator
                    ) -> torch.Tensor:
    """``steps`` Lanczos steps on secant curvature products, and the exact maximiser of the quadratic model on
    their Krylov subspace (see the module docstring). Returns the model's maximiser ``u`` (not yet evaluated)."""
    n = g0.numel()
    g_norm = torch.linalg.vector_norm(g0)
    v = g0 / g_norm if g_norm > 0 and torch.isfinite(g_norm) else _ascent_direction(g0, "2", generator)
    basis: list[torch.Tensor] = []
    columns: list[torch.Tensor] = []
    for _ in range(min(steps, n)):
        _, grad = search.gradient(rho * v)
        hv = (grad - g0) / rho
        basis.append(v)
        V = torch.stack(basis)
        coefficients = V @ hv
        columns.append(coefficients.double().cpu())
        r = hv - V.T @ coefficients
        r = r - V.T @ (V @ r)  # twice is enough
        r_norm = torch.linalg.vector_norm(r)
        if not (r_norm > 1e-10 * max(float(torch.linalg.vector_norm(hv)), 1e-300)):  # an invariant subspace
            r = _random_direction(g0, generator)
            r = r - V.T @ (V @ r)
            r = r - V.T @ (V @ r)
            r_norm = torch.linalg.vector_norm(r)
        v = r / r_norm
    k = len(basis)
    T = np.zeros((k, k))
    for j, column in enumerate(columns):
        T[: j + 1, j] = column.numpy()
    T = np.triu(T) + np.triu(T, 1).T  # V^T H V from its upper triangle (exact for a quadratic, up to rounding)
    V = torch.stack(basis)
    y = trust_region_maximizer((V @ g0).double().cpu().numpy(), T, rho)
    return _project(V.T @ torch.from_numpy(y).to(V), rho, "2")


def _apgd(search: _Search, u: torch.Tensor, rise: float, grad: torch.Tensor, rho: float, p: str, steps: int,
          generator: torch.Generator, *, momentum: float = 0.75) -> bool:
    """Auto-PGD (Croce & Hein 2020) for ``steps`` points from ``u`` (whose ``rise`` and scaled ``grad`` are known);
    returns whether the best rise of the whole search still grew by more than 0.1% during the last tenth of the
    steps."""
    eta = 2.0 * rho
    checkpoints = set(apgd_checkpoints(steps))
    best, best_u, best_grad = rise, u, grad
    previous_u = u
    last_checkpoint, successes, eta_before, best_before = 0, 0, None, best
    tail_start = steps - max(1, steps // 10)
    best_at_tail = search.best
    for k in range(1, steps + 1):
        z = _project(u + eta * _ascent_direction(grad, p, generator), rho, p)
        new_u = z if k == 1 else _project(u + momentum * (z - u) + (1 - momentum) * (u - previous_u), rho, p)
        if k < steps:
            new_rise, new_grad = search.gradient(new_u)
        else:
            new_rise, new_grad = search.rise(new_u), grad
        successes += new_rise > rise
        previous_u, u, rise, grad = u, new_u, new_rise, new_grad
        if rise > best:
            best, best_u, best_grad = rise, u, grad
        if k == tail_start:
            best_at_tail = search.best
        if k in checkpoints:
            if successes < 0.75 * (k - last_checkpoint) or (eta_before == eta and best_before == best):
                eta_before, eta = eta, eta / 2
                u, rise, grad, previous_u = best_u, best, best_grad, best_u
            else:
                eta_before = eta
            best_before, successes, last_checkpoint = best, 0, k
    return search.best - best_at_tail > 1e-3 * abs(search.best)


def krylov_steps(steps: int, p: str) -> int:
    """How many of ``steps`` the secant Lanczos phase takes: half of them for ``p = 2`` (at least the SAM step),
    none for ``p = inf``."""
    return max(1, steps // 2) if parse_norm(p) == "2" else 0


def worst_case_sharpness(
    loss_and_grad: LossAndGradFn,
    w: torch.Tensor,
    rho: float,
    *,
    p: str = "2",
    scale: torch.Tensor | None = None,
    steps: int = DEFAULT_STEPS,
    restarts: int = 0,
    random_start: bool = False,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    start: tuple[float, torch.Tensor] | None = None,
) -> WorstCase:
    """:math:`\\max_{\\|\\delta / c\\|_p \\le \\rho} L(w + \\delta) - L(w)` by the search of the module docstring.

    ``w`` has shape ``(n,)``; ``scale`` is :math:`c` (shape ``(n,)``, ``None`` for all ones); ``steps`` is the
    number of points evaluated (one gradient each) by the first run: for ``p = 2`` the first
    :func:`krylov_steps` build the secant Lanczos model and the rest are Auto-PGD from its maximiser; for
    ``p = inf`` all are Auto-PGD from :math:`\\delta = 0`. ``random_start`` starts Auto-PGD from a uniformly drawn
    point of the ball instead; ``restarts`` adds that many Auto-PGD runs of the same length from random points.
    ``loss_fn``, when given, evaluates points whose gradient is not needed (otherwise ``loss_and_grad`` is used);
    ``start``, when given, is ``loss_and_grad(w)`` already computed. ``seed`` seeds the random starts and the
    directions drawn where a gradient vanishes or the Krylov space is exhausted.
    """
    p = parse_norm(p)
    if rho < 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite non-negative number, got {rho}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if restarts < 0:
        raise ValueError(f"restarts must be 0 or more, got {restarts}")
    generator = torch.Generator().manual_seed(seed)
    loss0, grad = start if start is not None else loss_and_grad(w)
    loss0 = float(loss0)
    if rho == 0:
        return WorstCase(0.0, loss0, 0.0, [], torch.zeros_like(w))
    search = _Search(loss_and_grad, loss_fn or (lambda v: loss_and_grad(v)[0]), w, scale, loss0)
    g0 = _scaled(grad, scale)
    krylov = krylov_steps(steps, p)
    if krylov:
        u = _secant_lanczos(search, g0, rho, krylov, generator)  # its first point is the SAM perturbation
        sam = search.rises[0]
    else:
        sam = search.rise(_project(rho * _ascent_direction(g0, p, generator), rho, p)) if random_start else None
        u = torch.zeros_like(w)
    remaining = steps - len(search.rises)  # the Krylov space may be exhausted early (n < krylov)
    still_rising = False
    if remaining > 0:
        if random_start:
            if krylov:
                search.rise(u)
            u = _random_point(w, rho, p, generator)
        if (krylov or random_start) and remaining == 1:
            rise, grad_u, remaining = search.rise(u), None, 0
        elif krylov or random_start:
            rise, grad_u = search.gradient(u)
            remaining -= 1
        else:
            rise, grad_u = 0.0, g0
        if remaining > 0:
            still_rising = _apgd(search, u, rise, grad_u, rho, p, remaining, generator)
            if sam is None:
                sam = search.rises[0]
    for _ in range(restarts):
        u = _random_point(w, rho, p, generator)
        rise, grad_u = search.gradient(u)
        if steps > 1:
            still_rising = _apgd(search, u, rise, grad_u, rho, p, steps - 1, generator)
    if sam is None:
        sam = search.rises[0]
    return WorstCase(search.best, loss0, sam, search.rises, _scaled(search.best_u, scale),
                     iterations=len(search.rises), restarts=restarts, still_rising=still_rising)


def average_case_sharpness(
    loss_fn: LossFn,
    w: torch.Tensor,
    rho: float,
    *,
    scale: torch.Tensor | None = None,
    draws: int = 10,
    seed: int = 0,
    loss0: float | None = None,
) -> tuple[float, float]:
    """:math:`E_{\\delta \\sim N(0, \\rho^2 \\operatorname{diag}(c^2))}[L(w + \\delta) - L(w)]` and its standard error.

    ``draws`` antithetic pairs :math:`\\pm \\rho c \\odot z` (``2 * draws`` loss evaluations); the standard error
    is ``nan`` for a single pair. Draws come from a CPU generator seeded with ``seed``, so they do not depend on the
    device.
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    generator = torch.Generator().manual_seed(seed)
    if loss0 is None:
        loss0 = float(loss_fn(w))
    pair_means = []
    for _ in range(draws):
        delta = _scaled(rho * _random_direction(w, generator), scale)
        plus, minus = float(loss_fn(w + delta)), float(loss_fn(w - delta))
        _check_finite_loss(plus + minus, delta, rho)
        pair_means.append(0.5 * (plus + minus) - loss0)
    values = torch.tensor(pair_means, dtype=torch.float64)
    stderr = float(values.std(unbiased=True) / math.sqrt(draws)) if draws > 1 else float("nan")
    return float(values.mean()), stderr


def m_sharpness(
    batch_closures: Sequence[tuple[LossAndGradFn, LossFn | None]],
    w: torch.Tensor,
    rho: float,
    *,
    p: str = "2",
    scale: torch.Tensor | None = None,
    steps: int = DEFAULT_STEPS,
    restarts: int = 0,
    random_start: bool = False,
    seed: int = 0,
    map_batches: Callable[[Callable[[int], float], range], list[float]] | None = None,
) -> tuple[float, float]:
    """Mean over batches of the per-batch worst-case sharpness, and its standard error over batches.

    ``batch_closures`` holds one ``(loss_and_grad, loss_fn)`` pair per batch of :math:`m` examples; each batch gets
    its own maximiser :math:`\\delta_b` (seed ``seed + b`` where a gradient vanishes). ``map_batches(f, range(B))``,
    when given, returns ``[f(b) for b in range(B)]`` computed elsewhere, e.g. spread over processes
    (:func:`landscape.analyses.distributed.map_sharded`).
    """
    def batch_sharpness(b: int) -> float:
        loss_and_grad, loss_fn = batch_closures[b]
        return worst_case_sharpness(loss_and_grad, w, rho, p=p, scale=scale, steps=steps, restarts=restarts,
                                    random_start=random_start, seed=seed + b,
                                    loss_fn=loss_fn).sharpness

    batches = range(len(batch_closures))
    values = map_batches(batch_sharpness, batches) if map_batches else [batch_sharpness(b) for b in batches]
    if not values:
        raise ValueError("m_sharpness needs at least one batch")
    t = torch.tensor(values, dtype=torch.float64)
    stderr = float(t.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(t.mean()), stderr
