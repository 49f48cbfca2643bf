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

The maximum is searched in the scaled coordinates :math:`u = \\delta / c` (a ball of radius :math:`\\rho`) by projected
gradient ascent on :math:`f(u) = L(w + c \\odot u)`, whose gradient is :math:`c \\odot \\nabla L(w + c \\odot u)`:

- start at :math:`u_0 = 0`; step :math:`k = 1, \\dots, K` moves along the normalised ascent direction
  :math:`d_k = c \\odot \\nabla L(w + c \\odot u_{k-1})` and projects back onto the ball:

  - :math:`p = 2`: :math:`u_k = \\Pi_\\rho(u_{k-1} + \\rho\\, d_k / \\|d_k\\|_2)`, a constant step length
    :math:`\\rho`, where :math:`\\Pi_\\rho` rescales onto the sphere when outside. From the sphere this is a
    shifted power iteration on a quadratic loss, so it converges linearly to the global maximiser of the
    trust-region problem;
  - :math:`p = \\infty`: :math:`u_k = \\operatorname{clip}(u_{k-1} + \\frac{\\rho}{\\sqrt{k}}
    \\operatorname{sign}(d_k), -\\rho, \\rho)`, a step length decaying as :math:`\\rho / \\sqrt{k}` so that the
    iterates can settle inside the box instead of jumping between its vertices;

- so the first step is exactly the SAM step (:math:`\\delta = \\rho c^2 g / \\|c g\\|_2`, or :math:`\\rho c
  \\operatorname{sign}(g)` for :math:`p = \\infty`) and ``steps=1`` measures SAM's own perturbation;
- if the gradient vanishes (an exact critical point) the step direction is a seeded Gaussian draw instead;
- the result is the largest :math:`L(w + c \\odot u_k) - L(w)` over :math:`k = 0, \\dots, K` (the ascent is not
  monotone on a non-convex loss; :math:`u_0 = 0` makes the estimate non-negative). It is a lower bound of the true
  maximum, and converges to it for a quadratic loss at :math:`p = 2`.

Each ascent step costs one gradient over the subset; ``steps`` gradients plus one loss per radius in all.

Average-case sharpness uses antithetic pairs: each draw :math:`z \\sim N(0, I)` is evaluated at
:math:`\\delta = \\pm \\rho c \\odot z`, which cancels the first-order term :math:`g^\\top \\delta` exactly and leaves
an unbiased estimate; the standard error is the sample standard deviation of the pair means over
:math:`\\sqrt{\\text{draws}}`.

