"""The training loop: config, data, model, optimizer, then the loop, which reads top to bottom.

:func:`train` sets up and then loops, nanoGPT's way: at the top of each pass, when a metrics row is due, the raw
and EMA weights are evaluated and the row, the checkpoint and the training state are written; then one update
(forward and backward micro-batch by micro-batch, optimizer step, schedule, EMA) and its logging. What changes
as the run trains is one :class:`~landscape.trainers.state.TrainState`, the updates since the last row one
:class:`~landscape.trainers.state.RowTally`. The ingredients are timm's: ``create_optimizer_v2``,
``create_scheduler_v2`` stepped after every update, ``Mixup`` with ``SoftTargetCrossEntropy``,
``LabelSmoothingCrossEntropy``, ``ModelEmaV3`` (once per shared tensor: :mod:`.ema`); data order and
augmentation seeds come from :mod:`landscape.trainers.batches`, checkpoint steps from
:mod:`landscape.trainers.schedule`. The pieces other trainers reuse are public: :func:`build_optimizer`,
:func:`build_schedule`, :func:`build_loss`, :func:`evaluate`, :func:`metrics_row`, :func:`write_checkpoint`,
:func:`write_outputs`, :func:`existing_checkpoints`, :func:`apply_keep_policy`, :func:`check_finite`,
:func:`claim_run_dir`, :func:`after_update`, :func:`run_hash`, :func:`resolve_model_kwargs`, :func:`load_init_weights`, :class:`Stopwatch`.

A step is one optimizer update of ``batch_size`` images (over all processes and accumulation steps). After
the last update of every epoch and at every checkpoint step the raw and EMA weights are evaluated on the
validation set and one row is appended to ``metrics.csv``; at checkpoint steps the weights are written, and
after every evaluation ``state/last.pt`` is replaced, so a killed run continues from its last evaluation and
ends with the same weights, bit for bit, as a run that was never interrupted.

``metrics.csv`` columns: ``epoch`` (the epoch the row belongs to; 0 for the initial weights), ``step``,
``images_seen``, ``train_loss`` (mean over the row's updates of the loss on the augmented batches),
``val_loss``/``val_top1``/``val_top5`` and ``ema_val_*`` (cross-entropy and accuracy in percent on the
validation set, raw and EMA weights), ``lr`` (of the row's last update), ``grad_norm`` (mean global gradient
norm before clipping), ``wall_time`` (seconds since the run started, resumed runs included), ``images_per_s``
(training throughput of the row), ``schedule_epochs`` (the total epochs the row's learning-rate schedule was
computed for: it changes where ``landscape train --resume RUN --extend-to N`` extended the run), and
``moe_aux_loss`` for mixture-of-experts models.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from landscape.checkpoints import load_checkpoint, read_checkpoint_info, save_checkpoint
from landscape.config import TrainConfig, coerce_types, config_hash, from_dict, to_dict
from landscape.errors import CheckpointError, ConfigError, LandscapeError
from landscape.models import MaskedAutoencoder, MixtureOfSwiGLUExperts, create_model, encoder_state_dict, moe_aux_loss
from landscape.progress import progress_bar
from landscape.io import RunLock, WriteError, remove_stale_temporaries
from landscape.runs import Run, looks_like_run, is_empty_run
from landscape.trainers import distributed
from landscape.trainers.batches import TrainBatches, derive_seed, validation_batches
from landscape.trainers.ema import ModelEma
from landscape.trainers.recipes import validate
from landscape.trainers.schedule import checkpoint_steps, checkpoints_to_delete
from landscape.trainers.state import RowTally, TrainState, capture_rng, load_state, restore_rng, save_state

CHECK_EVERY = 32  # updates between checks of the loss for NaN/inf (each check waits for the device)


@dataclass
class TrainResult:
    """What a finished run returns: its directory, every metrics row, and where the time went (seconds)."""

    run: Run
    rows: list[dict[str, Any]]
    checkpoints: list[Path]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    @classmethod
    def of(cls, run: Run, state: TrainState, timings: dict[str, float]) -> TrainResult:
        """The result of ``run`` trained to ``state``: its rows and the checkpoints on disk, by step."""
        return cls(run=run, rows=state.rows, checkpoints=[state.checkpoints[s] for s in sorted(state.checkpoints)],
                   timings=dict(timings))


def train(
    config: TrainConfig | None,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_update: Callable[[int], None] | None = None,
    extend_to: int | None = None,
    log: Sequence[str] = (),
) -> TrainResult:
    """Train ``config`` into the run directory ``out`` and return its metrics.

    ``resume=True`` continues the run in ``out`` from its ``state/last.pt`` with the config saved there
    (``config`` must then be None); a new run refuses an existing directory unless ``overwrite``.
    ``extend_to`` (with ``resume``) raises the run's total to that many epochs, finished or not: the learning-rate
    schedule is recomputed for the new total from step 0 and followed from the saved step on, so only the
    remaining epochs see the new rates (past epochs are not re-run). ``config.yaml`` records ``extended_from``
    (the previous total) and ``extended_at``; every metrics row records in ``schedule_epochs`` the total its
    schedule was computed for.
    ``on_row(row)`` is called with every metrics row, ``on_update(step)`` after every update (both on the main
    process). Under ``torchrun`` every process calls this and only the first one writes.
    ``log`` names trackers (``tensorboard``, ``wandb``) that receive every metrics row as well
    (:mod:`landscape.tracking`; TensorBoard event files go into the run directory).
    """
    from landscape.tracking import ScalarLogger

    tracker = ScalarLogger(out, log, suffix="train")  # checked now; its writers open with the first row
    if tracker:
        shown = on_row

        def on_row(row: dict[str, Any]) -> None:
            tracker.log_metrics_row(row)
            if shown is not None:
                shown(row)

    dist, device = distributed.setup(device)
    held = contextlib.ExitStack()  # the run directory's lock, released however the training ends
    try:
        return _train(config, Path(out), dist, device, resume=resume, overwrite=overwrite, data_dir=data_dir,
                      progress=progress, on_row=on_row, on_update=on_update, held=held, extend_to=extend_to)
    finally:
        tracker.close()
        held.close()
        distributed.teardown(dist)


def _train(config, out, dist, device, *, resume, overwrite, data_dir, progress, on_row, on_update,
           held: contextlib.ExitStack, extend_to: int | None = None) -> TrainResult:
    t_start = time.perf_counter()
    # -- the run directory: a new one, or the one being resumed (whose saved config wins) ------------------------
    # Its lock is taken before anything is checked, so two trainings given one --out cannot both pass the checks.
    run = Run(out)
    _on_main(dist, lambda: claim_run_dir(run, config, held, resume=resume, overwrite=overwrite))
    config = validate(coerce_types(from_dict(TrainConfig, run.load_config()))) if resume else copy.deepcopy(config)
    saved = load_state(run.state_path) if resume and run.state_path.exists() else None

    # -- data ------------------------------------------------------------------------------------------------
    if resume:  # the data it started on, not other files found through another --data-dir
        from landscape.data import check_data_record

        for split in ("train", "val"):
            check_data_record(run.load_data_record(), config.data.name, split, where=str(run.root),
                              data_dir=data_dir, **config.data.options)
    train_data = TrainBatches(config, dist, data_dir=data_dir)
    val_data = validation_batches(config, dist, data_dir=data_dir, batch_size=max(256, train_data.micro_batch_size))
    updates_per_epoch = train_data.updates_per_epoch

    # -- model -----------------------------------------------------------------------------------------------
    config.model.kwargs = resolve_model_kwargs(config, train_data.info)
    if extend_to is not None:
        config = _extend(run, config, extend_to, saved, dist)
    torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
    model = _create_model(config.model.name, config.model.kwargs)
    mae = _check_task(config, model)
    if not resume:
        check_model_fits_data(config, config.model.kwargs, data_dir)
    # The mixture-of-experts layers of an mLiT leave a load-balancing loss after every forward.
    has_moe = any(isinstance(m, MixtureOfSwiGLUExperts) for m in model.modules())
    if config.init and saved is None:
        load_init_weights(model, config.init)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    ema = ModelEma(model, decay=config.ema.decay, use_warmup=config.ema.warmup) if config.ema.decay else None
    net = torch.compile(model) if config.compile else model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

    # -- optimizer, schedule, loss, precision -------------------------------------------------------------------
    optimizer = build_optimizer(config, model)
    scheduler = build_schedule(config, optimizer, updates_per_epoch)
    mixup, loss_fn = build_loss(config, train_data.info.num_classes, train_data.micro_batch_size)
    amp_dtype = _amp_dtype(config.amp, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    def val_metrics(net: torch.nn.Module, weights: str) -> dict[str, Any]:
        """The validation metrics of ``net``, with a bar while they take (10,000 images on a CPU: minutes)."""
        batches = progress_bar(val_data, total=len(val_data), desc=f"evaluating {weights} weights", unit=" batch",
                               leave=False, disable=None if progress and dist.is_main else True)
        with batches:
            return evaluate(net, batches, device, autocast, dist, mae=mae)

    if not resume:  # only now that data, model, init weights, optimizer and schedule are known to work, so that
        # a typo leaves nothing behind
        _on_main(dist, lambda: create_run(run, config, overwrite=overwrite, data_dir=data_dir))

    # -- where to start: the beginning, or the position saved in state/last.pt ----------------------------------
    state = TrainState(model, optimizer, scheduler, scaler, ema)
    if saved is not None:
        rescheduled = _check_resumable(run, config, saved)
        state.load_state_dict(saved, schedule=not rescheduled)
        if scheduler is not None and rescheduled:
            scheduler.step_update(state.step)  # the rate of the next update under the schedule of the new total
        rng = saved["rng"]
        restore_rng(rng[dist.rank] if len(rng) == dist.world_size else rng[0])
    else:
        torch.manual_seed(derive_seed(config.seed, "train", dist.rank))
        np.random.seed(derive_seed(config.seed, "numpy", dist.rank) % 2**32)
        random.seed(derive_seed(config.seed, "python", dist.rank))
    schedule = set(checkpoint_steps(config.checkpoint.every, updates_per_epoch=updates_per_epoch,
                                    epochs=config.epochs))
    if dist.is_main:
        state.checkpoints = existing_checkpoints(run, state.step)
        apply_keep_policy(config, state.checkpoints)  # a kill may have come before it
    batches = _updates(train_data, state.epoch, state.next_update, config.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    clock = Stopwatch()
    t_resumed = time.perf_counter()
    tally = RowTally(state.step + 1, lr=optimizer.param_groups[0]["lr"], aux=[] if has_moe else None)
    # row 0 and a checkpoint of the initial weights, unless a run stopped right after saving them resumes
    row_due = config.checkpoint.initial and state.step == 0 and not any(r.get("step") == 0 for r in state.rows)
    bar = None

    # -- the loop ----------------------------------------------------------------------------------------------
    while True:
        if row_due:
            # Evaluate (the row's updates are checked first, so a diverged run stops before its weights reach a
            # checkpoint), then write metrics.csv, the checkpoint if one is due, state/last.pt: each atomically.
            label = state.epoch - 1 if state.next_update == 0 else state.epoch  # after an epoch's last update
            check_finite(tally, label, state.checkpoints, fp16=amp_dtype == torch.float16)
            row = metrics_row(config, epoch=label, step=state.step, train=tally.summary(dist, device),
                              val=val_metrics(model, "raw"), ema_val=val_metrics(ema.module, "EMA") if ema is not None
                              else None,
                              wall_time=state.elapsed + (time.perf_counter() - t_resumed))
            state.rows.append(row)
            clock.lap("eval")
            rng = distributed.gather(capture_rng(), dist)
            checkpoint = state.step in schedule or state.step == 0
            _on_main(dist, lambda: write_outputs(run, config, state, rng, checkpoint=checkpoint))
            clock.lap("checkpoint")
            if on_row is not None and dist.is_main:
                on_row(row)
            tally = RowTally(state.step + 1, lr=tally.lr, aux=[] if has_moe else None)
        if state.epoch > config.epochs:
            break

        epoch, u = state.epoch, state.next_update
        if bar is None:  # the first update of an epoch (in this process)
            net.train()
            bar = progress_bar(total=updates_per_epoch, initial=u, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                               disable=None if progress and dist.is_main else True)
            bar_start, correct = u, torch.zeros((), device=device)  # training accuracy, for the progress bar only
            clock.lap("train")
        # forward and backward, micro-batch by micro-batch (gradients are synchronised after the last one)
        micro_batches = next(batches)
        update_loss = update_aux = 0.0
        for m, (x, y) in enumerate(micro_batches):
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            last_micro = m == len(micro_batches) - 1
            no_sync = net.no_sync if dist.enabled and not last_micro else contextlib.nullcontext
            with no_sync(), autocast():
                if mae:
                    output, loss = None, net(x)[0]
                else:
                    output = net(x)
                    loss = loss_fn(output, target)
                aux = moe_aux_loss(model) if has_moe else None
                total = loss + aux if aux is not None else loss
            scaler.scale(total / len(micro_batches)).backward()
            update_loss = update_loss + loss.detach().float() / len(micro_batches)
            if aux is not None:
                update_aux = update_aux + aux.detach().float() / len(micro_batches)
            if not bar.disable and output is not None:
                correct += (output.detach().argmax(-1) == y).sum()
        # the update: gradient norm (clipped if asked), optimizer step, schedule, EMA
        scaler.unscale_(optimizer)
        if config.optim.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        tally.lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.advance(updates_per_epoch)
        if scheduler is not None:
            scheduler.step_update(state.step)
        if ema is not None:
            ema.update(model, step=state.step)
        # log
        tally.add(update_loss, grad_norm, update_aux if has_moe else None)
        if len(tally) % CHECK_EVERY == 0:
            check_finite(tally, epoch, state.checkpoints, fp16=amp_dtype == torch.float16)
        tally.seconds += clock.lap("train")
        tally.images += config.batch_size
        if on_update is not None and dist.is_main:
            on_update(state.step)
        if not bar.disable and (u % 10 == 0 or u == updates_per_epoch - 1):
            seen = (u - bar_start + 1) * train_data.micro_batch_size * train_data.accum_steps
            bar.set_postfix(loss=f"{float(torch.stack(tally.losses[-10:]).mean()):.4f}",
                            acc=f"{100 * float(correct) / seen:.1f}",
                            img_s=f"{tally.images / max(tally.seconds, 1e-9):.0f}", refresh=False)
        row_due, bar = after_update(bar, state, schedule)

    clock.lap("train")
    return TrainResult.of(run, state, {"total": time.perf_counter() - t_start, **clock.seconds})


def after_update(bar, state: TrainState, schedule: set[int]) -> tuple[bool, Any]:
    """The progress bar after an update, and whether a metrics row is due: after an epoch's last update (the
    bar is closed and None returned for it, so the next epoch opens its own) or at a checkpoint step."""
    bar.update(1)
    row_due = state.next_update == 0 or state.step in schedule
    if state.next_update == 0:  # the epoch's last update
        bar.close()
        return row_due, None
    if row_due:
        bar.clear()
    return row_due, bar


# -- the pieces of a trainer (public: other trainers reuse them) -------------------------------------------------------
def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer for ``config.optim`` over ``model``'s parameters (timm's weight-decay groups), at the
    peak rate ``optim.lr``, scaled by ``batch_size / optim.lr_base_batch`` when that is set.

    torch's Adam, AdamW and SGD run their fused update (one kernel over every tensor) where torch has one for the
    parameters' device and dtype: on a CPU it took 1.2 ms against the multi-tensor update's 4.5 ms on the demo's
    52k-parameter ViT, a tenth of its training step (the same arithmetic, rounded in its own order). Another torch
    optimizer that leaves its implementation to torch runs its multi-tensor (``foreach``) update on every device:
    torch chooses it only on a GPU, and on a CPU the loop over tensors took half of that model's update. A resumed
    run keeps the implementation it started with (the optimizer's saved state names it)."""
    from timm.optim import create_optimizer_v2

    o = config.optim
    lr = o.lr * (config.batch_size / o.lr_base_batch if o.lr_base_batch else 1.0)
    extra = {k: v for k, v in (("betas", tuple(o.betas) if o.betas else None), ("eps", o.eps)) if v is not None}
    optimizer = _timm_call(create_optimizer_v2, model, opt=o.opt, lr=lr, weight_decay=o.weight_decay,
                           momentum=o.momentum, **extra)
    if type(optimizer) in _FUSABLE and _fused_supported(optimizer):
        groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in optimizer.param_groups]
        import inspect

        accepted = inspect.signature(type(optimizer)).parameters  # AdamW sets decoupled_weight_decay itself
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in ("foreach", "fused")}
        return type(optimizer)(groups, **defaults, fused=True)
    for group in optimizer.param_groups:  # torch picks the one-tensor-at-a-time loop on a CPU: half a small model's step
        if group.get("foreach", False) is None and not group.get("fused"):
            group["foreach"] = True
    return optimizer


