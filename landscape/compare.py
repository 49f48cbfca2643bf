"""Several runs side by side at their final checkpoint: ``landscape compare``.

One row per run, one column per measure (NaN where the run has no such result; the command line shows '-'):

=========================  =================================================================================
column                     source
=========================  =================================================================================
``run``, ``model``         the run directory as given; the model name with its variant knobs (config.yaml)
``params``                 parameters of the final checkpoint, each shared tensor counted once
``epoch``, ``step``        the final checkpoint (a run kept without its checkpoints, as a committed study is:
                           the last row of ``metrics.csv``, and the parameters its Hessian was taken over)
``top1``, ``ema_top1``     saved with the final checkpoint, else its row of ``metrics.csv``
``top_eigenvalue``         largest Hessian eigenvalue :math:`\\lambda_1` at the final checkpoint (hessian.nc:
                           ``eigenvalue_largest`` at ``k = 1``)
``trace``                  Hessian trace :math:`\\operatorname{tr} H` (hessian.nc: ``trace``, Hutch++)
``sharpness[rho=r]``       worst-case sharpness :math:`\\max_{\\|\\delta / c\\|_p \\le \\rho} L(w + \\delta) - L(w)`
                           at each radius, plain (SAM, :math:`c = 1`; ``adaptive_sharpness[rho=r]``: adaptive,
                           :math:`c = |w|`), told apart by each result's settings (``worst_case``)
``peak_to_final_drop``     :math:`\\max_e a_e - a_E` of the raw (and ``ema_`` EMA) top-1 curve (dynamics.nc, or
                           computed from ``metrics.csv`` when the run has a history)
=========================  =================================================================================

The results are those :mod:`landscape.summary` picks for the report and the figures (the raw weights, the whole
model, chosen by each file's settings); an analysis result is an xarray Dataset with one entry per analysed
checkpoint along ``checkpoint`` and a ``step`` coordinate; the entry of the final checkpoint is used, else the
latest analysed one, whose step is then reported in ``<analysis>_step``. Each result is read by one small
function (:func:`hessian_measures`, :func:`sharpness_measures`, :func:`dynamics_measures`) that looks for the
variable names listed next to it.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from landscape.io import atomic_write, atomic_write_text
from landscape.errors import LandscapeError

# Variable names each result may use for a measure, most specific first.
TOP_EIGENVALUE_VARS = ("eigenvalue_largest", "top_eigenvalues", "top_eigenvalue")
TRACE_VARS = ("trace",)
SHARPNESS_VARS = ("worst_case", "sharpness")
DROP_VAR = "peak_to_final_drop"
ACCURACY_COLUMNS = {"top1": "val_top1", "ema_top1": "ema_val_top1"}
# Shown for every comparison, '-' where no run has them; sharpness columns appear with the radii found.
ALWAYS_SHOWN = ("run", "model", "params", "epoch", "step", "top1", "ema_top1", "top_eigenvalue", "trace",
                DROP_VAR)


def compare_runs(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run with the measures of its final checkpoint; see the module docstring for the columns."""
    from landscape.summary import caveats, load_run

    loaded, seen = [], set()
    for p in paths:  # each run once, however it was spelled (runs/a, runs/a/, ./runs/a): not two "seeds"
        if Path(p).resolve() not in seen:
            seen.add(Path(p).resolve())
            loaded.append(load_run(p))
    rows = [run_summary(r) for r in loaded]
    keys_by_name: dict[str, set[str]] = {}
    for r in loaded:
        keys_by_name.setdefault(r.variant.name, set()).add(r.variant.key)
    for r, row in zip(loaded, rows):  # two architectures under one short name: each shown by its full key
        if len(keys_by_name[r.variant.name]) > 1:
            row["model"] = r.variant.key
    if not rows:
        raise LandscapeError("Give at least one run directory to compare.")
    columns = list(ALWAYS_SHOWN)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    columns.sort(key=_column_group)  # stable: identity, accuracy, Hessian, sharpness, dynamics
    table = pd.DataFrame(rows, columns=columns).astype({c: float for c in ALWAYS_SHOWN[5:]})
    table.attrs["caveats"] = caveats(loaded)  # what a reader must know: damaged files, unlike settings
    return table


