"""Spectral estimators of a symmetric linear operator: extreme eigenvalues, trace and spectral density.

The estimators know nothing of neural networks. Each takes an operator :math:`A \\in \\mathbb{R}^{n \\times n}`
(symmetric) and a seed, and only multiplies :math:`A` by blocks of vectors:

- :func:`top_eigenvalues`: the :math:`k` largest (and/or smallest) eigenpairs by thick-restart Lanczos with full
  reorthogonalisation (Wu & Simon 2000), stopped when each eigenvalue's error bound (from the Ritz residual
  :math:`r = \\|A y - \\theta y\\|` and the gap to the other Ritz values, :math:`\\min(r, r^2/\\text{gap})`) is
  below :math:`\\text{tol}\\,|\\theta|`.
- :func:`hutchinson_trace`, :func:`hutch_plus_plus_trace` and :func:`deflated_trace` (Hutch++ with a Lanczos
  basis instead of a sketch): :math:`\\operatorname{tr} A` with a standard error (Hutchinson 1989; Meyer, Musco,
  Musco & Woodruff 2021; Chen & Hallman 2023 for using the Krylov basis).
- :func:`spectral_density`: the eigenvalue density :math:`\\phi(t) = \\frac1n \\sum_i \\delta(t - \\lambda_i)`
  by stochastic Lanczos quadrature, Gaussian-broadened (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019).

An operator is any of: a :class:`~landscape.curvature.operators.HessianOperator` (products stay in torch on its
device), a dense torch tensor or numpy array, or any :class:`scipy.sparse.linalg.LinearOperator`. Every result
reports how many matrix-vector products (``matvecs``) it cost.

Memory. The Lanczos basis is an ``(m, n)`` tensor, by default in the operator's dtype on its device:
``m`` is at most ``basis_size`` for :func:`top_eigenvalues` (about :math:`\\max(2w+8, 20)` for :math:`w` eigenvalues
tracked, the wanted ones and the guards; thick restarts keep it bounded whatever the number of iterations) and
``num_steps`` for each probe of :func:`spectral_density`. For ViT-B/16 (86M parameters) in float32 the default
top-5 basis (22 vectors) is 7.6 GB and an 80-step density basis 27.5 GB. When that does not fit next to the
model, pass ``basis_device="cpu"`` (each step then moves one block of vectors to the host and back, and the
orthogonalisation runs on the CPU), or for the density ``reorthogonalize=False``: three vectors only, but the
Lanczos vectors lose orthogonality and converged outliers reappear as "ghost" copies in the node list; the
quadrature weights split between the copies, so moments and the broadened density stay usable while the node
list no longer reads as distinct eigenvalues. Hutch++ holds at most two ``(n, s)`` blocks for a sketch of ``s``
vectors (11 GB each for ViT-B/16 at ``s`` = 33), Hutchinson one ``(n, block_size)`` block.

PyHessian 0.1 computes the same three quantities with power iteration, Hutchinson's estimator and SLQ; its
density calls ``torch.eig``, which PyTorch 2 removed, so only its eigenvalues and trace can be compared. Three
more things to know when comparing: its constructor adds its ``create_graph`` gradient to ``.grad`` without
clearing it (give it a model whose gradients are ``None``, or it differentiates a sum of gradients); its trace
stops when ``|mean - previous| / (previous + 1e-6) < tol``, which is always true for a negative trace; and its
timm ViTs need the math attention kernel around every call, as ours switch on themselves.

The second half of this module applies the estimators to the loss Hessian of a model at every checkpoint of a
run (:func:`hessian_analysis`, :func:`run_hessian_analysis`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from landscape.analyses import distributed
from landscape.analyses.driver import Analysis, Job, analyze
from landscape.analyses.settings import EvaluationSettings
from landscape.errors import ConfigError, LandscapeError

Tensor = torch.Tensor
WHICH = ("largest", "smallest", "both")


# -- operators --------------------------------------------------------------------------------------------------
@dataclass
class TorchOperator:
    """A symmetric ``(n, n)`` operator as torch sees it: ``matmat`` maps ``(n, k)`` to ``(n, k)`` on ``device``."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    matmat: Callable[[Tensor], Tensor]


def as_torch_operator(op: Any) -> TorchOperator:
    """Wrap a HessianOperator, a dense tensor/array or a scipy LinearOperator as a :class:`TorchOperator`."""
    if isinstance(op, TorchOperator):
        return op
    if hasattr(op, "torch_matmat"):
        return TorchOperator(tuple(op.shape), op.torch_dtype, torch.device(op.device), op.torch_matmat)
    if isinstance(op, np.ndarray):
        op = torch.from_numpy(op)
    if isinstance(op, Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"a dense operator must be a square matrix, got shape {tuple(op.shape)}")
        matrix = op if op.is_floating_point() else op.double()
        return TorchOperator(tuple(matrix.shape), matrix.dtype, matrix.device, lambda v: matrix @ v.to(matrix.dtype))
    if hasattr(op, "matmat") and hasattr(op, "shape"):
        dtype = torch.float32 if np.dtype(op.dtype) == np.float32 else torch.float64
        np_dtype = np.float32 if dtype == torch.float32 else np.float64

        def matmat(v: Tensor) -> Tensor:
            out = op.matmat(v.detach().cpu().numpy().astype(np_dtype, copy=False))
            return torch.from_numpy(np.asarray(out, dtype=np_dtype))

        return TorchOperator(tuple(op.shape), dtype, torch.device("cpu"), matmat)
    raise TypeError(f"cannot use a {type(op).__name__} as a linear operator")


