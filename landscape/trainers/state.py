"""``state/last.pt``: everything a run needs to continue bit for bit, and nothing an analysis reads.

The file holds the step and the position in the epoch, the weights and EMA weights, the optimizer, scheduler
and gradient-scaler states, every random-number generator of every process (Python, NumPy, torch CPU and CUDA)
and the metrics rows written so far. It is written atomically after the checkpoint of the same step, so it
always describes a consistent point of the run; it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landscape.io import atomic_write, open_capturing
from landscape.errors import CheckpointError

FORMAT = "landscape-train-state/1"


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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically (a failed write leaves the previous file intact).

    torch's zip writer reports a full disk as ``unexpected pos``; writing through :func:`open_capturing` keeps
    the operating system's error, so the failure names its cause."""

    def write(tmp: Path) -> None:
        with open_capturing(tmp) as f:
            torch.save({"format": FORMAT, **state}, f)

    atomic_write(path, write, kept="the previous state is intact")


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state without running code from the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle: one message for all
        raise CheckpointError(f"{path} is not a readable training state ({e.__class__.__name__}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a landscape training state (expected format {FORMAT}).")
    return state