def _column_group(column: str) -> int:
    if column in ALWAYS_SHOWN[:5]:
        return 0
    if column in ACCURACY_COLUMNS:
        return 1
    if column in ("top_eigenvalue", "trace", "hessian_step"):
        return 2
    if column.startswith(("sharpness", "adaptive_sharpness")):
        return 3
    return 4


def run_summary(path: Any) -> dict[str, Any]:
    """The row of one run (a run directory, or its :class:`~landscape.summary.RunResults`): identity, size,
    accuracy and every analysis found for its final checkpoint."""
    from landscape.summary import RunResults, load_run

    summary = path if isinstance(path, RunResults) else load_run(path)
    path = summary.path
    infos = summary.run.checkpoints()
    metrics = summary.run.read_metrics()
    if infos:
        final = infos[-1]
        params, epoch, step, saved = final.num_params, final.epoch, final.step, final.metrics
    elif summary.results or not metrics.empty:  # results kept without their checkpoints (a committed study)
        last = metrics.iloc[-1] if not metrics.empty else {}
        params, step, saved = summary.num_params, summary.final_step, {}
        epoch = int(last["epoch"]) if _is_number(last.get("epoch")) else None
    else:
        raise LandscapeError(f"Run {path} has no checkpoints, results or metrics to compare.")
    row: dict[str, Any] = {
        "run": str(path),
        "model": summary.variant.name,
        "params": params,
        "epoch": epoch,
        "step": step,
    }
    row.update(accuracy(metrics, saved, step))
    at = step if step is not None else -1
    row.update(_at_final("hessian", summary.hessian, at, hessian_measures))
    row.update(_at_final("sharpness", summary.sharpness, at, sharpness_measures))
    row.update(_at_final("adaptive_sharpness", summary.adaptive_sharpness, at,
                         lambda entry: sharpness_measures(entry, "adaptive_sharpness")))
    row.update(dynamics_measures(summary.dynamics))
    return row


# -- accuracy ---------------------------------------------------------------------------------------------------
def accuracy(metrics: pd.DataFrame, saved: dict[str, Any], step: int | None) -> dict[str, float]:
    """Top-1 (raw and EMA) of the final checkpoint: the metrics ``saved`` with it, else its row of ``metrics.csv``.

    The ``metrics.csv`` row is the last one at the checkpoint's ``step``, else the last row of the file.
    """
    source: Any = saved
    if not any(_is_number(saved.get(key)) for key in ACCURACY_COLUMNS.values()) and not metrics.empty:
        at_step = metrics[metrics["step"] == step] if "step" in metrics and step is not None else metrics.iloc[:0]
        source = (at_step if len(at_step) else metrics).iloc[-1].to_dict()
    return {column: float(source[key]) if _is_number(source.get(key)) else math.nan
            for column, key in ACCURACY_COLUMNS.items()}


def _is_number(value: Any) -> bool:
    """A real number that is not NaN (numpy scalars included, booleans excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


# -- analysis results -------------------------------------------------------------------------------------------
def _at_final(name: str, ds, step: int, measures) -> dict[str, Any]:
    from landscape.summary import final_entry

    if ds is None:
        return {}
    entry, used = final_entry(ds, step)
    out = measures(entry)
    if out and used is not None and used != step:
        out[f"{name}_step"] = used
    return out


def _first_var(ds, names: tuple[str, ...]):
    return next((ds[n] for n in names if n in ds.data_vars), None)


def hessian_measures(entry) -> dict[str, float]:
    """``top_eigenvalue`` (the largest of the eigenvalues stored) and ``trace`` of one checkpoint's entry."""
    out = {}
    eig = _first_var(entry, TOP_EIGENVALUE_VARS)
    if eig is not None:
        values = np.asarray(eig.values, dtype=float)
        out["top_eigenvalue"] = float(np.nanmax(values)) if np.isfinite(values).any() else math.nan
    trace = _first_var(entry, TRACE_VARS)
    if trace is not None:
        out["trace"] = _scalar(trace)
    return out


def sharpness_measures(entry, name: str = "sharpness") -> dict[str, float]:
    """``<name>[rho=r, ...]``: one column per radius and per value of any other dimension of the result."""
    da = _first_var(entry, SHARPNESS_VARS)
    if da is None:
        return {}
    return _flatten(da, name)


