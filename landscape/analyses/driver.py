"""The one loop over a run's checkpoints that every analysis runs in.

``landscape analyze hessian|sharpness|surface``, a study and ``torchrun`` all measure a run the same way::

    open the run -> plan the checkpoints left to do -> shard them -> evaluation set -> prepare once
        -> for each checkpoint: load it -> measure it -> append it to the results file (resumable)

:func:`analyze` is that loop; an analysis says only what is its own, as an :class:`Analysis`:

- ``name``, its settings (a dataclass checked when made, :mod:`landscape.analyses.settings`) and
  :meth:`~Analysis.determining` (what is stored in the results' attrs and compared on a re-run);
- :meth:`~Analysis.results_path`, ``RUN/analysis/<name>.nc`` by default
  (:func:`~landscape.analyses.results.results_path`: several settings of one analysis live side by side);
- :meth:`~Analysis.complete`: whether a checkpoint already in the file is really done (files kept beside it);
- :meth:`~Analysis.prepare`: what it needs once per run (directions, a model to evaluate grids with);
- :meth:`~Analysis.load` (a checkpoint's model by default) and :meth:`~Analysis.measure`, one checkpoint's
  ``xarray.Dataset``, calling the measure function ``(model, data, settings) -> Dataset`` of its module;
- :meth:`~Analysis.work` and ``unit``: the length of a checkpoint's progress bar (tqdm on stderr, time left).

Sharding, resuming and ``force`` are :mod:`landscape.analyses.distributed` and
:class:`~landscape.analyses.results.AnalysisResults`, applied here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from landscape.analyses import distributed
from landscape.analyses.distributed import Distributed
from landscape.errors import LandscapeError

__all__ = ["Analysis", "Job", "ProgressBar", "analyze"]


@dataclass
class Job:
    """One analysis of one run under way, as the driver sets it up for :meth:`Analysis.prepare` and
    :meth:`Analysis.measure`: the run, the settings, the evaluation set ``(x, y)`` (whole, on every process),
    this process's place in the job (``world``, ``shard``), the device and dtype, and the results file
    (``None`` off the first process)."""

    run: Any
    settings: Any
    x: Any
    y: Any
    world: Distributed
    shard: str | None
    device: torch.device
    results: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return self.settings.torch_dtype

    @property
    def data_parallel_world(self) -> Distributed | None:
        """The processes one checkpoint's evaluation set is split over: all of them unless the work is sharded."""
        return None if self.shard else self.world

    def model(self, info: Any) -> torch.nn.Module:
        """Checkpoint ``info``'s model with the settings' weights (raw or EMA), on the device in the dtype."""
        from landscape.checkpoints import build_model, check_finite_weights, load_checkpoint

        _, state = load_checkpoint(info.path, weights=self.settings.weights)
        check_finite_weights(info.path, state, self.settings.weights)
        return build_model(info, state).to(device=self.device, dtype=self.dtype)


class Analysis:
    """One analysis as :func:`analyze` runs it over a run's checkpoints (see the module notes); subclasses set
    ``name`` and implement :meth:`measure`, and override the rest where their analysis differs."""

    name = "analysis"
    shard_modes: tuple[str, ...] = ("checkpoints",)
    unit = " step"
    contiguous = False  # with --shard checkpoints: each process a contiguous chunk (warm starts) or round-robin

    def __init__(self, settings: Any):
        self.settings = settings

    def determining(self, run: Any) -> dict[str, Any]:
        """The settings that determine the numbers, stored in the results file and compared on a re-run."""
        return self.settings.determining()

    def results_path(self, run: Any) -> Path:
        """Where the results of these settings live in ``run``."""
        from landscape.analyses.results import results_path

        return results_path(run, self.name, self.determining(run))

    def attrs(self) -> dict[str, Any]:
        """More attributes of the results file (besides settings, seed, versions and the evaluation set's)."""
        return {}

    def complete(self, run: Any, info: Any) -> bool:
        """Whether checkpoint ``info``, already in the results file, needs nothing more."""
        return True

    def prepare(self, job: Job, todo: Sequence[Any]) -> None:
        """What the analysis needs once per run, before the first of the checkpoints ``todo``."""

    def load(self, job: Job, info: Any) -> Any:
        """What :meth:`measure` takes of checkpoint ``info``: its model by default."""
        return job.model(info)

    def work(self, job: Job) -> int | None:
        """Units of work (``unit``) one checkpoint takes, the length of its progress bar (``None``: unknown)."""
        return None

    def finish(self, run: Any, results: Any) -> None:
        """After the checkpoints (or when none was left to measure), on the process that writes ``results``
        (:class:`~landscape.analyses.results.AnalysisResults`): bring entries that depend on other checkpoints up
        to date."""

    def measure(self, job: Job, info: Any, loaded: Any, callback: Callable[[int], Any] | None) -> Any:
        """One checkpoint's results: an ``xarray.Dataset`` without the ``checkpoint`` dimension. ``callback(n)``
        is called after every ``n`` units of work."""
        raise NotImplementedError


