"""The summary of a set of runs: their results gathered, and the flatness measures at each final checkpoint.

:func:`load_results` opens run directories and gathers every ``RUN/analysis/*.nc`` as a :class:`Result`, whose
meaning (analysis kind, weights, ``--params`` pattern, adaptive or plain, density only, ...) is read from the
file's attributes (``analysis`` and ``settings``), never from its name. :class:`RunResults` then names the result
each reader wants: the Hessian of the whole model, its spectral density, plain and adaptive sharpness and the
loss surfaces of the chosen weights. :func:`final_measures` makes one row per run of the measures at the final
checkpoint, described by :data:`MEASURES`; figures, report and compare all read these.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from landscape.errors import LandscapeError
from landscape.models.variants import FAMILY_ORDER, Variant, describe_variant, unique_labels
from landscape.runs import Run


# == one results file ============================================================================================
@dataclasses.dataclass(frozen=True)
class Result:
    """One results file of a run: its analysis ``kind`` and ``settings`` as its attributes record them."""

    path: Path
    kind: str
    settings: dict[str, Any]
    dataset: Any

    @property
    def weights(self) -> str:
        return str(self.settings.get("weights") or "raw")

    @property
    def params(self) -> str | None:
        return self.settings.get("params") or None

    @property
    def name(self) -> str:
        """A name for the result made from its attributes, never from its file's name
        (:func:`landscape.analyses.results.results_name`): a surface's names each target of its line or plane by
        its run's folder name and checkpoint, ``surface-interpolate-runB@epoch-0010-1d`` (the same wherever the
        runs have moved since; :meth:`named` with more of the targets' folders tells apart runs of one name)."""
        return self.named()

    def named(self, folders: int = 1) -> str:
        """:attr:`name`, with each target of a line or plane named by the last ``folders`` folders of its run's
        path (``studyA/runB@epoch-0010`` for 2)."""
        from landscape.analyses.results import results_name

        kind = self.kind
        if kind == "surface":
            from landscape.analyses.results import stored_path_file

            files = [stored_path_file(str(t), self.path.parent.parent) for t in self.settings.get("targets") or ()]
            targets = "".join(f"-{Path(*f.parent.parent.parts[-folders:]).as_posix()}@{f.stem}" for f in files)
            kind = f"surface-{self.settings.get('directions', 'random')}{targets}-{self.settings.get('dims')}d"
        return results_name(kind, self.settings)

    @property
    def updated(self) -> float:
        """When the result was last written (its ``updated`` attr, seconds since the epoch; 0 when not recorded)."""
        import datetime

        try:
            return datetime.datetime.fromisoformat(str(self.dataset.attrs.get("updated"))).timestamp()
        except (TypeError, ValueError, OverflowError):
            return 0.0

    def checkpoints(self) -> int:
        return int(self.dataset.sizes.get("checkpoint", 0))

    def describe(self) -> str:
        """What the file holds, in words, from its attributes (``adaptive sharpness, EMA weights``)."""
        s = self.settings
        if self.kind == "hessian":
            parts = [name for name, on in (("eigenvalues", s.get("top_k")), ("trace", s.get("trace")),
                                           ("spectral density", s.get("density"))) if on]
            text = "Hessian " + ", ".join(parts) if parts else "Hessian"
        elif self.kind == "sharpness":
            text = "adaptive sharpness (c = |w|)" if s.get("adaptive") else "sharpness (SAM, c = 1)"
        elif self.kind == "surface":
            text = f"loss surface along {s.get('directions', '?')} directions, {s.get('dims', '?')}D"
        else:
            text = self.kind
        if self.weights != "raw":
            text += f", {self.weights.upper()} weights"
        if self.params:
            text += f", parameters {self.params}"
        return text


def read_settings(ds) -> dict[str, Any]:
    """The settings stored in a results Dataset's attributes (empty when absent or unreadable)."""
    try:
        settings = json.loads(ds.attrs.get("settings") or "{}")
    except (TypeError, ValueError, RecursionError):
        return {}
    return settings if isinstance(settings, dict) else {}


