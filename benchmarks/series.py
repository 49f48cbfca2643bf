"""Series benchmark: top-5 Hessian eigenvalues over a dense series of checkpoints, cold against warm starts.

    python benchmarks/series.py [--checkpoints 50] [--every 2] [--threads N] [--md benchmarks/series.md]

The demo's ViT (width 32, depth 4, 2 heads, average pooling, patch 2 on the embedded 8x8 digits) is trained with
AdamW from its initialisation; after ``--warmup`` steps a checkpoint is kept every ``--every`` steps, so
consecutive checkpoints are a few updates apart, as in a densely checkpointed run. At each checkpoint, on a
fixed evaluation set of the training data in one batch (products through the kept graph, as ``landscape analyze
hessian`` makes them):

- reference: our Lanczos at tol 1e-7 from a random start (another seed);
- cold: the top 5 to 1e-3 from a random start, as every checkpoint was measured before warm starts;
- warm: the same stopping rule started from the previous checkpoint's Ritz vectors (the first one cold), as
  ``landscape analyze hessian`` now does along a series.

Printed (and written with ``--md``): products and seconds per checkpoint, mean and median, the ratio warm / cold,
and the largest relative error of the five eigenvalues against the reference over all checkpoints. Everything runs
in one process, interleaved per checkpoint (cold, then warm), so ratios hold on a loaded machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from landscape.analyses.hessian import HessianSettings, WarmStart, hessian_analysis
from landscape.data import analysis_subset
from landscape.models import create_model

DEMO_VIT = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2,
                mlp_ratio=4.0, class_token=False, global_pool="avg")


def checkpoint_series(count: int, every: int, warmup: int, seed: int = 0) -> list[torch.nn.Module]:
    """``count`` copies of the demo ViT taken every ``every`` AdamW steps (batch 32, lr 3e-3, weight decay 0.05,
    the demo's recipe at its peak rate) after ``warmup`` steps."""
    torch.manual_seed(seed)
    model = create_model("vit_pico_patch4_32", **DEMO_VIT)
    x, y = analysis_subset("digits", 1400, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    series = []
    step = 0
    while len(series) < count:
        batch = torch.randint(0, len(x), (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step >= warmup and (step - warmup) % every == 0:
            series.append(copy.deepcopy(model).eval())
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=50, help="checkpoints in the series")
    parser.add_argument("--every", type=int, default=2, help="AdamW steps between checkpoints")
    parser.add_argument("--warmup", type=int, default=40, help="AdamW steps before the first checkpoint")
    parser.add_argument("--samples", type=int, default=256, help="examples in the evaluation set")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--md", type=Path, default=Path(__file__).with_suffix(".md"),
                        help="where the table is written as markdown [default: benchmarks/series.md]")
    args = parser.parse_args()
    if args.checkpoints < 2 or args.every < 1 or args.warmup < 0 or args.samples < 1:
        sys.exit("--checkpoints must be at least 2, --every and --samples at least 1, --warmup at least 0.")
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    series = checkpoint_series(args.checkpoints, args.every, args.warmup)
    x, y = analysis_subset("digits", args.samples, seed=1)
    settings = HessianSettings(top_k=5, tol=1e-3, batch_size=args.samples, samples=args.samples)
    reference_settings = HessianSettings(top_k=5, tol=1e-7, batch_size=args.samples, samples=args.samples, seed=1)
    warm = WarmStart()
    rows = []
    for i, model in enumerate(series):
        reference = hessian_analysis(model, x, y, reference_settings)["eigenvalue_largest"].values
        row = {}
        for name, state in (("cold", None), ("warm", warm)):
            t0 = time.perf_counter()
            ds = hessian_analysis(model, x, y, settings, warm=state)
            seconds = time.perf_counter() - t0
            error = float(np.max(np.abs(ds["eigenvalue_largest"].values - reference) / np.abs(reference)))
            row[name] = (int(ds["eigenvalue_matvecs"]), seconds, error)
        rows.append(row)
        print(f"checkpoint {i + 1:3d}/{len(series)}: cold {row['cold'][0]:3d} HVPs {row['cold'][1]:6.2f} s, "
              f"warm {row['warm'][0]:3d} HVPs {row['warm'][1]:6.2f} s, lambda_1 {reference[0]:.4g}", flush=True)

    def column(name: str, field: int, rows=rows) -> list[float]:
        return [row[name][field] for row in rows]

    later = rows[1:]  # the first warm one starts cold: the steady state is what a long series costs
    cold_p, warm_p = statistics.mean(column("cold", 0, later)), statistics.mean(column("warm", 0, later))
    cold_s, warm_s = statistics.mean(column("cold", 1, later)), statistics.mean(column("warm", 1, later))
    n_params = sum(p.numel() for p in series[0].parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Series benchmark: warm-started eigensolves along a checkpoint series",
        "",
        f"`python benchmarks/series.py --checkpoints {args.checkpoints} --every {args.every} --warmup {args.warmup}`",
        "",
        f"demo ViT (width 32, depth 4, 2 heads, avg pool, patch 2 on 8x8 digits; {n_params / 1e3:.1f}k parameters), "
        f"{args.checkpoints} checkpoints {args.every} AdamW steps apart after {args.warmup}, {args.samples} examples "
        f"in one batch, float32, top 5 to tol 1e-3; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.machine()}; load average {load:.1f} at the end, {time.perf_counter() - started:.0f} s in all",
        "",
        "| start | HVPs per checkpoint (mean) | median | seconds per checkpoint (mean) | median "
        "| largest relative error (all checkpoints) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("cold", "warm"):
        lines.append(f"| {name} | {statistics.mean(column(name, 0, later)):.1f} | "
                     f"{statistics.median(column(name, 0, later)):.0f} | {statistics.mean(column(name, 1, later)):.3f} "
                     f"| {statistics.median(column(name, 1, later)):.3f} | {max(column(name, 2)):.1e} |")
    met = warm_p <= cold_p / 3 and warm_s <= cold_s / 3
    lines += [
        "",
        f"warm / cold (checkpoints 2 to {len(rows)}; the first warm-started one starts cold): "
        f"products {warm_p / cold_p:.2f}, wall time {warm_s / cold_s:.2f} "
        f"(target at most 0.33 on both: {'met' if met else 'NOT met'})",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    if args.md is not None:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