def random_probes(n: int, k: int, generator: torch.Generator, *, distribution: str = "rademacher",
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """``(n, k)`` probe vectors with :math:`E[z z^\\top] = I`: Rademacher (:math:`\\pm 1`) or standard Gaussian.

    Drawn on the CPU from ``generator``, one probe after another, so a seed gives the same probes on every
    device and however they are grouped: ``k`` probes drawn at once equal the same ``k`` drawn in smaller blocks
    (estimators that multiply probes in blocks then do not depend on the block size).
    """
    if distribution == "rademacher":
        draw = lambda: torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1  # noqa: E731
    elif distribution == "gaussian":
        draw = lambda: torch.randn(n, generator=generator, dtype=torch.float64)  # noqa: E731
    else:
        raise ConfigError(f"Unknown probe distribution {distribution!r}; accepted are rademacher and gaussian.")
    return torch.stack([draw() for _ in range(k)], dim=1).to(dtype)


# -- extreme eigenvalues ------------------------------------------------------------------------------------------
@dataclass
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    ``eigenvalues`` ``(w,)`` in decreasing order; ``eigenvectors`` ``(w, n)`` (unit norm, row ``i`` for
    eigenvalue ``i``) or ``None``; ``residual_norms`` :math:`\\|A y_i - \\theta_i y_i\\|` ``(w,)``;
    ``error_bounds`` ``(w,)``; with ``return_basis``, the final Krylov ``basis`` ``(m, n)`` (orthonormal rows)
    and ``basis_trace`` :math:`= \\operatorname{tr}(V^\\top A V)`, for :func:`deflated_trace`.
    For ``which="both"`` the first ``k`` are the largest and the last ``k`` the smallest.
    """

    eigenvalues: np.ndarray
    residual_norms: np.ndarray
    matvecs: int
    converged: bool
    which: str
    eigenvectors: Tensor | None = None
    error_bounds: np.ndarray | None = None
    basis: Tensor | None = None
    basis_trace: float | None = None
    basis_matrix: Tensor | None = None

    @property
    def largest(self) -> np.ndarray:
        """The largest eigenvalues, largest first."""
        k = len(self.eigenvalues) // 2 if self.which == "both" else len(self.eigenvalues)
        return self.eigenvalues[:k] if self.which != "smallest" else np.array([])

    @property
    def smallest(self) -> np.ndarray:
        """The smallest eigenvalues, most negative first."""
        k = len(self.eigenvalues) // 2 if self.which == "both" else len(self.eigenvalues)
        return self.eigenvalues[::-1][:k] if self.which != "largest" else np.array([])


def top_eigenvalues(
    op: Any,
    k: int = 5,
    *,
    which: str = "largest",
    tol: float = 1e-3,
    seed: int = 0,
    block_size: int = 1,
    guard: int = 2,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    return_eigenvectors: bool = False,
    return_basis: bool = False,
    basis_device: str | torch.device | None = None,
    basis_dtype: torch.dtype | None = None,
    start: Tensor | None = None,
) -> EigenResult:
    """The ``k`` largest (``which="largest"``), smallest (``"smallest"``) or both (``"both"``, ``2k`` in all)
    eigenvalues of a symmetric operator, by thick-restart (block) Lanczos with full reorthogonalisation, each to a
    relative accuracy ``tol``.

    Starting from ``block_size`` seeded Gaussian vectors, the Krylov basis :math:`V_m` (rows of an ``(m, n)``
    tensor) grows by blocks :math:`W = A V_{\\text{last}}`, orthogonalised twice against all of :math:`V_m`
    (classical Gram-Schmidt, twice is enough) and orthonormalised (:math:`W = QR`). The projections fill
    :math:`T_m = V_m^\\top A V_m`; its eigenpairs :math:`(\\theta_i, s_i)` give Ritz pairs :math:`(\\theta_i, y_i =
    V_m^\\top s_i)` with residual :math:`\\|A y_i - \\theta_i y_i\\| = \\|R\\, s_{i,\\text{last}}\\|`
    (:math:`\\beta_m |s_{m,i}|` for single vectors). Some eigenvalue of :math:`A` lies within :math:`r_i` of
    :math:`\\theta_i`, and within :math:`r_i^2 / \\delta_i` when :math:`\\delta_i` separates :math:`\\theta_i` from
    the rest of the spectrum (Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, 11.7). The gap is
    taken from the other Ritz values, each moved toward :math:`\\theta_i` by its own residual:
    :math:`\\delta_i = \\min_{j \\ne i} (|\\theta_i - \\theta_j| - r_j)`. The iteration stops when every tracked value's
    bound :math:`\\min(r_i, r_i^2/\\delta_i)` is below ``tol`` :math:`\\cdot |\\theta_i|` (``error_bounds`` in the
    result). Since eigenvalues converge twice as fast as eigenvectors, this stops well before the residuals
    themselves reach ``tol`` (``benchmarks/hessian.md``, top 5 to 1e-3 from 5 start vectors: 20 to 21 products
    on the 1.8M-parameter ViT, 31 to 41 on the 0.2M one, largest error 5e-5). When the basis is full it restarts from the Ritz vectors nearest the wanted
    end (about half the basis) plus the residual block.

    A Ritz value can converge to the *next* eigenvalue while the Krylov space has not yet found one (a start
    vector nearly orthogonal to its eigenvector): its residual is small and nothing signals the gap. So
    ``guard`` further Ritz values past the wanted ones must converge too, which gives a missed eigenvalue more
    iterations to appear (on the tests' spectrum with 10.7 next to 10.6, stopping on the five wanted values
    alone returns :math:`\\lambda_6` for :math:`\\lambda_5` from most of 6 seeds; ``guard=2`` from none).

    ``block_size`` > 1 multiplies several vectors at once (a batched Hessian-vector product shares one primal
    pass): more products in all than single-vector Lanczos, each cheaper, and robust to clustered eigenvalues.

    ``start`` ``(j, n)`` (rows, for instance the Ritz vectors of a nearby operator: :func:`ritz_start`) replaces
    the random start: the block is then at least ``j`` wide, its rows completed with seeded Gaussian vectors when
    ``block_size`` asks for more (:func:`start_block`). The stopping rule is the same, so is the accuracy; when the
    start already spans the wanted eigenvectors to within :math:`\\sqrt{\\text{tol}}` the first block's products
    meet it.

    Limitation (shared with every Krylov method): of an eigenvalue whose multiplicity exceeds the block size,
    one copy per block is found per restart cycle; exactly repeated eigenvalues may be reported too few times.
    """
    if which not in WHICH:
        raise ConfigError(f"Unknown eigenvalue selection {which!r}; accepted are {', '.join(WHICH)}.")
    A = as_torch_operator(op)
    n = A.shape[0]
    wanted = 2 * k if which == "both" else k
    if k < 1 or wanted > n:
        raise ConfigError(f"Cannot find {wanted} eigenvalues of a {n} x {n} operator; ask for between 1 and {n}.")
    per_end = min(k + max(0, guard), n // 2 if which == "both" else n)
    tracked = 2 * per_end if which == "both" else per_end  # wanted plus guards: these must converge
    b = max(1, min(int(block_size), n))
    if start is not None:  # a warm start: its whole block is multiplied at once, and so is each block after it
        b = max(b, min(len(start), n))
    m_max = min(n, basis_size or max(2 * tracked + 8, 20, tracked + 4 * b))
    if m_max < n and m_max < tracked + b + 2:
        raise ConfigError(f"The Lanczos basis ({m_max} vectors) must exceed the {tracked} eigenvalues tracked "
                          f"(wanted and guards) by at least the block size ({b}) plus 2.")
    max_matvecs = max_matvecs or max(50 * m_max, 1000)
    bdtype = basis_dtype or A.dtype
    bdevice = torch.device(basis_device) if basis_device is not None else A.device

    generator = torch.Generator().manual_seed(int(seed))
    V = torch.zeros(m_max, n, dtype=bdtype, device=bdevice)
    T = torch.zeros(m_max, m_max, dtype=torch.float64)
    V[:b] = start_block(n, b, generator, start).T.to(bdevice, bdtype)
    size, applied, matvecs = b, 0, 0  # basis vectors; those whose products are in T; products computed
    while True:
        block = V[applied:size]
        W = A.matmat(block.T.to(A.device, A.dtype)).T.to(bdevice, bdtype)  # (b', n)
        matvecs += size - applied
        coefficients = _orthogonalize_rows(W, V[:size]).double().cpu()  # (size, b')
        T[:size, applied:size] = coefficients
        T[applied:size, :size] = coefficients.T
        applied = size
        theta, S = torch.linalg.eigh(T[:size, :size])
        Q, R = torch.linalg.qr(W.T)  # residual block W = (Q R)^T
        residuals = torch.linalg.norm(R.double().cpu() @ S[size - len(W):], dim=0)
        bounds = _error_bounds(theta, residuals)
        idx = _wanted(theta, k, which)
        checked = _wanted(theta, per_end, which)
        anorm = float(theta.abs().max())
        scale = torch.clamp(theta[checked].abs(), min=1e-12 * max(anorm, 1e-300))
        done = bool((bounds[checked] <= tol * scale).all()) and size >= min(n, tracked)
        if done or size == n or matvecs >= max_matvecs:
            break
        if size + min(b, n - size) > m_max:  # thick restart: keep the Ritz vectors nearest the wanted end
            keep = _kept(theta, tracked, which, m_max, b)
            Y = S[:, keep].T.to(bdevice, bdtype) @ V[:size]
            V.zero_()
            T.zero_()
            V[: len(keep)] = Y
            T[range(len(keep)), range(len(keep))] = theta[keep]
            size = applied = len(keep)
        new = Q.T[: min(b, n - size)].to(bdevice, bdtype)
        deficient = R.diagonal().abs()[: len(new)] <= 1e-12 * max(anorm, 1e-300)
        for row in torch.nonzero(deficient).flatten().tolist():  # invariant subspace: continue in a fresh direction
            fresh = torch.randn(1, n, generator=generator, dtype=torch.float64).to(bdevice, bdtype)
            _orthogonalize_rows(fresh, torch.cat([V[:size], new[:row]]))
            new[row] = fresh[0] / fresh.norm()
        V[size:size + len(new)] = new
        size += len(new)

    vectors = None
    if return_eigenvectors:
        vectors = S[:, idx].T.to(bdevice, bdtype) @ V[:size]
    return EigenResult(
        eigenvalues=theta[idx].numpy(),
        residual_norms=residuals[idx].numpy(),
        error_bounds=bounds[idx].numpy(),
        matvecs=matvecs,
        converged=done,
        which=which,
        eigenvectors=vectors,
        basis=V[:size] if return_basis else None,  # every row's product is in T: T[:size, :size] = V^T A V
        basis_trace=float(T[:size, :size].trace()) if return_basis else None,
        basis_matrix=T[:size, :size].clone() if return_basis else None,
    )


def start_block(n: int, b: int, generator: torch.Generator, start: Tensor | None = None) -> Tensor:
    """An orthonormal ``(n, b)`` float64 start block: the rows of ``start`` ``(j, n)`` first (those that are
    linearly dependent on the ones before them replaced), then seeded Gaussian vectors up to ``b``; all ``b``
    Gaussian without ``start``."""
    if start is None:
        return torch.linalg.qr(torch.randn(n, b, generator=generator, dtype=torch.float64)).Q
    given = start.detach().to("cpu", torch.float64).reshape(-1, n)[:b]
    fill = torch.randn(n, b, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(torch.cat([given.T, fill[:, len(given):]], dim=1))
    scale = float(R.diagonal().abs().max()) if b else 0.0
    weak = (R.diagonal().abs() <= 1e-10 * max(scale, 1e-300)).nonzero().flatten().tolist()
    for column in weak:  # a dependent row: a fresh direction orthogonal to the others
        fresh = fill[:, column:column + 1].clone()
        others = torch.cat([Q[:, :column], Q[:, column + 1:]], dim=1)
        for _ in range(2):
            fresh -= others @ (others.T @ fresh)
        Q[:, column:column + 1] = fresh / fresh.norm()
    return Q


def ritz_start(result: EigenResult, k: int, guard: int = 2) -> Tensor:
    """The start block for the next operator of a series: the Ritz vectors ``(p, n)`` of the tracked eigenvalues
    of ``result`` (the ``k`` wanted and ``guard`` more at each end it was asked for, ``top_eigenvalues`` run with
    ``return_basis=True``), computed from its final basis :math:`V` and :math:`T = V^\\top A V` without a product."""
    if result.basis is None or result.basis_matrix is None:
        raise ValueError("a warm start needs the Krylov basis: call top_eigenvalues with return_basis=True")
    theta, S = torch.linalg.eigh(result.basis_matrix)
    per_end = min(k + max(0, guard), len(theta))
    if result.which == "both":
        per_end = min(per_end, len(theta) // 2)
    columns = _wanted(theta, per_end, "largest" if result.which == "both" else result.which)
    if result.which == "both":
        columns = torch.cat([columns, _wanted(theta, per_end, "smallest")])
    basis = result.basis
    return S[:, columns].T.to(basis.device, basis.dtype) @ basis


def _error_bounds(theta: Tensor, residuals: Tensor) -> Tensor:
    """For each Ritz value, a bound on its distance to an eigenvalue: ``min(r, r^2 / gap)``, the gap to the
    other Ritz values each widened by its residual (``r`` alone where that gap is not positive)."""
    if len(theta) < 2:
        return residuals.clone()
    distance = (theta[:, None] - theta[None, :]).abs() - residuals[None, :]
    distance.fill_diagonal_(float("inf"))
    gap = distance.min(dim=1).values
    quadratic = torch.where(gap > 0, residuals ** 2 / gap.clamp(min=1e-300), residuals)
    return torch.minimum(residuals, quadratic)


def _orthogonalize_rows(W: Tensor, basis: Tensor) -> Tensor:
    """Remove from the rows of ``W`` (in place) their components along the orthonormal rows of ``basis``;
    return the coefficients ``(len(basis), len(W))``."""
    h = basis @ W.T
    W -= h.T @ basis
    h2 = basis @ W.T
    W -= h2.T @ basis
    return h + h2


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from ``w`` (in place) its components along the orthonormal rows of ``basis``; return them."""
    h = basis @ w
    w -= basis.T @ h
    h2 = basis @ w
    w -= basis.T @ h2
    return h + h2


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the wanted Ritz values (``theta`` ascending), in decreasing order of value."""
    m = len(theta)
    top = torch.arange(m - 1, max(m - 1 - k, -1), -1)
    bottom = torch.arange(min(k, m) - 1, -1, -1)
    if which == "largest":
        return top
    if which == "smallest":
        return bottom
    return torch.cat([top, bottom[(bottom < m - k)]]) if m >= 2 * k else torch.arange(m - 1, -1, -1)


def _kept(theta: Tensor, wanted: int, which: str, m_max: int, block: int) -> Tensor:
    """Ritz vectors kept at a restart: the wanted ones and about as many again nearest them, leaving room for
    at least two more blocks."""
    m = len(theta)
    p = max(wanted, min(m_max - 2 * block, max(wanted + 1, (wanted + m_max) // 2)))
    if which == "largest":
        return torch.arange(m - p, m)
    if which == "smallest":
        return torch.arange(0, p)
    low = p // 2
    return torch.cat([torch.arange(0, low), torch.arange(m - (p - low), m)])


# -- trace --------------------------------------------------------------------------------------------------------
@dataclass
class TraceEstimate:
    """An unbiased trace estimate with its standard error (the standard deviation of the sample mean).

    ``samples`` are the terms :math:`z^\\top A z` averaged by the estimator (for Hutch++: of the deflated
    operator :math:`(I - QQ^\\top) A (I - QQ^\\top)`); ``low_rank_part`` is :math:`\\operatorname{tr}(Q^\\top A Q)`
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
    the standard error is below it (at least 10 samples), else after ``num_matvecs`` products.
    """
    A = as_torch_operator(op)
    generator = torch.Generator().manual_seed(int(seed))
    samples = _quadratic_samples(A, num_matvecs, generator, distribution, block_size, target_standard_error)
    values = np.asarray(samples)
    return TraceEstimate(float(values.mean()), _standard_error(samples), len(samples), values, 0.0, "hutchinson")


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
    standard error of the second term. ``matvecs`` counts the products made here.
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
    generator = torch.Generator().manual_seed(int(seed))
    samples = _quadratic_samples(A, num_matvecs, generator, distribution, block_size, target_standard_error,
                                 deflate=basis)
    values = np.asarray(samples)
    return TraceEstimate(basis_trace + float(values.mean()), _standard_error(samples), made + len(samples), values,
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
    ``sketch_size`` with it, since the default sketch is a third of the whole budget.
    """
    A = as_torch_operator(op)
    n = A.shape[0]
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
    return TraceEstimate(estimate, _standard_error(samples), 2 * s + len(samples), values, low_rank, "hutch++")


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
            if _standard_error(samples) <= target_standard_error:
                break
    return samples


def _blocks(A: TorchOperator, X: Tensor, block_size: int) -> Tensor:
    return torch.cat([A.matmat(X[:, i:i + block_size]) for i in range(0, X.shape[1], block_size)], dim=1)


def _standard_error(samples: list[float]) -> float:
    if len(samples) < 2:
        return float("nan")
    return float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


# -- spectral density ---------------------------------------------------------------------------------------------
def lanczos_tridiagonal(
    op: Any,
    start: Tensor,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
    basis_device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_steps`` Lanczos steps from ``start``: the diagonal :math:`\\alpha` ``(m,)`` and off-diagonal
    :math:`\\beta` ``(m-1,)`` of :math:`T_m = V_m^\\top A V_m`, :math:`v_1 = z/\\|z\\|`.

    Stops early (``m < num_steps``) when the Krylov space is exhausted (:math:`\\beta` vanishes). With
    ``reorthogonalize`` every new vector is orthogonalised against the whole ``(m, n)`` basis; without, only
    the three-term recurrence is kept (memory :math:`O(n)`, see the module notes on ghost eigenvalues).
    """
    A = as_torch_operator(op)
    n = A.shape[0]
    num_steps = min(num_steps, n)
    bdevice = torch.device(basis_device) if basis_device is not None else A.device
    v = start.to(bdevice, A.dtype).reshape(-1)
    v = v / v.norm()
    basis = torch.zeros(num_steps, n, dtype=A.dtype, device=bdevice) if reorthogonalize else None
    alphas: list[float] = []
    betas: list[float] = []
    previous, beta = None, 0.0
    for j in range(num_steps):
        if basis is not None:
            basis[j] = v
        w = A.matmat(v.to(A.device)[:, None])[:, 0].to(bdevice)
        alpha = float(torch.dot(w, v))
        alphas.append(alpha)
        w = w - alpha * v - (beta * previous if previous is not None else 0.0)
        if basis is not None:
            _orthogonalize(w, basis[: j + 1])
        beta = float(w.norm())
        if j == num_steps - 1 or beta <= 1e-10 * max(abs(a) for a in alphas) * math.sqrt(n) or beta == 0.0:
            break
        betas.append(beta)
        previous, v = v, w / beta
    return np.asarray(alphas), np.asarray(betas[: len(alphas) - 1])


def gauss_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the Gauss quadrature of a Lanczos run: the eigenvalues :math:`\\theta_j` of
    :math:`T_m` and the squared first components :math:`\\tau_j = (e_1^\\top s_j)^2` of its eigenvectors.

    For the start vector :math:`v`, :math:`\\sum_j \\tau_j \\theta_j^p = v^\\top A^p v / v^\\top v` exactly for
    :math:`p \\le 2m - 1`; the weights sum to 1.
    """
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    nodes, vectors = np.linalg.eigh(T)
    return nodes, vectors[0] ** 2


@dataclass
class SpectralDensity:
    """A broadened spectral density and the quadrature it was made from.

    ``grid`` ``(G,)`` eigenvalues and ``density`` ``(G,)`` values of :math:`\\hat\\phi` (integrating to 1 over the
    grid); ``nodes``/``weights`` ``(probes, steps)`` (NaN-padded when a run stopped early); ``sigma`` the
    Gaussian width in the grid's coordinate (:math:`t` for ``scale="linear"``, :math:`\\operatorname{asinh}(t /
    \\lambda_0)` for ``"symlog"``, :math:`\\lambda_0` = ``linthresh``).
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    scale: str
    linthresh: float
    matvecs: int

    def moment(self, p: int) -> float:
        """:math:`\\frac1n \\operatorname{tr} A^p` estimated from the quadrature (before broadening)."""
        valid = ~np.isnan(self.nodes)
        per_probe = np.where(valid, np.nan_to_num(self.weights) * np.nan_to_num(self.nodes) ** p, 0.0).sum(1)
        return float(per_probe.mean())


def spectral_density(
    op: Any,
    num_probes: int = 4,
    num_steps: int = 80,
    *,
    seed: int = 0,
    grid: np.ndarray | None = None,
    grid_size: int = 1000,
    sigma: float | None = None,
    scale: str = "linear",
    linthresh: float | None = None,
    distribution: str = "rademacher",
    reorthogonalize: bool = True,
    basis_device: str | torch.device | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: :math:`\\hat\\phi(t) = \\frac{1}{n_v} \\sum_{l=1}^{n_v} \\sum_{j=1}^{m}
    \\tau_j^{(l)} \\, g_\\sigma(t - \\theta_j^{(l)})`, one Lanczos run of ``num_steps`` per probe.

    Each probe's Gauss quadrature approximates :math:`z^\\top f(A) z / z^\\top z`, whose expectation is
    :math:`\\frac1n \\operatorname{tr} f(A)`. Broadening (:func:`broadened_density`) is Gaussian in the grid
    coordinate: ``scale="linear"`` is the usual picture; ``scale="symlog"`` broadens in
    :math:`u = \\operatorname{asinh}(t/\\lambda_0)`, a width proportional to :math:`|t|` beyond
    :math:`\\lambda_0` (default :math:`10^{-3} \\max|\\theta|`), so the bulk near zero and the outliers are both
    resolved and the density reads well on log axes. The default grid spans the nodes plus 6 widths in that
    coordinate; ``sigma`` defaults to 1% of the nodes' span in it.
    """
    if scale not in ("linear", "symlog"):
        raise ConfigError(f"Unknown density scale {scale!r}; accepted are linear and symlog.")
    A = as_torch_operator(op)
    n = A.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    steps = min(num_steps, n)
    nodes = np.full((num_probes, steps), np.nan)
    weights = np.full((num_probes, steps), np.nan)
    matvecs = 0
    for probe in range(num_probes):
        z = random_probes(n, 1, generator, distribution=distribution, dtype=torch.float64)[:, 0]
        alpha, beta = lanczos_tridiagonal(A, z, steps, reorthogonalize=reorthogonalize, basis_device=basis_device)
        matvecs += len(alpha)
        theta, tau = gauss_quadrature(alpha, beta)
        nodes[probe, : len(theta)] = theta
        weights[probe, : len(tau)] = tau
    finite = nodes[~np.isnan(nodes)]
    if linthresh is None:
        linthresh = 1e-3 * float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    if grid is None:
        u = _to_coordinate(finite, scale, linthresh)
        span = float(u.max() - u.min())
        if sigma is None:
            sigma = 0.01 * span if span > 0 else 1e-3 * max(1.0, float(np.abs(u).max()))
        u_grid = np.linspace(u.min() - 6 * sigma, u.max() + 6 * sigma, grid_size)
        grid = _from_coordinate(u_grid, scale, linthresh)
    elif sigma is None:
        u = _to_coordinate(np.asarray(grid, dtype=float), scale, linthresh)
        sigma = 0.01 * float(u.max() - u.min())
    grid = np.asarray(grid, dtype=float)
    density = broadened_density(nodes, weights, grid, sigma, scale=scale, linthresh=linthresh)
    return SpectralDensity(grid, density, nodes, weights, float(sigma), scale, float(linthresh), matvecs)


def broadened_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float, *,
                      scale: str = "linear", linthresh: float = 1.0) -> np.ndarray:
    """:math:`\\hat\\phi` on ``grid`` from quadrature ``nodes``/``weights`` ``(probes, steps)`` (NaN entries ignored).

    In the coordinate :math:`u(t)` (:math:`t`, or :math:`\\operatorname{asinh}(t/\\lambda_0)`) each node is a
    Gaussian of width ``sigma``; the density in :math:`t` carries the Jacobian :math:`u'(t)`, so it integrates
    to (the probes' mean of) the weights' sum, 1, over any grid that covers the nodes with a few widths to spare.
    Use it to put several checkpoints on one common grid.
    """
    nodes = np.atleast_2d(np.asarray(nodes, dtype=float))
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    valid = ~(np.isnan(nodes) | np.isnan(weights))
    theta = _to_coordinate(nodes[valid], scale, linthresh)
    tau = weights[valid] / nodes.shape[0]
    u = _to_coordinate(np.asarray(grid, dtype=float), scale, linthresh)
    out = np.zeros_like(u)
    for start in range(0, len(theta), 256):  # bounded (grid x nodes) temporaries
        diff = (u[:, None] - theta[None, start:start + 256]) / sigma
        out += (np.exp(-0.5 * diff**2) * tau[None, start:start + 256]).sum(1)
    out /= sigma * math.sqrt(2 * math.pi)
    if scale == "symlog":
        out /= np.sqrt(np.asarray(grid, dtype=float) ** 2 + linthresh**2)
    return out


def _to_coordinate(t: np.ndarray, scale: str, linthresh: float) -> np.ndarray:
    return np.arcsinh(t / linthresh) if scale == "symlog" else np.asarray(t, dtype=float)


def _from_coordinate(u: np.ndarray, scale: str, linthresh: float) -> np.ndarray:
    return linthresh * np.sinh(u) if scale == "symlog" else u


# == the Hessian analysis of a run ================================================================================
@dataclass
class HessianSettings(EvaluationSettings):
    """What ``landscape analyze hessian`` measures at each checkpoint, and on which data.

    The loss is the mean cross-entropy over ``samples`` examples of the run's dataset (``dataset``/``split``;
    chosen with ``seed``), in ``dtype``. The Hessian is taken with respect to the parameters matching
    ``params`` (:func:`~landscape.curvature.loss.parameters_by_pattern`; all when ``None``).

    - eigenvalues: ``top_k`` of each end asked for by ``which`` (largest, smallest, both) each to a
      relative accuracy ``tol`` (:func:`top_eigenvalues`); ``top_k=0`` skips them;
    - trace (``trace``): ``trace_matvecs`` products; ``trace_method="lanczos"`` spends them all on Hutchinson's
      estimator deflated by the Krylov basis that the eigenvalues left (:func:`deflated_trace`; Hutch++ when
      ``top_k=0``), ``"hutch++"`` always runs Hutch++ (a third of them on its sketch);
    - density (``density``): SLQ with ``density_probes`` runs of ``density_steps`` steps, on ``density_grid_size``
      points, ``density_scale`` linear or symlog.

    ``matrix`` chooses the curvature matrix every estimator above multiplies by
    (:func:`~landscape.curvature.operators.curvature_operator`): ``"hessian"``, the generalised Gauss-Newton
    ``"ggn"``, the true ``"fisher"`` (exact, which for softmax cross-entropy equals the GGN, or with
    ``fisher_samples`` labels per example drawn from the model with ``seed``) or the ``"empirical-fisher"``
    :math:`\\frac1N \\sum_i g_i g_i^\\top`. ``per_batch``: also the largest eigenvalue of the same matrix on each
    consecutive batch of ``per_batch`` examples of the evaluation set (the remainder left out), as in Park & Kim
    (2022), to the same ``tol``.

    ``batch_size``, ``vectors_per_pass`` and ``product`` (how Hessian-vector products are computed:
    :class:`~landscape.curvature.operators.HessianOperator`; ``"auto"`` keeps the gradient graph when ``samples``
    fit in one batch) trade memory for speed only.
    """

    top_k: int = 5
    which: str = "largest"
    tol: float = 1e-3
    trace: bool = False
    trace_matvecs: int = 99
    trace_method: str = "lanczos"
    density: bool = False
    density_probes: int = 4
    density_steps: int = 80
    density_grid_size: int = 1000
    density_scale: str = "linear"
    params: str | None = None
    vectors_per_pass: int = 8
    product: str = "auto"
    matrix: str = "hessian"
    fisher_samples: int | None = None
    per_batch: int | None = None
    per_block: bool = False
    preconditioned: bool = False

    RUNTIME_ONLY = ("batch_size", "vectors_per_pass", "product")

    def determining(self) -> dict[str, Any]:
        settings = super().determining()
        for key in ("per_block", "preconditioned"):  # left out while off: files from before them still match
            if not settings.get(key):
                settings.pop(key, None)
        for key, default in (("matrix", "hessian"), ("fisher_samples", None), ("per_batch", None)):
            if settings.get(key) == default:  # the same: files from before these options still match
                settings.pop(key, None)
        return settings

    def validate(self) -> None:
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be 0 or more, not {self.top_k}.")
        if self.top_k == 0 and not self.trace and not self.density:
            raise ConfigError("Nothing to compute: ask for eigenvalues (--top-k 1 or more), --trace or --density.")
        if self.which not in WHICH:
            raise ConfigError(f"Unknown eigenvalue selection {self.which!r}; accepted are {', '.join(WHICH)}.")
        self.check_evaluation()
        from landscape.curvature.operators import PRODUCTS

        if self.trace_method not in ("lanczos", "hutch++"):
            raise ConfigError(f"Unknown trace method {self.trace_method!r}; accepted are lanczos and hutch++.")
        if self.product not in PRODUCTS:
            raise ConfigError(f"Unknown Hessian-vector product {self.product!r}; accepted are {', '.join(PRODUCTS)}.")
        from landscape.curvature.operators import MATRICES

        if self.matrix not in MATRICES:
            raise ConfigError(f"Unknown curvature matrix {self.matrix!r}; accepted are {', '.join(MATRICES)}.")
        if self.fisher_samples is not None and (self.fisher_samples < 1 or self.matrix != "fisher"):
            raise ConfigError("--fisher-samples must be a positive integer and goes with --matrix fisher only.")
        if self.per_batch is not None and not 1 <= self.per_batch <= self.samples:
            raise ConfigError(f"--per-batch must be between 1 and --samples {self.samples}, not {self.per_batch}.")
        if self.per_batch is not None and self.top_k == 0:
            raise ConfigError("--per-batch measures top eigenvalues: give --top-k 1 or more.")
        if self.density_scale not in ("linear", "symlog"):
            raise ConfigError(f"Unknown density scale {self.density_scale!r}; accepted are linear and symlog.")
        from landscape.analyses.blocks import check_per_block

        check_per_block(self)


@dataclass
class WarmStart:
    """What one checkpoint of a series leaves the next: the Ritz vectors ``(p, P)`` of its tracked eigenvalues
    (:func:`ritz_start`), and the checkpoint (name and step) they came from; empty before the first.

    The eigenvalues are the same to ``tol`` from any start (the stopping rule does not change); only the products
    differ. Each results entry records its start (:meth:`start_data`): ``eigenvalue_warm_start`` and
    ``eigenvalue_start_step``, the step of the checkpoint whose vectors it started from (-1: random).
    """

    vectors: Tensor | None = None
    source: str | None = None
    source_step: int = -1

    def start_data(self) -> dict[str, Any]:
        """Results variables saying where the eigensolve about to run starts from."""
        warm = self.vectors is not None
        return {
            "eigenvalue_warm_start": ((), int(warm), {
                "long_name": "1 if the eigensolve started from the previous checkpoint's Ritz vectors, 0 if random"}),
            "eigenvalue_start_step": ((), self.source_step if warm else -1, {
                "long_name": "step of the checkpoint whose Ritz vectors started the eigensolve (-1: random start)"}),
        }

    def moved_to(self, name: str, step: int) -> None:
        """Record that the vectors now held come from checkpoint ``name`` at ``step``."""
        self.source, self.source_step = name, int(step)


def hessian_analysis(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    settings: HessianSettings | None = None,
    *,
    callback: Callable[[int], Any] | None = None,
    return_eigenvectors: bool = False,
    world: Any = None,
    criterion: Callable[[Any, Tensor], Tensor] | None = None,
    preconditioner: Any = None,
    warm: WarmStart | None = None,
):
    """The Hessian measurements of ``settings`` for one model on the evaluation set ``(x, y)``.

    With ``warm`` (a :class:`WarmStart` carried from one checkpoint of a series to the next) the eigensolve starts
    from its vectors, when it holds any, and leaves this model's Ritz vectors there for the next.

    ``criterion(outputs, targets)`` is the mean loss of a batch (cross-entropy when ``None``); ``x`` may be a dict
    of input tensors (:class:`~landscape.curvature.loss.LossFunction`).

    With ``world`` (a :class:`~landscape.trainers.distributed.Distributed` of several processes, each calling this
    with the same model, data and settings) the evaluation set is split across the processes and every product is
    summed over them (:mod:`landscape.analyses.distributed`); every process returns the same results.

    Returns an :class:`xarray.Dataset` without a checkpoint dimension (variables below), and, with
    ``return_eigenvectors``, a dict ``{"largest"|"smallest": (k, P) tensor}`` plus the parameter shapes:
    ``(dataset, eigenvectors, shapes)``.

    Variables: ``loss``, ``top1`` (%), ``gradient_norm`` on the evaluation set, ``num_parameters``;
    ``eigenvalue_largest`` / ``eigenvalue_smallest`` ``(k)`` (k = 1 is the extreme one) with
    ``..._residual`` and ``..._error_bound``, ``eigenvalue_matvecs``, ``eigenvalue_converged``; ``trace``,
    ``trace_standard_error``, ``trace_matvecs``; ``density`` and its abscissae ``density_eigenvalue`` ``(grid)``, the quadrature
    ``density_nodes``/``density_weights`` ``(probe, lanczos_step)``, ``density_sigma``, ``density_matvecs``;
    ``seconds``.
    """
    import xarray as xr

    from landscape.curvature.loss import LossFunction
    from landscape.curvature.operators import curvature_operator
    from landscape.analyses.distributed import split_evaluation_set

    settings = settings or HessianSettings()
    started = time.perf_counter()
    whole_x, whole_y = x, y
    x, y, data_parallel = split_evaluation_set(x, y, world)
    loss_fn = LossFunction(model, x, y, batch_size=settings.batch_size, params=settings.params,
                           vectors_per_pass=settings.vectors_per_pass, data_parallel=data_parallel,
                           **({"criterion": criterion} if criterion is not None else {}))
    op = curvature_operator(loss_fn, settings.matrix, callback=callback, product=settings.product,
                            fisher_samples=settings.fisher_samples, seed=settings.seed)
    matrix = MATRIX_NAMES[settings.matrix]
    loss, top1 = loss_fn.evaluate()
    gradient = op.loss_and_gradient()[1]  # with a kept graph, the pass that builds it
    data: dict[str, Any] = {
        "loss": ((), loss, {"long_name": "mean loss on the evaluation set", "units": "nats"}),
        "top1": ((), top1, {"long_name": "top-1 accuracy on the evaluation set", "units": "%"}),
        "gradient_norm": ((), float(gradient.norm()), {"long_name": "Euclidean norm of the loss gradient"}),
        "num_parameters": ((), loss_fn.num_parameters, {"long_name": "parameters the Hessian is taken over"}),
    }
    coords: dict[str, Any] = {}
    vectors: dict[str, Tensor] = {}
    result = None
    if settings.top_k > 0:
        deflate = settings.trace and settings.trace_method == "lanczos"
        result = top_eigenvalues(op, settings.top_k, which=settings.which, tol=settings.tol, seed=settings.seed,
                                 return_eigenvectors=return_eigenvectors, return_basis=deflate or warm is not None,
                                 start=warm.vectors if warm is not None else None)
        if warm is not None:
            warm.vectors = ritz_start(result, settings.top_k)
            result.basis = result.basis if deflate else None
        coords["k"] = np.arange(1, settings.top_k + 1)
        k = settings.top_k
        if settings.which in ("largest", "both"):
            data["eigenvalue_largest"] = (("k",), result.eigenvalues[:k],
                                          {"long_name": f"largest {matrix} eigenvalues, largest first"})
            data["eigenvalue_largest_residual"] = (("k",), result.residual_norms[:k],
                                                   {"long_name": "Ritz residual norm of each largest eigenvalue"})
            data["eigenvalue_largest_error_bound"] = (("k",), result.error_bounds[:k],
                                                      {"long_name": "bound on the error of each largest eigenvalue"})
            if return_eigenvectors:
                vectors["largest"] = result.eigenvectors[:k]
        if settings.which in ("smallest", "both"):
            data["eigenvalue_smallest"] = (("k",), result.eigenvalues[::-1][:k].copy(),
                                           {"long_name": f"smallest {matrix} eigenvalues, most negative first"})
            data["eigenvalue_smallest_residual"] = (("k",), result.residual_norms[::-1][:k].copy(),
                                                    {"long_name": "Ritz residual norm of each smallest eigenvalue"})
            data["eigenvalue_smallest_error_bound"] = (("k",), result.error_bounds[::-1][:k].copy(),
                                                       {"long_name": "bound on the error of each smallest eigenvalue"})
            if return_eigenvectors:
                vectors["smallest"] = result.eigenvectors.flip(0)[:k]
        data["eigenvalue_matvecs"] = ((), result.matvecs, {"long_name": "Hessian-vector products for eigenvalues"})
        data["eigenvalue_converged"] = ((), int(result.converged), {"long_name": "1 if every error bound met tol"})
    block_traces = None  # with --per-block, the groups' traces from the trace's products
    if settings.trace:
        if result is not None and result.basis is not None:  # the Krylov basis of the eigenvalues, for free
            if settings.per_block:  # the same probes and products, every group's trace from them too
                from landscape.analyses.blocks import deflated_group_traces, group_indices, parameter_groups

                groups = parameter_groups(model, loss_fn.names)
                block_traces = deflated_group_traces(
                    op, group_indices(loss_fn.shapes, groups), settings.trace_matvecs, basis=result.basis,
                    basis_matrix=result.basis_matrix, seed=settings.seed + 1, block_size=settings.vectors_per_pass)
                trace = block_traces[0]
            else:
                trace = deflated_trace(op, result.basis, settings.trace_matvecs, basis_trace=result.basis_trace,
                                       seed=settings.seed + 1,  # probes from another stream than the start vector
                                       block_size=settings.vectors_per_pass)
            method = f"Hutchinson deflated by the {len(result.basis)}-vector Lanczos basis of the eigenvalues"
            result.basis = None
        else:
            trace = hutch_plus_plus_trace(op, settings.trace_matvecs, seed=settings.seed,
                                          block_size=settings.vectors_per_pass)
            method = "Hutch++"
        data["trace"] = ((), trace.estimate, {"long_name": f"{matrix} trace ({method})", "method": trace.method})
        data["trace_standard_error"] = ((), trace.standard_error, {"long_name": "standard error of the trace"})
        data["trace_matvecs"] = ((), trace.matvecs, {"long_name": "Hessian-vector products for the trace"})
    if settings.density:
        density = spectral_density(op, settings.density_probes, settings.density_steps, seed=settings.seed,
                                   grid_size=settings.density_grid_size, scale=settings.density_scale)
        coords["probe"] = np.arange(settings.density_probes)
        coords["lanczos_step"] = np.arange(density.nodes.shape[1])
        coords["grid"] = np.arange(len(density.grid))
        data["density"] = (("grid",), density.density, {"long_name": "spectral density (SLQ, Gaussian broadening)"})
        data["density_eigenvalue"] = (("grid",), density.grid, {"long_name": "eigenvalue at each grid point"})
        data["density_nodes"] = (("probe", "lanczos_step"), density.nodes, {"long_name": "Gauss quadrature nodes"})
        data["density_weights"] = (("probe", "lanczos_step"), density.weights,
                                   {"long_name": "Gauss quadrature weights (each probe's sum to 1)"})
        data["density_sigma"] = ((), density.sigma, {"long_name": "Gaussian width in the grid coordinate"})
        data["density_linthresh"] = ((), density.linthresh, {"long_name": "linear threshold of the symlog scale"})
        data["density_matvecs"] = ((), density.matvecs, {"long_name": "Hessian-vector products for the density"})
    if settings.preconditioned:
        from landscape.analyses.stability import edge_of_stability_data

        raw_top = float(result.eigenvalues[0]) if result is not None and settings.which != "smallest" else None
        data.update(edge_of_stability_data(op, loss_fn.shapes, preconditioner, tol=settings.tol, seed=settings.seed,
                                           raw_top=raw_top))
    if "largest" in vectors:
        from landscape.analyses.subspace import gradient_subspace_data

        data.update(gradient_subspace_data(gradient, vectors["largest"]))
    op.release()
    if settings.per_block:
        from landscape.analyses.blocks import parameter_groups, per_block_data

        groups = parameter_groups(model, loss_fn.names)
        coords["group"] = list(groups)
        data.update(per_block_data(loss_fn, groups, settings, block_traces, callback=callback))
    if settings.per_batch:
        per_batch = per_batch_top_eigenvalues(model, whole_x, whole_y, settings, callback=callback,
                                              **({"criterion": criterion} if criterion is not None else {}))
        coords["batch"] = np.arange(len(per_batch))
        data["eigenvalue_per_batch"] = (("batch",), per_batch[:, 0], {
            "long_name": f"largest {matrix} eigenvalue of each batch of {settings.per_batch} examples"})
        data["per_batch_matvecs"] = ((), int(per_batch[:, 1].sum()),
                                     {"long_name": "matrix-vector products for the per-batch eigenvalues"})
    data["seconds"] = ((), time.perf_counter() - started, {"long_name": "wall time", "units": "s"})
    ds = xr.Dataset(data, coords=coords)
    if return_eigenvectors:
        return ds, vectors, dict(loss_fn.shapes)
    return ds


MATRIX_NAMES = {"hessian": "Hessian", "ggn": "generalised Gauss-Newton", "fisher": "Fisher",
                "empirical-fisher": "empirical Fisher"}


def per_batch_top_eigenvalues(model: torch.nn.Module, x: Tensor, y: Tensor, settings: HessianSettings, *,
                              callback: Callable[[int], Any] | None = None, **loss_kind: Any) -> np.ndarray:
    """The largest eigenvalue of ``settings.matrix`` on each consecutive batch of ``settings.per_batch`` examples of
    ``(x, y)`` (the last ``N mod per_batch`` left out): an ``(B, 2)`` array of (eigenvalue, products) per batch.

    Park & Kim (2022, "How do vision transformers work?") report the distribution of this :math:`\\lambda_{\\max}`
    over mini-batches. Each batch's operator is built on that batch alone (one process computes every batch).
    """
    from landscape.curvature.loss import LossFunction
    from landscape.curvature.operators import curvature_operator

    size = settings.per_batch
    rows = []
    for start in range(0, len(y) - size + 1, size):
        inputs = {k: v[start:start + size] for k, v in x.items()} if isinstance(x, dict) else x[start:start + size]
        part = LossFunction(model, inputs, y[start:start + size],
                            batch_size=settings.batch_size, params=settings.params,
                            vectors_per_pass=settings.vectors_per_pass, **loss_kind)
        op = curvature_operator(part, settings.matrix, callback=callback, product=settings.product,
                                fisher_samples=settings.fisher_samples, seed=settings.seed + start)
        result = top_eigenvalues(op, 1, tol=settings.tol, seed=settings.seed)
        op.release()
        rows.append((float(result.eigenvalues[0]), result.matvecs))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def resolve_device(device: str | torch.device | None) -> torch.device:
    want = str(device or "auto").lower()
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise LandscapeError(f"Device {device!r} was asked for but no CUDA GPU is visible; use --device cpu.")
    try:
        return torch.device(want)
    except RuntimeError:
        raise LandscapeError(f"Unknown device {device!r}; accepted are auto, cpu, cuda and cuda:K.") from None


def eigenvectors_path(run: Any, checkpoint_name: str) -> Path:
    """``RUN/analysis/hessian-eigenvectors/<checkpoint>.safetensors``."""
    return Path(run.analysis_dir) / "hessian-eigenvectors" / f"{checkpoint_name}.safetensors"


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
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        vectors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "landscape-hessian-eigenvectors/1":
        raise LandscapeError(f"{path} is not a Hessian eigenvector file.")
    eigenvalues = {k: np.asarray(v) for k, v in json.loads(meta["eigenvalues"]).items()}
    shapes = {n: tuple(s) for n, s in json.loads(meta["parameters"])}
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "eigenvalues", "parameters")}
    return HessianEigenvectors(vectors, eigenvalues, shapes, extra)


