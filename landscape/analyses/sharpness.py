"""The sharpness analysis: worst-case, average-case, first-order and m-sharpness of a model at each checkpoint.

:func:`sharpness_analysis` binds the estimators of :mod:`landscape.curvature.sharpness` (whose notes define every
measure and the search) to a model and its evaluation set through :class:`~landscape.curvature.loss.LossFunction`
and returns an ``xarray.Dataset`` (dimension ``rho``; settings, seed and library versions in its attrs);
:class:`SharpnessSettings` says what is measured; the rest of the module runs it over a run's checkpoints
(``RUN/analysis/sharpness.nc``, one entry per checkpoint, resumable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from landscape.analyses.driver import Analysis, Job, analyze
from landscape.analyses.settings import EvaluationSettings
from landscape.curvature.sharpness import (DEFAULT_STEPS, average_case_sharpness, first_order_sharpness, m_sharpness,
                                           parse_norm, sharpness_scale, worst_case_sharpness)


# -- on a model -----------------------------------------------------------------------------------------------------
@dataclass
class SharpnessSettings(EvaluationSettings):
    """What ``landscape analyze sharpness`` measures at each checkpoint, and on which data.

    The loss is the mean cross-entropy over ``samples`` examples of the run's dataset (``dataset``/``split``, chosen
    with ``seed``) in ``dtype``, as a function of the parameters matching ``params`` (all when ``None``).

    - ``rhos``: the radii, all measured in one call; ``p``: ``"2"`` or ``"inf"``;
    - ``adaptive``/``eta``: :math:`c = |w| + \\eta` instead of :math:`c = 1`;
    - ``steps``: points the worst-case search evaluates, one gradient each (default 40: the search of the module
      docstring); ``restarts``: further Auto-PGD runs of ``steps`` points from random starts; ``random_start``:
      the first Auto-PGD run starts from a random point of the ball;
    - ``m``: batch size of m-sharpness (``None``: not measured); the last ``samples mod m`` examples are left
      out of it so that every batch has exactly ``m``;
    - ``draws``: antithetic pairs of the average case (0: not measured).

    ``batch_size`` trades memory for speed only.
    """

    rhos: tuple[float, ...] = (0.01, 0.05, 0.1)
    p: str = "2"
    adaptive: bool = False
    eta: float = 0.0
    steps: int = DEFAULT_STEPS
    restarts: int = 0
    random_start: bool = False
    m: int | None = None
    draws: int = 10
    params: str | None = None

    def validate(self) -> None:
        from landscape.errors import ConfigError

        self.normalize_params()
        self.p = parse_norm(self.p)
        self.rhos = tuple(float(r) for r in self.rhos)
        if not self.rhos or any(not math.isfinite(r) or r <= 0 for r in self.rhos):
            raise ConfigError(f"--rho must be positive numbers, not {', '.join(map(str, self.rhos)) or 'nothing'}.")
        if any(not 1e-12 <= r <= 1e6 for r in self.rhos):
            raise ConfigError(f"--rho must be radii between 1e-12 and 1e6 (a radius is measured against weights of "
                              f"size about 1), not {', '.join(f'{r:g}' for r in self.rhos)}.")
        if len(set(self.rhos)) != len(self.rhos):
            raise ConfigError(f"--rho must be distinct radii; {', '.join(map(str, self.rhos))} repeats one.")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, not {self.steps}.")
        if self.restarts < 0:
            raise ConfigError(f"--restarts must be 0 or more, not {self.restarts}.")
        if self.m is not None and self.m < 1:
            raise ConfigError(f"--m must be a positive integer, not {self.m}.")
        if self.draws < 0:
            raise ConfigError(f"--draws must be 0 or more, not {self.draws}.")
        if self.eta < 0 or not math.isfinite(self.eta):
            raise ConfigError(f"--eta must be a finite non-negative number, not {self.eta}.")
        if self.eta and not self.adaptive:
            raise ConfigError(f"--eta {self.eta:g} offsets the adaptive scale |w| + eta, which plain sharpness does not "
                              "use; add --adaptive, or leave --eta out.")
        self.check_evaluation()
        if self.m is not None and self.m > self.samples:
            raise ConfigError(f"--m {self.m} is larger than the evaluation set (--samples {self.samples}).")

    def determining(self) -> dict[str, object]:
        settings = super().determining()
        for key, default in (("restarts", 0), ("random_start", False)):
            if settings.get(key) == default:  # left out at their defaults: one search, from the Krylov point
                settings.pop(key, None)
        return settings

    def work(self, num_examples: int) -> int:
        """Loss evaluations one checkpoint takes (the unit of the progress bar), after the first gradient."""
        batches = num_examples // self.m if self.m else 0
        # per radius and search: steps points (+1 with a random start after the Krylov phase); per m-batch the same
        # after its own first gradient; 2 per draw
        search = (1 + self.restarts) * self.steps + int(self.random_start)
        return len(self.rhos) * (search + (search + 1) * batches + 2 * self.draws)


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
    of input tensors (:class:`~landscape.curvature.loss.LossFunction`).

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

    from landscape.curvature.loss import LossFunction, left_out_variable, loss_attrs, num_inputs, slice_inputs
    from landscape.analyses.distributed import map_sharded, split_evaluation_set

    settings = settings or SharpnessSettings()
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
                                      swap_checked=True, **loss_kind))

    values: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        values.setdefault(name, []).append(value)

    for i, rho in enumerate(settings.rhos):
        seed = settings.seed + 1000 * i
        search = dict(steps=settings.steps, restarts=settings.restarts, random_start=settings.random_start)
        worst = worst_case_sharpness(loss_and_grad, w, rho, p=settings.p, scale=scale, seed=seed, loss_fn=loss_fn,
                                     start=(loss0, grad0), **search)
        record("worst_case", worst.sharpness)
        record("worst_case_iterations", worst.iterations)
        record("worst_case_restarts", worst.restarts)
        record("worst_case_still_rising", int(worst.still_rising))
        record("sam", worst.sam_sharpness)
        record("first_order", first_order_sharpness(grad0, rho, p=settings.p, scale=scale))
        if settings.draws:
            mean, stderr = average_case_sharpness(loss_fn, w, rho, scale=scale, draws=settings.draws, seed=seed,
                                                  loss0=loss0)
            record("average_case", mean)
            record("average_case_standard_error", stderr)
        if parts:
            closures = [(_counted(part.loss_and_gradient, tick), _counted(part.loss, tick)) for part in parts]
            mean, stderr = m_sharpness(closures, w, rho, p=settings.p, scale=scale, seed=seed,
                                       map_batches=map_batches, **search)
            record("m_sharpness", mean)
            record("m_sharpness_standard_error", stderr)

    radius = "radius" + (" in units of |w| + eta" if settings.adaptive else "")
    described = {
        "worst_case": f"max over ||delta/c||_{settings.p} <= rho of L(w + delta) - L(w)"
                      + (", secant Lanczos model then Auto-PGD" if settings.p == "2" else
                         ", Auto-PGD: the best point found, a local maximum (raise --restarts with --random-start)"),
        "worst_case_iterations": "points the worst-case search evaluated (one gradient each)",
        "worst_case_restarts": "Auto-PGD runs from random starts after the first",
        "worst_case_still_rising": "1 if the best rise grew by more than 0.1% in the last tenth of the steps",
        "sam": "L(w + delta) - L(w) after the first ascent step alone (the SAM perturbation)",
        "first_order": f"rho ||c g||_{'2' if settings.p == '2' else '1'}, the linearised worst case",
        "average_case": "E[L(w + delta) - L(w)], delta ~ N(0, rho^2 c^2), antithetic Monte Carlo",
        "average_case_standard_error": "standard error of average_case",
        "m_sharpness": f"mean over batches of {settings.m} examples of each batch's worst case",
        "m_sharpness_standard_error": "standard error of m_sharpness over the batches",
    }
    unit = loss_attrs(closure.criterion).get("units", "loss units")  # nats for cross-entropy
    data: dict[str, tuple] = {
        name: (("rho",), np.asarray(v, dtype=np.float64), {"long_name": described[name], "units": unit})
        for name, v in values.items()
    }
    for name in ("worst_case_iterations", "worst_case_restarts", "worst_case_still_rising"):
        data[name] = (("rho",), np.asarray(values[name], dtype=np.int64), {"long_name": described[name]})
    data["loss"] = ((), float(loss0), loss_attrs(closure.criterion))
    data["top1"] = ((), float(top1), {"long_name": "top-1 accuracy on the evaluation set", "units": "%"})
    data["gradient_norm"] = ((), float(torch.linalg.vector_norm(grad0)),
                             {"long_name": "Euclidean norm of the gradient", "units": f"{unit} per weight"})
    data["num_parameters"] = ((), int(closure.num_parameters), {"long_name": "parameters perturbed"})
    data["num_parameters_left_out"] = left_out_variable(closure)
    data["m_batches"] = ((), len(parts), {"long_name": "batches of the m-sharpness average"})
    data["seconds"] = ((), time.perf_counter() - started, {"long_name": "wall time", "units": "s"})
    coords = {"rho": ("rho", np.asarray(settings.rhos, dtype=np.float64),
                      {"long_name": radius, "units": "units of |w| + eta" if settings.adaptive else "weight units"})}
    return xr.Dataset(data, coords=coords)


def _counted(fn: Callable, tick: Callable[[int], object]) -> Callable:
    def call(v: torch.Tensor):
        out = fn(v)
        tick(1)
        return out

    return call


class SharpnessAnalysis(Analysis):
    """The sharpness measures of :class:`SharpnessSettings` at each checkpoint of a run (:func:`analyze`), results
    in ``RUN/analysis/sharpness.nc`` (``sharpness-adaptive.nc``, ``sharpness-ema.nc``, ... for other settings:
    :func:`~landscape.analyses.results.results_name`)."""

    name = "sharpness"
    unit = " loss"

    def __init__(self, settings: SharpnessSettings | None = None):
        super().__init__(settings or SharpnessSettings())

    def work(self, job: Job) -> int:
        return self.settings.work(len(job.x))

    def measure(self, job: Job, info, model: torch.nn.Module, callback: Callable[[int], object] | None):
        return sharpness_analysis(model, job.x, job.y, self.settings, callback=callback,
                                  world=job.data_parallel_world)


def run_sharpness_analysis(run, settings: SharpnessSettings | None = None, **options):
    """:func:`~landscape.analyses.driver.analyze` with a :class:`SharpnessAnalysis`; ``options`` are the driver's
    (``checkpoints``, ``force``, ``data_dir``, ``device``, ``progress``, ``shard``)."""
    return analyze(run, SharpnessAnalysis(settings), **options)


RESOLUTION_ULPS = 16
"""A rise in loss within this many units of rounding of the loss (its dtype's epsilon times the loss) is below
what the loss resolves: at ``--rho 1e-12`` the float32 worst case came out 0 and the average case negative."""


def sharpness_summary(ds) -> list[dict[str, object]]:
    """One row per checkpoint and radius of a sharpness Dataset, for a table; a note where the sharpness is below
    the loss's rounding (:data:`RESOLUTION_ULPS`) or the worst case was still rising."""
    import json

    import numpy as np

    try:
        dtype = json.loads(ds.attrs.get("settings", "{}")).get("dtype", "float32")
        eps = float(np.finfo(np.dtype(dtype)).eps)
    except (ValueError, TypeError, AttributeError):
        dtype, eps = "float32", float(np.finfo(np.float32).eps)
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
            notes = []
            resolution = RESOLUTION_ULPS * eps * abs(float(at["loss"]))
            rises = [abs(float(at[v])) for v in ("worst_case", "first_order") if v in at]
            if rises and max(rises) < resolution:
                more = ": --dtype float64 (--force replaces these)" if dtype == "float32" else ""
                notes.append(f"below the loss's {dtype} rounding ({resolution:.1e}){more}")
            if "worst_case_still_rising" in at and int(at["worst_case_still_rising"]):
                notes.append("worst case still rising: raise --steps")
            if notes:
                row["note"] = "; ".join(notes)
            rows.append(row)
    return rows