_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
"""torch optimizers with a fused update (a parameter group's options are all a rebuild needs)."""


def _fused_supported(optimizer: torch.optim.Optimizer) -> bool:
    """Whether torch has a fused update for every parameter of ``optimizer`` (device type and floating dtype)."""
    try:  # torch's own list (private: a torch without it keeps the multi-tensor update)
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError, TypeError):
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return bool(params) and all(p.device.type in devices and p.dtype in _FUSED_DTYPES and not p.is_sparse
                                and not g.get("differentiable") for g in optimizer.param_groups for p in g["params"])


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def build_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's learning-rate schedule for ``config.schedule`` over ``config.epochs``, to be stepped after every
    update with ``step_update(step)`` (None where the schedule keeps the rate constant)."""
    from timm.scheduler import create_scheduler_v2

    s = config.schedule
    scheduler, _ = _timm_call(create_scheduler_v2, optimizer, sched=s.sched, num_epochs=config.epochs,
                              warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr, min_lr=s.min_lr,
                              step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return scheduler


def build_loss(config: TrainConfig, num_classes: int, micro_batch_size: int) -> tuple[Any, torch.nn.Module]:
    """The batch mixing (timm's ``Mixup`` for MixUp/CutMix, else None) and the training loss that fits it: soft-
    target cross-entropy after mixing (the mixed targets carry the label smoothing), else cross-entropy with
    or without label smoothing."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    a = config.augment
    if a.mixup > 0 or a.cutmix > 0:
        if micro_batch_size % 2:
            raise ConfigError(f"MixUp/CutMix pair the images of a batch, so the micro-batch of each process "
                              f"({micro_batch_size} images) must be even.")
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.switch_prob,
                      mode=a.mixup_mode, label_smoothing=a.label_smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if a.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=a.label_smoothing)
    return None, torch.nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model, batches, device, autocast=contextlib.nullcontext, dist=None, *, mae=False) -> dict[str, Any]:
    """Mean cross-entropy and top-1/top-5 accuracy (percent) of ``model`` on the validation batches.

    For a masked autoencoder (``mae``), the mean reconstruction loss under a masking that is fixed per batch
    (so that evaluations are comparable and draw nothing from the training random-number generators).
    """
    dist = dist or distributed.Distributed()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    count, num_classes = 0, None
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mae:
            length = model.patchify(x[:1]).shape[1]
            g = torch.Generator().manual_seed(derive_seed("mae-eval", dist.rank, i))
            with autocast():
                loss = model(x, noise=torch.rand(len(x), length, generator=g).to(device))[0]
            loss_sum += loss.double() * len(y)
            count += len(y)
            continue
        with autocast():
            logits = model(x)
        logits = logits.float()
        num_classes = logits.shape[-1]
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, num_classes), dim=-1).indices
        hit = top == y[:, None]
        correct[0] += hit[:, 0].sum()
        correct[1] += hit.any(dim=-1).sum()
        count += len(y)
    model.train(was_training)
    loss, top1, top5, n = distributed.all_reduce_sum([loss_sum.item(), *correct.tolist(), count], dist, device)
    if n == 0:
        return {"val_loss": None, "val_top1": None, "val_top5": None}
    if mae:
        return {"val_loss": loss / n, "val_top1": None, "val_top5": None}
    return {"val_loss": loss / n, "val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n if (num_classes or 0) >= 5 else None}


def metrics_row(config: TrainConfig, *, epoch: int, step: int, train: dict[str, Any], val: dict[str, Any],
                ema_val: dict[str, Any] | None, wall_time: float) -> dict[str, Any]:
    """One row of ``metrics.csv``, its columns in the documented order (module docstring).

    ``train`` holds the row's training columns (:meth:`~landscape.trainers.state.RowTally.summary`), ``val`` and
    ``ema_val`` the :func:`evaluate` results of the raw and EMA weights (None without EMA)."""
    row = {
        "epoch": epoch, "step": step, "images_seen": step * config.batch_size, "train_loss": train["train_loss"],
        **val, **{"ema_" + k: ema_val[k] if ema_val is not None else None for k in val},
        "lr": train["lr"], "grad_norm": train["grad_norm"], "wall_time": wall_time,
        "images_per_s": train["images_per_s"], "schedule_epochs": config.epochs,
    }
    if "moe_aux_loss" in train:
        row["moe_aux_loss"] = train["moe_aux_loss"]
    return row


def write_checkpoint(run: Run, config: TrainConfig, model: torch.nn.Module, ema_model: torch.nn.Module | None,
                     row: dict[str, Any], *, epoch_end: bool, previous: Path | None = None) -> Path:
    """Write the weights (and EMA weights) as the checkpoint of the metrics row ``row`` and return its path:
    ``epoch-NNNN`` after an epoch's last update (``epoch_end``), else ``step-NNNNNNNN``.

    The metadata rebuilds the model (name and keyword arguments) and ties the file to its row (epoch, step,
    metrics) and to the run's settings (:func:`run_hash`). A failed write is one sentence naming the
    ``previous`` checkpoint, which it leaves intact."""
    path = run.checkpoint_path(epoch=row["epoch"]) if epoch_end else run.checkpoint_path(step=row["step"])
    try:
        save_checkpoint(
            path, model.state_dict(), model=config.model.name, model_kwargs=config.model.kwargs,
            epoch=row["epoch"] if epoch_end else None, step=row["step"], metrics=row, config_hash=run_hash(config),
            ema_state_dict=ema_model.state_dict() if ema_model is not None else None,
        )
    except (OSError, WriteError) as e:
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no checkpoint was lost"
        raise CheckpointError(f"Writing {path} failed ({e.strerror or e}); {kept}.") from None
    return path


def _updates(train_data: TrainBatches, epoch: int, start: int, epochs: int) -> Iterator[list]:
    """The micro-batches of every update to the end of the run, from update ``start`` of ``epoch`` on."""
    for e in range(epoch, epochs + 1):
        yield from train_data.epoch(e, start)
        start = 0


def check_finite(tally: RowTally, epoch: int, saved: dict[int, Path], *, fp16: bool = False,
                 run_dir: Path | None = None) -> None:
    """Stop a run whose loss or gradient norm is no longer finite (fp16 skips steps with overflowing gradients
    by design, so there only the loss counts); the sentence names ``run_dir`` when given (one of several runs)."""
    bad = tally.first_nonfinite(norms=not fp16)
    if bad is not None:
        step, loss, grad_norm = bad
        raise LandscapeError(_divergence_message(loss, grad_norm, step, epoch, saved, run_dir))


def write_outputs(run: Run, config: TrainConfig, state: TrainState, rng: list, *, checkpoint: bool) -> None:
    """metrics.csv, then the checkpoint (if due), then state/last.pt, then the keep policy: each atomic, so a run
    killed at any moment resumes to the weights it would have had."""
    run.write_metrics(state.rows)
    if checkpoint:
        saved = state.checkpoints
        path = write_checkpoint(run, config, state.model, state.ema.module if state.ema is not None else None,
                                state.rows[-1], epoch_end=state.next_update == 0,
                                previous=saved[max(saved)] if saved else None)
        saved[state.step] = path
        if config.save_preconditioner:
            _save_preconditioner(run, path, state.model, state.optimizer, state.step, run_hash(config))
    save_state(run.state_path, state.state_dict(run_hash(config), rng))
    apply_keep_policy(config, state.checkpoints)


def apply_keep_policy(config: TrainConfig, saved: dict[int, Path]) -> None:
    for old in checkpoints_to_delete(config.checkpoint.keep, sorted(saved)):
        _remove_checkpoint(saved.pop(old))


def _remove_checkpoint(path: Path) -> None:
    """A checkpoint and the optimizer state saved beside it (``save_preconditioner``), which means nothing alone."""
    from landscape.analyses.stability import preconditioner_path

    path.unlink(missing_ok=True)
    preconditioner_path(path.parent.parent, path.stem).unlink(missing_ok=True)


def _on_main(dist: distributed.Distributed, write: Callable[[], Any]) -> None:
    """``write()`` on the main process only; the one-sentence error it raises is raised on every process."""
    error = None
    if dist.is_main:
        try:
            write()
        except LandscapeError as e:
            error = e
    distributed.broadcast_error(error, dist)


def claim_run_dir(run: Run, config: TrainConfig | None, held: contextlib.ExitStack, *, resume: bool,
                   overwrite: bool) -> None:
    """Lock the run directory (removed again at the end if the training left nothing in it), then check it."""
    if not resume or run.root.is_dir():
        lock = held.enter_context(RunLock(run.root, create=not resume))
        held.callback(_remove_if_unused, run.root, lock)
    _prepare_run_dir(run, config, resume=resume, overwrite=overwrite)


def _check_resumable(run: Run, config: TrainConfig, saved: dict[str, Any]) -> bool:
    """Whether the saved state predates the run's latest extension (its schedule is then the new total's, not
    the saved one); a state of any other config is refused."""
    rescheduled = config.extended_from is not None and saved["config_hash"] == run_hash(
        dataclasses.replace(config, epochs=config.extended_from))
    if saved["config_hash"] != run_hash(config) and not rescheduled:
        raise CheckpointError(f"{run.config_path} was changed after {run.state_path} was saved; "
                              "a resumed run must keep its config (start a new run instead).")
    return rescheduled


# -- setting up, the run directory -------------------------------------------------------------------------------------
def resolve_model_kwargs(config: TrainConfig, info) -> dict[str, Any]:
    """The model's keyword arguments with the dataset's classes, channels and image size filled in."""
    kwargs = dict(config.model.kwargs)
    kwargs.setdefault("num_classes", info.num_classes)
    kwargs.setdefault("in_chans", info.in_chans)
    kwargs.setdefault("img_size", config.data.img_size or info.img_size)
    if config.model.drop_path > 0:
        kwargs.setdefault("drop_path_rate", config.model.drop_path)
    if config.task == "mae":
        kwargs.pop("num_classes")
        kwargs.setdefault("mask_ratio", config.mae.mask_ratio)
        kwargs.setdefault("norm_pix_loss", config.mae.norm_pix_loss)
    return kwargs


def check_config(config: TrainConfig) -> None:
    """Refuse a config whose dataset, model, model arguments, optimizer or schedule cannot be used, without
    loading data or weights.

    The model is built on the meta device (no memory, no initialisation), so ``--dry-run`` catches an unknown
    name or a bad keyword argument at once. An image folder's classes are only known from its files: its model is
    built with the declared count.
    """
    from landscape import data

    info = data.get_dataset_info(config.data.name, **config.data.options)
    kwargs = resolve_model_kwargs(config, info)
    with torch.device("meta"):
        model = _create_model(config.model.name, kwargs)
    _check_task(config, model)
    check_model_fits_data(config, kwargs)
    check_optimization(config)


def check_optimization(config: TrainConfig) -> None:
    """Refuse an optimizer or schedule timm does not know or cannot build with the config's settings (built over
    a one-weight stand-in: the names and settings are what timm reads), with as many updates per epoch as the
    run will make where the dataset's size is known (a schedule's phases are counted in updates)."""
    from landscape import data

    try:
        size = data.get_dataset_info(config.data.name, **config.data.options).train_size
    except LandscapeError:
        size = None  # refused where the data is checked
    if size is not None and config.data.train_size is not None:
        size = min(size, config.data.train_size)
    updates = max(1, size // config.batch_size) if size is not None else 1000  # an image folder: many
    build_schedule(config, build_optimizer(config, torch.nn.Linear(1, 1)), updates_per_epoch=updates)


def check_model_fits_data(config: TrainConfig, kwargs: dict[str, Any], data_dir=None) -> None:
    """The model arguments given (``--model-arg num_classes=5``, ``img_size``, ``in_chans``, ``patch_size``) must
    fit the images and classes of the data, before the run directory is made (they failed inside the loop)."""
    from landscape import data

    side = _square_side(kwargs.get("img_size"))
    patch = _square_side(kwargs.get("patch_size"))
    if side is not None and patch is not None and patch > side:
        raise ConfigError(f"patch_size {patch} is larger than the {side}x{side} images; give --model-arg "
                          f"patch_size={max(1, side // 4)} or a larger --img-size.")
    data.check_data_fits(config.data.name, model_in_chans=kwargs.get("in_chans"), model_img_size=side,
                         model_classes=kwargs.get("num_classes"), img_size=config.data.img_size,
                         options=config.data.options, data_dir=data_dir, training=True)
    info = data.get_dataset_info(config.data.name, **data.dataset_options(config.data.name, config.data.img_size,
                                                                          config.data.options))
    _check_forward(config, kwargs, info)
    for split, asked, has, option in (("train", config.data.train_size, info.train_size, "count"),
                                      ("val", config.data.val_size, info.val_size, "val_count")):
        if asked is not None and has is not None and asked > has:
            more = (f" (or generate more with --set data.options.{option}={asked})"
                    if config.data.name == "synthetic" else "")
            what = "training" if split == "train" else "validation"
            raise ConfigError(f"data.{split}_size {asked} is more than the {has} {what} images of {config.data.name}; "
                              f"give at most {has}, or leave it out for all of them{more}.")


def _check_forward(config: TrainConfig, kwargs: dict[str, Any], info) -> None:
    """One forward pass of the model on the meta device (no memory, no arithmetic; on the CPU with one image where
    the meta device cannot run an operation) with a batch of the data's shape (``info``: the data's
    :class:`~landscape.data.DatasetInfo`): what the arguments leave to the model's name
    (``vit_small_patch16_224``'s patch of 16 on 8x8 digits) fails here in one sentence, not in the first step."""
    side = config.data.img_size or info.img_size
    model = None
    for device in ("meta", "cpu"):  # on the CPU, one image, only where the meta device cannot run an operation
        try:
            with torch.device(device):  # the arguments were checked by building the model already
                model = create_model(config.model.name, **kwargs)
                with torch.no_grad():
                    model.eval()(torch.zeros(1, info.in_chans, side, side))
            return
        except LandscapeError:
            raise
        except Exception as e:  # noqa: BLE001  (timm asserts, convolutions refuse, shapes do not multiply)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if device == "meta" and (isinstance(e, NotImplementedError) or "meta" in str(e).lower()):
                continue  # an operation the meta device cannot run (an MAE's masking, an mLiT's routing)
            break
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", getattr(model, "patch_size", None))
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if isinstance(patch, int) and patch > side:
        hint = f"its patch of {patch} is larger than the images; give --model-arg patch_size={max(1, side // 4)}"
    elif isinstance(patch, int) and side % patch:  # a masked autoencoder cuts the images into whole patches
        hint = f"its patch of {patch} does not divide the images; give a --model-arg patch_size that divides {side}"
    else:
        hint = "give model arguments that fit them"
    raise ConfigError(f"{config.model.name} cannot take the {info.in_chans}-channel {side}x{side} images of "
                      f"{config.data.name} ({reason[:200]}); {hint}, or another --img-size.")


def _square_side(size: Any) -> int | None:
    """A square image or patch size given as ``N`` or ``(N, N)``; ``None`` for anything else."""
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return int(size) if isinstance(size, int) and not isinstance(size, bool) else None


def _check_task(config: TrainConfig, model: torch.nn.Module) -> bool:
    """Whether the run pre-trains a masked autoencoder; the model must fit the task."""
    is_mae = isinstance(model, MaskedAutoencoder)
    if config.task == "mae" and not is_mae:
        raise ConfigError(f"task mae needs a masked-autoencoder model such as mae_mlit_xs, not {config.model.name}.")
    if config.task == "classify" and is_mae:
        raise ConfigError(f"{config.model.name} is a masked autoencoder; train it with --recipe mae-pretrain.")
    return is_mae


def load_init_weights(model: torch.nn.Module, source: str | os.PathLike) -> dict[str, list[str]]:
    """Start ``model`` from the last checkpoint of run ``source`` (or a checkpoint file).

    Tensors whose name and shape match are copied; the rest (a classifier head for another number of classes, an
    MAE decoder) keep their fresh initialisation. Returns the names loaded and skipped.
    """
    source = Path(source)
    path = source if source.is_file() else _last_checkpoint(source)
    _, state = load_checkpoint(path)
    own = model.state_dict()
    if any(k.startswith("encoder.") for k in state):  # a masked autoencoder: keep its encoder
        state = encoder_state_dict(state)
    loaded = [k for k in own if k in state and tuple(state[k].shape) == tuple(own[k].shape)]
    if not loaded:
        raise CheckpointError(f"No weights in {path} fit the model (no tensor with a matching name and shape).")
    share = sum(own[k].numel() for k in loaded) / max(1, sum(t.numel() for t in own.values()))
    if share < 0.5:  # another architecture: a start from a few matching biases is a start from scratch
        raise CheckpointError(f"Only {len(loaded)} of the model's {len(own)} tensors ({share:.1%} of its weights) fit "
                              f"the weights in {path} by name and shape; --init starts from weights of the same "
                              "architecture (a new head may differ), so give a run of this model.")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "skipped": [k for k in own if k not in loaded]}


def _last_checkpoint(run_dir: Path) -> Path:
    infos = Run.open(run_dir).checkpoints()
    if not infos:
        raise CheckpointError(f"Run {run_dir} has no checkpoints to start from.")
    return infos[-1].path


def _create_model(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        return create_model(name, **kwargs)
    except LandscapeError:
        raise
    except (RuntimeError, TypeError, AssertionError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"Model {name} could not be built with {kwargs} ({reason}).") from None


def _timm_call(fn, *args, **kwargs):
    """A timm factory call whose refusal of a name becomes a one-sentence config error."""
    try:
        return fn(*args, **kwargs)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError, ImportError) as e:
        # IndexError: Adan's three betas given two; ImportError: an optimizer of a package not installed
        what = "optimizer" if "optim" in fn.__name__ else "schedule"
        reason = str(e).strip() or e.__class__.__name__
        if isinstance(e, IndexError) and kwargs.get("betas") is not None:
            reason = "it takes another number of betas than the two of optim.betas; leave optim.betas out"
        raise ConfigError(f"timm refused the {what} settings {kwargs.get('opt') or kwargs.get('sched')!r} "
                          f"({reason}).") from None


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp fp16 needs a CUDA device; use amp bf16 or off on the CPU.")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def _divergence_message(loss: float, grad_norm: float, step: int, epoch: int, saved: dict[int, Path],
                        run_dir: Path | None = None) -> str:
    what = f"the training loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
    last = _kept_checkpoints(saved)
    where = f" in {run_dir}" if run_dir is not None else ""
    return (f"Training diverged at step {step} (epoch {epoch}){where}: {what}; {last}; "
            "lower optim.lr or set optim.grad_clip and train again.")


