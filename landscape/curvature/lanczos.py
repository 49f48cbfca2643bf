"""Lanczos on a symmetric operator: its extreme eigenpairs, and the tridiagonal matrix of a start vector.

The functions know nothing of neural networks. Each takes an operator :math:`A \\in \\mathbb{R}^{n \\times n}`
(symmetric; anything :func:`~landscape.curvature.operators.as_torch_operator` takes: a curvature operator, a dense
tensor or array, a scipy ``LinearOperator``) and only multiplies it by blocks of vectors:

- :func:`top_eigenvalues`: the :math:`k` largest (and/or smallest) eigenpairs by thick-restart Lanczos with full
  reorthogonalisation (Wu & Simon 2000), stopped when each eigenvalue's error bound (from the Ritz residual
  :math:`r = \\|A y - \\theta y\\|` and the gap to the other Ritz values, :math:`\\min(r, r^2/\\text{gap})`) is
  below :math:`\\text{tol}\\,|\\theta|`; :func:`ritz_start` warm-starts the next operator of a series.
- :func:`lanczos_tridiagonal` and :func:`gauss_quadrature`: the Gauss quadrature of one start vector, for the
  spectral density (:mod:`landscape.curvature.density`).

Memory. The Lanczos basis is an ``(m, n)`` tensor, by default in the operator's dtype on its device:
``m`` is at most ``basis_size`` for :func:`top_eigenvalues` (about :math:`\\max(2w+8, 20)` for :math:`w` eigenvalues
tracked, the wanted ones and the guards; thick restarts keep it bounded whatever the number of iterations) and
``num_steps`` for :func:`lanczos_tridiagonal`. For ViT-B/16 (86M parameters) in float32 the default top-5 basis
(22 vectors) is 7.6 GB and an 80-step density basis 27.5 GB. When that does not fit next to the model, pass
``basis_device="cpu"`` (each step then moves one block of vectors to the host and back, and the orthogonalisation
runs on the CPU), or for the tridiagonal matrix ``reorthogonalize=False`` (three vectors only; see
:mod:`landscape.curvature.density` on the ghost eigenvalues it brings).

PyHessian 0.1 computes the top eigenvalues by power iteration; its timm ViTs need the math attention kernel around
every call, as ours switch on themselves, and its constructor adds its ``create_graph`` gradient to ``.grad``
without clearing it (give it a model whose gradients are ``None``, or it differentiates a sum of gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from landscape.curvature.operators import TorchOperator, as_torch_operator
from landscape.errors import ConfigError, LandscapeError

Tensor = torch.Tensor
WHICH = ("largest", "smallest", "both")
"""Which end of the spectrum :func:`top_eigenvalues` finds."""
CHECK_PRODUCTS = 8
"""Products of :func:`top_eigenvalues`'s check for a missed eigenvalue, per end of the spectrum."""
MAX_RESTARTS = 4
"""How many times :func:`top_eigenvalues` starts again after its check found a missed eigenvalue; a check that
still finds one after the last makes the result not converged."""


def rounding(dtype: torch.dtype) -> float:
    """The relative size below which a product's residual in ``dtype`` is taken for rounding, not a direction
    (256 units of rounding; a float32 Hessian-vector product of a 2-block ViT is off by about 6 of them from the
    float64 one, of an MLP by 2)."""
    return 256 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


