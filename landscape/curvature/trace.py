"""Trace estimators of a symmetric operator, each with its standard error.

- :func:`hutchinson_trace`: :math:`\\operatorname{tr} A \\approx \\frac1m \\sum_i z_i^\\top A z_i` (Hutchinson 1989);
- :func:`hutch_plus_plus_trace`: the trace of a low-rank sketch exactly, Hutchinson's estimator on the rest (Meyer,
  Musco, Musco & Woodruff 2021);
- :func:`deflated_trace`: Hutch++ with a basis already at hand, the Krylov basis of a :func:`~landscape.curvature.
  lanczos.top_eigenvalues` run (Chen & Hallman 2023 for using the Krylov basis);
- :func:`deflated_group_traces`: the same estimate for the whole operator and each of its diagonal blocks (parameter
  groups) from one set of probes.

Each takes any operator :func:`~landscape.curvature.operators.as_torch_operator` takes and reports the products it
cost (``matvecs``). Hutch++ holds at most two ``(n, s)`` blocks for a sketch of ``s`` vectors (11 GB each for
ViT-B/16 at ``s`` = 33), Hutchinson one ``(n, block_size)`` block.

PyHessian 0.1 computes the trace with Hutchinson's estimator; it stops when ``|mean - previous| / (previous + 1e-6)
< tol``, which is always true for a negative trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from landscape.curvature.operators import TorchOperator, as_torch_operator, random_probes
from landscape.errors import ConfigError

Tensor = torch.Tensor


@dataclass
class TraceEstimate:
    """An unbiased trace estimate with its standard error (the standard deviation of the sample mean).

    ``samples`` are the terms :math:`z^\\top A z` averaged by the estimator (for Hutch++: of the deflated
    operator :math:`(I - QQ^\\top) A (I - QQ^\\top)`; for ``method="exact"`` the unit vectors' terms, summed);
    ``low_rank_part`` is :math:`\\operatorname{tr}(Q^\\top A Q)`
    for Hutch++ and 0 for Hutchinson.
    """

    estimate: float
    standard_error: float
    matvecs: int
    samples: np.ndarray
    low_rank_part: float = 0.0
    method: str = "hutchinson"


def hutchinson_trace(
    op: Any,
    num_matvecs: int = 100,
    *,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = 16,
    target_standard_error: float | None = None,
) -> TraceEstimate:
    """Hutchinson's estimator :math:`\\operatorname{tr} A \\approx \\frac1m \\sum_{i=1}^m z_i^\\top A z_i`.

    With Rademacher probes the variance of one term is :math:`2 (\\|A\\|_F^2 - \\sum_i A_{ii}^2)`. The standard
    error is the sample standard deviation of the terms over :math:`\\sqrt m`. Probes are multiplied
    ``block_size`` at a time; with ``target_standard_error`` the estimator stops after the first block at which
    the standard error is below it (at least 10 samples), else after ``num_matvecs`` products. A budget of at least
    the dimension ``n`` (and no target) buys the exact trace instead: :math:`\\sum_i e_i^\\top A e_i` from ``n``
    products, standard error 0 (``method="exact"``).
    """
    A = as_torch_operator(op)
    if _affords_exact(A, num_matvecs, target_standard_error):
        return _exact_trace(A, block_size)
    generator = torch.Generator().manual_seed(int(seed))
    samples = _quadratic_samples(A, num_matvecs, generator, distribution, block_size, target_standard_error)
    values = np.asarray(samples)
    return TraceEstimate(float(values.mean()), standard_error(samples), len(samples), values, 0.0, "hutchinson")


def deflated_trace(
    op: Any,
    basis: Tensor,
    num_matvecs: int = 99,
    *,
    basis_trace: float | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = 16,
    target_standard_error: float | None = None,
) -> TraceEstimate:
    """Hutch++ with a basis already at hand: :math:`\\operatorname{tr}(Q^\\top A Q)` plus Hutchinson's estimator
    on :math:`(I - QQ^\\top) A (I - QQ^\\top)`, for orthonormal rows ``basis`` ``(s, n)`` (:math:`Q^\\top`).

    The Krylov basis of a :func:`top_eigenvalues` run (``return_basis=True``) spans the dominant eigenvectors,
    and its :math:`\\operatorname{tr}(Q^\\top A Q) = \\operatorname{tr} T` is known without a product
    (``basis_trace``; computed with :math:`s` products when not given): a trace measured after the eigenvalues
    then spends every product on the deflated rest, whose variance lacks the top eigenvalues' share of
    :math:`\\|A\\|_F^2`. The estimate is unbiased given the basis (its probes are drawn independently), with the
    standard error of the second term. ``matvecs`` counts the products made here. A budget of at least the
    dimension (and no target) gives the second term exactly, from the projected unit vectors
    :math:`(I - QQ^\\top) e_i` (``method="exact"``, standard error 0).
    """
    A = as_torch_operator(op)
    n = A.shape[0]
    made = 0
    if basis_trace is None:
        basis_trace = 0.0
        for i in range(0, len(basis), block_size):
            rows = basis[i:i + block_size].to(A.device, A.dtype)
            basis_trace += float(torch.sum(rows.T * A.matmat(rows.T)).double())
            made += len(rows)
    if len(basis) >= n:
        return TraceEstimate(basis_trace, 0.0, made, np.zeros(0), basis_trace, "deflated")
    if _affords_exact(A, num_matvecs, target_standard_error):
        return _exact_trace(A, block_size, deflate=basis, basis_trace=basis_trace, made=made)
    generator = torch.Generator().manual_seed(int(seed))
    samples = _quadratic_samples(A, num_matvecs, generator, distribution, block_size, target_standard_error,
                                 deflate=basis)
    values = np.asarray(samples)
    return TraceEstimate(basis_trace + float(values.mean()), standard_error(samples), made + len(samples), values,
                         basis_trace, "deflated")


def hutch_plus_plus_trace(
    op: Any,
    num_matvecs: int = 99,
    *,
    seed: int = 0,
    sketch_size: int | None = None,
    distribution: str = "rademacher",
    block_size: int = 16,
    target_standard_error: float | None = None,
) -> TraceEstimate:
    """Hutch++: the trace of a low-rank sketch exactly, Hutchinson's estimator on the rest.

    With :math:`s` = ``sketch_size`` (default ``num_matvecs // 3``): :math:`Q = \\operatorname{orth}(A S)` for
    an ``(n, s)`` probe block :math:`S`, then

    .. math::  \\operatorname{tr} A \\approx \\operatorname{tr}(Q^\\top A Q)
               + \\frac1m \\sum_{i=1}^m g_i^\\top (I - QQ^\\top) A (I - QQ^\\top) g_i,

    with :math:`m` = ``num_matvecs`` :math:`- 2s` fresh probes. For a spectrum dominated by a few large
    eigenvalues (a loss Hessian) the deflated operator's Frobenius norm, hence the variance, is much smaller
    than Hutchinson's; for a flat spectrum Hutchinson's three times as many samples win. The standard error
    is that of the second term given :math:`Q` (0 when the sketch spans the whole space and the trace is
    exact). ``target_standard_error`` stops the second phase early as in :func:`hutchinson_trace`; give
    ``sketch_size`` with it, since the default sketch is a third of the whole budget. A budget of at least the
    dimension ``n`` (and no target) buys the exact trace from ``n`` unit vectors instead (``method="exact"``).
    """
    A = as_torch_operator(op)
    n = A.shape[0]
    if _affords_exact(A, num_matvecs, target_standard_error):
        return _exact_trace(A, block_size)
    s = sketch_size if sketch_size is not None else num_matvecs // 3
    s = max(1, min(s, n, (num_matvecs - 2) // 2))
    if num_matvecs < 2 * s + 2:
        raise ConfigError(f"Hutch++ needs at least 4 matrix-vector products, not {num_matvecs}.")
    generator = torch.Generator().manual_seed(int(seed))
    S = random_probes(n, s, generator, distribution=distribution, dtype=A.dtype).to(A.device)
    Y = _blocks(A, S, block_size)
    del S
    Q = torch.linalg.qr(Y).Q
    del Y
    # tr(Q^T A Q) block by block: A Q itself is never held
    low_rank = sum(float(torch.sum(Q[:, i:i + block_size] * A.matmat(Q[:, i:i + block_size])).double())
                   for i in range(0, s, block_size))
    if s == n:  # the sketch spans everything: the trace is exact
        return TraceEstimate(low_rank, 0.0, 2 * s, np.zeros(0), low_rank, "hutch++")
    samples = _quadratic_samples(A, num_matvecs - 2 * s, generator, distribution, block_size, target_standard_error,
                                 deflate=Q.T)
    values = np.asarray(samples)
    estimate = low_rank + float(values.mean())
    return TraceEstimate(estimate, standard_error(samples), 2 * s + len(samples), values, low_rank, "hutch++")


def _quadratic_samples(A: TorchOperator, budget: int, generator: torch.Generator, distribution: str, block_size: int,
                       target_standard_error: float | None, deflate: Tensor | None = None) -> list[float]:
    """Terms :math:`z^\\top A z` for probes drawn ``block_size`` at a time (projected off the orthonormal rows of
    ``deflate`` when given), until ``budget`` products or, after at least 10, a standard error at most
    ``target_standard_error``."""
    samples: list[float] = []
    while len(samples) < budget:
        b = min(block_size, budget - len(samples))
        Z = random_probes(A.shape[0], b, generator, distribution=distribution, dtype=A.dtype)
        if deflate is not None:
            Z = Z.to(deflate.device, deflate.dtype)
            Z = Z - deflate.T @ (deflate @ Z)
        Z = Z.to(A.device, A.dtype)
        samples.extend((Z * A.matmat(Z)).sum(0).double().cpu().tolist())
        if target_standard_error is not None and len(samples) >= 10:
            if standard_error(samples) <= target_standard_error:
                break
    return samples


def _affords_exact(A: TorchOperator, budget: int, target_standard_error: float | None) -> bool:
    """Whether a trace budget pays for one product per dimension: then the trace is computed exactly, with fewer
    or as many products as the random probes would have taken (a target standard error asks to stop early:
    the probes are kept then)."""
    return target_standard_error is None and budget >= A.shape[0]


def _unit_blocks(n: int, block_size: int, dtype: torch.dtype):
    """The unit vectors :math:`e_1, \\dots, e_n` as ``(n, b)`` blocks of columns."""
    for start in range(0, n, block_size):
        b = min(block_size, n - start)
        E = torch.zeros(n, b, dtype=dtype)
        E[torch.arange(start, start + b), torch.arange(b)] = 1
        yield E


def _exact_trace(A: TorchOperator, block_size: int, *, deflate: Tensor | None = None, basis_trace: float = 0.0,
                 made: int = 0) -> TraceEstimate:
    """:math:`\\operatorname{tr}(Q^\\top A Q)` (``basis_trace``) plus :math:`\\sum_i w_i^\\top A w_i` over
    :math:`w_i = (I - QQ^\\top) e_i`, which is :math:`\\operatorname{tr}((I - QQ^\\top) A (I - QQ^\\top))`
    exactly: ``n`` products, standard error 0 (without ``deflate``, the plain :math:`\\sum_i A_{ii}`)."""
    samples: list[float] = []
    for Z in _unit_blocks(A.shape[0], block_size, torch.float64 if deflate is None else deflate.dtype):
        if deflate is not None:
            Z = Z.to(deflate.device)
            Z = Z - deflate.T @ (deflate @ Z)
        Z = Z.to(A.device, A.dtype)
        samples.extend((Z * A.matmat(Z)).sum(0).double().cpu().tolist())
    values = np.asarray(samples)
    return TraceEstimate(basis_trace + float(values.sum()), 0.0, made + len(samples), values, basis_trace, "exact")


def _blocks(A: TorchOperator, X: Tensor, block_size: int) -> Tensor:
    return torch.cat([A.matmat(X[:, i:i + block_size]) for i in range(0, X.shape[1], block_size)], dim=1)


def standard_error(samples: list[float]) -> float:
    """The standard deviation of the samples' mean (NaN for fewer than two samples)."""
    if len(samples) < 2:
        return float("nan")
    return float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


def deflated_group_traces(op: Any, indices: Mapping[str, Tensor], num_matvecs: int, *, basis: Tensor | None = None,
                          basis_matrix: Tensor | None = None, seed: int = 0, distribution: str = "rademacher",
                          block_size: int = 16) -> tuple[TraceEstimate, np.ndarray, np.ndarray]:
    """The trace of ``op`` and of each of its diagonal blocks ``indices`` (positions in the vector) from one set of
    probes.

    With the Krylov basis :math:`V` (orthonormal rows), :math:`T = V A V^\\top`, the deflated probes
    :math:`w = (I - V^\\top V) z` and their products :math:`A w`, writing :math:`P_g` for the coordinate projection
    on block :math:`g`,

    .. math::  \\operatorname{tr} A_{gg} = \\operatorname{tr}(V_g^\\top V_g\\, T)
               + \\mathbb{E}\\big[w_g^\\top (A w)_g + (V_g w_g)^\\top (V A w)\\big],

    (:math:`V_g` the columns of :math:`V` on the block) exactly as :func:`deflated_trace` splits
    :math:`\\operatorname{tr} A`. With :math:`\\Pi = V^\\top V` and :math:`R = I - \\Pi`,
    :math:`\\operatorname{tr} P_g A = \\operatorname{tr} P_g \\Pi A \\Pi + \\operatorname{tr} P_g A R
    + \\operatorname{tr} P_g R A \\Pi`: the first is the basis term, the second the expectation of
    :math:`w_g^\\top (A w)_g = z^\\top R P_g A R z`, and the third, equal to
    :math:`\\operatorname{tr} P_g \\Pi A R`, that of the cross term :math:`z^\\top R P_g \\Pi A R z`, counted once.
    Summed over blocks that cover the vector the cross terms vanish sample by sample (:math:`V w = 0`), so the
    block traces add up to the whole estimate exactly.

    With ``basis`` ``(m, n)`` (orthonormal rows) and ``basis_matrix`` :math:`T = V A V^\\top` ``(m, m)`` the whole-model
    estimate is that of :func:`deflated_trace` with the same ``seed`` (the same probes and
    products, number for number); without, Hutchinson's. A budget of at least ``n`` takes the unit vectors as
    probes instead and sums their terms: every trace exact, standard errors 0. Returns ``(TraceEstimate, estimates (G,),
    standard errors (G,))`` in the order of ``indices``.
    """
    A = as_torch_operator(op)
    n = A.shape[0]
    groups = list(indices)
    if basis is not None and basis_matrix is None:
        raise ValueError("a deflation basis needs its projected matrix V A V^T")
    V = basis if basis is not None else torch.zeros(0, n, dtype=A.dtype, device=A.device)
    T = basis_matrix.double().cpu() if basis_matrix is not None else torch.zeros(0, 0, dtype=torch.float64)
    on_basis = {g: indices[g].to(V.device) for g in groups}
    low_rank = np.array([float((V[:, i].double() @ V[:, i].double().T).cpu().mul(T).sum()) for i in on_basis.values()])
    basis_trace = float(T.trace()) if len(T) else 0.0
    if len(V) >= n:
        return (TraceEstimate(basis_trace, 0.0, 0, np.zeros(0), basis_trace, "deflated"), low_rank,
                np.zeros(len(groups)))
    on_op = {g: indices[g].to(A.device) for g in groups}
    exact = _affords_exact(A, num_matvecs, None)  # the unit vectors: every sum below is then the exact trace
    units = _unit_blocks(n, block_size, A.dtype) if exact else None
    generator = torch.Generator().manual_seed(int(seed))
    whole: list[float] = []
    parts: list[list[float]] = [[] for _ in groups]
    while len(whole) < (n if exact else num_matvecs):
        b = min(block_size, num_matvecs - len(whole))
        Z = next(units) if exact else random_probes(n, b, generator, distribution=distribution, dtype=A.dtype)
        if len(V):  # as deflated_trace: the probes projected off the basis, in the basis's dtype and device
            Z = Z.to(V.device, V.dtype)
            Z = Z - V.T @ (V @ Z)
        Z = Z.to(A.device, A.dtype)
        AZ = A.matmat(Z)
        whole.extend((Z * AZ).sum(0).double().cpu().tolist())
        VAZ = V @ AZ.to(V.device, V.dtype) if len(V) else None
        for j, g in enumerate(groups):
            i = on_op[g]
            sample = (Z[i] * AZ[i]).sum(0).double()
            if VAZ is not None:
                Vg = V[:, on_basis[g]]
                sample = sample + ((Vg @ Z[i].to(V.device, V.dtype)) * VAZ).sum(0).double().to(sample.device)
            parts[j].extend(sample.cpu().tolist())
    values = np.asarray(whole)
    if exact:
        estimate = TraceEstimate(basis_trace + float(values.sum()), 0.0, len(whole), values, basis_trace, "exact")
        return estimate, low_rank + np.array([np.sum(p) for p in parts]), np.zeros(len(groups))
    method = "deflated" if len(V) else "hutchinson"
    estimate = TraceEstimate(basis_trace + float(values.mean()), standard_error(whole), len(whole), values,
                             basis_trace, method)
    estimates = low_rank + np.array([np.mean(p) for p in parts])
    errors = np.array([standard_error(p) for p in parts])
    return estimate, estimates, errors
