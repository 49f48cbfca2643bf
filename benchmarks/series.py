"""Series benchmark: top-5 Hessian eigenvalues over a dense series of checkpoints, cold against warm starts.

    python benchmarks/series.py [--checkpoints 50] [--every 10] [--threads N] [--md benchmarks/series.md]

The series is the demo's baseline run itself (``landscape demo``'s study: ViT width 32, depth 4, 2 heads, average
pooling, patch 2 on the embedded 8x8 digits; AdamW at 3e-3, batch 32, one warm-up epoch, cosine to 3e-4 over 12
epochs, 540 updates), trained by ``landscape``'s trainer with a checkpoint every ``--every`` updates; the first
``--checkpoints`` of them are measured. At each checkpoint, on a fixed evaluation set of the training data in one
batch (products through the kept graph, as ``landscape analyze hessian`` makes them):

- reference: our Lanczos at tol 1e-6 from a random start (another seed), with its eigenvectors;
- cold: the top 5 to 1e-3 from a random start;
- warm: the same stopping rule started from the previous checkpoint's Ritz vectors (the first one cold), as
  ``landscape analyze hessian`` does along a series.

Printed (and written with ``--md``): products and seconds per checkpoint, mean and median, for the whole series and
for its thirds (warm-up and peak rate, the middle, the decayed end); the ratio warm / cold; the largest relative
error against the reference; and how far consecutive Hessians are apart (the relative change of the top eigenvalue,
and the overlap of consecutive top-5 eigenvector spaces, :math:`\\|Y_t^\\top Y_{t-1}\\|_F^2 / 5`, 1 when they are the
same space). Everything runs in one process, interleaved per checkpoint (cold, then warm), so ratios hold on a
loaded machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from landscape.analyses.hessian import HessianSettings, WarmStart, hessian_analysis
from landscape.curvature.lanczos import CHECK_PRODUCTS
from landscape.data import analysis_subset


def demo_series(every: int, count: int, root: Path) -> list[torch.nn.Module]:
    """The first ``count`` checkpoints of the demo's baseline run (seed 0), trained into ``root`` with a checkpoint
    every ``every`` updates, as models in eval mode."""
    from landscape.checkpoints import build_model, load_checkpoint
    from landscape.runs import Run
    from landscape.study import demo_study, ensure_trained, train_config

    spec = demo_study()
    overrides = dict(spec.overrides, **{"checkpoint.every": f"steps:{every}", "save_preconditioner": False})
    spec.overrides = overrides
    config = train_config(spec, spec.variants[0], 0)
    ensure_trained(config, root / "run")
    infos = Run(root / "run").checkpoints()[:count]
    models = []
    for info in infos:
        _, state = load_checkpoint(info.path)
        models.append(build_model(info, state).eval())
    return models


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """:math:`\\|A B^\\top\\|_F^2 / k` for two ``(k, P)`` orthonormal row blocks: 1 for the same space, about k/P for
    unrelated ones."""
    return float((a.double() @ b.double().T).pow(2).sum() / len(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=50, help="checkpoints in the series")
    parser.add_argument("--every", type=int, default=10, help="AdamW updates between checkpoints")
    parser.add_argument("--samples", type=int, default=128, help="examples in the evaluation set")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--md", type=Path, default=Path(__file__).with_suffix(".md"),
                        help="where the table is written as markdown [default: benchmarks/series.md]")
    args = parser.parse_args()
    if args.checkpoints < 2 or args.every < 1 or args.samples < 1:
        sys.exit("--checkpoints must be at least 2, --every and --samples at least 1.")
    if args.checkpoints * args.every > 540:
        sys.exit(f"The demo's run has 540 updates: {args.checkpoints} checkpoints {args.every} apart do not fit.")
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="landscape-series-") as root:
        series = demo_series(args.every, args.checkpoints, Path(root))
    x, y = analysis_subset("digits", args.samples, seed=1)
    settings = HessianSettings(top_k=5, tol=1e-3, batch_size=args.samples, samples=args.samples)
    reference_settings = HessianSettings(top_k=5, tol=1e-6, batch_size=args.samples, samples=args.samples, seed=1)
    warm = WarmStart()
    rows, previous = [], None
    for i, model in enumerate(series):
        ref_ds, vectors, _ = hessian_analysis(model, x, y, reference_settings, return_eigenvectors=True)
        reference = ref_ds["eigenvalue_largest"].values
        row = {"lambda": float(reference[0])}
        if previous is not None:
            row["change"] = abs(row["lambda"] - previous[0]) / previous[0]
            row["overlap"] = overlap(vectors["largest"], previous[1])
        previous = (row["lambda"], vectors["largest"])
        for name, state in (("cold", None), ("warm", warm)):
            t0 = time.perf_counter()
            ds = hessian_analysis(model, x, y, settings, warm=state)
            seconds = time.perf_counter() - t0
            error = float(np.max(np.abs(ds["eigenvalue_largest"].values - reference) / np.abs(reference)))
            row[name] = (int(ds["eigenvalue_matvecs"]), seconds, error)
        rows.append(row)
        print(f"checkpoint {i + 1:3d}/{len(series)}: cold {row['cold'][0]:3d} HVPs {row['cold'][1]:6.2f} s, "
              f"warm {row['warm'][0]:3d} HVPs {row['warm'][1]:6.2f} s, lambda_1 {reference[0]:.4g}"
              + (f", overlap {row['overlap']:.2f}" if "overlap" in row else ""), flush=True)

    later = rows[1:]  # the first warm one starts cold: the steady state is what a long series costs
    third = max(1, len(later) // 3)
    parts = [("all", later), ("first third", later[:third]), ("middle third", later[third:2 * third]),
             ("last third", later[2 * third:])]
    tracked = settings.top_k + 2  # the wanted values and the two guards: a start is checked with as many products
    floor = tracked + CHECK_PRODUCTS  # and a converged run is checked for a missed eigenvalue
    n_params = sum(p.numel() for p in series[0].parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Series benchmark: warm-started eigensolves along a checkpoint series",
        "",
        f"`python benchmarks/series.py --checkpoints {args.checkpoints} --every {args.every}`",
        "",
        f"the demo's baseline run (ViT width 32, depth 4, 2 heads, avg pool, patch 2 on 8x8 digits; "
        f"{n_params / 1e3:.1f}k parameters; 540 AdamW updates, cosine schedule), its first {args.checkpoints} "
        f"checkpoints {args.every} updates apart, {args.samples} examples in one batch, float32, top 5 to tol 1e-3; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}; load average "
        f"{load:.1f} at the end, {time.perf_counter() - started:.0f} s in all",
        "",
        "| checkpoints | cold HVPs (mean) | warm HVPs (mean) | warm / cold HVPs | cold s (mean) | warm s (mean) "
        "| warm / cold s | top eigenvalue's change (median) | top-5 overlap (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, part in parts:
        if not part:
            continue
        cold_p = statistics.mean(r["cold"][0] for r in part)
        warm_p = statistics.mean(r["warm"][0] for r in part)
        cold_s = statistics.mean(r["cold"][1] for r in part)
        warm_s = statistics.mean(r["warm"][1] for r in part)
        lines.append(f"| {label} ({len(part)}) | {cold_p:.1f} | {warm_p:.1f} | {warm_p / cold_p:.2f} | {cold_s:.3f} "
                     f"| {warm_s:.3f} | {warm_s / cold_s:.2f} | {statistics.median(r['change'] for r in part):.1%} "
                     f"| {statistics.median(r['overlap'] for r in part):.2f} |")
    cold_p = statistics.mean(r["cold"][0] for r in later)
    warm_p = statistics.mean(r["warm"][0] for r in later)
    cold_s = statistics.mean(r["cold"][1] for r in later)
    warm_s = statistics.mean(r["warm"][1] for r in later)
    met = warm_p <= cold_p / 3 and warm_s <= cold_s / 3
    lines += [
        "",
        f"largest relative error against the reference, all checkpoints: cold "
        f"{max(r['cold'][2] for r in rows):.1e}, warm {max(r['warm'][2] for r in rows):.1e}",
        "",
        f"warm / cold (checkpoints 2 to {len(rows)}; the first warm-started one starts cold): products "
        f"{warm_p / cold_p:.2f}, wall time {warm_s / cold_s:.2f} (target at most 0.33 on both: "
        f"{'met' if met else 'NOT met'}). No start can take fewer than {floor} products here (the five values "
        f"and two guards are checked on a basis of at least {tracked} vectors, then {CHECK_PRODUCTS} products look for "
        f"a missed eigenvalue): {floor / cold_p:.2f} of cold.",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    if args.md is not None:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