class HessianAnalysis(Analysis):
    """The Hessian measurements of :class:`HessianSettings` at each checkpoint of a run (:func:`analyze`), results in
    ``RUN/analysis/hessian.nc`` (``hessian-ema.nc``, ``hessian-density.nc``, ... for other weights and kinds:
    :func:`~landscape.analyses.results.results_name`).

    With ``save_eigenvectors`` the eigenvectors go to :func:`eigenvectors_path` (layout: :func:`save_eigenvectors`;
    a checkpoint whose file is missing is measured again), with the gradient's share in their span and their
    overlap with the previous checkpoint's; with ``shard="checkpoints"`` each process writes those of its own.
    With ``warm_start`` each eigensolve after the first starts from the previous checkpoint's Ritz vectors
    (:class:`WarmStart`; the same eigenvalues to ``tol``, fewer products on a dense series), and with
    ``shard="checkpoints"`` each process then takes a contiguous chunk of the checkpoints in step order and
    warm-starts within it (the first of each chunk starts cold); every entry records its start.
    """

    name = "hessian"
    unit = " HVP"

    def __init__(self, settings: HessianSettings | None = None, *, save_eigenvectors: bool = False,
                 warm_start: bool = False):
        super().__init__(settings or HessianSettings())
        if save_eigenvectors and self.settings.top_k == 0:
            raise ConfigError("Saving eigenvectors needs eigenvalues: give --top-k 1 or more.")
        self.save_eigenvectors = save_eigenvectors
        self.warm = WarmStart() if warm_start and self.settings.top_k else None
        self.contiguous = self.warm is not None

    def complete(self, run: Any, info: Any) -> bool:
        return not self.save_eigenvectors or eigenvectors_path(run, info.name).exists()

    def work(self, job: Job) -> int:
        return expected_products(self.settings)

    def measure(self, job: Job, info: Any, model: torch.nn.Module, callback: Callable[[int], Any] | None):
        settings, run, warm = self.settings, job.run, self.warm
        preconditioner = None
        if settings.preconditioned:
            from landscape.analyses.stability import checkpoint_preconditioner

            preconditioner = checkpoint_preconditioner(run, info)
        start = (warm or WarmStart()).start_data() if settings.top_k else {}
        out = hessian_analysis(model, job.x, job.y, settings, callback=callback,
                               return_eigenvectors=self.save_eigenvectors, world=job.data_parallel_world,
                               preconditioner=preconditioner, warm=warm)
        if warm is not None:
            warm.moved_to(info.name, info.step)
        if not self.save_eigenvectors:
            return out.assign(start)
        ds, vectors, shapes = out
        ds = ds.assign(start)
        if "largest" in vectors:  # against the previous checkpoint's saved eigenvectors, before this one's are
            from landscape.analyses.subspace import overlap_with_previous_data

            ds = ds.assign(overlap_with_previous_data(run, info, vectors["largest"], shapes))
        error = None
        if job.shard or job.world.is_main:
            eigenvalues = {end: ds[f"eigenvalue_{end}"].values for end in vectors}
            try:
                save_eigenvectors(eigenvectors_path(run, info.name), vectors, eigenvalues, shapes, metadata={
                    "checkpoint": info.name, "epoch": info.epoch, "step": info.step,
                    "settings": settings.determining(),
                })
            except Exception as e:  # data-parallel: the others must hear of it, not wait in the next collective
                error = e
        distributed.raise_if_failed(error, job.data_parallel_world)
        return ds