def create_run(run: Run, config: TrainConfig, *, overwrite: bool, data_dir=None) -> None:
    """The run directory with its config.yaml and data.json (what it is trained on, checked by its analyses)."""
    from landscape.data import data_record

    created = Run.create(run.root, overwrite=overwrite)
    created.save_config(config)
    created.save_data_record(data_record(config.data.name, data_dir=data_dir, **config.data.options))


def _kept_checkpoints(saved: dict[int, Path]) -> str:
    """What a diverged run keeps: its last checkpoint, called good only when its validation loss (recorded in its
    header) is finite, else the last one that is."""
    if not saved:
        return "no checkpoint had been written"

    def finite(path: Path) -> bool:
        try:
            value = read_checkpoint_info(path).metrics.get("val_loss")
        except LandscapeError:
            return False
        return value is None or (isinstance(value, (int, float)) and math.isfinite(value))

    steps = sorted(saved, reverse=True)
    last = saved[steps[0]]
    good = next((saved[s] for s in steps if finite(saved[s])), None)
    if good == last:
        return f"the last good checkpoint {last.name} is kept"
    if good is None:
        return f"every checkpoint kept already has a non-finite validation loss (the last is {last.name})"
    return (f"the checkpoints are kept, but {last.name} already has a non-finite validation loss: {good.name} is the "
            "last good one")


