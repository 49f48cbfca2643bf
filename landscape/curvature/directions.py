"""Directions through weight space: filter normalisation, random and principal directions, grids along them.

The maths of the loss-surface analysis (:mod:`landscape.analyses.surface`, whose notes give each normalisation
policy and where it departs from Li et al. 2018): :func:`filter_normalize` rescales each filter of a direction to
the norm of the weights' filter (:func:`filter_groups`: token tables by token, fused qkv weights by head block,
other weights by output row, 1-D tensors zeroed by default); :func:`random_directions` draws seeded Gaussian
directions; :func:`trajectory_principal_directions` the top principal directions of a trajectory of weights;
:func:`combine`, :func:`grid_axes` and :func:`grid_coefficients` place the grid points, checkpoints exactly on
them; :func:`barrier` is the loss barrier of Frankle et al. (2020). Directions are dicts ``{name: tensor}``
shaped like the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from landscape.errors import LandscapeError

TOKEN_PARAMETERS = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")
ONE_DIM_POLICIES = ("zero", "filter", "weight")
TOKEN_POLICIES = ("token", "tensor")
QKV_POLICIES = ("head", "row")
_EPS = 1e-10

ParamDict = dict[str, torch.Tensor]


ParamDict = dict[str, torch.Tensor]


# -- filter normalisation -------------------------------------------------------------------------------------
def qkv_head_counts(model: nn.Module) -> dict[str, int]:
    """``{"blocks.0.attn.qkv.weight": num_heads, ...}`` for every attention module with a fused ``qkv`` linear."""
    out = {}
    for name, module in model.named_modules():
        qkv = getattr(module, "qkv", None)
        heads = getattr(module, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int) and heads > 0 and qkv.out_features % (3 * heads) == 0:
            out[f"{name}.qkv.weight" if name else "qkv.weight"] = heads
    return out


def filter_groups(name: str, shape: Sequence[int], *, qkv_heads: dict[str, int] | None = None,
                  qkv: str = "head", tokens: str = "token") -> int | None:
    """How many filters the parameter ``name`` splits into (rows of ``reshape(groups, -1)``), ``None`` if 1-D.

    The policy is the module docstring's: token tables by token, fused qkv by head block (or row), other weights
    by output row.
    """
    shape = tuple(shape)
    leaf = name.rsplit(".", 1)[-1]
    numel = math.prod(shape)
    if leaf in TOKEN_PARAMETERS and len(shape) >= 1 and tokens == "token":
        return numel // shape[-1] if shape[-1] else 0
    if leaf in TOKEN_PARAMETERS and len(shape) >= 2:
        return shape[0]
    if len(shape) <= 1:
        return None
    if qkv == "head" and qkv_heads and name in qkv_heads:
        return 3 * qkv_heads[name]
    return shape[0]


def filter_normalize(
    direction: ParamDict,
    weights: ParamDict,
    *,
    qkv_heads: dict[str, int] | None = None,
    one_dim: str = "zero",
    qkv: str = "head",
    tokens: str = "token",
) -> ParamDict:
    """Rescale each filter :math:`d_i` of ``direction`` to :math:`d_i \\|w_i\\| / (\\|d_i\\| + 10^{-10})`.

    ``direction`` and ``weights`` map the same names to tensors of the same shapes; a new dict is returned
    (in the dtype and device of ``weights``). The filter of each parameter is given by :func:`filter_groups`.
    """
    if one_dim not in ONE_DIM_POLICIES:
        raise LandscapeError(
            f"Unknown policy {one_dim!r} for one-dimensional parameters; accepted are zero, filter and weight.")
    if tokens not in TOKEN_POLICIES:
        raise LandscapeError(f"Unknown token-table normalisation {tokens!r}; accepted are token and tensor.")
    if qkv not in QKV_POLICIES:
        raise LandscapeError(f"Unknown qkv normalisation {qkv!r}; accepted are head and row.")
    out = {}
    for name, w in weights.items():
        d = direction[name].to(device=w.device, dtype=w.dtype)
        groups = filter_groups(name, w.shape, qkv_heads=qkv_heads, qkv=qkv, tokens=tokens)
        if groups is None:
            if one_dim == "zero":
                out[name] = torch.zeros_like(w)
                continue
            if one_dim == "weight":
                out[name] = w.clone()
                continue
            groups = 1
        if w.numel() == 0:
            out[name] = d.clone()
            continue
        d_rows, w_rows = d.reshape(groups, -1), w.reshape(groups, -1)
        ratio = torch.linalg.vector_norm(w_rows, dim=1, keepdim=True) / (
            torch.linalg.vector_norm(d_rows, dim=1, keepdim=True) + _EPS)
        out[name] = (d_rows * ratio).reshape(w.shape)
    return out


def random_directions(weights: ParamDict, count: int, *, seed: int = 0) -> list[ParamDict]:
    """``count`` raw Gaussian directions shaped like ``weights`` (float32, CPU), from ``torch.Generator(seed)``.

    Parameters are drawn in the order of ``weights``; the draws do not depend on the device or dtype of the model.
    """
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(w.shape, generator=generator, dtype=torch.float32) for name, w in weights.items()}
            for _ in range(count)]


def check_same_parameters(reference: ParamDict, other: ParamDict, *, what: str) -> None:
    """Refuse ``other`` unless it has exactly the names and shapes of ``reference``."""
    missing = sorted(set(reference) - set(other))
    unexpected = sorted(set(other) - set(reference))
    mismatched = sorted(n for n in set(reference) & set(other) if tuple(reference[n].shape) != tuple(other[n].shape))
    if missing or unexpected or mismatched:
        first = (missing or unexpected or mismatched)[0]
        raise LandscapeError(
            f"{what} does not have the parameters of the model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mismatched)} of another shape, e.g. {first!r}); directions need the same architecture."
        )


# -- trajectory PCA -------------------------------------------------------------------------------------------
def _row_chunks(shape: Sequence[int], copies: int, max_elements: int) -> Iterable[tuple[int, int]]:
    rows = shape[0] if len(shape) else 1
    per_row = max(1, math.prod(shape[1:]) if len(shape) > 1 else 1)
    step = max(1, max_elements // max(1, copies * per_row))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


@dataclass
class TrajectoryPCA:
    """Result of :func:`trajectory_principal_directions`.

    ``directions`` are the scaled principal directions (dicts shaped like the model's parameters), ``scales`` the
    norms they were scaled to, ``explained_variance`` :math:`\\lambda_k / \\operatorname{tr} G`, ``coordinates``
    the trajectory ``(T, count)`` in direction units relative to the last checkpoint.
    """

    directions: list[ParamDict]
    scales: list[float]
    explained_variance: list[float]
    coordinates: np.ndarray
    checkpoints: list[str] = field(default_factory=list)


def trajectory_principal_directions(readers: Sequence[Any], shapes: dict[str, Sequence[int]], count: int = 2, *,
                                    max_elements: int = 1 << 24, dtype: torch.dtype = torch.float32) -> TrajectoryPCA:
    """Top-``count`` principal directions of a trajectory of weights :math:`\\theta_1..\\theta_T` given as
    ``readers``, each with ``rows(name, start, stop)`` returning rows ``start:stop`` of parameter ``name`` flattened
    in float64 (:math:`\\theta_T` last).

    The differences :math:`D_i = \\theta_i - \\theta_T` are centred and their Gram matrix
    :math:`G = H D D^\\top H` (:math:`H = I - \\tfrac{1}{T-1} 1 1^\\top`) is accumulated in one pass that reads the
    same slice of every point at a time (never a parameters x points matrix); with :math:`G a_k = \\lambda_k a_k`, a
    second pass forms :math:`v_k = D^\\top H a_k / \\sqrt{\\lambda_k}` (unit norm), each then scaled by the largest
    :math:`|\\langle \\theta_i - \\theta_T, v_k \\rangle|` so that the trajectory fits in :math:`[-1, 1]`. Memory: the
    ``(T-1, T-1)`` Gram matrix, one slice of at most ``max_elements`` numbers from all points, and the ``count``
    output directions. ``checkpoints`` of the result is left empty for the caller to name the points.
    """
    ref, others = readers[-1], readers[:-1]
    n = len(others)

    def differences(name: str, start: int, stop: int) -> torch.Tensor:
        last = ref.rows(name, start, stop)
        return torch.stack([r.rows(name, start, stop) - last for r in others])

    gram = torch.zeros(n, n, dtype=torch.float64)
    for name, shape in shapes.items():
        for start, stop in _row_chunks(shape, len(readers), max_elements):
            d = differences(name, start, stop)
            gram += d @ d.T
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    centred = centre @ gram @ centre
    eigenvalues, eigenvectors = torch.linalg.eigh(centred)
    order = torch.argsort(eigenvalues, descending=True)[:count]
    top, vectors = eigenvalues[order], eigenvectors[:, order]
    if bool((top <= 1e-12 * max(float(eigenvalues.abs().max()), 1e-300)).any()):
        raise LandscapeError(
            f"The trajectory spans fewer than {count} dimensions (its checkpoints are identical or collinear); "
            "trajectory PCA needs checkpoints that move in at least that many directions.")
    coefficients = centre @ vectors / torch.sqrt(top)  # v_k = D^T coefficients[:, k]
    projections = gram @ coefficients  # <theta_i - theta_T, v_k>
    signs = torch.where(projections[0] > 0, -1.0, 1.0).to(torch.float64)  # the trajectory starts at negative a, b
    coefficients, projections = coefficients * signs, projections * signs
    scales = projections.abs().amax(dim=0)

    directions: list[ParamDict] = [{} for _ in range(count)]
    for name, shape in shapes.items():
        parts: list[list[torch.Tensor]] = [[] for _ in range(count)]
        for start, stop in _row_chunks(shape, len(readers), max_elements):
            combined = (coefficients * scales).T @ differences(name, start, stop)  # (count, chunk)
            for k in range(count):
                parts[k].append(combined[k])
        for k in range(count):
            directions[k][name] = torch.cat(parts[k]).reshape(tuple(shape)).to(dtype)
    coordinates = torch.cat([projections / scales, torch.zeros(1, count, dtype=torch.float64)]).numpy()
    return TrajectoryPCA(
        directions=directions,
        scales=[float(s) for s in scales],
        explained_variance=[float(v) for v in top / torch.trace(centred)],
        coordinates=coordinates,
    )


# -- grids ------------------------------------------------------------------------------------------------------
def combine(bases: Sequence[ParamDict], coefficients: Sequence[float]) -> ParamDict:
    """:math:`\\sum_j c_j B_j` per parameter, computed afresh (a new dict; the bases are not modified).

    Terms with :math:`c_j = 0` are skipped and a lone :math:`c_j = 1` term is the basis tensor itself, so a grid
    point that coincides with a basis point (a checkpoint) has exactly that point's weights.
    """
    terms = [(float(c), b) for c, b in zip(coefficients, bases) if float(c) != 0.0]
    out = {}
    for name, reference in bases[0].items():
        if not terms:
            out[name] = torch.zeros_like(reference)
            continue
        c, b = terms[0]
        total = b[name] if c == 1.0 else c * b[name]
        for c, b in terms[1:]:
            total = torch.add(total, b[name], alpha=c)
        out[name] = total
    return out


def grid_axes(value_range: tuple[float, float], points: int, anchors: Sequence[float] = (0.0,)) -> np.ndarray:
    """``points`` evenly spaced coordinates over ``value_range``, plus the ``anchors`` inside it.

    Anchors are the coordinates of checkpoints (0 for the centre; 0 and 1 for interpolation and planes): a grid
    coordinate within a millionth of a step of one is set to it exactly, and an anchor that falls between grid
    points is inserted, so the checkpoints themselves are always evaluated.
    """
    start, stop = value_range
    axis = np.linspace(start, stop, points)
    step = abs(stop - start) / max(points - 1, 1)
    for anchor in anchors:
        close = np.abs(axis - anchor) <= 1e-6 * step
        axis[close] = anchor
        if not close.any() and start <= anchor <= stop:
            axis = np.sort(np.append(axis, anchor))
    return axis


def barrier(values: np.ndarray, axis: np.ndarray) -> float:
    """:math:`\\max_{\\alpha \\in [0, 1]} f(\\alpha) - \\tfrac{1}{2}(f(0) + f(1))` over the grid (Frankle et al. 2020);
    ``nan`` unless both 0 and 1 are grid points."""
    at0, at1 = np.flatnonzero(axis == 0.0), np.flatnonzero(axis == 1.0)
    if not len(at0) or not len(at1):
        return float("nan")
    inside = (axis >= 0.0) & (axis <= 1.0)
    return float(values[inside].max() - 0.5 * (values[at0[0]] + values[at1[0]]))


def grid_coefficients(kind: str, axes: Sequence[np.ndarray]) -> np.ndarray:
    """``(points, 1 + dims)`` coefficients of the bases for every grid point, ``a`` varying slowest.

    ``random``/``pca``/``eigen``: :math:`(1, a, b)` on :math:`(w_0, d_1, d_2)`; ``interpolate``/``plane``:
    :math:`(1 - a - b, a, b)` on :math:`(w_0, w_1, w_2)`, so the checkpoints themselves are grid points with exact
    coefficients 0 and 1.
    """
    mesh = np.meshgrid(*axes, indexing="ij")
    coords = [m.reshape(-1) for m in mesh]
    if kind in ("interpolate", "plane"):
        first = 1.0 - np.sum(coords, axis=0)
    else:
        first = np.ones_like(coords[0])
    return np.stack([first, *coords], axis=1)