def classify(ds) -> str | None:
    """The analysis a results Dataset holds, from its ``analysis`` attribute (a ``dynamics.nc`` written before it
    had one is recognised by its variables); ``None`` for a file that is no analysis result."""
    kind = ds.attrs.get("analysis")
    if kind:
        return str(kind)
    if "peak_to_final_drop" in ds.data_vars:
        return "dynamics"
    return None


def gather_results(run: Run) -> list[Result]:
    """Every results file of ``run`` (``RUN/analysis/*.nc``, in name order), classified by its attributes."""
    from landscape.analyses.results import read_results

    out = []
    for path in sorted(Path(run.analysis_dir).glob("*.nc")):
        ds = read_results(path)
        kind = classify(ds) if ds is not None else None
        if kind is not None:
            missing = missing_variable(kind, ds)
            if missing:
                raise LandscapeError(f"{path} says it holds {kind} results but has no {missing!r}; delete it or "
                                     "recompute it with --force.")
            shapes = {**_DIMS.get(kind, {}), "step": {"checkpoint"}, "epoch": {"checkpoint", "epoch"}}
            odd = [name for name, dims in shapes.items() if name in ds.variables and not set(ds[name].dims) <= dims]
            if odd:
                raise LandscapeError(f"{path} has {odd[0]!r} over {tuple(ds[odd[0]].dims)}, which no {kind} results "
                                     "file holds; delete it or recompute it with --force.")
            unreal = [name for name in shapes if name in ds.variables and ds[name].dtype.kind not in "fiub"]
            if unreal:  # text, complex numbers or objects where the readers take real numbers
                held = "text" if ds[unreal[0]].dtype.kind in "USO" else str(ds[unreal[0]].dtype)
                raise LandscapeError(f"{path} holds {unreal[0]!r} as {held}, not as real numbers, which no results "
                                     "file does; delete it or recompute it with --force.")
            empty = [d for name in shapes if name in ds.variables for d in ds[name].dims
                     if d != "checkpoint" and ds.sizes[d] == 0]
            if empty:  # a grid, a list of radii or of eigenvalues with no entry: nothing any analysis writes
                raise LandscapeError(f"{path} has no entries along {empty[0]!r}, which no {kind} results file has; "
                                     "delete it or recompute it with --force.")
            out.append(Result(path=path, kind=kind, settings=read_settings(ds), dataset=ds))
    return out


_REQUIRED = {"sharpness": ("rho",), "surface": ("loss",),
             "dynamics": ("peak_to_final_drop",)}
"""Variables without which a results file of each kind cannot be read (the readers index by them)."""


def missing_variable(kind: str, ds) -> str | None:
    """The first of :data:`_REQUIRED`'s variables of ``kind`` that ``ds`` lacks, or None."""
    return next((name for name in _REQUIRED.get(kind, ()) if name not in ds.variables), None)

_DIMS = {
    "hessian": {"eigenvalue_largest": {"checkpoint", "k"}, "eigenvalue_smallest": {"checkpoint", "k"},
                "trace": {"checkpoint"}, "trace_standard_error": {"checkpoint"}, "num_parameters": {"checkpoint"},
                "density": {"checkpoint", "grid"}, "density_eigenvalue": {"checkpoint", "grid"},
                "block_eigenvalue_largest": {"checkpoint", "group"}, "block_trace": {"checkpoint", "group"}},
    "sharpness": {"rho": {"rho"}, "worst_case": {"checkpoint", "rho"}, "average_case": {"checkpoint", "rho"},
                  "average_case_standard_error": {"checkpoint", "rho"}},
    "surface": {"a": {"a"}, "b": {"b"}, "loss": {"checkpoint", "a", "b"}},
    "dynamics": {"peak_to_final_drop": {"weights"}, "top1": {"weights", "epoch"}},
}
"""The dimensions each variable the readers use may have, by kind of results file (a value on others would be
read as something else, or fail inside a reader)."""