class ProgressBar:
    """A tqdm bar on stderr for one checkpoint, counting units of work against the expected total (time left
    shown), raising the total when the work takes more than expected."""

    def __init__(self, name: str, total: int | None, unit: str):
        from landscape.progress import progress_bar

        self.bar = progress_bar(desc=name, total=total, unit=unit, leave=True)

    def update(self, n: int = 1) -> None:
        if self.bar.total is not None and self.bar.n + n > self.bar.total:
            self.bar.total = self.bar.n + n
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def analyze(run: Any, analysis: Analysis, *, checkpoints: str = "all", force: bool = False, data_dir: Any = None,
            device: str | torch.device | None = None, progress: bool = False, shard: str | None = None,
            on_plan: Callable[[int], Any] | None = None) -> Any:
    """Measure ``analysis`` at the selected ``checkpoints`` of ``run`` (a path or a
    :class:`~landscape.runs.Run`) and append each to its results file; returns the whole Dataset of the file.

    Checkpoints already in the file with the same settings (and :meth:`Analysis.complete`) are skipped unless
    ``force``; each finished checkpoint is written at once, so an interruption loses at most the one in progress.
    Under ``torchrun`` (:mod:`landscape.analyses.distributed`) the processes split each checkpoint's evaluation set,
    or with ``shard`` one of the analysis's ``shard_modes``; only the first process writes the file, and the others
    return ``None``. ``progress``: a bar per checkpoint on the first process. ``on_plan(n)`` is called on the first
    process with the number of checkpoints to measure, before the first one starts.
    """
    from landscape.analyses.evaluation import evaluation_data
    from landscape.runs import Run

    run = run if isinstance(run, Run) else Run.open(run)
    if run.load_config().get("task") == "mae":  # its model reconstructs patches: no class logits, no such loss
        raise LandscapeError(f"{run.root} is a masked-autoencoder pre-training run: the analyses measure a "
                             "classifier's cross-entropy; fine-tune it (landscape train --init RUN) and analyse that "
                             "run.")
    settings = analysis.settings
    shard = distributed.check_shard(shard, analysis.shard_modes, analysis.name)
    world, torch_device = distributed.join(device)
    try:
        selected = run.select_checkpoints(checkpoints)
    except LandscapeError:  # a training into the run (--overwrite) may have removed them: say that instead
        from landscape.io import RunLock

        RunLock(run.root, shared=True).release()  # refused, naming the training, while one holds the run
        raise
    results, todo = _plan(run, analysis, selected, world, shard, force)
    if not todo:
        if results is not None:
            analysis.finish(run, results)
        return results.dataset if results is not None else None
    for info in todo:  # a checkpoint of another run is refused before any is measured, not when reached
        run.check_checkpoint_model(info)
    x, y = evaluation_data(run, settings, data_dir, results)
    job = Job(run, settings, x, y, world, shard, torch_device, results)
    analysis.prepare(job, todo)  # refuses what cannot be measured (a --top-k past the parameters) before the plan
    if on_plan is not None and world.is_main:
        on_plan(len(todo))

    def measure(info: Any) -> Any:
        loaded = analysis.load(job, info)
        bar = ProgressBar(info.name, analysis.work(job), analysis.unit) if progress and world.is_main else None
        try:
            return analysis.measure(job, info, loaded, bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

    def append(info: Any, ds: Any) -> None:
        results.append(ds, name=info.name, epoch=info.epoch, step=info.step)

    distributed.for_each_checkpoint(todo, measure, append, world, shard=shard == "checkpoints",
                                    contiguous=analysis.contiguous)
    if results is not None:
        analysis.finish(run, results)
    return results.dataset if results is not None else None


def _plan(run: Any, analysis: Analysis, checkpoints: Sequence[Any], world: Distributed, shard: str | None,
          force: bool) -> tuple[Any, list[Any]]:
    """Open the results file on the first process and agree on the checkpoints still to measure.

    Returns ``(results, todo)``: the :class:`~landscape.analyses.results.AnalysisResults` (``None`` on the other
    processes, which never read or write the file) and the checkpoints not finished in the file with the same
    settings, or not :meth:`Analysis.complete`; all of them with ``force``.
    """
    from landscape.analyses.results import AnalysisResults
    from landscape.io import check_writable

    results = None

    def plan() -> list[str]:
        nonlocal results
        results = AnalysisResults(analysis.results_path(run), analysis.name, analysis.determining(run),
                                  analysis.settings.seed, force=force)
        results.attrs.update(distributed.processes_attrs(world, shard))
        results.attrs.update(analysis.attrs())
        todo = [c.name for c in checkpoints if not results.is_finished(c.name) or not analysis.complete(run, c)]
        if todo:  # a folder that cannot take the results is refused before the first measurement, not after
            check_writable(results.path.parent)
        return todo

    names = set(distributed.on_main(plan, world))
    return results, [c for c in checkpoints if c.name in names]
