"""Loss-surface throughput: grid points per second against plain forward passes over the same data.

A grid point of ``landscape analyze surface`` is one evaluation of the loss and top-1 accuracy over the fixed
evaluation set at fresh weights :math:`w_0 + a d_1 + b d_2` (:func:`landscape.analyses.surface.surface_analysis`:
the weights combined anew from the centre and the filter-normalised directions, handed to
``torch.func.functional_call`` through :meth:`LossFunction.evaluate`, the batch-size-weighted mean loss and the
number correct). The baseline is the plainest forward loop over the same batches, ``model(x)`` under
``torch.no_grad()`` in eval mode, with no loss, no accuracy and no new weights: once with PyTorch's default
attention kernel, once with the math kernel that every analysis runs under (second derivatives need it).

All three run in this one process on the same model, data and batch size, interleaved point by point (forward,
forward-math, grid point, forward, ...) so that they see the same machine; each reports the median over the rounds
of evaluations of the whole evaluation set per second (a round is one pass over the grid). A grid point is timed
through :func:`~landscape.analyses.surface.evaluate_grid`, the loop inside ``surface_analysis``. The target is a grid
at no less than 90% of the forward throughput.

    python benchmarks/surface.py --quick --threads 1     (under a minute on 2 CPU cores)
    python benchmarks/surface.py                         (a few minutes)

Writes the table to benchmarks/surface.md (``--md``) as well as printing it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def forward_pass(model: torch.nn.Module, x: torch.Tensor, batch_size: int, *, math_kernel: bool) -> float:
    """Seconds for one plain forward pass over ``x`` in batches: ``model(x)``, nothing else."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = sdpa_kernel(SDPBackend.MATH) if math_kernel else nullcontext()
    started = time.perf_counter()
    with torch.no_grad(), kernel:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
    return time.perf_counter() - started


def grid_point(closure, bases, coefficients: np.ndarray) -> float:
    """Seconds for one grid point of a surface: fresh weights, loss and top-1 over the evaluation set."""
    from landscape.analyses.surface import evaluate_grid

    started = time.perf_counter()
    evaluate_grid(closure, bases, coefficients[None])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_pico_patch4_32")
    parser.add_argument("--samples", type=int, default=256, help="size of the evaluation set")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--points", type=int, default=4, help="grid points per axis (a points x points grid)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="128 examples, a 3 x 3 grid, 3 rounds")
    parser.add_argument("--md", type=Path, default=Path(__file__).with_suffix(".md"), help="where to write the table")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.points, args.rounds = 128, 3, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    from landscape.curvature.loss import LossFunction
    from landscape.curvature.directions import filter_normalize, grid_coefficients, qkv_head_counts, random_directions
    from landscape.data import analysis_subset
    from landscape.models import count_parameters, create_model

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).eval()
    img_size = model.patch_embed.img_size[0]
    x, y = analysis_subset("synthetic", args.samples, img_size=img_size, in_chans=3)
    closure = LossFunction(model, x, y, batch_size=args.batch_size, skip_unused=False)
    center = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads = qkv_head_counts(model)
    directions = [filter_normalize(d, center, qkv_heads=heads) for d in random_directions(center, 2, seed=0)]
    axes = [np.linspace(-1.0, 1.0, args.points)] * 2

    coefficients = grid_coefficients("random", axes)  # the rows surface_analysis evaluates, (1, a, b) each
    bases = [center, *directions]
    forward_pass(model, x, args.batch_size, math_kernel=False)  # warm-up
    grid_point(closure, bases, coefficients[0])
    # The three alternate point by point, so that load from elsewhere on the machine hits them alike.
    rates: dict[str, list[float]] = {"forward": [], "forward_math": [], "grid": []}
    for _ in range(args.rounds):
        seconds = {k: 0.0 for k in rates}
        for i, row in enumerate(coefficients):
            measure = {
                "forward": lambda: forward_pass(model, x, args.batch_size, math_kernel=False),
                "forward_math": lambda: forward_pass(model, x, args.batch_size, math_kernel=True),
                "grid": lambda: grid_point(closure, bases, row),
            }
            order = list(measure)[i % 3:] + list(measure)[:i % 3]  # no method always runs first
            for name in order:
                seconds[name] += measure[name]()
        for k in rates:
            rates[k].append(len(coefficients) / seconds[k])
    median = {k: statistics.median(v) for k, v in rates.items()}

    rows = [
        ("plain forward, default attention kernel", median["forward"]),
        ("plain forward, math attention kernel", median["forward_math"]),
        ("surface grid points (loss + top-1, fresh weights)", median["grid"]),
    ]
    header = (f"{args.model} ({count_parameters(model) / 1e6:.2f}M parameters), {len(x)} examples of "
              f"{tuple(x.shape[1:])}, batch {args.batch_size}, {args.points}x{args.points} grid, median of "
              f"{args.rounds} rounds; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"{platform.processor() or platform.machine()}")
    lines = [
        header,
        "",
        "| evaluation of the whole set | per second | vs forward (default kernel) | vs forward (math kernel) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, rate in rows:
        lines.append(f"| {name} | {rate:.3f} | {rate / median['forward']:.1%} | {rate / median['forward_math']:.1%} |")
    ratio = median["grid"] / median["forward"]
    same_kernel = median["grid"] / median["forward_math"]
    lines += [
        "",
        f"grid / forward = {ratio:.1%} (target at least 90%: {'met' if ratio >= 0.9 else 'NOT met'}); "
        f"grid / forward under the math attention kernel = {same_kernel:.1%}.",
        "Grid points are evaluated by LossFunction.evaluate, the evaluation shared by every analysis; it takes no "
        "derivatives, so it keeps the default (fused) attention kernel, and the first ratio is the cost of the "
        "surface machinery itself (fresh weights, functional_call, loss and top-1). The math kernel, which second "
        "derivatives need, is shown for reference.",
    ]
    text = "\n".join(lines)
    print(text)
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *_arguments_without_md(sys.argv[1:])])
    args.md.write_text(f"# Surface benchmark\n\n`{command}`\n\n{text}\n")


def _arguments_without_md(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--md":
            skip = True
        elif not arg.startswith("--md="):
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