def final_entry(ds, step: int) -> tuple[Any, int | None]:
    """The entry of ``ds`` at checkpoint ``step`` (else the latest analysed one) and the step it is at.

    Results without a ``checkpoint`` dimension are returned whole. A ``weights`` dimension is reduced to the
    raw weights when present, else its first entry.
    """
    used = None
    if "checkpoint" in ds.dims and ds.sizes["checkpoint"] > 0:
        steps = np.asarray(ds["step"].values) if "step" in ds.coords else None
        if steps is not None and (steps == step).any():
            index = int(np.flatnonzero(steps == step)[-1])
        else:
            index = int(np.argmax(steps)) if steps is not None else ds.sizes["checkpoint"] - 1
        ds = ds.isel(checkpoint=index)
        used = int(steps[index]) if steps is not None else None
    if "weights" in ds.dims:
        names = [str(w) for w in ds["weights"].values]
        ds = ds.isel(weights=names.index("raw") if "raw" in names else 0)
    return ds, used


# == one run and its results =====================================================================================
def _density_only(s: dict[str, Any]) -> bool:
    return bool(s.get("density")) and not (s.get("top_k") or s.get("trace"))


@dataclasses.dataclass
class RunResults:
    """One run and every result it holds (``results``), with the ones the readers use picked by their settings
    for the weights ``weights`` (``None`` / empty where the run has none):

    ``hessian`` the eigenvalues and trace of the whole model, ``hessian_density`` its spectral density (a
    density-only result first), ``sharpness`` plain (c = 1) and ``adaptive_sharpness`` adaptive (c = |w|)
    sharpness of the whole model, ``surfaces`` every loss surface by :attr:`Result.name`
    (``surface-random-1d``, ``surface-interpolate-runB@epoch-0010-1d``, ``...-studyA/runB@...`` where two target
    runs share a folder name; of two of one name, the one that wins as below keeps it, the other gets ``-2``),
    ``dynamics`` the training dynamics. Where several results qualify, the one that holds the final checkpoint and
    the most checkpoints wins, then the one written last (not a copy kept aside under another name).
    ``final_step`` is the step of the run's last checkpoint. ``problems`` says, one sentence each, what of the run
    could not be read or is incomplete.
    """

    path: Path
    run: Run
    variant: Variant
    label: str
    seed: int
    num_params: int | None
    results: list[Result] = dataclasses.field(default_factory=list)
    dynamics: Any = None
    final_step: int | None = None
    weights: str = "raw"
    problems: list[str] = dataclasses.field(default_factory=list)

    def find(self, kind: str, test: Callable[[dict[str, Any]], bool] = lambda s: True, *,
             prefer: Callable[[dict[str, Any]], bool] = lambda s: False) -> Result | None:
        """The best result of ``kind`` for the whole model and :attr:`weights` whose settings pass ``test``."""
        found = [r for r in self.results if r.kind == kind and r.weights == self.weights and r.params is None
                 and test(r.settings)]
        if not found:
            return None
        return min(found, key=lambda r: (not prefer(r.settings), *self._rank(r)))

    def _rank(self, r: Result) -> tuple:
        """Which of several results qualifying alike wins: the one holding the final checkpoint, then the most
        checkpoints, then the one written last (a copy kept aside keeps the time it was written)."""
        steps = r.dataset["step"].values if "step" in r.dataset.coords else ()
        try:
            written = r.path.stat().st_mtime_ns  # within the attr's second (a copy made by cp is the same data)
        except OSError:
            written = 0
        return (self.final_step not in set(int(s) for s in steps), -r.checkpoints(), -r.updated, -written,
                r.path.name)

    def _dataset(self, *args, **kwargs):
        result = self.find(*args, **kwargs)
        return result.dataset if result is not None else None

    @property
    def hessian(self):
        return self._dataset("hessian", lambda s: not _density_only(s) and s.get("matrix", "hessian") == "hessian")

    @property
    def ggn(self):
        """The eigenvalues of the generalised Gauss-Newton matrix (``--matrix ggn``), or ``None``."""
        return self._dataset("hessian", lambda s: s.get("matrix") == "ggn" and bool(s.get("top_k")))

    @property
    def hessian_density(self):
        return self._dataset("hessian", lambda s: bool(s.get("density")) and s.get("matrix", "hessian") == "hessian",
                             prefer=_density_only)

    @property
    def sharpness(self):
        return self._dataset("sharpness", lambda s: not s.get("adaptive"))

    @property
    def adaptive_sharpness(self):
        return self._dataset("sharpness", lambda s: bool(s.get("adaptive")))

    @property
    def surfaces(self) -> dict[str, Any]:
        found = sorted((r for r in self.results if r.kind == "surface"), key=self._rank)
        names = {id(r): r.name for r in found}
        for folders in (2, 3, 4):  # lines to two runs of one folder name (two studies'): more of their paths
            for name in {n for n in names.values() if list(names.values()).count(n) > 1}:
                alike = [r for r in found if names[id(r)] == name]
                if len({tuple(r.settings.get("targets") or ()) for r in alike}) > 1:
                    names.update({id(r): r.named(folders) for r in alike})
        surfaces: dict[str, Any] = {}
        for r in found:
            key, n = names[id(r)], 1
            while key in surfaces:  # two of one name (a copied file, Datasets given in memory): both kept
                n += 1
                key = f"{names[id(r)]}-{n}"
            surfaces[key] = r.dataset
        return surfaces


