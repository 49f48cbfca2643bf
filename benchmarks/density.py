"""Density benchmark: the SLQ spectral density against the exact spectrum, error against products.

    python benchmarks/density.py [--width 16] [--depth 2] [--probes 1,2,4,8] [--steps 5,10,20,40,80] [--seeds 5]
                                 [--md benchmarks/density.md]

A small ViT of the demo's family (patch 2 on the embedded 8x8 digits, average pooling) is trained for ``--train-steps``
AdamW steps in float64; its loss Hessian on ``--samples`` training examples is computed densely (one product per unit
vector) and diagonalised, which gives the exact spectral measure :math:`\\mu = \\frac1n \\sum_i \\delta_{\\lambda_i}`.
Stochastic Lanczos quadrature (:func:`spectral_density`, the estimator of ``landscape analyze hessian --density``)
then runs on the same matrix at every budget ``probes x steps`` from ``--seeds`` seeds. Each run gives a discrete
measure :math:`\\hat\\mu` (its nodes with their weights over the probes); against :math:`\\mu` the table shows

- ``W1 / span``: the Wasserstein-1 distance :math:`\\int |F_\\mu - F_{\\hat\\mu}|\\,dt` over the spectrum's width
  :math:`\\lambda_{\\max} - \\lambda_{\\min}` (the picture on a linear axis, dominated by the bulk);
- ``W1 symlog``: the same distance in :math:`u = \\operatorname{asinh}(t/\\lambda_0)`, :math:`\\lambda_0 = 10^{-3}
  \\max|\\lambda|` (the picture of ``--density-scale symlog``: bulk and outliers both resolved);
- ``L1 broadened``: :math:`\\int |\\phi - \\hat\\phi|\\,dt` between the two measures broadened alike (Gaussians of 1% of
  the spectrum's width, the analysis's default; 0 is perfect, 2 is disjoint): the error of the plotted curve;
- ``lambda_max``: the relative error of the largest node.

Each error is the mean over the seeds (the worst seed in brackets). The products of a budget are ``probes x steps``
whatever the model; the seconds per product on the model in float32 are measured too, so the last column is what the
density costs per checkpoint on it. Every number is computed in one process.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from landscape.curvature.density import broadened_density, spectral_density
from landscape.curvature.loss import LossFunction
from landscape.curvature.operators import HessianOperator
from landscape.data import analysis_subset
from landscape.models import create_model
from landscape.curvature.products import dense_hessian


def trained_model(width: int, depth: int, steps: int, seed: int = 0) -> torch.nn.Module:
    """The demo's ViT family at ``width`` and ``depth`` after ``steps`` AdamW steps (lr 3e-3, batch 32)."""
    torch.manual_seed(seed)
    model = create_model("vit_pico_patch4_32", img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=width,
                         depth=depth, num_heads=2, mlp_ratio=2.0, class_token=False, global_pool="avg")
    x, y = analysis_subset("digits", 1400, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def wasserstein_1(a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray) -> float:
    """:math:`\\int |F_a - F_b|\\,dt` for the discrete measures with atoms ``a``/``b`` and weights ``wa``/``wb``
    (each summing to 1): exact, the two step functions integrated between consecutive atoms."""
    points = np.concatenate([a, b])
    jumps = np.concatenate([wa, -wb])
    order = np.argsort(points, kind="stable")
    points, jumps = points[order], jumps[order]
    difference = np.cumsum(jumps)[:-1]  # F_a - F_b between consecutive atoms
    return float(np.sum(np.abs(difference) * np.diff(points)))


def slq_measure(density) -> tuple[np.ndarray, np.ndarray]:
    """The atoms and weights of an SLQ run: every probe's Gauss nodes, each probe's weights divided by the probes."""
    valid = ~(np.isnan(density.nodes) | np.isnan(density.weights))
    weights = density.weights[valid] / density.nodes.shape[0]
    return density.nodes[valid], weights / weights.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="embedding width of the ViT (2 heads)")
    parser.add_argument("--depth", type=int, default=2, help="blocks of the ViT")
    parser.add_argument("--samples", type=int, default=256, help="examples in the evaluation set")
    parser.add_argument("--train-steps", type=int, default=200, help="AdamW steps before the Hessian is taken")
    parser.add_argument("--probes", default="1,2,4,8", help="comma-separated probe counts")
    parser.add_argument("--steps", default="5,10,20,40,80", help="comma-separated Lanczos steps per probe")
    parser.add_argument("--seeds", type=int, default=5, help="SLQ seeds per budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--md", type=Path, default=None, help="also write the table as markdown here")
    args = parser.parse_args()
    try:
        probes = [int(p) for p in args.probes.split(",")]
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        sys.exit("--probes and --steps must be comma-separated positive integers, such as 1,2,4.")
    if min(probes + steps) < 1 or args.seeds < 1 or args.width < 2 or args.depth < 1 or args.samples < 1:
        sys.exit("--probes, --steps, --seeds, --depth and --samples must be positive, --width at least 2.")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model = trained_model(args.width, args.depth, args.train_steps)
    x, y = analysis_subset("digits", args.samples, seed=1)
    seconds_per_product = product_seconds(model, x, y)
    model = model.double()
    loss = LossFunction(model, x, y, batch_size=None, vectors_per_pass=64)
    n = loss.num_parameters
    hessian = dense_hessian(loss)
    hessian = 0.5 * (hessian + hessian.T)
    exact = np.linalg.eigvalsh(hessian.numpy())
    exact_weights = np.full(n, 1.0 / n)
    span = float(exact[-1] - exact[0])
    linthresh = 1e-3 * float(np.abs(exact).max())
    symlog = lambda t: np.arcsinh(t / linthresh)  # noqa: E731
    sigma = 0.01 * span
    grid = np.linspace(exact[0] - 6 * sigma, exact[-1] + 6 * sigma, 4000)
    exact_curve = broadened_density(exact[None, :], exact_weights[None, :], grid, sigma)
    dt = grid[1] - grid[0]
    print(f"{n} parameters, exact spectrum from {exact[0]:.4g} to {exact[-1]:.4g} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    rows = []
    for p in probes:
        for m in steps:
            errors = []
            for seed in range(args.seeds):
                density = spectral_density(hessian, p, m, seed=seed, grid=grid, sigma=sigma)
                atoms, weights = slq_measure(density)
                errors.append((
                    wasserstein_1(exact, exact_weights, atoms, weights) / span,
                    wasserstein_1(symlog(exact), exact_weights, symlog(atoms), weights),
                    float(np.sum(np.abs(density.density - exact_curve)) * dt),
                    abs(float(np.nanmax(density.nodes)) - exact[-1]) / abs(exact[-1]),
                ))
            products = p * min(m, n)
            rows.append((p, m, products, np.asarray(errors)))
            mean = np.asarray(errors).mean(0)
            print(f"{p} probes x {m:3d} steps = {products:4d} products: W1/span {mean[0]:.2e}, W1 symlog "
                  f"{mean[1]:.3f}, L1 broadened {mean[2]:.3f}, lambda_max {mean[3]:.1e}", flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python benchmarks/density.py" + "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}" for name in ("width", "depth", "samples", "train_steps",
                                                                          "probes", "steps", "seeds"))
    lines = [
        f"`{command}`",
        "",
        f"ViT (demo family: patch 2 on 8x8 digits, width {args.width}, depth {args.depth}, 2 heads, MLP ratio 2, avg "
        f"pool; {n} parameters) after {args.train_steps} AdamW steps; Hessian on {args.samples} examples, dense in "
        f"float64, eigenvalues from {exact[0]:.4g} to {exact[-1]:.4g}; SLQ with full reorthogonalisation, "
        f"{args.seeds} seeds per budget; one product on the model in float32 (kept graph) {seconds_per_product:.4f} s; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}; load average "
        f"{load:.1f} at the end, {time.perf_counter() - started:.0f} s in all",
        "",
        "| probes x steps | products | W1 / span | W1 symlog | L1 broadened | lambda_max rel. error | seconds here |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p, m, products, errors in rows:
        mean, worst = errors.mean(0), errors.max(0)
        lines.append(f"| {p} x {m} | {products} | {mean[0]:.2e} ({worst[0]:.1e}) | {mean[1]:.3f} ({worst[1]:.3f}) | "
                     f"{mean[2]:.3f} ({worst[2]:.3f}) | {mean[3]:.0e} ({worst[3]:.0e}) | "
                     f"{products * seconds_per_product:.1f} |")
    lines += ["", knee(rows)]
    table = "\n".join(lines)
    print()
    print(table)
    if args.md is not None:
        args.md.write_text("# Density benchmark: SLQ against the dense spectrum\n\n" + table + "\n")


def knee(rows: list) -> str:
    """The cheapest budget whose mean errors (both W1 and the broadened L1) are within 1.5 times the best budget's."""
    best = np.min([errors.mean(0)[:3] for *_, errors in rows], axis=0)
    fits = [(products, p, m) for p, m, products, errors in rows if np.all(errors.mean(0)[:3] <= 1.5 * best)]
    if not fits:
        return "No budget comes within 1.5 times the best error on all three measures."
    products, p, m = min(fits)
    return (f"Cheapest budget within 1.5x of the best mean error on W1 / span, W1 symlog and L1 broadened alike: "
            f"{p} probes x {m} steps ({products} products).")


def product_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> float:
    """The fastest of ``repeats`` single Hessian-vector products through the kept graph, in float32."""
    op = HessianOperator(LossFunction(model, x, y, batch_size=None), product="kept-graph")
    v = torch.randn(op.shape[0], 1, generator=torch.Generator().manual_seed(0))
    op.torch_matmat(v)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        op.torch_matmat(v)
        best = min(best, time.perf_counter() - start)
    op.release()
    return best


if __name__ == "__main__":
    main()
