"""The Hessian eigenvectors an analysis keeps (``analyze hessian --save-eigenvectors``): one safetensors file per
checkpoint in ``RUN/analysis/hessian-eigenvectors/`` (``hessian-ema-eigenvectors/``, ... for other weights, matrices
and ``--params``: :func:`eigenvectors_path`), read back without executing code, for the surfaces along
eigenvectors and the overlap of the top subspace between checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landscape.errors import LandscapeError

Tensor = torch.Tensor


VECTOR_SETTINGS = ("matrix", "weights", "params")
"""The settings that decide which vectors are the eigenvectors (each combination keeps a folder of its own)."""


def eigenvectors_path(run: Any, checkpoint_name: str, settings: Any = None) -> Path:
    """``RUN/analysis/<name>-eigenvectors/<checkpoint>.safetensors``: ``<name>`` is the results name of the Hessian
    ``settings`` (an object or mapping) as far as they decide the vectors: ``hessian`` (the raw weights' Hessian,
    also when ``settings`` is ``None``), ``hessian-ema``, ``hessian-ggn``, ``hessian-params-<pattern>``, ..."""
    from landscape.analyses.results import results_name

    return Path(run.analysis_dir) / f"{results_name('hessian', vector_settings(settings))}-eigenvectors" \
        / f"{checkpoint_name}.safetensors"


def vector_settings(settings: Any) -> dict[str, Any]:
    """The :data:`VECTOR_SETTINGS` of ``settings`` (an object, a mapping or ``None``), defaults left out."""
    get = settings.get if isinstance(settings, dict) else (lambda k: getattr(settings, k, None))
    defaults = {"matrix": "hessian", "weights": "raw", "params": None}
    return {k: get(k) for k in VECTOR_SETTINGS if get(k) not in (None, "", defaults[k])} if settings is not None \
        else {}


def saved_for(path: Path, settings: Any) -> bool:
    """Whether ``path`` holds eigenvectors of the Hessian ``settings`` ask for (its header only is read): a file an
    older version wrote for other weights or another matrix into the plain folder is not."""
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("settings", "null"))
    except Exception:  # unreadable: measured again, and rewritten
        return False
    return not isinstance(stored, dict) or vector_settings(stored) == vector_settings(settings)


def check_vectors_of(saved: "HessianEigenvectors", path: Path, settings: Any) -> None:
    """Refuse eigenvectors saved for other weights, another matrix or other parameters than ``settings`` ask for
    (a file an older version wrote into the plain folder whatever its settings)."""
    stored = saved.metadata.get("settings")
    if not isinstance(stored, dict):
        return
    wanted, there = vector_settings(settings), vector_settings(stored)
    if wanted != there:
        def describe(s: dict[str, Any]) -> str:
            return (f"matrix {s.get('matrix', 'hessian')}, weights {s.get('weights', 'raw')}, "
                    f"params {s.get('params', 'all')}")

        raise LandscapeError(f"{path} holds the eigenvectors of another Hessian ({describe(there)}) than the one "
                             f"asked for ({describe(wanted)}); compute these with landscape analyze hessian RUN "
                             "--save-eigenvectors and the same settings (that checkpoint is then measured again).")


def save_eigenvectors(path: str | Path, vectors: dict[str, Tensor], eigenvalues: dict[str, np.ndarray],
                      shapes: dict[str, tuple[int, ...]], *, metadata: dict[str, Any] | None = None) -> Path:
    """Write Hessian eigenvectors for later use as directions, atomically.

    Layout of the safetensors file: one tensor per end, ``"largest"`` and/or ``"smallest"``, of shape
    ``(k, P)`` in the analysis dtype, row ``i`` the unit eigenvector of the ``i``-th eigenvalue from that end.
    Header metadata (JSON strings): ``eigenvalues`` ``{"largest": [...], "smallest": [...]}``, ``parameters``
    ``[[name, shape], ...]`` giving the order and shapes in which the ``P`` entries split into parameter
    tensors (the names are the model's state-dict names), plus ``metadata`` (checkpoint, step, settings).
    """
    from safetensors.torch import save_file

    from landscape.io import atomic_write

    tensors = {end: v.detach().to("cpu").contiguous() for end, v in vectors.items()}
    meta = {
        "format": "landscape-hessian-eigenvectors/1",
        "eigenvalues": json.dumps({end: [float(e) for e in values] for end, values in eigenvalues.items()}),
        "parameters": json.dumps([[n, list(s)] for n, s in shapes.items()]),
    }
    meta.update({k: json.dumps(v, default=str) for k, v in (metadata or {}).items()})
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


@dataclass
class HessianEigenvectors:
    """Eigenvectors read back by :func:`load_eigenvectors`: ``vectors[end]`` ``(k, P)``, ``eigenvalues[end]`` ``(k,)``."""

    vectors: dict[str, Tensor]
    eigenvalues: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def direction(self, index: int = 0, end: str = "largest") -> dict[str, Tensor]:
        """Eigenvector ``index`` (0: the extreme one) of ``end`` as ``{parameter name: tensor}``."""
        from landscape.curvature.loss import unflatten_vector

        if end not in self.vectors:
            raise LandscapeError(f"No {end} eigenvectors were saved; saved are {', '.join(self.vectors)}.")
        return {n: t.clone() for n, t in unflatten_vector(self.vectors[end][index], self.shapes).items()}


def load_eigenvectors(path: str | Path) -> HessianEigenvectors:
    """Read a file written by :func:`save_eigenvectors` (safetensors: no code is executed)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise LandscapeError(
            f"{path} does not exist; compute it with 'landscape analyze hessian RUN --save-eigenvectors'."
        )
    from landscape.io import refuse_special

    refuse_special(path, "a Hessian eigenvector file", advice="delete it")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vectors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "landscape-hessian-eigenvectors/1":
            raise LandscapeError(f"{path} is not a Hessian eigenvector file.")
        eigenvalues = {k: np.asarray(v) for k, v in json.loads(meta["eigenvalues"]).items()}
        shapes = {n: tuple(int(d) for d in s) for n, s in json.loads(meta["parameters"])}
        extra = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "eigenvalues", "parameters")}
    except LandscapeError:
        raise
    except Exception as e:  # safetensors', JSON's and unpacking's own errors: a damaged file
        raise LandscapeError(f"{path} is not a readable Hessian eigenvector file ({e.__class__.__name__}); delete "
                             "it and run the Hessian analysis with --save-eigenvectors again.") from None
    return HessianEigenvectors(vectors, eigenvalues, shapes, extra)