def load_run(path: str | os.PathLike, *, weights: str = "raw") -> RunResults:
    """One run directory and its results (dynamics from ``metrics.csv`` when the run has a history but no
    ``dynamics.nc``)."""
    from landscape.analyses.dynamics import run_dynamics

    path = Path(path)
    run = Run.open(path)
    config = run.load_config()
    infos = run.checkpoints()
    if not (config.get("model") or {}).get("name") and infos:
        config = {**config, "model": {"name": infos[-1].model, "kwargs": infos[-1].model_kwargs}}
    results = gather_results(run)
    dynamics = next((r.dataset for r in results if r.kind == "dynamics"), None)
    problems = []
    if run.metrics_path.exists() or run.metrics_path.is_symlink():  # a link to nowhere is refused, not skipped
        try:
            current = run_dynamics(run)
        except LandscapeError as e:  # the run's other results still count; the gap is said, not hidden
            if dynamics is None:
                problems.append(f"{str(e).rstrip('.')}. The run's accuracy curve and peak-to-final drop are left out.")
        else:
            if dynamics is not None and not _same_curves(dynamics, current):  # trained on since it was written
                problems.append(f"{path}'s analysis/dynamics.nc is older than its metrics.csv (the run trained on "
                                f"since); its dynamics are read from metrics.csv (landscape analyze dynamics {path} "
                                "updates the file).")
            dynamics = current
    if not any(r.kind in ("hessian", "sharpness", "surface") for r in results):
        problems.append(f"{path} has no Hessian, sharpness or surface results yet (landscape analyze ... {path}); "
                        "its flatness measures are empty.")
    if dynamics is not None and "final_epoch" in dynamics and "planned_epochs" in dynamics.attrs:
        final, planned = int(dynamics["final_epoch"]), int(dynamics.attrs["planned_epochs"])
        if final < planned:  # said, since its "final" top-1 and drop are not the trained run's
            problems.append(f"{path} was evaluated up to epoch {final} of its {planned} (stopped early or still "
                            f"training); its final top-1 and peak-to-final drop are epoch {final}'s.")
    variant = describe_variant(config, run.name)
    if infos:
        try:  # its parameters and top-1 are read from the last checkpoint's header
            run.check_checkpoint_model(infos[-1])
        except LandscapeError as e:
            problems.append(str(e))
        num_params, final_step = infos[-1].num_params, infos[-1].step
    else:  # results kept without their checkpoints (a committed study): read both from what was kept
        num_params, final_step = _whole_model_parameters(results), _last_step(run)
    loaded = RunResults(path=path, run=run, variant=variant, label=variant.label,
                        seed=int(config.get("seed", 0) or 0), num_params=num_params, results=results,
                        dynamics=dynamics, final_step=final_step, weights=weights, problems=problems)
    loaded.problems.extend(_measured_elsewhere(loaded))
    return loaded