def _prepare_run_dir(run: Run, config: TrainConfig | None, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if config is not None:
            raise ConfigError("A resumed run uses the config saved in its directory; give no other config.")
        check_resumable_dir(run)
        for folder in (run.root, run.checkpoints_dir, run.state_dir, run.analysis_dir):
            remove_stale_temporaries(folder, recursive=folder == run.analysis_dir)  # interrupted writes
        return
    if config is None:
        raise ConfigError("A new run needs a config.")
    if run.root.exists() and not run.root.is_dir():
        raise LandscapeError(f"{run.root} exists and is not a directory.")
    if run.root.is_dir() and not looks_like_run(run.root):
        raise LandscapeError(f"{run.root} already holds files that are not a landscape run; choose another --out "
                             "folder.")
    if run.root.is_dir() and not overwrite and not is_empty_run(run.root):
        raise LandscapeError(
            f"Run directory {run.root} already exists; continue it with --resume or replace it with --overwrite.")


def check_resumable_dir(run: Run) -> None:
    """Refuse a run directory that ``--resume`` cannot continue (no run, no config, no saved state where one is
    needed), without writing anything."""
    if not run.root.exists():
        raise CheckpointError(f"Run directory {run.root} does not exist; there is nothing to resume.")
    if not run.config_path.exists():
        raise CheckpointError(f"{run.root} is not a run to resume (it has no config.yaml).")
    restart = any(run.checkpoints_dir.glob("*.safetensors")) and is_empty_run(run.root)  # killed before the
    # training state that follows its first checkpoint: trained again from the start, with its saved config
    if not run.state_path.exists() and not restart and is_empty_run(run.root, analyses=False) and \
            not is_empty_run(run.root) and any(run.checkpoints_dir.glob("*.safetensors")):  # empty but for
        # its analysis results
        # analysed since: a retraining (from --init weights that have moved on, on a GPU) may not give that
        # checkpoint's very weights again, and its results would then describe weights that no longer exist
        raise CheckpointError(
            f"{run.root} stopped before saving its first training state and was analysed since, so it cannot be "
            f"resumed: training it again may not reproduce the weights its analyses measured. Move "
            f"{run.analysis_dir} elsewhere to train it again from the start (the analyses stay there), or "
            "analyse its checkpoint as it is.")
    if not run.state_path.exists() and not restart:
        if any(run.checkpoints_dir.glob("*.safetensors")):
            raise CheckpointError(
                f"{run.root} cannot be resumed because its training state {run.state_path} is missing; nothing "
                "was changed, and its checkpoints can still be analysed or used with --init in a new run.")
        raise CheckpointError(
            f"{run.root} cannot be resumed because it stopped before saving any state; it holds no checkpoint, "
            "so start it again with the same train command (without --resume).")


def _remove_if_unused(root: Path, lock: RunLock) -> None:
    """Remove a run folder that holds nothing but its lock (a training that failed its checks), then unlock."""
    try:
        if lock.created and [p.name for p in root.iterdir()] == [lock.path.name]:
            lock.path.unlink()
            root.rmdir()
        elif lock.made_file and not (root / "config.yaml").exists():  # a folder of the user's: leave it as it was
            lock.path.unlink()
    except OSError:
        pass
    lock.release()


def run_hash(config: TrainConfig) -> str:
    """The hash that ties checkpoints and the training state to a run's settings (the extension record left out,
    so that a run's hash changes with its new total only)."""
    settings = to_dict(config)
    for key in ("extended_from", "extended_at"):
        settings.pop(key, None)
    if not settings.get("save_preconditioner"):
        settings.pop("save_preconditioner", None)
    return config_hash(settings)


def resumed_config(out: str | Path, extend_to: int | None = None, data_dir=None) -> TrainConfig:
    """The config ``landscape train --resume OUT [--extend-to N]`` would train with, after the checks the resume
    makes (the run, its saved state, the data it started on), read without taking the run's lock or writing
    anything (``--dry-run``): the saved config, or with ``extend_to`` the one the extension would record."""
    from landscape import data
    from landscape.data import check_data_record

    run = Run(out)
    check_resumable_dir(run)
    saved_config = validate(coerce_types(from_dict(TrainConfig, run.load_config())))
    saved = load_state(run.state_path) if run.state_path.exists() else None
    for split in ("train", "val"):
        check_data_record(run.load_data_record(), saved_config.data.name, split, where=str(run.root),
                          data_dir=data_dir, **saved_config.data.options)
    config = copy.deepcopy(saved_config)
    config.model.kwargs = resolve_model_kwargs(config, data.get_dataset_info(config.data.name, **config.data.options))
    if extend_to is not None:
        config = _extended_config(run, config, extend_to, saved)
    if saved is not None:
        _check_resumable(run, config, saved)
    return config if extend_to is not None else saved_config


def _extend(run: Run, config: TrainConfig, epochs: int, state: dict | None, dist) -> TrainConfig:
    """``config`` with its total raised to ``epochs`` and the extension recorded (:func:`_extended_config`), saved
    as the run's config."""
    extended = _extended_config(run, config, epochs, state)
    if extended is config:
        return config
    error = None
    if dist.is_main:
        try:
            run.save_config(extended)
        except LandscapeError as e:
            error = e
        except OSError as e:
            error = CheckpointError(f"Writing {run.config_path} failed ({e.strerror or e}); the run is unchanged.")
    distributed.broadcast_error(error, dist)
    return extended


def _extended_config(run: Run, config: TrainConfig, epochs: int, state: dict | None) -> TrainConfig:
    """``config`` with its total raised to ``epochs`` and the extension recorded (``config`` itself when this
    extension is already recorded).

    The saved state must belong to ``config`` or, when an earlier extension stopped before its first save, to the
    config before that extension (whose total then stays the one recorded in ``extended_from``)."""
    if epochs == config.epochs and config.extended_from is not None:
        return config  # this extension is already recorded (an interrupted one, say): continuing it is a resume
    if epochs <= config.epochs:
        raise ConfigError(f"--extend-to {epochs} must be more than the {config.epochs} epochs {run.root} is set to "
                          f"train, e.g. --extend-to {2 * config.epochs}.")
    previous = config.epochs
    if state is not None and state["config_hash"] != run_hash(config):
        if config.extended_from is None or state["config_hash"] != run_hash(
                dataclasses.replace(config, epochs=config.extended_from)):
            raise CheckpointError(f"{run.config_path} was changed after {run.state_path} was saved; "
                                  "a resumed run must keep its config (start a new run instead).")
        previous = config.extended_from
    extended = dataclasses.replace(config, epochs=epochs, extended_from=previous,
                                   extended_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:  # checked before the run's config is rewritten: a total no run can have would leave it unusable
        validate(extended)
    except ConfigError as e:
        raise ConfigError(f"--extend-to {epochs}: {str(e).removeprefix('The config is invalid: ')}") from None
    return extended


def _save_preconditioner(run: Run, checkpoint: Path, model, optimizer, step: int, chash: str) -> None:
    """Adam's second moment and the optimizer's hyperparameters beside the checkpoint just written
    (:mod:`landscape.analyses.stability`)."""
    from landscape.analyses.stability import optimizer_preconditioner, preconditioner_path, save_preconditioner

    path = preconditioner_path(run.root, checkpoint.stem)
    tensors, meta = optimizer_preconditioner(model, optimizer, updates=step)
    try:
        save_preconditioner(path, tensors, meta, checkpoint_step=step, config_hash=chash)
    except (OSError, WriteError) as e:
        raise CheckpointError(f"Writing {path} failed ({getattr(e, 'strerror', None) or e}); the checkpoint "
                              f"{checkpoint.name} itself is intact.") from None


def existing_checkpoints(run: Run, step: int) -> dict[int, Path]:
    """Checkpoints up to ``step`` on disk; later ones (written after the saved state) are removed."""
    saved = {}
    for info in run.checkpoints():
        if info.step > step:
            _remove_checkpoint(info.path)
        else:
            saved[info.step] = info.path
    return saved


class Stopwatch:
    """Wall-clock and CPU seconds of this process, summed per phase (train, eval, checkpoint, ...)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> float:
        """Charge the time since the previous lap to ``phase``; return its wall-clock seconds."""
        wall, cpu = time.perf_counter(), time.process_time()
        dt = wall - self._wall
        self.seconds[phase] = self.seconds.get(phase, 0.0) + dt
        self.seconds[phase + "_cpu"] = self.seconds.get(phase + "_cpu", 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu
        return dt
