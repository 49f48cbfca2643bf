"""How the top Hessian subspace moves through training, from the eigenvectors ``--save-eigenvectors`` keeps.

- Overlap between checkpoints: for the top-:math:`k` eigenvectors :math:`V_t` (orthonormal rows, ``(k, P)``) at
  consecutive checkpoints, :math:`\\|V_t V_{t+1}^\\top\\|_F^2 / k \\in [0, 1]`: 1 when the two span the same
  subspace, about :math:`k/P` for unrelated ones. It does not depend on the signs or the order of the eigenvectors
  within the subspace.
- Gradient in the top subspace (Gur-Ari, Roberts & Dyer 2018, "Gradient descent happens in a tiny subspace"):
  :math:`\\|V g\\|^2 / \\|g\\|^2` for the gradient :math:`g` of the same loss at the same checkpoint, 1 when the
  gradient lies wholly in the span of the top eigenvectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor


def subspace_overlap(a: Tensor, b: Tensor) -> float:
    """:math:`\\|A B^\\top\\|_F^2 / k` for orthonormal rows ``a`` ``(k, P)`` and ``b`` ``(k', P)``, ``k = min(k, k')``."""
    a, b = a.double(), b.to(a.device).double()
    k = min(len(a), len(b))
    return float((a[:k] @ b[:k].T).square().sum()) / k


def gradient_subspace_fraction(gradient: Tensor, vectors: Tensor) -> float:
    """:math:`\\|V g\\|^2 / \\|g\\|^2` (NaN for a zero gradient)."""
    g = gradient.reshape(-1).double()
    norm = float(g.square().sum())
    if norm == 0.0:
        return float("nan")
    return float((vectors.to(g.device).double() @ g).square().sum()) / norm


def gradient_subspace_data(gradient: Tensor, vectors: Tensor) -> dict[str, Any]:
    """The variable ``gradient_top_subspace_fraction`` of one checkpoint, for the top-``k`` eigenvectors ``vectors``."""
    return {"gradient_top_subspace_fraction": ((), gradient_subspace_fraction(gradient, vectors), {
        "long_name": f"fraction of the squared gradient norm in the span of the top {len(vectors)} eigenvectors"})}


def overlap_with_previous_data(run: Any, info: Any, vectors: Tensor, shapes: dict[str, tuple[int, ...]],
                               settings: Any = None) -> dict[str, Any]:
    """``top_subspace_overlap`` of checkpoint ``info``'s top eigenvectors with those saved for the nearest earlier
    checkpoint of ``run`` that has them for the same Hessian (``settings``: weights, matrix, parameters; NaN when
    there is none), and that checkpoint's ``top_subspace_overlap_step`` (-1 when none)."""
    from landscape.analyses.eigenvectors import check_vectors_of, eigenvectors_path, load_eigenvectors

    overlap, previous_step = float("nan"), -1
    earlier = [c for c in run.checkpoints() if c.step < info.step]
    for candidate in reversed(earlier):
        path = eigenvectors_path(run, candidate.name, settings)
        if not path.exists():
            continue
        try:
            saved = load_eigenvectors(path)
            check_vectors_of(saved, path, settings)
        except Exception:  # an unreadable, foreign or other Hessian's file is not an earlier subspace: look back
            continue
        if "largest" not in saved.vectors or {n: tuple(s) for n, s in saved.shapes.items()} != {
                n: tuple(s) for n, s in shapes.items()}:
            continue
        overlap, previous_step = subspace_overlap(vectors, saved.vectors["largest"]), int(candidate.step)
        break
    k = len(vectors)
    return {
        "top_subspace_overlap": ((), overlap, {
            "long_name": f"||V_prev V^T||_F^2 / k of the top {k} eigenvectors with the previous checkpoint's"}),
        "top_subspace_overlap_step": ((), np.int64(previous_step), {
            "long_name": "step of the checkpoint the overlap is taken with (-1: none)"}),
    }


def refreshed_overlaps(run: Any, ds: Any, settings: Any) -> Any:
    """``ds`` (a results file's Dataset) with each checkpoint's ``top_subspace_overlap`` taken again where an
    earlier checkpoint nearer than the one it was taken with now has saved eigenvectors (``None`` when none has).
    Only the files of the checkpoints to change are read; an overlap whose vectors were deleted since is left."""
    from landscape.analyses.eigenvectors import eigenvectors_path, load_eigenvectors, saved_for

    if ds is None or "top_subspace_overlap" not in ds or "top_subspace_overlap_step" not in ds:
        return None
    checkpoints = sorted(run.checkpoints(), key=lambda c: c.step)
    by_name = {c.name: c for c in checkpoints}
    with_vectors = [c.step for c in checkpoints if saved_for(eigenvectors_path(run, c.name, settings), settings)]
    changed = ds.copy(deep=True)
    overlap, step = changed["top_subspace_overlap"].values, changed["top_subspace_overlap_step"].values
    any_change = False
    for i, name in enumerate(str(c) for c in ds["checkpoint"].values):
        info = by_name.get(name)
        if info is None or info.step not in with_vectors:
            continue
        nearest = max((s for s in with_vectors if s < info.step), default=-1)
        before = int(step[i]) if np.isfinite(step[i]) else None  # NaN: an entry measured without eigenvectors
        if before is None or nearest <= before:  # a nearer one has appeared; one deleted since leaves it as it is
            continue
        try:
            own = load_eigenvectors(eigenvectors_path(run, name, settings))
        except Exception:  # unreadable now: leave the overlap as it was measured
            continue
        if "largest" not in own.vectors:
            continue
        data = overlap_with_previous_data(run, info, own.vectors["largest"], own.shapes, settings)
        new_overlap, new_step = data["top_subspace_overlap"][1], int(data["top_subspace_overlap_step"][1])
        if new_step == before:
            continue
        overlap[i], step[i], any_change = new_overlap, new_step, True
    return changed if any_change else None