def _same_curves(stored, current) -> bool:
    """Whether a stored dynamics result holds the same epochs and top-1 curves as one computed now."""
    try:
        return (list(stored["epoch"].values) == list(current["epoch"].values)
                and list(stored["weights"].values) == list(current["weights"].values)
                and np.allclose(stored["top1"].values, current["top1"].values, rtol=0, atol=1e-9, equal_nan=True))
    except (KeyError, ValueError, TypeError):
        return False


def _measured_elsewhere(r: RunResults) -> list[str]:
    """Sentences for the flatness measures of ``r`` that are not of its final checkpoint (analysed before the run
    trained on) or that its grid cannot hold (a 1D surface that never rises enough for its width)."""
    out = []
    if r.final_step is not None:
        late = []
        used = {"Hessian": r.hessian, "sharpness": r.sharpness, "adaptive sharpness": r.adaptive_sharpness,
                "1D surface": r.surfaces.get("surface-random-1d")}
        for what, ds in used.items():
            if ds is None or not ds.sizes.get("checkpoint", 0) or "step" not in ds.coords:
                continue
            steps = np.asarray(ds["step"].values, dtype=float)
            if not (steps == r.final_step).any():
                _, at = final_entry(ds, r.final_step)
                epochs = np.asarray(ds["epoch"].values, dtype=float) if "epoch" in ds.coords else np.array([])
                epoch = epochs[np.flatnonzero(steps == at)[-1]] if epochs.size and at is not None else math.nan
                late.append(f"{what} (step {at}" + (f", epoch {int(epoch)})" if np.isfinite(epoch) else ")"))
        if late:
            out.append(f"{r.path}'s {', '.join(late)} results are of a checkpoint before its final one (step "
                       f"{r.final_step}): its flatness measures there are that checkpoint's; analyse the final one "
                       f"with landscape analyze ... {r.path} --checkpoints last.")
    line = r.surfaces.get("surface-random-1d")
    if line is not None and line.sizes.get("checkpoint", 0):
        entry, _ = final_entry(line, r.final_step if r.final_step is not None else -1)
        a, loss = np.asarray(entry["a"].values, dtype=float), np.asarray(entry["loss"].values, dtype=float)
        if np.isnan(surface_width(a, loss)):
            out.append(f"{r.path}'s 1D loss surface rises less than {SURFACE_WIDTH_RISE:g} nats within its grid "
                       f"({a.min():g} to {a.max():g}) on at least one side, so its surface width lies beyond the grid "
                       "and is left out; measure a wider slice with landscape analyze surface RUN --dims 1 --range "
                       "START:STOP --force.")
    return out


def _whole_model_parameters(results: list[Result]) -> int | None:
    """The parameter count a whole-model Hessian result was taken over, or ``None``."""
    for r in results:
        if r.kind == "hessian" and not r.settings.get("params") and "num_parameters" in r.dataset:
            values = np.asarray(r.dataset["num_parameters"].values, dtype=float).ravel()
            values = values[np.isfinite(values)]
            if values.size:
                return int(values[-1])
    return None


def _last_step(run: Run) -> int | None:
    """The step of the last row of ``metrics.csv``, or ``None``."""
    try:
        metrics = run.read_metrics()
    except LandscapeError:
        return None
    if metrics.empty or "step" not in metrics:
        return None
    steps = metrics["step"].dropna()
    return int(steps.iloc[-1]) if len(steps) else None