def _flatten(da, name: str) -> dict[str, float]:
    """A small DataArray as ``{"name[dim=value, ...]": float}``; 0-d gives ``{name: float}``."""
    if da.ndim == 0:
        return {name: _scalar(da)}
    dims = sorted(da.dims, key=lambda d: (d == "rho", d))  # rho last: reads as "sharpness[norm=2, rho=0.05]"
    da = da.transpose(*dims)
    out = {}
    for index in np.ndindex(*da.shape):
        labels = [f"{d}={_label(da[d].values[i]) if d in da.coords else i}" for d, i in zip(dims, index)]
        out[f"{name}[{', '.join(labels)}]"] = float(da.values[index])
    return out


def _label(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _scalar(da) -> float:
    values = np.asarray(da.values, dtype=float).ravel()
    return float(values[0]) if values.size == 1 else math.nan


def dynamics_measures(ds) -> dict[str, float]:
    """Peak-to-final drop of the raw and EMA top-1 curves of a run's dynamics (dynamics.nc, else computed from the
    run's history by :func:`landscape.summary.load_run`)."""
    if ds is None or DROP_VAR not in ds.data_vars:
        return {}
    drop = ds[DROP_VAR]
    if "weights" not in drop.dims:
        return {DROP_VAR: _scalar(drop)}
    out = {}
    for weights in drop["weights"].values:
        prefix = "" if str(weights) == "raw" else f"{weights}_"
        out[prefix + DROP_VAR] = float(drop.sel(weights=weights))
    return out


# -- output -----------------------------------------------------------------------------------------------------
def write_compare_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """The table as CSV (empty cells where a measure is missing), written atomically."""
    atomic_write_text(Path(path), table.to_csv(index=False, float_format="%.10g"))


def measure_columns(table: pd.DataFrame) -> list[str]:
    """The numeric measures worth drawing: everything numeric except epoch, step and analysis steps."""
    skip = {"epoch", "step"}
    return [c for c in table.columns
            if c not in skip and not c.endswith("_step") and pd.api.types.is_numeric_dtype(table[c])
            and table[c].notna().any()]


def compare_figure(table: pd.DataFrame):
    """One panel per measure, one horizontal bar per run (missing values marked '-'); a matplotlib Figure."""
    from matplotlib.figure import Figure

    columns = measure_columns(table)
    if not columns:
        raise LandscapeError("The runs have no numeric measures to draw.")
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    labels = [str(r) for r in table["run"]]
    height = max(1.6, 0.35 * len(labels) + 0.9)
    fig = Figure(figsize=(4.2 * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    positions = np.arange(len(labels))
    from matplotlib.ticker import MaxNLocator

    for i, (ax, column) in enumerate(zip(axes.flat, columns)):
        values = table[column].to_numpy(dtype=float)
        present = ~np.isnan(values)
        ax.barh(positions[present], values[present], color="C0")
        # a value of 0 is a bar of no length: a dot marks it apart from a missing value, which is named
        zero = present & (values == 0)
        ax.plot(values[zero], positions[zero], linestyle="none", marker="o", markersize=3, color="C0")
        for y in positions[~present]:
            ax.text(0.02, y, "not measured", va="center", ha="left", color="0.4", fontsize=7,
                    transform=ax.get_yaxis_transform())
        ax.set_yticks(positions, labels if i % ncols == 0 else [""] * len(labels))
        ax.set_ylim(len(labels) - 0.5, -0.5)  # the first run on top, each row whole (a mark on the last one too)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # long tick labels (0.00025) must not run together
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
        unit = _column_unit(column)
        ax.set_title(column + (f" ({unit})" if unit else ""), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    return fig


def _column_unit(column: str) -> str:
    """The unit of a compared measure, from its name: top-1 in %, drops in points, losses, gaps and sharpness in
    nats, curvatures in nats per squared weight; none where the name does not say."""
    name = column.split("[")[0]
    if "top1" in name:
        return "%"
    if "drop" in name:
        return "points"
    if any(word in name for word in ("eigenvalue", "trace", "lambda")):
        return "nats/weight²"
    if any(word in name for word in ("loss", "gap", "sharpness", "barrier")):
        return "nats"
    return ""


def save_compare_figure(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Draw :func:`compare_figure` to ``path`` (format from its extension), written atomically."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    fig = compare_figure(table)
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise LandscapeError(f"Cannot draw a figure as .{fmt}; accepted extensions are {', '.join(sorted(supported))}.")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150))