def run_hessian_analysis(run: Any, settings: HessianSettings | None = None, *, save_eigenvectors_to_disk: bool = False,
                         warm_start: bool = False, **options: Any):
    """:func:`~landscape.analyses.driver.analyze` with a :class:`HessianAnalysis`; ``options`` are the driver's
    (``checkpoints``, ``force``, ``data_dir``, ``device``, ``progress``, ``shard``, ``on_plan``)."""
    return analyze(run, HessianAnalysis(settings, save_eigenvectors=save_eigenvectors_to_disk,
                                        warm_start=warm_start), **options)


def expected_products(settings: HessianSettings) -> int:
    """The Hessian-vector products one checkpoint is expected to take: the trace's and the density's are fixed
    budgets; the eigenvalues' depend on the spectrum, and ``4 k + 12`` is what the error-bound stopping rule
    typically needs at ``tol=1e-3`` (``benchmarks/hessian.md``: 20 for k = 5 at width 192, 31-41 at width 64)."""
    total = 4 * settings.top_k + 12 if settings.top_k else 0
    if settings.which == "both":
        total *= 2
    if settings.trace:
        total += settings.trace_matvecs
    if settings.density:
        total += settings.density_probes * settings.density_steps
    return max(total, 1)


def expected_warm_products(settings: HessianSettings) -> int:
    """The eigenvalue products of a warm-started checkpoint: the start block (the ``k`` + 2 guard Ritz vectors of
    each end) and typically one block more before the error bounds meet ``tol`` (``benchmarks/series.md``)."""
    per_end = 2 * (settings.top_k + 2)
    cold = 4 * settings.top_k + 12
    return min(per_end, cold) * (2 if settings.which == "both" else 1) if settings.top_k else 0


