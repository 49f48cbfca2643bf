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