def load_results(paths: Iterable[str | os.PathLike], *, weights: str = "raw",
                 loader: Callable[..., Iterable[RunResults]] = map) -> list[RunResults]:
    """Open every run directory and gather its results (:func:`load_run`); runs in the order given, each once,
    labelled so that no two variants share a label. ``loader`` maps :func:`load_run` over the paths, in order:
    the built-in ``map``, or a process pool's to read several runs at once."""
    results = []
    seen: set[Path] = set()
    for run in loader(functools.partial(load_run, weights=weights), list(paths)):
        if run.run.root.resolve() in seen:
            continue
        seen.add(run.run.root.resolve())
        results.append(run)
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

    @property
    def flags(self) -> str:
        """The marks after the measure's name: :data:`FLAG_REPARAMETERISATION`, :data:`FLAG_SIZE`, both or none."""
        return (FLAG_REPARAMETERISATION if self.reparameterisation else "") + (FLAG_SIZE if self.size_dependent else "")


FLAG_REPARAMETERISATION = "†"  # the measure changes under reparameterisations that keep the network function
FLAG_SIZE = "‡"  # the measure grows with the parameter count or the weight norm

REFERENCE_RHO = 0.05  # the radius of plain sharpness that votes (others are drawn in the figures)
REFERENCE_ADAPTIVE_RHO = 0.5
SURFACE_WIDTH_RISE = 0.1  # nats: the surface width is where the loss stays within this of its centre value

MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("top_eigenvalue", "top Hessian eigenvalue λ₁", "nats per squared weight", True, False,
            "a rescaling of the weights that keeps the function can make λ₁ as large as wanted (Dinh et al. 2017)"),
    Measure("trace", "Hessian trace tr H", "nats per squared weight", True, True,
            "a sum over all P eigenvalues: grows with the parameter count"),
    Measure("trace_per_parameter", "mean eigenvalue tr H / P", "nats per squared weight", True, False,
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
            f"loss rises by less than {SURFACE_WIDTH_RISE:g} nats (left out where the grid ends first); larger is "
            "flatter", smaller_is_flatter=False),
)}


# == one row per run =============================================================================================
# The results each flatness measure is read from (RunResults attributes; a surface by its name).
MEASURE_SOURCES = {"top_eigenvalue": "hessian", "trace": "hessian", "trace_per_parameter": "hessian",
                   "worst_case_sharpness": "sharpness", "average_case_sharpness": "sharpness",
                   "adaptive_sharpness": "adaptive_sharpness", "adaptive_average_sharpness": "adaptive_sharpness",
                   "surface_width": "surface-random-1d"}
# Settings that change only memory, speed or what else a file holds, never the measures read from it.
_INCIDENTAL_SETTINGS = frozenset({"batch_size", "vectors_per_pass", "product", "top_k", "which", "density",
                                  "density_probes", "density_steps", "checkpoints", "shard"})


def settings_disagreements(results: Sequence[RunResults]) -> dict[str, str]:
    """``{source: sentence}`` for each kind of result (:data:`MEASURE_SOURCES`) whose runs were measured with
    different settings (evaluation samples, seed, dtype, tolerance, radii, steps, ...): their measures compare
    unlike measurements."""
    out = {}
    for source in dict.fromkeys(MEASURE_SOURCES.values()):
        per_run = []
        for r in results:
            ds = r.surfaces.get(source) if source.startswith("surface") else getattr(r, source)
            if ds is not None and ds.sizes.get("checkpoint", 0):
                per_run.append((r.run.name, read_settings(ds), ds.attrs))
        if len(per_run) < 2:
            continue
        per_run = _measured_data(per_run)
        keys = sorted(set().union(*(set(s) for _, s in per_run)) - _INCIDENTAL_SETTINGS)
        parts = []
        for key in keys:
            values: dict[str, list[str]] = {}
            for name, settings in per_run:
                values.setdefault(json.dumps(settings.get(key), sort_keys=True), []).append(name)
            if len(values) > 1:
                parts.append(f"{key} " + " vs ".join(
                    f"{value} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})" for value, names in values.items()))
        if parts:
            out[source] = (f"The runs' {source.replace('_', ' ')} results were measured with different settings "
                           f"({'; '.join(parts[:3])}{'; ...' if len(parts) > 3 else ''}), so their measures do not "
                           "compare like with like.")
    return out


