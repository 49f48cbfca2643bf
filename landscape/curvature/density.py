"""The spectral density of a symmetric operator by stochastic Lanczos quadrature.

:func:`spectral_density` estimates :math:`\\phi(t) = \\frac1n \\sum_i \\delta(t - \\lambda_i)`, Gaussian-broadened
(Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019), from one Lanczos run per random probe
(:func:`~landscape.curvature.lanczos.lanczos_tridiagonal`, :func:`~landscape.curvature.lanczos.gauss_quadrature`);
:func:`broadened_density` puts quadratures on any grid.

Without reorthogonalisation (``reorthogonalize=False``: three vectors in memory instead of the ``(steps, n)``
basis) the Lanczos vectors lose orthogonality and converged outliers reappear as "ghost" copies in the node list;
the quadrature weights split between the copies, so moments and the broadened density stay usable while the node
list no longer reads as distinct eigenvalues.

PyHessian's ``density_generate`` broadens the same quadrature with a variance of ``1e-5 * max(1, span)``,
far narrower than the default here (a standard deviation of 1% of the span); :func:`broadened_density` redraws a
stored density (nodes and weights) at any width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from landscape.curvature.lanczos import gauss_quadrature, lanczos_tridiagonal
from landscape.curvature.operators import as_torch_operator, random_probes
from landscape.errors import ConfigError


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
