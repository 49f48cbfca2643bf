"""Training dynamics from ``metrics.csv``: peak-to-final degradation and the generalisation gap.

For a top-1 curve :math:`a_e` over epochs :math:`e = 1..E` (raw and EMA weights):

- peak :math:`a^* = \\max_e a_e` at epoch :math:`e^* = \\arg\\max_e a_e` (the first epoch reaching it),
- final :math:`a_E`, and the peak-to-final drop :math:`a^* - a_E` in percentage points (arXiv 2512.01059
  reports it for the EMA weights),
- the running drop from the best so far :math:`\\max_{e' \\le e} a_{e'} - a_e`,
- the generalisation gap :math:`L_{val,e} - L_{train,e}`. The training loss is the running mean over the
  epoch's augmented (MixUp/CutMix, label-smoothed) batches, so the gap is a trend, not a clean estimate.

The attribute ``val_size`` is the number of validation images each top-1 is measured on (absent where the run's
config cannot tell: an image folder evaluated in full); it sets the binomial noise floor of the drop
(:func:`landscape.statistics.drop_noise_floor`).

Across seeds of one variant (:func:`landscape.models.variants.describe_variant`), every scalar gets a mean and a standard deviation (ddof=1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import xarray as xr

from landscape.errors import LandscapeError
from landscape.models.variants import describe_variant
from landscape.runs import Run

WEIGHTS = {"raw": "val_top1", "ema": "ema_val_top1"}
SCALARS = ("peak_epoch", "peak_top1", "final_top1", "peak_to_final_drop")


def epoch_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch: the last evaluation row of each epoch (runs may also evaluate mid-epoch)."""
    if metrics.empty or "epoch" not in metrics:
        return pd.DataFrame()
    rows = metrics.dropna(subset=["epoch"]).copy()
    rows["epoch"] = rows["epoch"].astype(int)
    if "step" in rows:  # the last by step, not by the file's order
        rows = rows.sort_values(["epoch", "step"], kind="stable")
    return rows.groupby("epoch", sort=True).tail(1).set_index("epoch").sort_index()


def peak_to_final(curve: np.ndarray, epochs: np.ndarray) -> dict[str, float]:
    """Peak epoch, peak value, final value and peak-to-final drop of one accuracy curve.

    The peak ignores epochs without a value (NaN); the final value is the curve's value at its last epoch, so a
    curve missing its last value has a NaN final value and drop (an earlier value would pass for the final one).
    """
    valid = ~np.isnan(curve)
    if not valid.any():
        return {k: float("nan") for k in SCALARS}
    values, at = curve[valid], epochs[valid]
    i = int(np.argmax(values))
    final = float(curve[-1])
    return {
        "peak_epoch": float(at[i]),
        "peak_top1": float(values[i]),
        "final_top1": final,
        "peak_to_final_drop": float(values[i] - final),
    }


def drop_from_best(curve: np.ndarray) -> np.ndarray:
    """:math:`\\max_{e' \\le e} a_{e'} - a_e`, NaN where the curve is NaN."""
    best = np.fmax.accumulate(np.where(np.isnan(curve), -np.inf, curve))
    out = best - curve
    out[np.isnan(curve)] = np.nan
    return out


def run_dynamics(run: Run) -> xr.Dataset:
    """The dynamics of one run as an xarray Dataset over ``weights`` (raw, ema) and ``epoch``."""
    table = epoch_table(run.read_metrics())
    if table.empty:
        raise LandscapeError(
            f"Run {run.root} has no per-epoch metrics (metrics.csv is missing or empty), so it has no dynamics."
        )
    epochs = table.index.to_numpy()
    weights = [w for w, col in WEIGHTS.items() if col in table and table[col].notna().any()]
    if not weights:
        if str((run.load_config() or {}).get("task", "classify")) == "mae":
            raise LandscapeError(f"{run.root} pre-trains a masked autoencoder: it has no top-1 curve, so no peak-to-final "
                                 "drop (fine-tune it with --init to get one).")
        what = "no val_top1 values" if "val_top1" in table else "no val_top1 column"
        raise LandscapeError(f"metrics.csv of {run.root} has {what}, so the run has no accuracy curve.")
    try:
        curves = np.stack([table[WEIGHTS[w]].to_numpy(dtype=float) for w in weights])
    except (TypeError, ValueError):
        raise LandscapeError(f"metrics.csv of {run.root} holds top-1 values that are not numbers; restore it from "
                             "the checkpoints' headers or train the run again.") from None
    if not np.isnan(curves).all() and not ((curves >= 0) & (curves <= 100) | np.isnan(curves)).all():
        bad = curves[~(((curves >= 0) & (curves <= 100)) | np.isnan(curves))][0]
        raise LandscapeError(f"metrics.csv of {run.root} holds a top-1 of {bad:g}, outside 0-100 %; restore it or "
                             "train the run again.")
    last = int(np.flatnonzero(~np.isnan(curves).all(axis=0))[-1]) + 1  # the final epoch: the last one evaluated
    scalars = [peak_to_final(c[:last], epochs[:last]) for c in curves]
    data = {
        "top1": (("weights", "epoch"), curves, {"units": "%", "long_name": "validation top-1"}),
        "drop_from_best": (("weights", "epoch"), np.stack([drop_from_best(c) for c in curves]),
                           {"units": "percentage points", "long_name": "running drop from the best top-1"}),
    }
    names = {"peak_epoch": "first epoch with the best validation top-1", "peak_top1": "best validation top-1",
             "final_top1": "validation top-1 at the last evaluated epoch",
             "peak_to_final_drop": "best minus final validation top-1"}
    for key in SCALARS:
        units = "epoch" if key == "peak_epoch" else ("percentage points" if key == "peak_to_final_drop" else "%")
        data[key] = (("weights",), np.array([s[key] for s in scalars]), {"units": units, "long_name": names[key]})
    data["final_epoch"] = ((), int(epochs[last - 1]), {"units": "epoch", "long_name": "last epoch evaluated, whose "
                                                        "top-1 is final_top1 (NaN where that weights' value is missing)"})
    for col in ("train_loss", "val_loss"):
        values = table[col].to_numpy(dtype=float) if col in table else np.full(len(epochs), np.nan)
        data[col] = (("epoch",), values, {"units": "nats", "long_name": "mean training loss of the epoch (augmented "
                                          "batches)" if col == "train_loss" else "validation loss"})
    data["generalization_gap"] = (("epoch",), data["val_loss"][1] - data["train_loss"][1],
                                  {"units": "nats", "long_name": "validation loss minus training loss"})
    config = run.load_config()
    ds = xr.Dataset(data, coords={"weights": weights, "epoch": epochs})
    ds.attrs.update(
        run=run.name, variant=describe_variant(config, run.name).key, seed=int(config.get("seed", -1)),
        definition="peak_to_final_drop = max_e top1_e - top1_E (percentage points); first epoch attaining the max",
    )
    size = validation_size(config, run.load_data_record())
    if size is not None:
        ds.attrs["val_size"] = size
    planned = config.get("epochs")
    if isinstance(planned, int) and not isinstance(planned, bool) and planned > 0:
        ds.attrs["planned_epochs"] = planned  # a final_epoch below it: the run stopped early (or is still training)
    return ds