_DATA_ATTRS = ("data", "data_img_size", "data_options")
"""The attrs naming the data a result was measured on (:func:`landscape.analyses.evaluation.analysis_data_attrs`)."""


def _measured_data(per_run: list[tuple[str, dict, Any]]) -> list[tuple[str, dict]]:
    """``(name, settings)`` with the data each result was measured on in place of the options that named it: the
    settings' ``dataset``/``img_size``/``classes`` are overrides (``null`` is "the run's own data"), so two runs on
    other data can agree on them and two on the same data can differ. Kept as they are where a result does not
    record its data (results of the notebook API)."""
    if not all(_DATA_ATTRS[0] in attrs for _, _, attrs in per_run):
        return [(name, settings) for name, settings, _ in per_run]
    out = []
    for name, settings, attrs in per_run:
        settings = {k: v for k, v in settings.items() if k not in ("dataset", "img_size", "classes")}
        for key in _DATA_ATTRS:
            value = attrs.get(key)
            if key == "data_options" and isinstance(value, str):
                try:
                    value = json.loads(value or "{}")
                except ValueError:
                    pass
            settings[key] = value.item() if hasattr(value, "item") else value
        if settings["data_img_size"] in ("", None):  # the dataset's own size
            settings["data_img_size"] = _native_size(settings["data"])
        out.append((name, settings))
    return out


def _native_size(name: Any) -> int | None:
    from landscape.data.registry import get_dataset_info

    try:
        return int(get_dataset_info(str(name)).img_size)
    except Exception:  # noqa: BLE001  (a dataset this version does not know: compared by name only)
        return None


def caveats(results: Sequence[RunResults]) -> list[str]:
    """What a reader of a summary of ``results`` must know: each run's :attr:`RunResults.problems`, and the kinds of
    results measured with different settings across runs (:func:`settings_disagreements`)."""
    return ([p for r in results for p in r.problems] + list(settings_disagreements(results).values())
            + training_disagreements(results)
            + repeated_seeds((r.variant.key, r.label or r.variant.label, r.seed, r.path) for r in results)
            + coverage_gaps(results) + unsettled_searches(results))


def still_rising(entry) -> np.ndarray:
    """Per radius of one sharpness entry, whether its worst-case search was still rising when its steps ran out
    (a finite value only: a NaN is no bound of anything); all False for files without the flag."""
    if "worst_case_still_rising" not in entry:
        return np.zeros(entry.sizes.get("rho", 1), dtype=bool)
    return (entry["worst_case_still_rising"].values.astype(float) > 0) & np.isfinite(
        entry["worst_case"].values.astype(float))


def unsettled_searches(results: Sequence[RunResults]) -> list[str]:
    """One sentence per kind of sharpness whose worst-case search was still rising at a run's final checkpoint
    when its steps ran out (``worst_case_still_rising``), naming the runs and radii: those values are lower bounds,
    and a comparison may follow the number of steps rather than the landscape."""
    out = []
    for attr, kind, flag in (("sharpness", "worst-case sharpness", ""),
                             ("adaptive_sharpness", "adaptive worst-case sharpness", " --adaptive")):
        where, steps = [], set()
        for r in results:
            ds = getattr(r, attr)
            if ds is None or not ds.sizes.get("checkpoint", 0) or "worst_case_still_rising" not in ds:
                continue
            entry, _ = final_entry(ds, r.final_step if r.final_step is not None else -1)
            rising = still_rising(entry)
            if rising.any():
                where.append(f"{r.path.name} at ρ = {', '.join(f'{float(v):g}' for v in entry['rho'].values[rising])}")
                steps.add(read_settings(ds).get("steps"))
        if where:
            counts = " or ".join(str(n) for n in sorted(n for n in steps if isinstance(n, int)))
            out.append(f"The {kind} was still rising when its search stopped, so it is a lower bound, in "
                       f"{'; '.join(where)}: rerun `landscape analyze sharpness{flag}` on those runs with more "
                       f"--steps{' than their ' + counts if counts else ''} (and --force).")
    return out


