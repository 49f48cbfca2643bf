"""What one checkpoint of each analysis costs at its default settings, on this machine, for a given run.

Counts the work of each analysis in its own unit (Hessian-vector products, loss-and-gradient evaluations along a
sharpness search, loss evaluations on a surface grid), times one unit on the run's last checkpoint with the run's
fixed evaluation set, and prints the product of the two::

    python benchmarks/costs.py runs/base                 # defaults of `landscape analyze ...`
    python benchmarks/costs.py runs/base --samples 128   # a smaller evaluation set

Every unit is timed in the same run (the median of ``--repeats``); the table's seconds are estimates
(count x unit), not a run of the analyses themselves.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.analyses.evaluation import evaluation_data
from landscape.analyses.hessian import HessianSettings, eigenvalue_products
from landscape.analyses.sharpness import SharpnessSettings
from landscape.analyses.surface import SurfaceSettings
from landscape.checkpoints import build_model, load_checkpoint
from landscape.curvature.loss import LossFunction
from landscape.curvature.operators import HessianOperator
from landscape.errors import LandscapeError
from landscape.runs import Run


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, the kept graph
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory (its last checkpoint is measured)")
    parser.add_argument("--samples", type=int, default=None, help="evaluation examples (default: the analyses')")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hessian = HessianSettings(top_k=5, trace=True, density=True)
    if args.samples:
        hessian.samples = args.samples
    sharpness = SharpnessSettings(samples=hessian.samples)
    surface = SurfaceSettings(samples=hessian.samples)

    run = Run.open(args.run)
    infos = run.checkpoints()
    if not infos:
        raise LandscapeError(f"{args.run} has no checkpoint to measure; train it first.")
    info = infos[-1]
    x, y = evaluation_data(run, hessian)
    _, state = load_checkpoint(info.path)
    model = build_model(info, state)
    with sdpa_kernel(SDPBackend.MATH):
        loss = LossFunction(model, x, y, batch_size=hessian.batch_size)
        op = HessianOperator(loss)
        rng = np.random.default_rng(0)
        forward = median_seconds(lambda: loss.loss(), args.repeats)
        gradient = median_seconds(lambda: loss.gradient(), args.repeats)
        product = median_seconds(lambda: op @ rng.standard_normal(loss.num_parameters), args.repeats)

    eigen = eigenvalue_products(hessian)
    rows = [
        ("analyze hessian --top-k 5", "products", eigen, product),
        ("  + --trace", "products", hessian.trace_matvecs, product),
        ("  + --density", "products", hessian.density_probes * hessian.density_steps, product),
        ("analyze sharpness (3 radii; --adaptive the same again)", "loss + gradient", sharpness.work(len(x)),
         gradient),
        (f"analyze surface --dims 2 ({surface.points}x{surface.points})", "loss", surface.points ** 2, forward),
        (f"analyze surface --dims 1 ({surface.points} points)", "loss", surface.points, forward),
    ]
    print(f"run {args.run}, checkpoint {info.name}: {info.model} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters), {len(x)} evaluation examples of shape "
          f"{tuple(x.shape[1:])}; {platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"one unit: loss {forward:.3f} s, loss + gradient {gradient:.3f} s, Hessian-vector product {product:.3f} s "
          f"(median of {args.repeats})")
    print()
    print("| analysis (defaults) | unit | units per checkpoint | seconds per checkpoint |")
    print("| --- | --- | ---: | ---: |")
    for name, unit, count, seconds in rows:
        print(f"| {name} | {unit} | {count} | {count * seconds:,.0f} |")


if __name__ == "__main__":
    try:
        main()
    except LandscapeError as e:
        raise SystemExit(f"Error: {e}") from None