def validation_size(config: dict, record: dict | None = None) -> int | None:
    """How many validation images a run's top-1 is measured on: ``data.val_size`` of its config when set, capped
    by the size of the validation split it was trained with (its ``data.json`` record), or else the registry's;
    ``None`` where none is known. Reads no data files."""
    from landscape.data import get_dataset_info

    data = config.get("data") or {}
    kept = ((record or {}).get("splits") or {}).get("val") if isinstance(record, dict) else None
    if isinstance(kept, dict) and isinstance(kept.get("examples"), int) and kept["examples"] > 0:
        full = kept["examples"]
    else:
        try:
            full = get_dataset_info(data.get("name", "digits"), **(data.get("options") or {})).val_size
        except (LandscapeError, TypeError, ValueError):
            full = None
    sizes = [int(s) for s in (data.get("val_size"), full) if s]
    return min(sizes) if sizes else None


def across_seeds(datasets: Iterable[xr.Dataset]) -> xr.Dataset:
    """Mean and standard deviation (ddof=1) of the peak-to-final scalars per variant and weights."""
    rows = []
    for ds in datasets:
        for w in ds["weights"].values:
            rows.append({"variant": ds.attrs["variant"], "weights": str(w), "seed": ds.attrs.get("seed"),
                         **{k: float(ds[k].sel(weights=w)) for k in SCALARS}})
    df = pd.DataFrame(rows)
    if df.empty:
        return xr.Dataset()
    grouped = df.groupby(["variant", "weights"])[list(SCALARS)]
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.count()[SCALARS[0]]
    out = xr.Dataset({f"{k}_mean": mean[k].to_xarray() for k in SCALARS})
    for k in SCALARS:
        out[f"{k}_std"] = std[k].to_xarray()
    out["n_seeds"] = count.to_xarray()
    return out


def write_dynamics(run: Run) -> tuple[xr.Dataset, Path]:
    """Compute :func:`run_dynamics` and write it to ``RUN/analysis/dynamics.nc`` through the results writer (atomic,
    with the attributes of every analysis: ``analysis``, ``settings``, library versions, time, host); always
    recomputed, since it costs one read of ``metrics.csv``. Returns the Dataset and the path written."""
    from landscape.analyses.results import analysis_attrs, results_path, write_results
    from landscape.io import RunLock, exclusive_file_lock

    ds = run_dynamics(run)
    ds.attrs = {**analysis_attrs("dynamics", {}, int(ds.attrs["seed"])), **ds.attrs}
    path = results_path(run, "dynamics", {})
    with RunLock(run.root, shared=True), exclusive_file_lock(path.parent):  # no training writes the run meanwhile
        if not _unchanged(ds, path):  # a re-run leaves an equal file as it is (figures and copies need not redo)
            write_results(ds, path)
    return ds, path


def _unchanged(ds: xr.Dataset, path: Path) -> bool:
    """Whether ``path`` already holds ``ds``: the same values and attributes but for when and where it was written
    (a damaged or unreadable file is not)."""
    from landscape.analyses.results import read_results

    try:
        old = read_results(path)
    except Exception:
        return False
    if old is None:
        return False
    moment = ("created", "updated", "host", "library_versions")
    probe = ds.copy()
    probe.attrs = {**{k: v for k, v in ds.attrs.items() if k not in moment},
                   **{k: old.attrs[k] for k in moment if k in old.attrs}}
    try:
        return bool(old.identical(probe))
    except Exception:
        return False