def repeated_seeds(runs: Iterable[tuple[Any, str, Any, Any]]) -> list[str]:
    """One sentence per run that is the same variant and seed as one before it (a copied run, a run trained
    twice), from ``(variant key, label, seed, path)`` of each run: a spread over the runs would count it as
    another seed."""
    seen: dict[tuple[Any, Any], Any] = {}
    out = []
    for key, label, seed, path in runs:
        if (key, seed) in seen:
            out.append(f"{seen[key, seed]} and {path} are both seed {seed} of {label}; the spread over seeds counts "
                       "them as two seeds.")
        seen.setdefault((key, seed), path)
    return out


def coverage_gaps(results: Sequence[RunResults]) -> list[str]:
    """One sentence per kind of flatness result that some runs have and others lack (their rows then average
    fewer runs than the variant has), and one per run whose final losses are not finite (its generalisation gap
    is left out)."""
    out = []
    kinds = {"hessian": "Hessian", "sharpness": "sharpness", "surface": "surface"}
    having = {kind: [r for r in results if any(res.kind == kind for res in r.results)] for kind in kinds}
    for kind, runs in having.items():
        missing = [r for r in results if r not in runs]
        if runs and missing and any(r.results for r in missing):  # a run with no results at all is named already
            names = ", ".join(r.path.name for r in missing[:4]) + (f" and {len(missing) - 4} more"
                                                                     if len(missing) > 4 else "")
            out.append(f"{names} {'has' if len(missing) == 1 else 'have'} no {kinds[kind]} results ({len(runs)} of "
                       f"{len(results)} runs do); the {kinds[kind]} measures average the runs that have them.")
    for r in results:
        gap = r.dynamics["generalization_gap"] if r.dynamics is not None and "generalization_gap" in r.dynamics \
            else None
        if gap is not None and gap.size and not np.isfinite(np.asarray(gap.values, dtype=float)[-1]):
            out.append(f"{r.path.name}'s training or validation loss is not finite at its last evaluation; its "
                       "generalisation gap is left out.")
    return out


def training_disagreements(results: Sequence[RunResults]) -> list[str]:
    """One sentence per variant whose runs were trained with other settings than their seed (a run retrained with
    another data subset, schedule or EMA beside the others): their spread then mixes settings with seeds.
    Imported runs are left out (their config.yaml records where the weights came from, not how they were
    trained)."""
    from landscape.config import config_differences

    groups: dict[str, list[tuple[RunResults, dict]]] = {}
    for r in results:
        try:
            config = r.run.load_config()
        except Exception:  # an unreadable config is reported where it is read
            continue
        if isinstance(config.get("source"), dict) or not config:
            continue
        groups.setdefault(r.variant.key, []).append((r, config))
    out = []
    for members in groups.values():
        (first, reference), others = members[0], members[1:]
        for r, config in others:
            differences = config_differences(config, reference, ignore=("seed",))
            if differences:
                shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more"
                                                      if len(differences) > 3 else "")
                out.append(f"Runs of {r.label or r.variant.label} were trained with different settings: {r.path.name} has {shown} "
                           f"(as in {first.path.name}); their spread mixes those settings with the seeds.")
    return out


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
    rows.sort(key=lambda row: (FAMILY_ORDER.index(row["family"]), row["group_size"] or 0, row["mlp_init"] != "sliced",
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
        ball = "" if str(read_settings(ds).get("p", "2")) == "2" else f", ℓ{read_settings(ds)['p']} ball"
        if "worst_case" in at:
            measure = MEASURES[worst].at(rho)
            out.append((dataclasses.replace(measure, label=measure.label + ball), float(at["worst_case"]), 0.0))
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
    points); NaN where the loss stays below on one side, since the width then lies beyond the grid (the end of the
    grid would be a lower bound, not the width)."""
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
        return math.nan

    return edge(range(centre + 1, len(a))) - edge(range(centre - 1, -1, -1))
