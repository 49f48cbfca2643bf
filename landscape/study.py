"""A study: variants x seeds -> train -> analyses -> figures -> report.

A study (:class:`StudySpec`) is a list of :class:`StudyVariant` (a model name and its keyword arguments) trained
with one recipe for each seed into ``OUT/runs/<variant>-s<seed>/``. :func:`run_study` trains every run, measures
the Hessian's top eigenvalue and trace at every checkpoint and the spectral density, sharpness and loss surfaces
at the final one (:class:`AnalysisSettings`), writes the dynamics, then the figures to ``OUT/figures/`` and the
report to ``OUT/report.md``. Every stage skips what is already done, so an interrupted study continues where it
stopped when run again. :func:`demo_study` is the study of ``landscape demo``.

Reading a study back, shared by the figures and the report: :func:`describe_variant` says what variant a run is
(family, knobs, a readable label, the baseline it is compared with), :func:`load_results` gathers the runs'
analysis results and :func:`final_measures` makes one row per run of the flatness measures at the final
checkpoint, described by :data:`MEASURES`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from landscape.errors import ConfigError, LandscapeError
from landscape.runs import Run

# == what a run is ===============================================================================================
FAMILIES = ("baseline", "grouped", "shallow", "mlit", "other")
# Keyword arguments that make a variant of a base architecture rather than another architecture.
VARIANT_KNOBS = ("group_size", "init_scale", "width_ratio", "mlp_init", "init")
# Keyword arguments that do not change the architecture being compared (training-only settings).
_NOT_ARCHITECTURE = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate")
_SUFFIXES = {"_grouped_mlp": "grouped", "_shallow_mlp": "shallow"}


@dataclasses.dataclass(frozen=True)
class VariantInfo:
    """What variant a run is.

    ``key`` is :func:`landscape.analyses.dynamics.variant_name` (model name plus variant knobs), the identity
    shared by every seed of the variant. ``base`` names the architecture the variant is derived from, with the
    architecture arguments, so that a GroupedMLP or ShallowMLP run is compared with the baseline of the same base
    and size. ``label`` is what the figures and the report print.
    """

    key: str
    family: str
    base: str
    label: str
    group_size: int | None = None
    width_ratio: float | None = None
    mlp_init: str | None = None


def describe_variant(config: dict[str, Any], run: Run | None = None) -> VariantInfo:
    """The :class:`VariantInfo` of a run from its ``config.yaml`` (``model.name`` and ``model.kwargs``)."""
    from landscape.analyses.dynamics import variant_name

    model = config.get("model") or {}
    name = str(model.get("name") or (run.name if run is not None else "model"))
    kwargs = dict(model.get("kwargs") or {})
    key = variant_name({"model": {"name": name, "kwargs": kwargs}}, run if run is not None else Run("."))
    family, base_name = "other", name
    for suffix, fam in _SUFFIXES.items():
        if name.endswith(suffix):
            family, base_name = fam, name[: -len(suffix)]
    if family == "other":
        if name.startswith("mlit"):
            family = "mlit"
        elif "vit" in name and not name.startswith("mae"):
            family = "baseline"
    arch = {k: v for k, v in sorted(kwargs.items()) if k not in VARIANT_KNOBS and k not in _NOT_ARCHITECTURE}
    base = base_name + (f"({','.join(f'{k}={v}' for k, v in arch.items())})" if arch else "")
    group_size = width_ratio = mlp_init = None
    if family == "grouped":
        group_size = int(kwargs.get("group_size", 2))
        label = f"GroupedMLP g={group_size}"
    elif family == "shallow":
        width_ratio = float(kwargs.get("width_ratio", 0.5))
        mlp_init = str(kwargs.get("mlp_init", "sliced"))
        label = f"ShallowMLP {mlp_init}" + ("" if width_ratio == 0.5 else f" r={width_ratio:g}")
    elif family == "baseline":
        group_size = 1
        label = "ViT baseline"
    elif family == "mlit":
        label = "mLiT"
    else:
        label = key
    return VariantInfo(key=key, family=family, base=base, label=label, group_size=group_size,
                       width_ratio=width_ratio, mlp_init=mlp_init)


def unique_labels(infos: Iterable[VariantInfo]) -> dict[str, str]:
    """``{variant key: label}``, with the base architecture appended where two variants would share a label."""
    infos = {i.key: i for i in infos}
    by_label: dict[str, set[str]] = {}
    for info in infos.values():
        by_label.setdefault(info.label, set()).add(info.key)
    out = {}
    for key, info in infos.items():
        clash = len(by_label[info.label]) > 1
        out[key] = f"{info.label} ({info.base})" if clash and info.family != "other" else info.label
    return out


# == reading a study back ========================================================================================
@dataclasses.dataclass
class RunResults:
    """One run and its analysis results (``None`` / empty where an analysis was not run).

    ``hessian_density`` is ``analysis/hessian-density.nc`` (a spectral density kept apart from ``hessian.nc``),
    ``sharpness`` is ``analysis/sharpness.nc`` (plain, c = 1), ``adaptive_sharpness`` ``sharpness-adaptive.nc``
    (c = |w|); ``surfaces`` maps the name of each ``analysis/surface-*.nc`` file (without ``.nc``) to its Dataset;
    ``final_step`` is the step of the run's last checkpoint.
    """

    path: Path
    run: Run
    variant: VariantInfo
    label: str
    seed: int
    num_params: int | None
    dynamics: Any = None
    hessian: Any = None
    hessian_density: Any = None
    sharpness: Any = None
    adaptive_sharpness: Any = None
    surfaces: dict[str, Any] = dataclasses.field(default_factory=dict)
    final_step: int | None = None


def load_results(paths: Iterable[str | os.PathLike]) -> list[RunResults]:
    """Open every run directory and read its ``analysis/*.nc`` results (dynamics from ``metrics.csv`` when the
    run has a history but no ``dynamics.nc``). Runs are returned in the order given."""
    from landscape.analyses.dynamics import run_dynamics
    from landscape.compare import read_result

    results = []
    seen: set[Path] = set()
    for path in paths:
        path = Path(path)
        run = Run.open(path)
        if run.root.resolve() in seen:
            continue
        seen.add(run.root.resolve())
        config = run.load_config()
        infos = run.checkpoints()
        if not (config.get("model") or {}).get("name") and infos:
            config = {**config, "model": {"name": infos[-1].model, "kwargs": infos[-1].model_kwargs}}
        dynamics = read_result(run, "dynamics")
        if dynamics is None and run.metrics_path.exists():
            try:
                dynamics = run_dynamics(run)
            except LandscapeError:
                dynamics = None
        surfaces = {}
        for file in sorted(run.analysis_dir.glob("surface-*.nc")):
            ds = read_result(run, file.stem)
            if ds is not None:
                surfaces[file.stem] = ds
        results.append(RunResults(
            path=path, run=run, variant=describe_variant(config, run), label="", seed=int(config.get("seed", 0) or 0),
            num_params=infos[-1].num_params if infos else None, dynamics=dynamics,
            hessian=read_result(run, "hessian"), hessian_density=read_result(run, "hessian-density"),
            sharpness=read_result(run, "sharpness"),
            adaptive_sharpness=read_result(run, "sharpness-adaptive"), surfaces=surfaces,
            final_step=infos[-1].step if infos else None,
        ))
    if not results:
        raise LandscapeError("Give at least one run directory.")
    labels = unique_labels(r.variant for r in results)
    for r in results:
        r.label = labels[r.variant.key]
    return results


# == the flatness measures ======================================================================================
@dataclasses.dataclass(frozen=True)
class Measure:
    """A flatness measure of a final checkpoint, with what it can and cannot be compared on.

    Smaller is flatter unless ``smaller_is_flatter`` is false (a width).

    ``reparameterisation``: the value changes under rescalings of the weights that leave the network function
    unchanged (Dinh et al. 2017), so a difference may reflect the weights' scale rather than the function.
    ``size_dependent``: the value grows with the number of parameters or the weight norm, so it is not comparable
    between models of different parameter counts.
    """

    name: str
    label: str
    units: str
    reparameterisation: bool
    size_dependent: bool
    note: str = ""
    smaller_is_flatter: bool = True

    def at(self, rho: float | None) -> "Measure":
        """This measure with its radius filled into the label."""
        return dataclasses.replace(self, label=self.label.format(rho=f"{rho:g}")) if rho is not None else self


REFERENCE_RHO = 0.05  # the radius of plain sharpness that votes (others are drawn in the figures)
REFERENCE_ADAPTIVE_RHO = 0.5
SURFACE_WIDTH_RISE = 0.1  # nats: the surface width is where the loss stays within this of its centre value

MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("top_eigenvalue", "top Hessian eigenvalue λ₁", "nats", True, False,
            "a rescaling of the weights that keeps the function can make λ₁ as large as wanted (Dinh et al. 2017)"),
    Measure("trace", "Hessian trace tr H", "nats", True, True,
            "a sum over all P eigenvalues: grows with the parameter count"),
    Measure("trace_per_parameter", "mean eigenvalue tr H / P", "nats", True, False,
            "the trace divided by the parameter count P"),
    Measure("worst_case_sharpness", "worst-case sharpness (SAM), ρ = {rho}", "nats", True, True,
            "max of L(w + δ) − L(w) over ‖δ‖₂ ≤ ρ: a fixed radius is a smaller step for larger ‖w‖"),
    Measure("average_case_sharpness", "average-case sharpness, ρ = {rho}", "nats", True, True,
            "E L(w + δ) − L(w), δ ~ N(0, ρ²I): about ρ²/2 tr H, so it grows with the parameter count"),
    Measure("adaptive_sharpness", "adaptive worst-case sharpness, ρ = {rho}", "nats", False, False,
            "the ball scaled by |w| (Kwon et al. 2021): invariant to rescaling single weights"),
    Measure("adaptive_average_sharpness", "adaptive average-case sharpness, ρ = {rho}", "nats", False, True,
            "about ρ²/2 Σ wᵢ² Hᵢᵢ: a sum over parameters"),
    Measure("surface_width", f"1D surface width at +{SURFACE_WIDTH_RISE:g} nats", "direction units", True, False,
            f"length of the interval around the weights, along a filter-normalised random direction, where the "
            f"loss rises by less than {SURFACE_WIDTH_RISE:g} nats; larger is flatter", smaller_is_flatter=False),
)}


# == defining and running a study ================================================================================
@dataclasses.dataclass
class StudyVariant:
    """One model of a study: ``name`` names its run directories (``<name>-s<seed>``)."""

    name: str
    model: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AnalysisSettings:
    """The analyses a study runs, with settings cheap enough for a CPU demo (raise them for a real study).

    All analyses use the same fixed subset of ``samples`` training examples (seed ``seed``) and the raw weights.

    - Hessian at the checkpoints of ``checkpoints`` (:data:`landscape.runs.CHECKPOINT_SPEC_HELP`): the ``top_k``
      largest eigenvalues each to a relative accuracy ``tol`` and the trace with ``trace_matvecs`` more products,
      deflated by the eigenvalues' Lanczos basis (``hessian.nc``); at the final checkpoint the spectral density by SLQ with ``density_probes`` x
      ``density_steps`` products (``hessian-density.nc``);
    - sharpness at the final checkpoint, at the radii ``rhos`` (plain, c = 1) and ``adaptive_rhos`` (adaptive,
      c = |w|), with ``sharpness_steps`` ascent steps and ``sharpness_draws`` antithetic pairs for the average;
    - loss surfaces at the final checkpoint along filter-normalised random directions: ``surface_points`` on a
      line and ``surface_points_2d`` squared on a plane, over ``[-surface_range, surface_range]``.
    """

    samples: int = 64
    checkpoints: str = "all"
    top_k: int = 1
    tol: float = 1e-2
    trace_matvecs: int = 9
    density_probes: int = 2
    density_steps: int = 20
    rhos: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    adaptive_rhos: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)
    sharpness_steps: int = 5
    sharpness_draws: int = 4
    surface_points: int = 21
    surface_points_2d: int = 13
    surface_range: float = 1.0
    seed: int = 0
    device: str | None = None  # None: the GPU when there is one, else the CPU


@dataclasses.dataclass
class StudySpec:
    """Variants x seeds, trained with one recipe plus overrides, analysed with :class:`AnalysisSettings`."""

    variants: list[StudyVariant]
    seeds: list[int]
    data: str = "digits"
    recipe: str | None = "digits"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    analysis: AnalysisSettings = dataclasses.field(default_factory=AnalysisSettings)

    def run_names(self) -> list[tuple[StudyVariant, int, str]]:
        return [(v, s, f"{v.name}-s{s}") for v in self.variants for s in self.seeds]


# The small ViT every demo variant derives from; average pooling instead of a class token learns 8x8 digits in a
# few epochs (a class token needs several times more).
_DEMO_VIT = dict(embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0, class_token=False, global_pool="avg")
_DEMO_MLIT = dict(embed_dim=32, depth=3, num_heads=4, num_kv_heads=2, hidden_first=64, hidden_last=32,
                  class_token=False, global_pool="avg")
_DEMO_DATA = {
    "digits": dict(patch_size=2, epochs=12, batch_size=32, lr=3e-3, overrides={}),
    "fashion-mnist": dict(patch_size=4, epochs=8, batch_size=64, lr=2e-3,
                          overrides={"data.train_size": 12000, "data.val_size": 2000}),
}


def demo_study(data: str = "digits", *, seeds: int = 2, epochs: int | None = None) -> StudySpec:
    """The study of ``landscape demo``: baseline ViT, GroupedMLP (pairs), ShallowMLP (half width, sliced and random
    init) and an mLiT, ``seeds`` seeds each, on ``digits`` (8x8, patch 2) or ``fashion-mnist`` (28x28, patch 4, a
    fixed 12,000-image training subset)."""
    if data not in _DEMO_DATA:
        raise ConfigError(f"The demo runs on {' or '.join(_DEMO_DATA)}, not {data!r}.")
    if seeds < 1:
        raise ConfigError(f"The demo needs at least one seed, got {seeds}.")
    d = _DEMO_DATA[data]
    vit = dict(_DEMO_VIT, patch_size=d["patch_size"])
    base = "vit_pico_patch4_32"
    variants = [
        StudyVariant("baseline", base, dict(vit)),
        StudyVariant("grouped-g2", f"{base}_grouped_mlp", dict(vit, group_size=2)),
        StudyVariant("shallow-sliced", f"{base}_shallow_mlp", dict(vit, width_ratio=0.5, mlp_init="sliced")),
        StudyVariant("shallow-random", f"{base}_shallow_mlp", dict(vit, width_ratio=0.5, mlp_init="random")),
        StudyVariant("mlit", "mlit_xxs", dict(_DEMO_MLIT, patch_size=d["patch_size"])),
    ]
    overrides = {
        "epochs": int(epochs or d["epochs"]), "batch_size": d["batch_size"], "amp": "off",
        "optim.opt": "adamw", "optim.lr": d["lr"], "optim.weight_decay": 0.05,
        "schedule.sched": "cosine", "schedule.warmup_epochs": 1, "schedule.warmup_lr": 1e-4,
        "schedule.min_lr": d["lr"] / 10,
        "augment.crop": "none", "augment.hflip": 0.0, "augment.label_smoothing": 0.0, "augment.mixup": 0.0,
        "augment.cutmix": 0.0, "ema.decay": 0.98, "checkpoint.every": "epoch", "checkpoint.keep": "all",
        "model.drop_path": 0.0, **d["overrides"],
    }
    return StudySpec(variants=variants, seeds=list(range(seeds)), data=data, recipe="digits", overrides=overrides)


@dataclasses.dataclass(frozen=True)
class StudyEvent:
    """A progress report: ``stage`` (train, hessian, sharpness, surface, dynamics, figures, report, done) of the run
    ``run`` (empty for the whole study), a one-line ``message`` and the seconds the stage took."""

    stage: str
    run: str
    message: str
    seconds: float = 0.0


@dataclasses.dataclass
class StudyOutcome:
    """Where a finished study put things, and the wall time of each stage summed over runs (seconds)."""

    out: Path
    runs: list[Path]
    figures: dict[str, list[Path]]
    report: Path | None
    timings: dict[str, float]
    wall_time: float


Emit = Callable[[StudyEvent], None]


def train_config(spec: StudySpec, variant: StudyVariant, seed: int):
    """The resolved :class:`~landscape.config.TrainConfig` of one run of the study."""
    from landscape.trainers import build_config

    return build_config(spec.recipe, model=variant.model, model_kwargs=variant.kwargs, data=spec.data,
                        options={"seed": seed}, overrides=spec.overrides)


def _same_run(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a run directory's config.yaml is the run the study asks for (the fields a study sets)."""
    def pick(c: dict[str, Any]) -> tuple:
        model = c.get("model") or {}
        asked = (wanted.get("model") or {}).get("kwargs", {})
        kwargs = {k: v for k, v in (model.get("kwargs") or {}).items() if k in asked}
        return (model.get("name"), kwargs, c.get("seed"), c.get("epochs"), (c.get("data") or {}).get("name"),
                c.get("optim"), c.get("batch_size"))
    return pick(saved) == pick(wanted)


def ensure_trained(config, run_dir: Path, *, data_dir=None, emit: Emit | None = None) -> str:
    """Train ``config`` into ``run_dir`` unless it is already there: ``"skipped"`` when the run finished,
    ``"resumed"`` when it continued from ``state/last.pt``, ``"trained"`` otherwise.

    A directory holding a different run (another model, seed, epochs or optimiser) is refused rather than mixed.
    """
    from landscape.config import to_dict
    from landscape.trainers import train

    emit = emit or (lambda e: None)
    run = Run(run_dir)
    wanted = to_dict(config)
    if run.config_path.exists():
        saved = run.load_config()
        if not _same_run(saved, wanted):
            raise LandscapeError(
                f"{run_dir} holds a run with other settings than the study asks for; delete it or give another --out.")
        if _finished(run, int(saved.get("epochs", config.epochs))):
            return "skipped"
        if run.state_path.exists():
            t0 = time.perf_counter()
            result = train(None, run_dir, resume=True, data_dir=data_dir, progress=False)
            emit(StudyEvent("train", run.root.name, _train_message(result.rows, "resumed"), time.perf_counter() - t0))
            return "resumed"
    t0 = time.perf_counter()
    result = train(config, run_dir, overwrite=True, data_dir=data_dir, progress=False)
    emit(StudyEvent("train", run.root.name, _train_message(result.rows, "trained"), time.perf_counter() - t0))
    return "trained"


def _finished(run: Run, epochs: int) -> bool:
    metrics = run.read_metrics()
    if metrics.empty or "epoch" not in metrics or not (metrics["epoch"] == epochs).any():
        return False
    return run.checkpoint_path(epoch=epochs).exists()


def _train_message(rows: list[dict[str, Any]], verb: str) -> str:
    if not rows:
        return verb
    last = rows[-1]
    top1 = last.get("val_top1")
    ema = last.get("ema_val_top1")
    text = f"{verb}: {last.get('epoch')} epochs, final top-1 {top1:.1f}%" if top1 is not None else verb
    return text + (f" (EMA {ema:.1f}%)" if ema is not None else "")


def default_jobs() -> int:
    """Runs at once: one per CPU core (at most 4), since each run uses one thread."""
    return max(1, min(4, os.cpu_count() or 1))


def run_study(spec: StudySpec, out: str | os.PathLike, *, jobs: int = 1, threads: int = 1, data_dir=None,
              on_event: Emit | None = None, figures_out: str | os.PathLike | None = None, force: bool = False,
              formats: Sequence[str] = ("png", "pdf")) -> StudyOutcome:
    """Train and analyse every run of ``spec`` into ``OUT/runs/``, then write ``OUT/figures/`` and ``OUT/report.md``.

    ``jobs`` runs go at once, each in its own process with ``threads`` CPU threads (tiny models gain nothing from
    more threads, and several processes keep every core busy); ``jobs=1`` works in this process. Finished
    training and finished analyses are skipped, so an interrupted study continues when run again; ``force``
    recomputes every analysis (training is never repeated). ``on_event`` receives a :class:`StudyEvent` after
    every stage. Figures are written in ``formats``; the PNGs are also copied to ``figures_out`` when given.
    """
    from landscape.figures import write_figures
    from landscape.report import write_report

    emit = on_event or (lambda e: None)
    start = time.perf_counter()
    out = Path(out)
    runs_dir = out / "runs"
    configs = [(train_config(spec, v, s), runs_dir / name) for v, s, name in spec.run_names()]  # fail early
    tasks = [(config, run_dir, spec.analysis, data_dir, threads, force) for config, run_dir in configs]
    timings: dict[str, float] = {}

    def record(event: StudyEvent) -> None:
        timings[event.stage] = timings.get(event.stage, 0.0) + event.seconds
        emit(event)

    if jobs <= 1:
        for task in tasks:
            _study_task(task, record)
    else:
        _run_parallel(tasks, jobs, record)

    run_dirs = [run_dir for _, run_dir in configs]
    t0 = time.perf_counter()
    results = load_results(run_dirs)
    figures = write_figures(results, out / "figures", formats=formats)
    record(StudyEvent("figures", "", f"{len(figures)} figures in {out / 'figures'}", time.perf_counter() - t0))
    if figures_out is not None:  # the gallery a repository shows: the PNGs
        import shutil

        Path(figures_out).mkdir(parents=True, exist_ok=True)
        for paths in figures.values():
            for p in paths:
                if p.suffix == ".png":
                    shutil.copyfile(p, Path(figures_out) / p.name)
    t0 = time.perf_counter()
    (report_path, *_), hypotheses = write_report(results, out / "report.md", figures=figures, html=True)
    verdicts = ", ".join(f"{h.key} {h.verdict}" for h in hypotheses)
    record(StudyEvent("report", "", f"{report_path} ({verdicts})", time.perf_counter() - t0))
    return StudyOutcome(out=out, runs=run_dirs, figures=figures, report=report_path, timings=timings,
                        wall_time=time.perf_counter() - start)


def _study_task(task, emit: Emit) -> None:
    """Train one run (unless done), then analyse its checkpoints (each analysis skips what it has done)."""
    import torch

    config, run_dir, settings, data_dir, threads, force = task
    run_dir = Path(run_dir)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            # torch registers its forward-mode (jvp) decompositions through torch.jit.script on first use and
            # warns that jit.script is deprecated: nothing a user of the study can act on.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            t0 = time.perf_counter()
            if ensure_trained(config, run_dir, data_dir=data_dir, emit=emit) == "skipped":
                emit(StudyEvent("train", run_dir.name, "already trained", 0.0))
            analyze_run(Run(run_dir), settings, data_dir=data_dir, emit=emit, force=force)
            emit(StudyEvent("done", run_dir.name, f"run finished in {time.perf_counter() - t0:.0f} s", 0.0))
    finally:
        torch.set_num_threads(previous)


_worker_queue = None


def _init_worker(queue) -> None:
    global _worker_queue
    _worker_queue = queue


def _worker(task) -> None:
    _study_task(task, _worker_queue.put)


def _run_parallel(tasks, jobs: int, emit: Emit) -> None:
    """Run the tasks in ``jobs`` spawned processes, passing their events on as they come."""
    import multiprocessing
    import queue as queue_module
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        events = manager.Queue()
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context, initializer=_init_worker,
                                 initargs=(events,)) as pool:
            pending = {pool.submit(_worker, task) for task in tasks}
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(events, emit, queue_module.Empty)
                for future in finished:
                    error = future.exception()
                    if error is not None:
                        for other in pending:
                            other.cancel()
                        raise error
            _drain(events, emit, queue_module.Empty)


def _drain(events, emit: Emit, empty) -> None:
    while True:
        try:
            emit(events.get_nowait())
        except empty:
            return


def analyze_run(run: Run, settings: AnalysisSettings, *, data_dir=None, emit: Emit | None = None,
                force: bool = False) -> None:
    """Every analysis of one run with ``settings``: the Hessian's top eigenvalue and trace at the selected
    checkpoints; its spectral density, sharpness and loss surfaces at the final one; the dynamics. ``force``
    recomputes results made with other settings instead of refusing them."""
    from landscape.analyses.dynamics import write_dynamics

    emit = emit or (lambda e: None)
    for stage, analysis in _ANALYSES.items():
        t0 = time.perf_counter()
        message = analysis(run, settings, data_dir, force)
        emit(StudyEvent(stage, run.root.name, message, time.perf_counter() - t0))
    t0 = time.perf_counter()
    ds, _ = write_dynamics(run)
    drop = ds["peak_to_final_drop"]
    text = ", ".join(f"{w} {float(drop.sel(weights=w)):.2f}" for w in ds["weights"].values)
    emit(StudyEvent("dynamics", run.root.name, f"peak-to-final drop (points): {text}", time.perf_counter() - t0))


def _hessian(run: Run, settings: AnalysisSettings, data_dir, force: bool = False) -> str:
    from landscape.analyses.hessian import HessianSettings, run_hessian_analysis

    common = dict(samples=settings.samples, seed=settings.seed)
    curvature = HessianSettings(top_k=settings.top_k, tol=settings.tol, trace=True,
                                trace_matvecs=settings.trace_matvecs, **common)
    ds = run_hessian_analysis(run, curvature, checkpoints=settings.checkpoints, data_dir=data_dir, force=force,
                              device=settings.device)
    density = HessianSettings(top_k=0, density=True, density_probes=settings.density_probes,
                              density_steps=settings.density_steps, density_grid_size=400, density_scale="symlog",
                              **common)
    run_hessian_analysis(run, density, checkpoints="last", data_dir=data_dir, force=force, device=settings.device)
    last = ds.isel(checkpoint=-1)
    return (f"{ds.sizes['checkpoint']} checkpoints; final top eigenvalue {float(last['eigenvalue_largest'][0]):.3g}, "
            f"trace {float(last['trace']):.3g}")


def _sharpness(run: Run, settings: AnalysisSettings, data_dir, force: bool = False) -> str:
    from landscape.analyses.sharpness import SharpnessSettings, run_sharpness_analysis

    plain = SharpnessSettings(rhos=settings.rhos, steps=settings.sharpness_steps, draws=settings.sharpness_draws,
                              samples=settings.samples, seed=settings.seed)
    ds = run_sharpness_analysis(run, plain, checkpoints="last", data_dir=data_dir, force=force,
                                device=settings.device)
    adaptive = dataclasses.replace(plain, rhos=settings.adaptive_rhos, adaptive=True)
    ads = run_sharpness_analysis(run, adaptive, checkpoints="last", data_dir=data_dir, force=force,
                                 device=settings.device)
    last, alast = ds.isel(checkpoint=-1), ads.isel(checkpoint=-1)
    return (f"worst case at rho={settings.rhos[-1]:g}: {float(last['worst_case'][-1]):.3g} nats, adaptive at "
            f"rho={settings.adaptive_rhos[-1]:g}: {float(alast['worst_case'][-1]):.3g} nats")


def _surface(run: Run, settings: AnalysisSettings, data_dir, force: bool = False) -> str:
    from landscape.analyses.surface import SurfaceSettings, run_surface_analysis

    span = (-settings.surface_range, settings.surface_range)
    for dims, points in ((1, settings.surface_points), (2, settings.surface_points_2d)):
        surface = SurfaceSettings(directions="random", dims=dims, range=span, points=points,
                                  samples=settings.samples, seed=settings.seed)
        run_surface_analysis(run, surface, checkpoints="last", data_dir=data_dir, force=force, device=settings.device)
    return f"1D line of {settings.surface_points} points, 2D plane of {settings.surface_points_2d}² points"


_ANALYSES: dict[str, Callable[..., str]] = {
    "hessian": _hessian,
    "sharpness": _sharpness,
    "surface": _surface,
}


# == one row per run =============================================================================================
def final_measures(results: Sequence[RunResults], *, weights: str = "raw") -> tuple[Any, list[Measure]]:
    """A table with one row per run and the flatness measures found at its final checkpoint, and those measures.

    Columns: ``run``, ``variant`` (key), ``label``, ``family``, ``base``, ``seed``, ``params``, ``group_size``,
    ``width_ratio``, ``mlp_init``, ``top1_raw``/``top1_ema`` (final top-1, %), ``drop_raw``/``drop_ema``
    (peak-to-final drop, percentage points) and ``drop`` (that of ``weights``), ``gap`` (final validation minus
    training loss, nats); then per measure ``<name>`` and ``<name>_se`` (the estimator's standard error, 0 where it
    is deterministic).
    """
    import pandas as pd

    rows, found = [], {}
    for r in results:
        row: dict[str, Any] = {
            "run": str(r.path), "variant": r.variant.key, "label": r.label or r.variant.label,
            "family": r.variant.family, "base": r.variant.base, "seed": r.seed, "params": r.num_params,
            "group_size": r.variant.group_size, "width_ratio": r.variant.width_ratio, "mlp_init": r.variant.mlp_init,
        }
        row.update(_dynamics_columns(r.dynamics, weights))
        for measure, value, se in _analysis_measures(r):
            found.setdefault(measure.name, measure)
            row[measure.name], row[f"{measure.name}_se"] = value, se
        rows.append(row)
    rows.sort(key=lambda row: (FAMILIES.index(row["family"]), row["group_size"] or 0, row["mlp_init"] != "sliced",
                               row["width_ratio"] or 0, row["variant"], row["seed"]))
    return pd.DataFrame(rows), list(found.values())


def _dynamics_columns(ds, weights: str) -> dict[str, float]:
    out = {"top1_raw": math.nan, "top1_ema": math.nan, "drop_raw": math.nan, "drop_ema": math.nan, "gap": math.nan}
    if ds is not None:
        for w in (str(w) for w in ds["weights"].values):
            out[f"top1_{w}"] = float(ds["final_top1"].sel(weights=w))
            out[f"drop_{w}"] = float(ds["peak_to_final_drop"].sel(weights=w))
        gap = ds["generalization_gap"].values
        finite = gap[np.isfinite(gap)]
        out["gap"] = float(finite[-1]) if finite.size else math.nan
    out["drop"] = out.get(f"drop_{weights}", math.nan)
    return out


def _analysis_measures(r: RunResults) -> list[tuple[Measure, float, float]]:
    """The flatness measures of a run's final checkpoint as ``(measure, value, standard error)``."""
    from landscape.compare import final_entry

    out: list[tuple[Measure, float, float]] = []
    step = r.final_step if r.final_step is not None else -1
    if r.hessian is not None and r.hessian.sizes.get("checkpoint", 0):
        h, _ = final_entry(r.hessian, step)
        if "eigenvalue_largest" in h:
            out.append((MEASURES["top_eigenvalue"], float(h["eigenvalue_largest"].isel(k=0)), 0.0))
        if "trace" in h:
            trace, se = float(h["trace"]), float(h.get("trace_standard_error", 0.0))
            out.append((MEASURES["trace"], trace, se))
            p = float(h["num_parameters"]) if "num_parameters" in h else float(r.num_params or "nan")
            out.append((MEASURES["trace_per_parameter"], trace / p, se / p))
    kinds = ((r.sharpness, "worst_case_sharpness", "average_case_sharpness", REFERENCE_RHO),
             (r.adaptive_sharpness, "adaptive_sharpness", "adaptive_average_sharpness", REFERENCE_ADAPTIVE_RHO))
    for ds, worst, average, reference in kinds:
        if ds is None or not ds.sizes.get("checkpoint", 0):
            continue
        entry, _ = final_entry(ds, step)
        rhos = entry["rho"].values
        rho = float(rhos[np.argmin(np.abs(np.log(rhos / reference)))])
        at = entry.sel(rho=rho)
        if "worst_case" in at:
            out.append((MEASURES[worst].at(rho), float(at["worst_case"]), 0.0))
        if "average_case" in at:
            se = float(at["average_case_standard_error"]) if "average_case_standard_error" in at else 0.0
            out.append((MEASURES[average].at(rho), float(at["average_case"]), se))
    line = r.surfaces.get("surface-random-1d")
    if line is not None and line.sizes.get("checkpoint", 0):
        entry, _ = final_entry(line, step)
        out.append((MEASURES["surface_width"], surface_width(entry["a"].values, entry["loss"].values), 0.0))
    return out


def surface_width(a: np.ndarray, loss: np.ndarray, rise: float = SURFACE_WIDTH_RISE) -> float:
    """Length of the interval around ``a = 0`` on which ``loss - loss(0) < rise`` (linear interpolation between grid
    points; where the loss stays below on one side, the interval runs to the end of the grid on that side)."""
    a, loss = np.asarray(a, dtype=float), np.asarray(loss, dtype=float)
    centre = int(np.argmin(np.abs(a)))
    excess = loss - loss[centre] - rise

    def edge(indices) -> float:
        previous = centre
        for i in indices:
            if excess[i] >= 0:
                t = -excess[previous] / (excess[i] - excess[previous])
                return float(a[previous] + t * (a[i] - a[previous]))
            previous = i
        return float(a[previous])

    return edge(range(centre + 1, len(a))) - edge(range(centre - 1, -1, -1))