def describe_plan(settings: HessianSettings, checkpoints: int, *, warm_start: bool = False) -> str:
    """One line saying what an analysis of ``checkpoints`` checkpoints will cost, in Hessian-vector products:
    ``"28 checkpoints x ~21 products (eigenvalues ~12, trace 9)"``."""
    total = expected_products(settings)
    parts = []
    if settings.top_k:
        eigen = 4 * settings.top_k + 12 if settings.which != "both" else 2 * (4 * settings.top_k + 12)
        if warm_start and checkpoints > 1:
            warm = expected_warm_products(settings)
            total = round(total - eigen + (eigen + (checkpoints - 1) * warm) / checkpoints)
            eigen = f"~{warm} warm-started, ~{eigen} for the first"
        else:
            eigen = f"~{eigen}"
        parts.append(f"eigenvalues {eigen}")
    if settings.trace:
        parts.append(f"trace {settings.trace_matvecs}")
    if settings.density:
        parts.append(f"density {settings.density_probes} x {settings.density_steps}")
    noun = "checkpoint" if checkpoints == 1 else "checkpoints"
    return f"{checkpoints} {noun} x ~{total} products ({', '.join(parts)})"


def hessian_summary(ds) -> list[dict[str, Any]]:
    """One row per checkpoint of a hessian Dataset: the headline numbers, for a table."""
    rows = []
    for i, name in enumerate(ds["checkpoint"].values):
        entry = ds.isel(checkpoint=i)
        epoch = float(entry["epoch"])
        row: dict[str, Any] = {"checkpoint": str(name), "epoch": None if math.isnan(epoch) else int(epoch),
                               "step": int(entry["step"])}
        row["loss"] = float(entry["loss"])
        if "eigenvalue_largest" in ds:
            row["lambda_max"] = float(entry["eigenvalue_largest"].isel(k=0))
            if ds.sizes.get("k", 0) > 1:
                row[f"lambda_{ds.sizes['k']}"] = float(entry["eigenvalue_largest"].isel(k=-1))
        if "eigenvalue_smallest" in ds:
            row["lambda_min"] = float(entry["eigenvalue_smallest"].isel(k=0))
        if "trace" in ds:
            row["trace"] = float(entry["trace"])
            row["trace_se"] = float(entry["trace_standard_error"])
        if "preconditioned_sharpness" in ds:
            row["sharpness_P"] = float(entry["preconditioned_sharpness"])
            row["threshold"] = float(entry["stability_threshold"])
        matvecs = sum(int(entry[v]) for v in ("eigenvalue_matvecs", "trace_matvecs", "density_matvecs") if v in ds)
        row["HVPs"] = matvecs
        row["seconds"] = float(entry["seconds"])
        if "eigenvalue_converged" in ds and not int(entry["eigenvalue_converged"]):
            row["note"] = "eigenvalues not converged"
        rows.append(row)
    return rows
