"""Training throughput of ``landscape train`` against a bare timm loop, and the time spent writing checkpoints.

Both loops train the same model (same name, keyword arguments and seed) with the same optimizer
(``timm.optim.create_optimizer_v2``), schedule, global batch, per-image transform, number of loader workers,
MixUp/CutMix, loss and EMA, for the same number of epochs, in this one process, alternating (bare, landscape,
bare, landscape, ...) so that both see the same machine. The bare loop is what one writes by hand with timm:
a shuffled ``DataLoader`` (or, for recipes without image-by-image augmentation, random batches indexed out of
the normalised tensor), forward, loss, backward, step, schedule, EMA; no evaluation, no logging, no
checkpoints.

Reported per loop: training images per second, the median over the repeats, and the ratio as the median of
the ratios of the (bare, landscape) pairs, which cancels load that drifts slowly on a shared machine. For
``landscape train`` the images per second are
the images over the time of its training loop including metrics bookkeeping and every checkpoint, state and
metrics.csv write, but excluding the evaluation of raw and EMA weights after each epoch (which the bare loop
does not do; its share is reported separately). The checkpoint share is checkpoint + state + metrics writing
time over the whole wall time of the run.

On a shared machine wall-clock time mostly measures the neighbours. The second pair of columns therefore
counts CPU seconds of this process (``time.process_time``) instead: with ``--workers 0 --threads 1`` all of
the work of both loops (loading, augmentation, forward, backward, bookkeeping, writing) runs in this process
on one thread, so images per CPU-second compare the two loops whatever else the machine is doing.

    LANDSCAPE_DATA_DIR=/data python benchmarks/train_throughput.py --data fashion-mnist --quick
    python benchmarks/train_throughput.py --data digits --quick            (no data files needed)

Writes the table to benchmarks/train_throughput.md (``--md``) as well as printing it.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def bare_timm_loop(config, data_dir, device: torch.device) -> dict[str, float]:
    """Train the config's model with timm's parts and nothing else; return images and seconds."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from landscape.models import create_model
    from landscape.trainers.batches import TrainBatches
    from landscape.trainers.distributed import Distributed

    # The same per-image transform, subset and batch augmentation as the trainer, built by the trainer's code;
    # the bare loop then reads them its own way (a shuffled DataLoader, or plain random batches).
    source = TrainBatches(config, Distributed(), data_dir=data_dir)
    batch = config.batch_size
    if source.image_by_image:
        dataset = torch.utils.data.Subset(source.loader.dataset.dataset, source.subset.tolist())
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=config.data.num_workers,
            persistent_workers=config.data.num_workers > 0, pin_memory=device.type == "cuda")
        epochs_of_batches = lambda: iter(loader)  # noqa: E731
    else:
        x_all, y_all = source.x, source.y

        def epochs_of_batches():
            order = torch.randperm(len(y_all))
            for u in range(len(y_all) // batch):
                i = order[u * batch:(u + 1) * batch]
                yield x_all[i], y_all[i]

    torch.manual_seed(config.seed)
    model = create_model(config.model.name, **config.model.kwargs).to(device)
    o, s, a = config.optim, config.schedule, config.augment
    extra = {k: v for k, v in (("betas", tuple(o.betas) if o.betas else None), ("eps", o.eps)) if v is not None}
    optimizer = create_optimizer_v2(model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, **extra)
    updates = source.updates_per_epoch
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.sched, num_epochs=config.epochs, warmup_epochs=s.warmup_epochs,
                                       warmup_lr=s.warmup_lr, min_lr=s.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates)
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.switch_prob,
                      mode=a.mixup_mode, label_smoothing=a.label_smoothing, num_classes=source.info.num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif a.label_smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(a.label_smoothing)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=config.ema.decay) if config.ema.decay else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    augment_generator = torch.Generator().manual_seed(0)

    model.train()
    step, images = 0, 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(config.epochs):
        for x, y in epochs_of_batches():
            x = source.augment(x, augment_generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            with autocast():
                loss = loss_fn(model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if scheduler is not None:
                scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "images_per_cpu_s": images / cpu}


def landscape_loop(config, data_dir, device: torch.device) -> dict[str, float]:
    """Run ``landscape train`` into a temporary run directory; return its throughput and time shares."""
    from landscape.trainers import train

    with tempfile.TemporaryDirectory() as tmp:
        result = train(config, Path(tmp) / "run", device=str(device), data_dir=data_dir, progress=False)
    t = result.timings
    images = result.rows[-1]["images_seen"]
    loop_seconds = t["train"] + t["checkpoint"]
    return {
        "images": images,
        "seconds": loop_seconds,
        "images_per_s": images / loop_seconds,
        "images_per_cpu_s": images / (t["train_cpu"] + t["checkpoint_cpu"]),
        "checkpoint_share": t["checkpoint"] / t["total"],
        "eval_share": t["eval"] / t["total"],
        "checkpoints": len(result.checkpoints),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--recipe", default=None, help="default: small-images, or digits for --data digits")
    parser.add_argument("--model", default=None, help="default: vit_pico_patch4_32 (the recipe's model for digits)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--train-size", type=int, default=None, help="train on a fixed subset of this many images")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="default: $LANDSCAPE_DATA_DIR")
    parser.add_argument("--quick", action="store_true", help="2048 images, 1 epoch, 5 repeats")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--md", default=str(Path(__file__).with_suffix(".md")), help="where to write the table")
    args = parser.parse_args()

    from landscape.trainers import build_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    recipe = args.recipe or ("digits" if args.data == "digits" else "small-images")
    model = args.model or (None if recipe == "digits" else "vit_pico_patch4_32")
    overrides = list(args.overrides)
    train_size = args.train_size or (2048 if args.quick and args.data != "digits" else None)
    if train_size:
        overrides.append(f"data.train_size={train_size}")
    if args.quick:
        overrides.append("data.val_size=1000")
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    epochs = args.epochs or (1 if args.quick else None)
    config = build_config(recipe, model=model, data=args.data,
                          options={"epochs": epochs, "batch_size": args.batch_size}, overrides=overrides)
    repeats = args.repeats or (5 if args.quick else 3)

    from landscape import data as landscape_data
    from landscape.trainers.loop import resolve_model_kwargs

    config.model.kwargs = resolve_model_kwargs(config, landscape_data.get_dataset_info(config.data.name))
    bare, ours = [], []
    for i in range(repeats):
        bare.append(bare_timm_loop(config, args.data_dir, device))
        ours.append(landscape_loop(config, args.data_dir, device))
        print(f"repeat {i + 1}/{repeats}: bare {bare[-1]['images_per_s']:.1f} images/s "
              f"({bare[-1]['images_per_cpu_s']:.1f} per CPU-s), landscape {ours[-1]['images_per_s']:.1f} images/s "
              f"({ours[-1]['images_per_cpu_s']:.1f} per CPU-s)", file=sys.stderr, flush=True)
    b = statistics.median(r["images_per_s"] for r in bare)
    o = statistics.median(r["images_per_s"] for r in ours)
    ratio = statistics.median(y["images_per_s"] / x["images_per_s"] for x, y in zip(bare, ours))
    b_cpu = statistics.median(r["images_per_cpu_s"] for r in bare)
    o_cpu = statistics.median(r["images_per_cpu_s"] for r in ours)
    ratio_cpu = statistics.median(y["images_per_cpu_s"] / x["images_per_cpu_s"] for x, y in zip(bare, ours))
    share = statistics.median(r["checkpoint_share"] for r in ours)
    eval_share = statistics.median(r["eval_share"] for r in ours)

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {_count(torch.get_num_threads(), 'thread')})"
    lines = [
        f"`python benchmarks/train_throughput.py {' '.join(_argv())}`",
        "",
        f"{config.data.name}, recipe {config.recipe}, model {config.model.name}, batch {config.batch_size}, "
        f"{_count(config.epochs, 'epoch')} of {ours[0]['images'] // config.epochs} images, "
        f"{_count(config.data.num_workers, 'loader worker')}, {_count(ours[0]['checkpoints'], 'checkpoint')} per run, "
        f"{repeats} repeats (median), {hardware}, torch {torch.__version__}.",
        "",
        "| loop | images/s | ratio | images per CPU-second | ratio (CPU) | checkpoint share of wall time "
        "| evaluation share |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| bare timm loop | {b:.1f} | 1.000 | {b_cpu:.1f} | 1.000 | - | - |",
        f"| landscape train | {o:.1f} | {ratio:.3f} | {o_cpu:.1f} | {ratio_cpu:.3f} | {100 * share:.2f}% "
        f"| {100 * eval_share:.1f}% |",
        "",
        "Targets: ratio >= 0.95, checkpoint share <= 3%. Ratios are medians of the per-repeat ratios. Per repeat "
        "(images per CPU-second, bare / landscape): "
        + ", ".join(f"{x['images_per_cpu_s']:.1f} / {y['images_per_cpu_s']:.1f}" for x, y in zip(bare, ours)) + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text("# Training throughput\n\n" + text + "\n")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _argv() -> list[str]:
    return [a for a in sys.argv[1:] if not a.startswith("--md") and not a.endswith(".md")]


if __name__ == "__main__":
    main()