# -- extreme eigenvalues ------------------------------------------------------------------------------------------
@dataclass
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    ``eigenvalues`` ``(w,)`` in decreasing order; ``eigenvectors`` ``(w, n)`` (unit norm, row ``i`` for
    eigenvalue ``i``) or ``None``; ``residual_norms`` :math:`\\|A y_i - \\theta_i y_i\\|` ``(w,)``;
    ``error_bounds`` ``(w,)``; with ``return_basis``, the final Krylov ``basis`` ``(m, n)`` (orthonormal rows)
    and ``basis_trace`` :math:`= \\operatorname{tr}(V^\\top A V)`, for :func:`deflated_trace`; ``size``, the
    number of basis vectors at the end; ``missed``, how many times the check after convergence found an eigenvalue
    the Krylov space had missed (and Lanczos started again); ``tracked_values``, the Ritz values of the wanted
    eigenvalues and the guards.
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
    size: int = 0
    missed: int = 0
    tracked_values: np.ndarray | None = None

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
    check: int = CHECK_PRODUCTS,
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
    the random start. With ``block_size=1`` (the default) Lanczos starts from one vector, the normalised sum of the
    orthonormalised rows (:func:`combined_start`): every direction they span is in it with weight
    :math:`1/\\sqrt{j}`, against about :math:`1/\\sqrt{n}` in a random vector, and the Krylov space spans the rows'
    invariant part after :math:`j` products when they are eigenvectors. With ``block_size`` > 1 the start block is
    at least ``j`` wide, its rows completed with seeded Gaussian vectors when ``block_size`` asks for more
    (:func:`start_block`). The stopping rule is the same either way, so is the accuracy. Along the series of
    ``benchmarks/series.md`` (consecutive Hessians two AdamW steps apart) the single combined vector takes fewer
    products than a random start, and the block of Ritz vectors about twice as many.

    Guards make a missed eigenvalue rare, not impossible: along the demo's run (``benchmarks/series.md``), one of 50
    random starts converged, near the initialisation's flat spectrum (3.87, 3.65, 3.47, 3.43, 3.31, 3.23, ...), to
    every value but 3.31, reporting 3.23 as the fifth with a bound of 6e-4. So once converged, ``check`` more
    products (for each end asked for) look for an eigenvalue the Krylov space missed: Lanczos from a fresh seeded
    vector on the operator with the tracked Ritz vectors projected out, whose largest Ritz value (smallest, at that
    end) can only pass the ``k``-th wanted value when an eigenvalue beyond it was missed (:func:`missed_direction`;
    on that start it passed after 6 products; it must pass by more than ``tol``, so that the copies of an eigenvalue
    repeated more often than the values tracked do not count). Then Lanczos starts again from a block: the tracked
    Ritz vectors combined into one vector, the copies of a repeated value beyond its first, and the new direction
    beside them, and is checked again; ``matvecs`` counts every
    product. ``check=0`` skips it; ``missed`` in the result counts the restarts, at most :data:`MAX_RESTARTS`, and a
    check that still finds a missed eigenvalue after the last one leaves the result not ``converged``.

    The block restart also finds the copies of a repeated eigenvalue (a linear layer with ``d`` outputs under MSE
    has every eigenvalue ``d`` times): the Krylov space of one vector holds one direction of each eigenspace, so
    the first run finds one copy; the check then finds a second direction in that eigenspace, and the block keeps
    it apart from the first.
    """
    if which not in WHICH:
        raise ConfigError(f"Unknown eigenvalue selection {which!r}; accepted are {', '.join(WHICH)}.")
    A = as_torch_operator(op)
    n = A.shape[0]
    check_wanted(k, which, n)
    if check < 0:
        raise ConfigError(f"check must be at least 0 products, got {check}.")
    options = dict(k=k, which=which, tol=tol, block_size=block_size, guard=guard, basis_size=basis_size,
                   basis_device=basis_device, basis_dtype=basis_dtype)
    limit = max_matvecs  # for the whole call, the check and any restart included
    result, tracked = _lanczos_run(A, seed=seed, max_matvecs=limit, start=start,
                                   return_eigenvectors=return_eigenvectors, return_basis=return_basis, **options)
    total, missed = result.matvecs, 0
    ends = ("largest", "smallest") if which == "both" else (which,)
    while check and result.converged and result.size < n:
        found = []
        for end in ends:
            direction, products = missed_direction(A, tracked, result, end, k, check, tol=tol,
                                                   seed=seed + 7919 * (missed + 1) + (end == "smallest"))
            total += products
            if direction is not None:
                found.append(direction)
        if not found:
            break
        if missed == MAX_RESTARTS or (limit is not None and total >= limit):
            result.converged = False  # an eigenvalue is known to be missing from the values returned
            break
        missed += 1
        # A block start: the tracked vectors combined into one (:func:`combined_start`), each copy of a repeated
        # value beyond its first, and each direction found beside them. A copy of a repeated eigenvalue found by the
        # check is one more direction in that eigenspace, which one start vector made of them all would merge with
        # the others: a block of width w finds at most w copies.
        copies = tracked[_repeated(result.tracked_values, tol)].to(found[0].device, found[0].dtype)
        start = torch.cat([combined_start(tracked, n).to(found[0].device, found[0].dtype), copies, *found])
        restart = dict(options, block_size=max(block_size, len(start)))
        if basis_size is not None and basis_size < len(tracked) + len(start) + 2:
            restart["block_size"] = block_size
        result, tracked = _lanczos_run(A, seed=seed + missed, max_matvecs=None if limit is None else limit - total,
                                       start=start, return_eigenvectors=return_eigenvectors,
                                       return_basis=return_basis, **restart)
        total += result.matvecs
    result.matvecs, result.missed = total, missed
    return result


def check_wanted(k: int, which: str, n: int) -> None:
    """Refuse ``k`` eigenvalues at the ``which`` end(s) of an ``n x n`` operator when it has not that many."""
    wanted = 2 * k if which == "both" else k
    if k < 1 or wanted > n:
        if which == "both":
            raise ConfigError(f"Cannot find the {k} largest and the {k} smallest eigenvalues of a {n} x {n} operator; "
                              f"with both ends ask for between 1 and {n // 2} at each end." if n >= 2 else
                              f"A {n} x {n} operator has one eigenvalue; ask for the largest or the smallest.")
        raise ConfigError(f"Cannot find {wanted} eigenvalues of a {n} x {n} operator; ask for between 1 and {n}.")


def _lanczos_run(A: Any, *, k: int, which: str, tol: float, seed: int, block_size: int, guard: int,
                 max_matvecs: int | None, basis_size: int | None, return_eigenvectors: bool, return_basis: bool,
                 basis_device: Any, basis_dtype: torch.dtype | None, start: Tensor | None
                 ) -> tuple[EigenResult, Tensor]:
    """One thick-restart Lanczos run of :func:`top_eigenvalues` (without its check); also returns the tracked Ritz
    vectors ``(p, n)`` (the wanted ones and the guards, at each end asked for)."""
    n = A.shape[0]
    per_end = min(k + max(0, guard), n // 2 if which == "both" else n)
    tracked = 2 * per_end if which == "both" else per_end  # wanted plus guards: these must converge
    b = max(1, min(int(block_size), n))
    if start is not None and b == 1:
        start = combined_start(start, n)
    elif start is not None:  # a warm block: multiplied at once, and so is each block after it
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
        if not bool(torch.isfinite(W).all()):
            raise LandscapeError("A product with the operator is not finite (NaN or infinity): the weights or the "
                                 "loss at this point are not finite, so it has no eigenvalues to find.")
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
        count = min(b, n - size)
        floor = 1e-12 * max(anorm, 1e-300)
        if bool((R.diagonal().abs()[:count] > floor).all()):
            new = Q.T[:count].to(bdevice, bdtype)
        else:  # the residuals span less than a block (an invariant subspace: a repeated eigenvalue's copies)
            new = _extend_block(W, V[:size], count, floor, generator)
        # A residual near rounding (an invariant subspace reached in float32) normalised is a row far from
        # orthogonal to the basis, which broke it (Ritz values above the largest eigenvalue); orthogonalised again
        # it is a fresh direction. T holds every product's own projections, so it stays V^T A V either way.
        new = _orthonormal_against(new, V[:size])
        V[size:size + len(new)] = new
        size += len(new)

    vectors = None
    if return_eigenvectors:
        vectors = S[:, idx].T.to(bdevice, bdtype) @ V[:size]
    tracked_vectors = S[:, checked].T.to(bdevice, bdtype) @ V[:size]
    result = EigenResult(
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
    result.size = size
    result.tracked_values = theta[checked].numpy()
    return result, tracked_vectors


def missed_direction(A: Any, tracked: Tensor, result: EigenResult, end: str, k: int, products: int, *,
                     seed: int, tol: float = 0.0) -> tuple[Tensor | None, int]:
    """Whether a converged run of :func:`top_eigenvalues` missed an eigenvalue at ``end`` (``"largest"`` or
    ``"smallest"``), by ``products`` steps of Lanczos from a fresh vector (seed ``seed``) on

    .. math:: B = P A P + c\\, Y Y^\\top, \\qquad P = I - Y Y^\\top,

    :math:`Y` an orthonormal basis of the ``tracked`` Ritz vectors ``(p, n)`` and :math:`c` a little short of the
    ``k``-th wanted value :math:`\\theta_k` (half its magnitude: inside the spectrum, which a far shift would widen and
    so slow Lanczos down). Every Ritz value of :math:`B` lies within its spectrum, which away from
    :math:`c` is that of :math:`A` on the complement of the tracked vectors (up to their residuals): its extreme
    Ritz value passes :math:`\\theta_k` only if :math:`A` has an eigenvalue beyond :math:`\\theta_k` that the tracked
    vectors do not hold. It must pass by more than ``tol`` :math:`\\cdot|\\theta_k|` (and more than the operator's
    rounding): a copy of :math:`\\theta_k` itself outside the tracked vectors (an eigenvalue repeated more often than
    ``k`` plus the guards) changes no returned value, and one within ``tol`` of it changes the ``k``-th by less than
    ``tol``. Returns ``(direction, products)``: that Ritz vector ``(1, n)`` (unit, orthogonal to :math:`Y`) when it
    passed, else ``None``."""
    Y = torch.linalg.qr(tracked.T).Q  # (n, p)
    values = result.eigenvalues
    both = result.which == "both"
    theta_k = float(values[k - 1] if end == "largest" else (values[k] if both else values[0]))
    margin = 0.5 * abs(theta_k) + 1e-12 * float(np.max(np.abs(values)))  # inside the spectrum: it stays as narrow
    c = theta_k - margin if end == "largest" else theta_k + margin

    def deflated(V: Tensor) -> Tensor:
        V = V.to(Y.device, Y.dtype)
        inside = Y.T @ V
        W = A.matmat((V - Y @ inside).to(A.device, A.dtype)).to(Y.device, Y.dtype)
        return (W - Y @ (Y.T @ W) + c * (Y @ inside)).to(A.device, A.dtype)

    B = TorchOperator(A.shape, A.dtype, A.device, deflated)
    check, vector = _lanczos_run(B, k=1, which=end, tol=0.0, seed=seed, block_size=1, guard=0,
                                 max_matvecs=products, basis_size=max(products + 1, 4), return_eigenvectors=False,
                                 return_basis=False, basis_device=Y.device, basis_dtype=Y.dtype, start=None)
    mu = float(check.eigenvalues[0])
    passed = max(tol, rounding(A.dtype)) * abs(theta_k)
    if not (mu > theta_k + passed if end == "largest" else mu < theta_k - passed):
        return None, check.matvecs
    vector = vector[:1].to(Y.device, Y.dtype)
    vector = vector - (vector @ Y) @ Y.T
    return vector / vector.norm(), check.matvecs


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


def combined_start(start: Tensor, n: int) -> Tensor:
    """One unit start vector ``(1, n)`` from the rows of ``start`` ``(j, n)``: the sum of an orthonormal basis of
    their span (the rows themselves, up to sign, when they are orthonormal, as Ritz vectors are), normalised; float64
    on the CPU."""
    rows = start.detach().to("cpu", torch.float64).reshape(-1, n)
    Q, R = torch.linalg.qr(rows.T)
    scale = float(R.diagonal().abs().max()) if len(rows) else 0.0
    independent = R.diagonal().abs() > 1e-10 * max(scale, 1e-300)
    if not bool(independent.any()):
        raise ValueError("a warm start needs at least one nonzero row")
    total = Q[:, independent].sum(dim=1)
    return (total / total.norm())[None, :]


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


def _repeated(values: np.ndarray, tol: float) -> Tensor:
    """Indices of the values that repeat an earlier one (sorted by value, consecutive values within ``tol`` of
    each other's magnitude form one group): every member of a group but its first."""
    order = np.argsort(values, kind="stable")
    ordered = np.asarray(values, dtype=np.float64)[order]
    scale = max(float(np.abs(ordered).max()) if len(ordered) else 0.0, 1e-300)
    same = np.abs(np.diff(ordered)) <= np.maximum(tol, 1e-12) * np.maximum(np.abs(ordered[1:]), 1e-12 * scale)
    return torch.as_tensor(order[1:][same], dtype=torch.long)


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


def _extend_block(W: Tensor, basis: Tensor, count: int, floor: float, generator: torch.Generator) -> Tensor:
    """``count`` orthonormal rows, orthogonal to ``basis``, whose span holds every row of the residual block ``W``
    (rows orthogonal to ``basis``) that is not below ``floor``, the rest fresh random directions.

    The basis stays orthonormal and keeps the whole residual (so the Krylov relation and the error bounds hold);
    a Householder QR of a rank-deficient ``W`` gives a column of no residual whose replacement would drop the
    parts of later residuals along it."""
    U, singular, _ = torch.linalg.svd(W.T, full_matrices=False)
    rows = [U[:, singular > floor].T[:count]]
    while sum(len(r) for r in rows) < count:
        fresh = torch.randn(1, W.shape[1], generator=generator, dtype=torch.float64).to(W.device, W.dtype)
        _orthogonalize_rows(fresh, torch.cat([basis, *rows]))
        rows.append(fresh / fresh.norm())
    return torch.cat(rows)


def _orthonormal_against(rows: Tensor, basis: Tensor) -> Tensor:
    """``rows`` orthogonalised twice against the orthonormal rows of ``basis`` and orthonormalised among
    themselves (a row left without length replaced by a direction orthogonal to everything)."""
    rows = rows.clone()
    for _ in range(2):
        _orthogonalize_rows(rows, basis)
    Q, R = torch.linalg.qr(rows.T)
    weak = (R.diagonal().abs() <= 1e-3 * rows.norm(dim=1).clamp(min=1e-300)).nonzero().flatten().tolist()
    Q = Q.T.contiguous()
    for i in weak:
        fresh = torch.randn(1, rows.shape[1], generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        fresh = fresh.to(rows.device, rows.dtype)
        others = torch.cat([basis, Q[:i], Q[i + 1:]])
        for _ in range(2):
            _orthogonalize_rows(fresh, others)
        Q[i] = fresh[0] / fresh.norm()
    return Q


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


# -- the tridiagonal matrix of one start vector ----------------------------------------------------------------
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
    floor = 1e-10 * math.sqrt(n)
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
        if j == num_steps - 1 or beta <= floor * max(abs(a) for a in alphas) or beta == 0.0:
            break
        betas.append(beta)
        previous, v = v, w / beta
        if basis is not None and beta <= rounding(A.dtype) * max(abs(a) for a in alphas):
            # a residual near rounding (an exhausted Krylov space in float32) normalised is far from orthogonal to
            # the basis: the run went on with repeated nodes that moved weight between eigenvalues (0.154 on one
            # of weight 0.026); orthogonalised again it is a fresh direction, coupled by this tiny beta
            v = _orthonormal_against(v[None, :], basis[: j + 1])[0]
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
