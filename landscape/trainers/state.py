"""What changes as a run trains: :class:`TrainState` (weights, optimizer, position, metrics rows) and
:class:`RowTally` (the updates since the last metrics row); and ``state/last.pt``, the file that lets a run
continue bit for bit.

``state/last.pt`` holds the position (``step``, and the next update to do: update ``next_update`` of epoch
``epoch``), the weights and EMA weights, the optimizer, scheduler and gradient-scaler states, every
random-number generator of every process (Python, NumPy, torch CPU and CUDA) and the metrics rows written so
far; nothing an analysis reads. It is written atomically after the checkpoint of the same step, so it always
describes a consistent point of the run; it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landscape.errors import CheckpointError
from landscape.io import atomic_write, open_capturing
from landscape.trainers import distributed

FORMAT = "landscape-train-state/1"


@dataclass
class TrainState:
    """The objects a run trains and where it stands: the next update to do is update ``next_update`` of epoch
    ``epoch``, after ``step`` updates in all.

    ``rows`` are the metrics rows written so far, ``elapsed`` the run's wall-clock seconds before this process
    took it over (a resumed run), ``checkpoints`` the checkpoint files on disk by step (main process only).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, or None for a constant rate
    scaler: torch.amp.GradScaler
    ema: Any = None  # a :class:`~landscape.trainers.ema.ModelEma`, or None
    step: int = 0
    epoch: int = 1
    next_update: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    checkpoints: dict[int, Path] = field(default_factory=dict)

    def advance(self, updates_per_epoch: int) -> None:
        """Count one update done; after an epoch's last update the position moves to the next epoch."""
        self.step += 1
        self.next_update += 1
        if self.next_update == updates_per_epoch:
            self.epoch, self.next_update = self.epoch + 1, 0

    def state_dict(self, config_hash: str, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """What ``state/last.pt`` saves, after the latest metrics row (whose wall time becomes ``elapsed``)."""
        return {
            "step": self.step, "epoch": self.epoch, "next_update": self.next_update, "rows": self.rows,
            "elapsed": self.rows[-1]["wall_time"], "config_hash": config_hash, "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any], *, schedule: bool = True) -> None:
        """Continue from a saved state; ``schedule=False`` keeps the scheduler as built (a schedule recomputed
        for a new total). The random-number generators are restored separately, per process."""
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            if not any(g.get("fused") for g in self.optimizer.param_groups):
                # a run started before the fused update keeps its multi-tensor one (the saved groups say so); torch
                # would still hand it the scaler's found-inf flags, which only the fused update reads
                self.optimizer.__dict__.pop("_step_supports_amp_scaling", None)
            if self.scheduler is not None and schedule:
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"The training state does not fit the run's model and optimizer ({reason}); "
                                  "restore state/last.pt, or start the run again with --overwrite.") from None
        self.step, self.epoch, self.next_update = state["step"], state["epoch"], state["next_update"]
        self.rows, self.elapsed = list(state["rows"]), float(state["elapsed"])


@dataclass
class RowTally:
    """The updates since the last metrics row, the first of which was update ``first_step``.

    Losses, gradient norms and mixture-of-experts losses stay on the device (``aux`` is None for a model
    without experts): reading them every update would make the host wait for the accelerator. ``lr`` is the
    rate of the latest update, ``images`` and ``seconds`` the images trained on and the time it took.
    """

    first_step: int
    lr: float
    aux: list[torch.Tensor] | None = None
    losses: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, aux: torch.Tensor | None = None) -> None:
        self.losses.append(loss)
        self.norms.append(grad_norm.detach().float())
        if self.aux is not None:
            self.aux.append(aux)

    def __len__(self) -> int:
        return len(self.losses)

    def first_nonfinite(self, *, norms: bool = True) -> tuple[int, float, float] | None:
        """The step, loss and gradient norm of the first update whose loss (or, with ``norms``, gradient norm)
        is not finite; None when every one is."""
        if not self.losses:
            return None
        losses, grad_norms = torch.stack(self.losses), torch.stack(self.norms)
        bad = ~torch.isfinite(losses)
        if norms:
            bad |= ~torch.isfinite(grad_norms)
        if not bad.any():
            return None
        i = int(bad.nonzero()[0])
        return self.first_step + i, float(losses[i]), float(grad_norms[i])

    def summary(self, dist: distributed.Distributed, device: torch.device) -> dict[str, Any]:
        """The row's training columns over all processes: mean loss and gradient norm (None without updates),
        the latest rate, the throughput and, for a model with experts, the mean load-balancing loss."""
        local = [float(torch.stack(v).sum()) if v else 0.0 for v in (self.losses, self.norms, self.aux)]
        loss_sum, norm_sum, aux_sum, n = distributed.all_reduce_sum([*local, len(self.losses)], dist, device)
        out = {"train_loss": loss_sum / n if n else None, "lr": self.lr, "grad_norm": norm_sum / n if n else None,
               "images_per_s": self.images / self.seconds if self.seconds > 0 else None}
        if self.aux is not None:
            out["moe_aux_loss"] = aux_sum / n if n else None
        return out


def capture_rng() -> dict[str, Any]:
    """The states of this process's random-number generators, in tensors and plain containers only."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put the generators back in the states :func:`capture_rng` returned."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"The training state's random-number generator states are damaged ({type(e).__name__}); "
                              "restore state/last.pt, or start the run again with --overwrite.") from None


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically; a failed write leaves the previous file intact and is one sentence.

    torch's zip writer reports a full disk as ``unexpected pos``; writing through :func:`open_capturing` keeps
    the operating system's error, so the failure names its cause."""

    def write(tmp: Path) -> None:
        with open_capturing(tmp) as f:
            torch.save({"format": FORMAT, **state}, f)

    try:
        atomic_write(path, write, kept="the previous state is intact")
    except OSError as e:
        raise CheckpointError(f"Writing {path} failed ({e.strerror or e}); the previous state is intact.") from None


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state without running code from the file."""
    from landscape.io import refuse_special

    refuse_special(path, "a training state", error=CheckpointError)  # a pipe blocked the resume forever
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle: one message for all
        raise CheckpointError(f"{path} is not a readable training state ({e.__class__.__name__}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a landscape training state (expected format {FORMAT}).")
    problem = _state_problem(state)
    if problem:  # a resume from it would fail half-way, or delete the checkpoints past a wrong step
        raise CheckpointError(f"{path} is damaged ({problem}); restore it, or start the run again with --overwrite.")
    return state


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a training state, or ``None``."""
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(state.get("config_hash"), str):
        return "no config hash"
    for key in ("step", "epoch", "next_update"):
        if not count(state.get(key)):
            return f"its {key} is {state.get(key)!r}, not a count"
    rows = state.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return "no metrics rows"
    steps = [r.get("step") for r in rows]
    if not all(count(v) for v in steps) or steps != sorted(steps) or steps[-1] > state["step"]:
        return "its metrics rows do not lead up to its step"
    if not isinstance(state.get("elapsed"), (int, float)) or isinstance(state.get("elapsed"), bool):
        return "no elapsed time"
    for key in ("model", "optimizer", "scaler"):
        if not isinstance(state.get(key), dict):
            return f"no {key} state"
    if not all(isinstance(t, torch.Tensor) and not t.is_complex() for t in state["model"].values()):
        return "model weights that are not real tensors"
    if not isinstance(state.get("rng"), list) or not all(isinstance(r, dict) for r in state["rng"]):
        return "no random-number generator states"
    return None
