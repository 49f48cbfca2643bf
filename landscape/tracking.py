"""Scalars to experiment trackers: TensorBoard event files in the run directory, and Weights & Biases.

``landscape train --log tensorboard`` writes every metrics row (the numbers of ``metrics.csv``, tag
``train/<column>``, at the row's step) and ``landscape analyze ... --log tensorboard`` every scalar of each
checkpoint's results (tag ``<results file>/<variable>``, with ``/k1``, ``/rho0.05`` for entries along a
dimension), so ``tensorboard --logdir runs/`` shows each run under its directory name. ``--log wandb`` sends the
same scalars to W&B. The files and numbers in ``metrics.csv`` and ``analysis/`` stay the record; trackers are views.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from landscape.errors import ConfigError, LandscapeError

BACKENDS = ("tensorboard", "wandb")
TRAIN_SKIPPED = ("epoch", "step")
ANALYSIS_DIMS = ("k", "rho", "weights")


def check_backends(backends: Iterable[str]) -> tuple[str, ...]:
    """The requested backends, each known and importable; else one sentence saying what to install."""
    import importlib.util

    chosen = tuple(dict.fromkeys(b.strip().lower() for b in backends if b and b.strip()))
    for name in chosen:
        if name not in BACKENDS:
            raise ConfigError(f"Unknown --log {name!r}; accepted are {', '.join(BACKENDS)}.")
    if "tensorboard" in chosen and importlib.util.find_spec("tensorboard") is None:
        raise LandscapeError("--log tensorboard needs the tensorboard package: pip install 'vit-landscape[tensorboard]'.")
    if "wandb" in chosen and importlib.util.find_spec("wandb") is None:
        raise LandscapeError("--log wandb needs the wandb package, which is not installed: pip install wandb "
                             "(and wandb login), or use --log tensorboard.")
    return chosen


class ScalarLogger:
    """Writes scalars to the chosen backends for one run directory; the writers open on the first scalar.

    ``suffix`` ends the event file's name (``events.out.tfevents.<time>.<host>.<suffix>``), so training and each
    analysis keep their own files side by side in the run directory.
    """

    def __init__(self, run_dir: str | os.PathLike, backends: Sequence[str], *, suffix: str = "",
                 config: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.backends = check_backends(backends)
        self.suffix = suffix
        self.config = dict(config or {})
        self._tensorboard = None
        self._wandb = None

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _open(self) -> None:
        if "tensorboard" in self.backends and self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self._tensorboard = SummaryWriter(log_dir=str(self.run_dir), filename_suffix=f".{self.suffix}"
                                                  if self.suffix else "")
            except OSError as e:
                raise LandscapeError(f"Cannot write TensorBoard event files into {self.run_dir} "
                                     f"({e.strerror or e}).") from None
        if "wandb" in self.backends and self._wandb is None:
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "landscape"), name=self.run_dir.name,
                                     dir=str(self.run_dir), config=self.config, reinit=True)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step``; values that are not finite numbers are left out."""
        values = {tag: float(v) for tag, v in scalars.items() if _is_number(v)}
        if not values or not self.backends:
            return
        self._open()
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, global_step=int(step))
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def log_metrics_row(self, row: Mapping[str, Any]) -> None:
        """One row of ``metrics.csv``: every numeric column as ``train/<column>`` at the row's step."""
        self.log({f"train/{k}": v for k, v in row.items() if k not in TRAIN_SKIPPED}, int(row.get("step") or 0))

    def log_results(self, ds: Any, name: str, checkpoints: Iterable[str] | None = None) -> int:
        """The scalars of each checkpoint of a results Dataset (only ``checkpoints`` when given), tag
        ``<name>/<variable>``, at the checkpoint's step; returns how many checkpoints were logged."""
        wanted = None if checkpoints is None else set(checkpoints)
        logged = 0
        for i, checkpoint in enumerate(ds["checkpoint"].values):
            if wanted is not None and str(checkpoint) not in wanted:
                continue
            entry = ds.isel(checkpoint=i)
            self.log(results_scalars(entry, name), int(entry["step"]))
            logged += 1
        return logged

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def results_scalars(entry: Any, name: str) -> dict[str, float]:
    """``{tag: value}`` of one checkpoint's results: every variable that is a scalar, or a vector along one of
    ``k``, ``rho`` or ``weights`` (one tag per entry: ``eigenvalue_largest/k1``, ``worst_case/rho0.05``)."""
    out: dict[str, float] = {}
    for var, array in entry.data_vars.items():
        if array.ndim == 0:
            out[f"{name}/{var}"] = array.item()
        elif array.ndim == 1 and array.dims[0] in ANALYSIS_DIMS:
            dim = array.dims[0]
            for coordinate, value in zip(array[dim].values, array.values):
                label = f"{coordinate:g}" if isinstance(coordinate, float) else str(coordinate)
                out[f"{name}/{var}/{dim}{label}"] = value
    return out


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