The functions :func:`worst_case_sharpness`, :func:`average_case_sharpness` and :func:`first_order_sharpness` take
closures over a flat parameter vector and know nothing about networks; :func:`sharpness_analysis` binds them to a
model and the analysis subset through :class:`~landscape.analyses.curvature.LossFunction`;
:func:`run_sharpness_analysis` runs over a run's checkpoints and writes ``RUN/analysis/sharpness.nc`` (one entry per
checkpoint, dimension ``rho``; settings, seed and library versions in its attrs; resumable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from landscape.analyses.results import EvaluationSettings

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
    """The per-coordinate scale :math:`c`: ``None`` (meaning :math:`c = 1`) for SAM, :math:`|w| + \\eta` if adaptive."""
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

    ``sharpness`` is :math:`\\max_k L(w + \\delta_k) - L(w)` over the ascent iterates (with :math:`\\delta_0 = 0`),
    ``loss`` is :math:`L(w)`, ``sam_sharpness`` the rise after the first (SAM) step alone, ``rises`` the rise at
    every iterate :math:`k = 1..K` and ``delta`` the best perturbation (shape ``(n,)``).
    """

    sharpness: float
    loss: float
    sam_sharpness: float
    rises: list[float]
    delta: torch.Tensor


def _random_direction(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    z = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)


def _ascent_step(u: torch.Tensor, d: torch.Tensor, step: float, rho: float, p: str,
                 generator: torch.Generator) -> torch.Tensor:
    """One projected normalised-gradient step in the scaled coordinates (see the module docstring)."""
    if p == "2":
        norm = torch.linalg.vector_norm(d)
        if not torch.isfinite(norm) or norm == 0:
            d = _random_direction(d, generator)
            norm = torch.linalg.vector_norm(d)
        u = u + (step / norm) * d
        radius = torch.linalg.vector_norm(u)
        if radius > rho:
            u = u * (rho / radius)
        return u
    s = torch.sign(d)
    if not bool(s.any()):
        s = torch.sign(_random_direction(d, generator))
    return torch.clamp(u + step * s, -rho, rho)


def worst_case_sharpness(
    loss_and_grad: LossAndGradFn,
    w: torch.Tensor,
    rho: float,
    *,
    p: str = "2",
    scale: torch.Tensor | None = None,
    steps: int = 20,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    start: tuple[float, torch.Tensor] | None = None,
) -> WorstCase:
    """:math:`\\max_{\\|\\delta / c\\|_p \\le \\rho} L(w + \\delta) - L(w)` by projected gradient ascent.

    ``w`` has shape ``(n,)``; ``scale`` is :math:`c` (shape ``(n,)``, ``None`` for all ones); ``loss_fn``, when
    given, evaluates the final iterate without a gradient (otherwise ``loss_and_grad`` is used); ``start``, when
    given, is ``loss_and_grad(w)`` already computed. The step schedule is stated in the module docstring. ``seed``
    only matters where the gradient vanishes.
    """
    p = parse_norm(p)
    if rho < 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite non-negative number, got {rho}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    generator = torch.Generator().manual_seed(seed)
    evaluate = loss_fn or (lambda v: loss_and_grad(v)[0])

    u = torch.zeros_like(w)
    loss0, grad = start if start is not None else loss_and_grad(w)
    loss0 = float(loss0)
    best, best_u = 0.0, u
    rises: list[float] = []
    if rho == 0:
        return WorstCase(0.0, loss0, 0.0, [0.0] * steps, torch.zeros_like(w))
    for k in range(1, steps + 1):
        step = rho if p == "2" else rho / math.sqrt(k)
        u = _ascent_step(u, _scaled(grad, scale), step, rho, p, generator)
        point = w + _scaled(u, scale)
        if k < steps:
            loss_k, grad = loss_and_grad(point)
        else:
            loss_k = evaluate(point)
        rise = float(loss_k) - loss0
        rises.append(rise)
        if rise > best:
            best, best_u = rise, u
    return WorstCase(best, loss0, rises[0], rises, _scaled(best_u, scale))


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
    steps: int = 20,
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
        return worst_case_sharpness(loss_and_grad, w, rho, p=p, scale=scale, steps=steps, seed=seed + b,
                                    loss_fn=loss_fn).sharpness

    batches = range(len(batch_closures))
    values = map_batches(batch_sharpness, batches) if map_batches else [batch_sharpness(b) for b in batches]
    if not values:
        raise ValueError("m_sharpness needs at least one batch")
    t = torch.tensor(values, dtype=torch.float64)
    stderr = float(t.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(t.mean()), stderr


# -- on a model -----------------------------------------------------------------------------------------------------
@dataclass
class SharpnessSettings(EvaluationSettings):
    """What ``landscape analyze sharpness`` measures at each checkpoint, and on which data.

    The loss is the mean cross-entropy over ``samples`` examples of the run's dataset (``dataset``/``split``, chosen
    with ``seed``) in ``dtype``, as a function of the parameters matching ``params`` (all when ``None``).

    - ``rhos``: the radii, all measured in one call; ``p``: ``"2"`` or ``"inf"``;
    - ``adaptive``/``eta``: :math:`c = |w| + \\eta` instead of :math:`c = 1`;
    - ``steps``: projected gradient ascent steps of the worst case (the schedule is in the module docstring);
    - ``m``: batch size of m-sharpness (``None``: not measured); the last ``samples mod m`` examples are left
      out of it so that every batch has exactly ``m``;
    - ``draws``: antithetic pairs of the average case (0: not measured).

    ``batch_size`` trades memory for speed only.
    """

    rhos: tuple[float, ...] = (0.01, 0.05, 0.1)
    p: str = "2"
    adaptive: bool = False
    eta: float = 0.0
    steps: int = 20
    m: int | None = None
    draws: int = 10
    params: str | None = None

    def validate(self) -> None:
        from landscape.errors import ConfigError

        self.p = parse_norm(self.p)
        self.rhos = tuple(float(r) for r in self.rhos)
        if not self.rhos or any(not math.isfinite(r) or r <= 0 for r in self.rhos):
            raise ConfigError(f"--rho must be positive numbers, not {', '.join(map(str, self.rhos)) or 'nothing'}.")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, not {self.steps}.")
        if self.m is not None and self.m < 1:
            raise ConfigError(f"--m must be a positive integer, not {self.m}.")
        if self.draws < 0:
            raise ConfigError(f"--draws must be 0 or more, not {self.draws}.")
        if self.eta < 0 or not math.isfinite(self.eta):
            raise ConfigError(f"--eta must be a finite non-negative number, not {self.eta}.")
        self.check_evaluation()
        if self.m is not None and self.m > self.samples:
            raise ConfigError(f"--m {self.m} is larger than the evaluation set (--samples {self.samples}).")

    def work(self, num_examples: int) -> int:
        """Loss evaluations one checkpoint takes (the unit of the progress bar), after the first gradient."""
        batches = num_examples // self.m if self.m else 0
        # per radius: steps - 1 gradients and one loss on the whole set, steps + 1 per m-batch, 2 per draw
        return len(self.rhos) * (self.steps + (self.steps + 1) * batches + 2 * self.draws)


def sharpness_analysis(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: SharpnessSettings | None = None,
    *,
    callback: Callable[[int], object] | None = None,
    world=None,
    criterion: Callable | None = None,
):
    """All sharpness measures of ``settings`` for ``model`` on the evaluation set ``(x, y)``.

    ``criterion(outputs, targets)`` is the mean loss of a batch (cross-entropy when ``None``); ``x`` may be a dict
    of input tensors (:class:`~landscape.analyses.curvature.LossFunction`).

    With ``world`` (a :class:`~landscape.trainers.distributed.Distributed` of several processes, each calling this
    with the same model, data and settings) the evaluation set is split across the processes with every loss and
    gradient summed over them, and the batches of m-sharpness are dealt out whole
    (:mod:`landscape.analyses.distributed`); every process returns the same results.

    Returns an ``xarray.Dataset`` over ``rho`` (no checkpoint dimension): ``loss``, ``top1`` (%) and
    ``gradient_norm`` at :math:`w`; per radius ``worst_case``, ``sam`` (the rise after the first, SAM step alone),
    ``first_order``, and when asked for ``average_case`` / ``average_case_standard_error`` and ``m_sharpness`` /
    ``m_sharpness_standard_error``. The model is not modified. ``callback(k)`` is called after every ``k`` loss
    evaluations (:meth:`SharpnessSettings.work` in all).
    """
    import time

    import numpy as np
    import xarray as xr

    from landscape.analyses.curvature import LossFunction, num_inputs, slice_inputs
    from landscape.analyses.distributed import map_sharded, split_evaluation_set

    settings = settings or SharpnessSettings()
    settings.validate()
    started = time.perf_counter()
    tick = callback or (lambda k: None)
    x_slice, y_slice, data_parallel = split_evaluation_set(x, y, world)
    loss_kind = {"criterion": criterion} if criterion is not None else {}
    closure = LossFunction(model, x_slice, y_slice, batch_size=settings.batch_size, params=settings.params,
                           data_parallel=data_parallel, **loss_kind)
    map_batches = (lambda f, batches: map_sharded(f, batches, world)) if data_parallel is not None else None
    w = closure.parameter_vector()
    scale = sharpness_scale(w, adaptive=settings.adaptive, eta=settings.eta)
    loss_and_grad, loss_fn = _counted(closure.loss_and_gradient, tick), _counted(closure.loss, tick)
    loss0, grad0 = closure.loss_and_gradient(w)
    top1 = closure.evaluate()[1]
    parts = []
    if settings.m:
        for start in range(0, num_inputs(x) - settings.m + 1, settings.m):
            parts.append(LossFunction(model, slice_inputs(x, start, start + settings.m), y[start:start + settings.m],
                                      batch_size=settings.batch_size, params=closure.names, skip_unused=False,
                                      **loss_kind))

    values: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        values.setdefault(name, []).append(value)

    for i, rho in enumerate(settings.rhos):
        seed = settings.seed + 1000 * i
        worst = worst_case_sharpness(loss_and_grad, w, rho, p=settings.p, scale=scale, steps=settings.steps,
                                     seed=seed, loss_fn=loss_fn, start=(loss0, grad0))
        record("worst_case", worst.sharpness)
        record("sam", worst.sam_sharpness)
        record("first_order", first_order_sharpness(grad0, rho, p=settings.p, scale=scale))
        if settings.draws:
            mean, stderr = average_case_sharpness(loss_fn, w, rho, scale=scale, draws=settings.draws, seed=seed,
                                                  loss0=loss0)
            record("average_case", mean)
            record("average_case_standard_error", stderr)
        if parts:
            closures = [(_counted(part.loss_and_gradient, tick), _counted(part.loss, tick)) for part in parts]
            mean, stderr = m_sharpness(closures, w, rho, p=settings.p, scale=scale, steps=settings.steps, seed=seed,
                                       map_batches=map_batches)
            record("m_sharpness", mean)
            record("m_sharpness_standard_error", stderr)

    radius = "radius" + (" in units of |w| + eta" if settings.adaptive else "")
    described = {
        "worst_case": f"max over ||delta/c||_{settings.p} <= rho of L(w + delta) - L(w), by projected gradient ascent",
        "sam": "L(w + delta) - L(w) after the first ascent step alone (the SAM perturbation)",
        "first_order": f"rho ||c g||_{'2' if settings.p == '2' else '1'}, the linearised worst case",
        "average_case": "E[L(w + delta) - L(w)], delta ~ N(0, rho^2 c^2), antithetic Monte Carlo",
        "average_case_standard_error": "standard error of average_case",
        "m_sharpness": f"mean over batches of {settings.m} examples of each batch's worst case",
        "m_sharpness_standard_error": "standard error of m_sharpness over the batches",
    }
    data: dict[str, tuple] = {
        name: (("rho",), np.asarray(v, dtype=np.float64), {"long_name": described[name], "units": "nats"})
        for name, v in values.items()
    }
    data["loss"] = ((), float(loss0), {"long_name": "mean loss on the evaluation set", "units": "nats"})
    data["top1"] = ((), float(top1), {"long_name": "top-1 accuracy on the evaluation set", "units": "%"})
    data["gradient_norm"] = ((), float(torch.linalg.vector_norm(grad0)),
                             {"long_name": "Euclidean norm of the gradient"})
    data["num_parameters"] = ((), int(closure.num_parameters), {"long_name": "parameters perturbed"})
    data["m_batches"] = ((), len(parts), {"long_name": "batches of the m-sharpness average"})
    data["seconds"] = ((), time.perf_counter() - started, {"long_name": "wall time", "units": "s"})
    coords = {"rho": ("rho", np.asarray(settings.rhos, dtype=np.float64), {"long_name": radius})}
    return xr.Dataset(data, coords=coords)


def _counted(fn: Callable, tick: Callable[[int], object]) -> Callable:
    def call(v: torch.Tensor):
        out = fn(v)
        tick(1)
        return out

    return call


def run_sharpness_analysis(
    run,
    settings: SharpnessSettings | None = None,
    *,
    checkpoints: str = "all",
    force: bool = False,
    data_dir=None,
    device: str | torch.device | None = None,
    progress: bool = False,
    shard: str | None = None,
):
    """Measure sharpness at the selected checkpoints of ``run``; results in ``RUN/analysis/sharpness.nc``
    (``sharpness-adaptive.nc``, ``sharpness-ema.nc``, ... for other settings: :func:`~landscape.analyses.results.
    results_name`).

    Checkpoints already in the file (with the same settings) are skipped unless ``force``; each finished
    checkpoint is written at once, so an interruption loses at most the one in progress. Returns the whole
    Dataset of the file.

    Under ``torchrun`` (:mod:`landscape.analyses.distributed`) the processes split the evaluation set of each
    checkpoint, or with ``shard="checkpoints"`` take whole checkpoints each; only the first process writes the
    results file, and the others return ``None``.
    """
    from landscape.analyses import distributed
    from landscape.analyses.curvature import evaluation_data
    from landscape.analyses.results import results_path
    from landscape.checkpoints import build_model, load_checkpoint
    from landscape.runs import Run

    run = run if isinstance(run, Run) else Run.open(run)
    settings = settings or SharpnessSettings()
    settings.validate()
    shard = distributed.check_shard(shard, ("checkpoints",), "sharpness")
    world, torch_device = distributed.join(device)
    dtype = settings.torch_dtype
    path = results_path(run, "sharpness", settings.determining())
    results, todo = distributed.plan_checkpoints(path, "sharpness", settings.determining(),
                                                 settings.seed, run.select_checkpoints(checkpoints), world, shard,
                                                 force=force)
    if not todo:
        return results.dataset if results is not None else None
    x, y = evaluation_data(run, settings, data_dir, results)

    def compute(info):
        _, state = load_checkpoint(info.path, weights=settings.weights)
        model = build_model(info, state).to(device=torch_device, dtype=dtype)
        bar = progress_bar(info.name, settings.work(len(x)), " loss", progress and world.is_main)
        try:
            return sharpness_analysis(model, x, y, settings, callback=bar.update if bar is not None else None,
                                      world=None if shard else world)
        finally:
            if bar is not None:
                bar.close()

    return distributed.measure_checkpoints(results, todo, compute, world, shard)


def progress_bar(name: str, total: int | None, unit: str, enabled: bool):
    """A tqdm bar on stderr for one checkpoint, or ``None`` when progress is off."""
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(desc=name, total=total, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)


def sharpness_summary(ds) -> list[dict[str, object]]:
    """One row per checkpoint and radius of a sharpness Dataset, for a table."""
    rows = []
    for i, name in enumerate(ds["checkpoint"].values):
        entry = ds.isel(checkpoint=i)
        epoch = float(entry["epoch"])
        for rho in entry["rho"].values:
            at = entry.sel(rho=rho)
            row: dict[str, object] = {"checkpoint": str(name), "epoch": None if math.isnan(epoch) else int(epoch),
                                      "loss": float(at["loss"]), "rho": float(rho)}
            for var in ("worst_case", "sam", "first_order", "average_case", "m_sharpness"):
                if var in at:
                    row[var] = float(at[var])
            rows.append(row)
    return rows
