"""The Hessian analysis: top eigenvalues, trace and spectral density of a model's curvature matrix at each checkpoint.

:func:`hessian_analysis` measures one model on a fixed evaluation set with the estimators of
:mod:`landscape.curvature` (:func:`~landscape.curvature.lanczos.top_eigenvalues`,
:func:`~landscape.curvature.trace.deflated_trace`, :func:`~landscape.curvature.trace.hutch_plus_plus_trace`,
:func:`~landscape.curvature.density.spectral_density`) applied to the operator of
:func:`~landscape.curvature.operators.curvature_operator`, and returns an ``xarray.Dataset`` whose attrs carry its
settings (:class:`HessianSettings`); the rest of the module runs it over a run's checkpoints and keeps the
eigenvectors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from landscape.analyses import distributed
from landscape.analyses.driver import Analysis, Job, analyze
from landscape.analyses.eigenvectors import eigenvectors_path, save_eigenvectors, saved_for
from landscape.analyses.settings import EvaluationSettings
from landscape.curvature.density import spectral_density
from landscape.curvature.lanczos import WHICH, ritz_start, top_eigenvalues
from landscape.curvature.trace import deflated_trace, hutch_plus_plus_trace
from landscape.errors import ConfigError

Tensor = torch.Tensor


# == the Hessian analysis of a run ================================================================================
MAX_COUNT = 100_000  # the most probes, steps, products or label draws one setting may ask for (2**64 was a traceback)


@dataclass
class HessianSettings(EvaluationSettings):
    """What ``landscape analyze hessian`` measures at each checkpoint, and on which data.

    The loss is the mean cross-entropy over ``samples`` examples of the run's dataset (``dataset``/``split``;
    chosen with ``seed``), in ``dtype``. The Hessian is taken with respect to the parameters matching
    ``params`` (:func:`~landscape.curvature.loss.parameters_by_pattern`; all when ``None``).

    - eigenvalues: ``top_k`` of each end asked for by ``which`` (largest, smallest, both) each to a
      relative accuracy ``tol`` (:func:`top_eigenvalues`); ``top_k=0`` skips them;
    - trace (``trace``): ``trace_matvecs`` products; ``trace_method="lanczos"`` spends them all on Hutchinson's
      estimator deflated by the Krylov basis that the eigenvalues left (:func:`deflated_trace`; Hutch++ when
      ``top_k=0``), ``"hutch++"`` always runs Hutch++ (a third of them on its sketch);
    - density (``density``): SLQ with ``density_probes`` runs of ``density_steps`` steps, on ``density_grid_size``
      points, ``density_scale`` linear or symlog.

    ``matrix`` chooses the curvature matrix every estimator above multiplies by
    (:func:`~landscape.curvature.operators.curvature_operator`): ``"hessian"``, the generalised Gauss-Newton
    ``"ggn"``, the true ``"fisher"`` (exact, which for softmax cross-entropy equals the GGN, or with
    ``fisher_samples`` labels per example drawn from the model with ``seed``) or the ``"empirical-fisher"``
    :math:`\\frac1N \\sum_i g_i g_i^\\top`. ``per_batch``: also the largest eigenvalue of the same matrix on each
    consecutive batch of ``per_batch`` examples of the evaluation set (the remainder left out), as in Park & Kim
    (2022), to the same ``tol``.

    ``batch_size``, ``vectors_per_pass`` and ``product`` (how Hessian-vector products are computed:
    :class:`~landscape.curvature.operators.HessianOperator`; ``"auto"`` keeps the gradient graph when ``samples``
    fit in one batch) trade memory for speed only.
    """

    top_k: int = 5
    which: str = "largest"
    tol: float = 1e-3
    trace: bool = False
    trace_matvecs: int = 99
    trace_method: str = "lanczos"
    density: bool = False
    density_probes: int = 4
    density_steps: int = 80
    density_grid_size: int = 1000
    density_scale: str = "linear"
    params: str | None = None
    vectors_per_pass: int = 8
    product: str = "auto"
    matrix: str = "hessian"
    fisher_samples: int | None = None
    per_batch: int | None = None
    per_block: bool = False
    preconditioned: bool = False

    RUNTIME_ONLY = ("batch_size", "vectors_per_pass", "product")

    def determining(self) -> dict[str, Any]:
        settings = super().determining()
        for key in ("per_block", "preconditioned"):  # left out while off: files from before them still match
            if not settings.get(key):
                settings.pop(key, None)
        for key, default in (("matrix", "hessian"), ("fisher_samples", None), ("per_batch", None)):
            if settings.get(key) == default:  # the same: files from before these options still match
                settings.pop(key, None)
        return settings

    def validate(self) -> None:
        self.normalize_params()
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be 0 or more, not {self.top_k}.")
        if self.top_k == 0 and not self.trace and not self.density:
            raise ConfigError("Nothing to compute: ask for eigenvalues (--top-k 1 or more), --trace or --density.")
        if self.which not in WHICH:
            raise ConfigError(f"Unknown eigenvalue selection {self.which!r}; accepted are {', '.join(WHICH)}.")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol <= 1):  # NaN fails every comparison
            raise ConfigError(f"--tol must be a relative accuracy in (0, 1], not {self.tol}.")
        self.check_evaluation()
        for name, option in (("trace_matvecs", "--trace-matvecs"), ("density_probes", "--density-probes"),
                             ("density_steps", "--density-steps")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_COUNT:
                raise ConfigError(f"{option} must be a whole number from 1 to {MAX_COUNT:,}, not {value!r}.")
        from landscape.curvature.operators import PRODUCTS

        if self.trace_method not in ("lanczos", "hutch++"):
            raise ConfigError(f"Unknown trace method {self.trace_method!r}; accepted are lanczos and hutch++.")
        if self.product not in PRODUCTS:
            raise ConfigError(f"Unknown Hessian-vector product {self.product!r}; accepted are {', '.join(PRODUCTS)}.")
        from landscape.curvature.operators import MATRICES

        if self.matrix not in MATRICES:
            raise ConfigError(f"Unknown curvature matrix {self.matrix!r}; accepted are {', '.join(MATRICES)}.")
        if self.preconditioned and self.matrix != "hessian":
            raise ConfigError(f"--preconditioned measures the edge of stability of the Hessian (its threshold is "
                              f"defined for the Hessian), not of --matrix {self.matrix}; measure the two in two calls.")
        if self.matrix != "hessian" and self.top_k and self.which != "largest":
            raise ConfigError(
                f"--matrix {self.matrix} is positive semi-definite and singular whenever the examples times the "
                "classes are fewer than the parameters: its smallest eigenvalues are 0, which Lanczos cannot resolve "
                "to a relative --tol (it would run to its product cap); use --which largest.")
        if self.fisher_samples is not None and (not 1 <= self.fisher_samples <= MAX_COUNT or self.matrix != "fisher"):
            raise ConfigError(f"--fisher-samples must be a whole number from 1 to {MAX_COUNT:,} and goes with "
                              "--matrix fisher only.")
        if self.per_batch is not None and not 1 <= self.per_batch <= self.samples:
            raise ConfigError(f"--per-batch must be between 1 and --samples {self.samples}, not {self.per_batch}.")
        if self.per_batch is not None and self.top_k == 0:
            raise ConfigError("--per-batch measures top eigenvalues: give --top-k 1 or more.")
        if self.density_scale not in ("linear", "symlog"):
            raise ConfigError(f"Unknown density scale {self.density_scale!r}; accepted are linear and symlog.")
        from landscape.analyses.blocks import check_per_block

        check_per_block(self)


@dataclass
class WarmStart:
    """What one checkpoint of a series leaves the next: the Ritz vectors ``(p, P)`` of its tracked eigenvalues
    (:func:`ritz_start`), and the checkpoint (name and step) they came from; empty before the first.

    The eigenvalues are the same to ``tol`` from any start (the stopping rule does not change); only the products
    differ. Each results entry records its start (:meth:`start_data`): ``eigenvalue_warm_start`` and
    ``eigenvalue_start_step``, the step of the checkpoint whose vectors it started from (-1: random).
    """

    vectors: Tensor | None = None
    source: str | None = None
    source_step: int = -1

    def start_data(self) -> dict[str, Any]:
        """Results variables saying where the eigensolve about to run starts from."""
        warm = self.vectors is not None
        return {
            "eigenvalue_warm_start": ((), int(warm), {
                "long_name": "1 if the eigensolve started from the previous checkpoint's Ritz vectors, 0 if random"}),
            "eigenvalue_start_step": ((), self.source_step if warm else -1, {
                "long_name": "step of the checkpoint whose Ritz vectors started the eigensolve (-1: random start)"}),
        }

    def moved_to(self, name: str, step: int) -> None:
        """Record that the vectors now held come from checkpoint ``name`` at ``step``."""
        self.source, self.source_step = name, int(step)


def hessian_analysis(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    settings: HessianSettings | None = None,
    *,
    callback: Callable[[int], Any] | None = None,
    return_eigenvectors: bool = False,
    world: Any = None,
    criterion: Callable[[Any, Tensor], Tensor] | None = None,
    preconditioner: Any = None,
    warm: WarmStart | None = None,
):
    """The Hessian measurements of ``settings`` for one model on the evaluation set ``(x, y)``.

    With ``warm`` (a :class:`WarmStart` carried from one checkpoint of a series to the next) the eigensolve starts
    from its vectors, when it holds any, and leaves this model's Ritz vectors there for the next.

    ``criterion(outputs, targets)`` is the mean loss of a batch (cross-entropy when ``None``); ``x`` may be a dict
    of input tensors (:class:`~landscape.curvature.loss.LossFunction`).

    With ``world`` (a :class:`~landscape.trainers.distributed.Distributed` of several processes, each calling this
    with the same model, data and settings) the evaluation set is split across the processes and every product is
    summed over them (:mod:`landscape.analyses.distributed`); every process returns the same results.

    Returns an :class:`xarray.Dataset` without a checkpoint dimension (variables below), and, with
    ``return_eigenvectors``, a dict ``{"largest"|"smallest": (k, P) tensor}`` plus the parameter shapes:
    ``(dataset, eigenvectors, shapes)``.

    Variables: ``loss``, ``top1`` (%), ``gradient_norm`` on the evaluation set, ``num_parameters`` (and
    ``num_parameters_left_out``: frozen or not reaching the loss, named in its attrs);
    ``eigenvalue_largest`` / ``eigenvalue_smallest`` ``(k)`` (k = 1 is the extreme one) with
    ``..._residual`` and ``..._error_bound``, ``eigenvalue_matvecs``, ``eigenvalue_converged``, ``eigenvalue_missed``
    (:func:`~landscape.curvature.lanczos.top_eigenvalues`'s check); ``trace``,
    ``trace_standard_error``, ``trace_matvecs``; ``density`` and its abscissae ``density_eigenvalue`` ``(grid)``, the quadrature
    ``density_nodes``/``density_weights`` ``(probe, lanczos_step)``, ``density_sigma``, ``density_matvecs``;
    ``seconds``.
    """
    import xarray as xr

    from landscape.curvature.loss import LossFunction, left_out_variable, loss_attrs
    from landscape.curvature.operators import curvature_operator
    from landscape.analyses.distributed import split_evaluation_set

    settings = settings or HessianSettings()
    started = time.perf_counter()
    whole_x, whole_y = x, y
    x, y, data_parallel = split_evaluation_set(x, y, world)
    loss_fn = LossFunction(model, x, y, batch_size=settings.batch_size, params=settings.params,
                           vectors_per_pass=settings.vectors_per_pass, data_parallel=data_parallel,
                           **({"criterion": criterion} if criterion is not None else {}))
    op = curvature_operator(loss_fn, settings.matrix, callback=callback, product=settings.product,
                            fisher_samples=settings.fisher_samples, seed=settings.seed)
    matrix = MATRIX_NAMES[settings.matrix]
    loss, top1 = loss_fn.evaluate()
    gradient = op.loss_and_gradient()[1]  # with a kept graph, the pass that builds it
    data: dict[str, Any] = {
        "loss": ((), loss, loss_attrs(loss_fn.criterion)),
        "top1": ((), top1, {"long_name": "top-1 accuracy on the evaluation set", "units": "%"}),
        "gradient_norm": ((), float(gradient.norm()), {"long_name": "Euclidean norm of the loss gradient"}),
        "num_parameters": ((), loss_fn.num_parameters, {"long_name": "parameters the Hessian is taken over"}),
        "num_parameters_left_out": left_out_variable(loss_fn),
    }
    coords: dict[str, Any] = {}
    vectors: dict[str, Tensor] = {}
    result = None
    if settings.top_k > 0:
        deflate = settings.trace and settings.trace_method == "lanczos"
        result = top_eigenvalues(op, settings.top_k, which=settings.which, tol=settings.tol, seed=settings.seed,
                                 return_eigenvectors=return_eigenvectors, return_basis=deflate or warm is not None,
                                 start=warm.vectors if warm is not None else None)
        if warm is not None:
            warm.vectors = ritz_start(result, settings.top_k)
            result.basis = result.basis if deflate else None
        coords["k"] = np.arange(1, settings.top_k + 1)
        k = settings.top_k
        if settings.which in ("largest", "both"):
            data["eigenvalue_largest"] = (("k",), result.eigenvalues[:k],
                                          {"long_name": f"largest {matrix} eigenvalues, largest first"})
            data["eigenvalue_largest_residual"] = (("k",), result.residual_norms[:k],
                                                   {"long_name": "Ritz residual norm of each largest eigenvalue"})
            data["eigenvalue_largest_error_bound"] = (("k",), result.error_bounds[:k],
                                                      {"long_name": "bound on the error of each largest eigenvalue, in exact arithmetic on the products as computed (their rounding is not in it)"})
            if return_eigenvectors:
                vectors["largest"] = result.eigenvectors[:k]
        if settings.which in ("smallest", "both"):
            data["eigenvalue_smallest"] = (("k",), result.eigenvalues[::-1][:k].copy(),
                                           {"long_name": f"smallest {matrix} eigenvalues, most negative first"})
            data["eigenvalue_smallest_residual"] = (("k",), result.residual_norms[::-1][:k].copy(),
                                                    {"long_name": "Ritz residual norm of each smallest eigenvalue"})
            data["eigenvalue_smallest_error_bound"] = (("k",), result.error_bounds[::-1][:k].copy(),
                                                       {"long_name": "bound on the error of each smallest eigenvalue, in exact arithmetic on the products as computed (their rounding is not in it)"})
            if return_eigenvectors:
                vectors["smallest"] = result.eigenvectors.flip(0)[:k]
        data["eigenvalue_matvecs"] = ((), result.matvecs, {"long_name": "Hessian-vector products for eigenvalues"})
        data["eigenvalue_converged"] = ((), int(result.converged), {
            "long_name": "1 if every error bound met tol and no eigenvalue is known to be missed"})
        data["eigenvalue_missed"] = ((), int(result.missed), {
            "long_name": "times the check after convergence found an eigenvalue Lanczos had missed (and restarted)"})
    block_traces = None  # with --per-block, the groups' traces from the trace's products
    if settings.trace:
        if result is not None and result.basis is not None:  # the Krylov basis of the eigenvalues, for free
            if settings.per_block:  # the same probes and products, every group's trace from them too
                from landscape.analyses.blocks import group_indices, parameter_groups
                from landscape.curvature.trace import deflated_group_traces

                groups = parameter_groups(model, loss_fn.names)
                block_traces = deflated_group_traces(
                    op, group_indices(loss_fn.shapes, groups), settings.trace_matvecs, basis=result.basis,
                    basis_matrix=result.basis_matrix, seed=settings.seed + 1, block_size=settings.vectors_per_pass)
                trace = block_traces[0]
            else:
                trace = deflated_trace(op, result.basis, settings.trace_matvecs, basis_trace=result.basis_trace,
                                       seed=settings.seed + 1,  # probes from another stream than the start vector
                                       block_size=settings.vectors_per_pass)
            method = "Hutchinson deflated by the Lanczos basis of the eigenvalues"  # its size varies by checkpoint
            data["trace_deflation_size"] = ((), len(result.basis), {
                "long_name": "vectors of the Lanczos basis whose exact part of the trace was taken out"})
            result.basis = None
        else:
            trace = hutch_plus_plus_trace(op, settings.trace_matvecs, seed=settings.seed,
                                          block_size=settings.vectors_per_pass)
            method = "Hutch++"
        if trace.method == "exact":  # the budget covered every parameter: one product per unit vector
            method = "exact: one product per parameter, the budget being at least their number"
        data["trace"] = ((), trace.estimate, {"long_name": f"{matrix} trace ({method})", "method": trace.method})
        data["trace_standard_error"] = ((), trace.standard_error, {"long_name": "standard error of the trace"})
        data["trace_matvecs"] = ((), trace.matvecs, {"long_name": "Hessian-vector products for the trace"})
    if settings.density:
        density = spectral_density(op, settings.density_probes, settings.density_steps, seed=settings.seed,
                                   grid_size=settings.density_grid_size, scale=settings.density_scale)
        coords["probe"] = np.arange(settings.density_probes)
        coords["lanczos_step"] = np.arange(density.nodes.shape[1])
        coords["grid"] = np.arange(len(density.grid))
        data["density"] = (("grid",), density.density, {"long_name": "spectral density (SLQ, Gaussian broadening)"})
        data["density_eigenvalue"] = (("grid",), density.grid, {"long_name": "eigenvalue at each grid point"})
        data["density_nodes"] = (("probe", "lanczos_step"), density.nodes, {"long_name": "Gauss quadrature nodes"})
        data["density_weights"] = (("probe", "lanczos_step"), density.weights,
                                   {"long_name": "Gauss quadrature weights (each probe's sum to 1)"})
        data["density_sigma"] = ((), density.sigma, {"long_name": "Gaussian width in the grid coordinate"})
        data["density_linthresh"] = ((), density.linthresh, {"long_name": "linear threshold of the symlog scale"})
        data["density_matvecs"] = ((), density.matvecs, {"long_name": "Hessian-vector products for the density"})
    if settings.preconditioned:
        from landscape.analyses.stability import edge_of_stability_data

        raw_top = float(result.eigenvalues[0]) if result is not None and settings.which != "smallest" else None
        data.update(edge_of_stability_data(op, loss_fn.shapes, preconditioner, tol=settings.tol, seed=settings.seed,
                                           raw_top=raw_top))
    if "largest" in vectors:
        from landscape.analyses.subspace import gradient_subspace_data

        data.update(gradient_subspace_data(gradient, vectors["largest"]))
    op.release()
    if settings.per_block:
        from landscape.analyses.blocks import parameter_groups, per_block_data

        groups = parameter_groups(model, loss_fn.names)
        coords["group"] = list(groups)
        data.update(per_block_data(loss_fn, groups, settings, block_traces, callback=callback))
    if settings.per_batch:
        per_batch = per_batch_top_eigenvalues(model, whole_x, whole_y, settings, callback=callback,
                                              **({"criterion": criterion} if criterion is not None else {}))
        coords["batch"] = np.arange(len(per_batch))
        data["eigenvalue_per_batch"] = (("batch",), per_batch[:, 0], {
            "long_name": f"largest {matrix} eigenvalue of each batch of {settings.per_batch} examples"})
        data["per_batch_matvecs"] = ((), int(per_batch[:, 1].sum()),
                                     {"long_name": "matrix-vector products for the per-batch eigenvalues"})
    data["seconds"] = ((), time.perf_counter() - started, {"long_name": "wall time", "units": "s"})
    ds = xr.Dataset(data, coords=coords)
    loss_unit = ds["loss"].attrs.get("units", "loss units")  # nats for cross-entropy; a given loss has its own
    for name in ds.data_vars:  # curvature in loss per squared parameter unit, the gradient per parameter unit
        if name.startswith(("eigenvalue_largest", "eigenvalue_smallest", "trace", "density_eigenvalue",
                            "eigenvalue_per_batch", "block_eigenvalue_largest", "block_trace")) \
                and not name.endswith(("matvecs", "residual", "converged", "size")):
            ds[name].attrs.setdefault("units", f"{loss_unit} per squared weight")
    if "density" in ds:  # a density over the eigenvalue: it integrates to 1 in d(lambda)
        ds["density"].attrs.setdefault("units", f"per ({loss_unit} per squared weight)")
    ds["gradient_norm"].attrs.setdefault("units", f"{loss_unit} per weight")
    if return_eigenvectors:
        return ds, vectors, dict(loss_fn.shapes)
    return ds


MATRIX_NAMES = {"hessian": "Hessian", "ggn": "generalised Gauss-Newton", "fisher": "Fisher",
                "empirical-fisher": "empirical Fisher"}


def per_batch_top_eigenvalues(model: torch.nn.Module, x: Tensor, y: Tensor, settings: HessianSettings, *,
                              callback: Callable[[int], Any] | None = None, **loss_kind: Any) -> np.ndarray:
    """The largest eigenvalue of ``settings.matrix`` on each consecutive batch of ``settings.per_batch`` examples of
    ``(x, y)`` (the last ``N mod per_batch`` left out): an ``(B, 2)`` array of (eigenvalue, products) per batch.

    Park & Kim (2022, "How do vision transformers work?") report the distribution of this :math:`\\lambda_{\\max}`
    over mini-batches. Each batch's operator is built on that batch alone (one process computes every batch).
    """
    from landscape.curvature.loss import LossFunction
    from landscape.curvature.operators import curvature_operator

    size = settings.per_batch
    rows = []
    for start in range(0, len(y) - size + 1, size):
        inputs = {k: v[start:start + size] for k, v in x.items()} if isinstance(x, dict) else x[start:start + size]
        part = LossFunction(model, inputs, y[start:start + size],
                            batch_size=settings.batch_size, params=settings.params,
                            vectors_per_pass=settings.vectors_per_pass, **loss_kind)
        op = curvature_operator(part, settings.matrix, callback=callback, product=settings.product,
                                fisher_samples=settings.fisher_samples, seed=settings.seed + start)
        result = top_eigenvalues(op, 1, tol=settings.tol, seed=settings.seed)
        op.release()
        rows.append((float(result.eigenvalues[0]), result.matvecs))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


class HessianAnalysis(Analysis):
    """The Hessian measurements of :class:`HessianSettings` at each checkpoint of a run (:func:`analyze`), results in
    ``RUN/analysis/hessian.nc`` (``hessian-ema.nc``, ``hessian-density.nc``, ... for other weights and kinds:
    :func:`~landscape.analyses.results.results_name`).

    With ``save_eigenvectors`` the eigenvectors go to :func:`eigenvectors_path` (layout: :func:`save_eigenvectors`;
    a checkpoint whose file is missing is measured again), with the gradient's share in their span and their
    overlap with the previous checkpoint's; with ``shard="checkpoints"`` each process writes those of its own.
    With ``warm_start`` each eigensolve after the first starts from the previous checkpoint's Ritz vectors
    (:class:`WarmStart`; the same eigenvalues to ``tol``, fewer products on a dense series), and with
    ``shard="checkpoints"`` each process then takes a contiguous chunk of the checkpoints in step order and
    warm-starts within it (the first of each chunk starts cold); every entry records its start.
    """

    name = "hessian"
    unit = " HVP"

    def __init__(self, settings: HessianSettings | None = None, *, save_eigenvectors: bool = False,
                 warm_start: bool = False):
        super().__init__(settings or HessianSettings())
        if save_eigenvectors and self.settings.top_k == 0:
            raise ConfigError("Saving eigenvectors needs eigenvalues: give --top-k 1 or more.")
        self.save_eigenvectors = save_eigenvectors
        self.contiguous = bool(warm_start and self.settings.top_k)
        self.warm: WarmStart | None = None
        self.groups = 0  # the model's parameter groups under per_block, known once prepared
        self.parameters: int | None = None  # the parameters measured, known once prepared (a trace budget past them
        # buys the exact trace: one product per parameter)

    def prepare(self, job: Job, todo: Any) -> None:
        self.warm = WarmStart() if self.contiguous else None  # each series starts cold
        settings = self.settings
        if settings.top_k or settings.per_block or settings.trace:  # before the plan is printed, not at the first checkpoint
            from landscape.analyses.blocks import parameter_groups
            from landscape.checkpoints import build_model
            from landscape.curvature.lanczos import check_wanted
            from landscape.curvature.loss import parameters_by_pattern

            with torch.device("meta"):  # sizes only: no memory, no initialisation
                model = build_model(todo[0])
            selected = parameters_by_pattern(model, settings.params)
            self.parameters = sum(p.numel() for p in selected.values())
            if settings.top_k:
                check_wanted(settings.top_k, settings.which, sum(p.numel() for p in selected.values()))
            if settings.per_block:
                self.groups = len(parameter_groups(model, list(selected)))

    def complete(self, run: Any, info: Any) -> bool:
        return not self.save_eigenvectors or saved_for(eigenvectors_path(run, info.name, self.settings), self.settings)

    def work(self, job: Job) -> int:
        return expected_products(self.settings, groups=self.groups, parameters=self.parameters)

    def finish(self, run: Any, results: Any) -> None:
        """Overlaps taken before an earlier checkpoint's eigenvectors were saved (another process measured it
        meanwhile) are taken again: the file does not depend on the order or sharding of the checkpoints."""
        if not self.save_eigenvectors or not self.settings.top_k:
            return
        from landscape.analyses.results import read_results
        from landscape.analyses.subspace import refreshed_overlaps

        if refreshed_overlaps(run, read_results(results.path), self.settings) is not None:  # the lock only if so
            results.revise(lambda ds: refreshed_overlaps(run, ds, self.settings))

    def measure(self, job: Job, info: Any, model: torch.nn.Module, callback: Callable[[int], Any] | None):
        settings, run, warm = self.settings, job.run, self.warm
        preconditioner = None
        if settings.preconditioned:
            from landscape.analyses.stability import checkpoint_preconditioner

            preconditioner = checkpoint_preconditioner(run, info)
        start = (warm or WarmStart()).start_data() if settings.top_k else {}
        out = hessian_analysis(model, job.x, job.y, settings, callback=callback,
                               return_eigenvectors=self.save_eigenvectors, world=job.data_parallel_world,
                               preconditioner=preconditioner, warm=warm)
        if warm is not None:
            warm.moved_to(info.name, info.step)
        if not self.save_eigenvectors:
            return out.assign(start)
        ds, vectors, shapes = out
        ds = ds.assign(start)
        if "largest" in vectors:  # against the previous checkpoint's saved eigenvectors, before this one's are
            from landscape.analyses.subspace import overlap_with_previous_data

            ds = ds.assign(overlap_with_previous_data(run, info, vectors["largest"], shapes, settings))
        error = None
        if job.shard or job.world.is_main:
            eigenvalues = {end: ds[f"eigenvalue_{end}"].values for end in vectors}
            try:
                save_eigenvectors(eigenvectors_path(run, info.name, settings), vectors, eigenvalues, shapes, metadata={
                    "checkpoint": info.name, "epoch": info.epoch, "step": info.step,
                    "settings": settings.determining(),
                })
            except Exception as e:  # data-parallel: the others must hear of it, not wait in the next collective
                error = e
        distributed.raise_if_failed(error, job.data_parallel_world)
        return ds


def run_hessian_analysis(run: Any, settings: HessianSettings | None = None, *, save_eigenvectors_to_disk: bool = False,
                         warm_start: bool = False, **options: Any):
    """:func:`~landscape.analyses.driver.analyze` with a :class:`HessianAnalysis`; ``options`` are the driver's
    (``checkpoints``, ``force``, ``data_dir``, ``device``, ``progress``, ``shard``, ``on_plan``)."""
    return analyze(run, HessianAnalysis(settings, save_eigenvectors=save_eigenvectors_to_disk,
                                        warm_start=warm_start), **options)


def trace_products(settings: HessianSettings, parameters: int | None = None) -> int:
    """The trace's products: its budget, or one per parameter when the budget is at least their number (the exact
    trace, :func:`~landscape.curvature.trace.deflated_trace`)."""
    if parameters is not None and settings.trace_matvecs >= parameters:
        return parameters
    return settings.trace_matvecs


def expected_products(settings: HessianSettings, *, groups: int = 0, parameters: int | None = None) -> int:
    """The Hessian-vector products one checkpoint is expected to take: the trace's and the density's are fixed
    budgets; the eigenvalues' depend on the spectrum, and ``4 k + 12`` is what the error-bound stopping rule
    typically needs at ``tol=1e-3`` (``benchmarks/hessian.md``: 20 for k = 5 at width 192, 31-41 at width 64), plus
    the check for a missed eigenvalue (:data:`~landscape.curvature.lanczos.CHECK_PRODUCTS`, 8). Each further top
    eigenvalue (:func:`extra_top_eigenvalues`: each of ``groups`` parameter groups, the preconditioned matrix, each
    batch) is one more such run for k = 1."""
    total = eigenvalue_products(settings)
    if settings.trace:
        total += trace_products(settings, parameters)
    if settings.density:
        total += settings.density_probes * settings.density_steps
    total += sum(extra_top_eigenvalues(settings, groups).values()) * _top_one_products()
    return max(total, 1)


def extra_top_eigenvalues(settings: HessianSettings, groups: int = 0) -> dict[str, int]:
    """The Lanczos runs for one top eigenvalue each beside the main one: ``{"per-block": groups,
    "preconditioned": 1, "per-batch": samples // per_batch}``, those asked for."""
    extra = {}
    if settings.per_block and groups:
        extra["per-block"] = groups
    if settings.preconditioned:
        extra["preconditioned"] = 1
    if settings.per_batch:
        extra["per-batch"] = settings.samples // settings.per_batch
    return extra


def _top_one_products() -> int:
    """The expected products of one top eigenvalue from a cold start (:func:`eigenvalue_products` for k = 1)."""
    return eigenvalue_products(HessianSettings(top_k=1, which="largest"))


def expected_warm_products(settings: HessianSettings) -> int:
    """The eigenvalue products of a warm-started checkpoint: about 0.9 of a cold start's along the demo's run
    (``benchmarks/series.md``: 0.92 to 0.95 over 50 checkpoints 10 updates apart, for k = 5 at ``tol=1e-3``), since
    the stopping rule is the same and the previous Ritz vectors only give the start a head start."""
    return round(0.9 * eigenvalue_products(settings))


def eigenvalue_products(settings: HessianSettings) -> int:
    """The eigenvalues' expected products from a cold start: ``4 k + 12`` and the check per end (see
    :func:`expected_products`)."""
    from landscape.curvature.lanczos import CHECK_PRODUCTS

    ends = 2 if settings.which == "both" else 1
    return (4 * settings.top_k + 12 + CHECK_PRODUCTS) * ends if settings.top_k else 0


def describe_plan(settings: HessianSettings, checkpoints: int, *, warm_start: bool = False, groups: int = 0,
                  parameters: int | None = None) -> str:
    """One line saying what an analysis of ``checkpoints`` checkpoints will cost, in Hessian-vector products:
    ``"28 checkpoints x ~42 products (eigenvalues ~32, trace 10)"`` (top 3 and a trace of 10); ``groups``: the
    parameter groups of ``per_block``."""
    total = expected_products(settings, groups=groups, parameters=parameters)
    parts = []
    if settings.top_k:
        eigen = eigenvalue_products(settings)
        if warm_start and checkpoints > 1:
            warm = expected_warm_products(settings)
            total = round(total - eigen + (eigen + (checkpoints - 1) * warm) / checkpoints)
            eigen = f"~{warm} warm-started, ~{eigen} for the first"
        else:
            eigen = f"~{eigen}"
        parts.append(f"eigenvalues {eigen}")
    if settings.trace:
        trace = trace_products(settings, parameters)
        parts.append(f"trace {trace}" + (" (exact: one per parameter)" if trace < settings.trace_matvecs
                                          or parameters == settings.trace_matvecs else ""))
    if settings.density:
        parts.append(f"density {settings.density_probes} x {settings.density_steps}")
    for what, runs in extra_top_eigenvalues(settings, groups).items():
        parts.append(f"{what} {runs} x ~{_top_one_products()}")
    noun = "checkpoint" if checkpoints == 1 else "checkpoints"
    return f"{checkpoints} {noun} x ~{total} products ({', '.join(parts)})"


def hessian_summary(ds) -> list[dict[str, Any]]:
    """One row per checkpoint of a hessian Dataset: the headline numbers, for a table."""
    rows = []
    for i, name in enumerate(ds["checkpoint"].values):
        entry = ds.isel(checkpoint=i)
        epoch = float(entry["epoch"])
        row: dict[str, Any] = {"checkpoint": str(name), "epoch": None if math.isnan(epoch) else int(epoch),
                               "step": int(entry["step"])}
        row["loss"] = float(entry["loss"])
        if "eigenvalue_largest" in ds:
            row["lambda_max"] = float(entry["eigenvalue_largest"].isel(k=0))
            if ds.sizes.get("k", 0) > 1:
                row[f"lambda_{ds.sizes['k']}"] = float(entry["eigenvalue_largest"].isel(k=-1))
        if "eigenvalue_smallest" in ds:
            row["lambda_min"] = float(entry["eigenvalue_smallest"].isel(k=0))
        if "trace" in ds:
            row["trace"] = float(entry["trace"])
            row["trace_se"] = float(entry["trace_standard_error"])
        if "preconditioned_sharpness" in ds:
            row["sharpness_P"] = float(entry["preconditioned_sharpness"])
            row["threshold"] = float(entry["stability_threshold"])
        matvecs = sum(int(entry[v].sum()) for v in ("eigenvalue_matvecs", "trace_matvecs", "density_matvecs",
                                                    "block_eigenvalue_matvecs", "per_batch_matvecs",
                                                    "preconditioned_matvecs") if v in ds)
        row["HVPs"] = matvecs
        row["seconds"] = float(entry["seconds"])
        if "eigenvalue_converged" in ds and not int(entry["eigenvalue_converged"]):
            row["note"] = "eigenvalues not converged"
        rows.append(row)
    return rows
