"""The training loop: config, data, model, optimizer, loop, evaluation, checkpoint, in that order.

One function, :func:`train`, reads top to bottom. The ingredients are timm's: ``create_optimizer_v2``,
``create_scheduler_v2`` stepped after every update, ``Mixup`` with ``SoftTargetCrossEntropy``,
``LabelSmoothingCrossEntropy``, ``ModelEmaV3`` (once per shared tensor: :mod:`.ema`); data order and augmentation seeds come from
:mod:`landscape.trainers.batches`, checkpoint steps from :mod:`landscape.trainers.schedule`.

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from landscape.checkpoints import load_checkpoint, save_checkpoint
from landscape.config import TrainConfig, coerce_types, config_hash, from_dict, to_dict
from landscape.errors import CheckpointError, ConfigError, LandscapeError
from landscape.models import MaskedAutoencoder, MixtureOfSwiGLUExperts, create_model, encoder_state_dict, moe_aux_loss
from landscape.io import RunLock, WriteError, remove_stale_temporaries
from landscape.runs import Run, _is_empty_run
from landscape.trainers import distributed
from landscape.trainers.batches import TrainBatches, derive_seed, validation_batches
from landscape.trainers.recipes import validate
from landscape.trainers.schedule import checkpoint_steps, checkpoints_to_delete
from landscape.trainers.state import capture_rng, load_state, restore_rng, save_state

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
    error = None
    if dist.is_main:
        try:
            if not resume or run.root.is_dir():
                lock = held.enter_context(RunLock(run.root, create=not resume))
                held.callback(_remove_if_unused, run.root, lock)
            _prepare_run_dir(run, config, resume=resume, overwrite=overwrite)
        except LandscapeError as e:
            error = e
    distributed.broadcast_error(error, dist)
    config = validate(coerce_types(from_dict(TrainConfig, run.load_config()))) if resume else copy.deepcopy(config)
    state = load_state(run.state_path) if resume and run.state_path.exists() else None

    # -- data ------------------------------------------------------------------------------------------------
    train_data = TrainBatches(config, dist, data_dir=data_dir)
    val_data = validation_batches(config, dist, data_dir=data_dir, batch_size=max(256, train_data.micro_batch_size))
    updates_per_epoch = train_data.updates_per_epoch
    info = train_data.info

    # -- model -----------------------------------------------------------------------------------------------
    config.model.kwargs = resolve_model_kwargs(config, info)
    if extend_to is not None:
        config = _extend(run, config, extend_to, state, dist)
    chash = run_hash(config)
    torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
    model = _create_model(config.model.name, config.model.kwargs)
    mae = _check_task(config, model)
    # The mixture-of-experts layers of an mLiT leave a load-balancing loss after every forward.
    has_moe = any(isinstance(m, MixtureOfSwiGLUExperts) for m in model.modules())
    if config.init and state is None:
        load_init_weights(model, config.init)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    ema = None
    if config.ema.decay:
        from landscape.trainers.ema import ModelEma

        ema = ModelEma(model, decay=config.ema.decay, use_warmup=config.ema.warmup)
    net = torch.compile(model) if config.compile else model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

    # -- optimizer, schedule, loss -----------------------------------------------------------------------------
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    o = config.optim
    lr = o.lr * (config.batch_size / o.lr_base_batch if o.lr_base_batch else 1.0)
    extra = {k: v for k, v in (("betas", tuple(o.betas) if o.betas else None), ("eps", o.eps)) if v is not None}
    optimizer = _timm_call(create_optimizer_v2, model, opt=o.opt, lr=lr, weight_decay=o.weight_decay,
                           momentum=o.momentum, **extra)
    s = config.schedule
    scheduler, _ = _timm_call(create_scheduler_v2, optimizer, sched=s.sched, num_epochs=config.epochs,
                              warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr, min_lr=s.min_lr,
                              step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    a = config.augment
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        if train_data.micro_batch_size % 2:
            raise ConfigError(f"MixUp/CutMix pair the images of a batch, so the micro-batch of each process "
                              f"({train_data.micro_batch_size} images) must be even.")
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.switch_prob,
                      mode=a.mixup_mode, label_smoothing=a.label_smoothing, num_classes=info.num_classes)
        loss_fn = SoftTargetCrossEntropy()  # the mixed targets already carry the label smoothing
    elif a.label_smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=a.label_smoothing)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()
    amp_dtype = _amp_dtype(config.amp, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if not resume:  # only now that data and model are known to work, init weights, optimizer and
        # schedule are known to work, so a typo leaves nothing behind
        error = None
        if dist.is_main:
            try:
                Run.create(run.root, overwrite=overwrite).save_config(config)
            except LandscapeError as e:
                error = e
        distributed.broadcast_error(error, dist)

    # -- where to start: the beginning, or the position saved in state/last.pt ----------------------------------
    step, epoch, start_update, rows, elapsed = 0, 1, 0, [], 0.0
    if state is not None:
        # A state saved before the run's latest extension: the schedule is the new total's, not the saved one.
        rescheduled = config.extended_from is not None and state["config_hash"] == run_hash(
            dataclasses.replace(config, epochs=config.extended_from))
        if state["config_hash"] != chash and not rescheduled:
            raise CheckpointError(f"{run.config_path} was changed after {run.state_path} was saved; "
                                  "a resumed run must keep its config (start a new run instead).")
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and not rescheduled:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, start_update = state["step"], state["epoch"], state["next_update"]
        if scheduler is not None and rescheduled:
            scheduler.step_update(step)  # the rate of the next update under the schedule of the new total
        rows, elapsed = list(state["rows"]), float(state["elapsed"])
        rng = state["rng"]
        restore_rng(rng[dist.rank] if len(rng) == dist.world_size else rng[0])
    else:
        torch.manual_seed(derive_seed(config.seed, "train", dist.rank))
        np.random.seed(derive_seed(config.seed, "numpy", dist.rank) % 2**32)
        random.seed(derive_seed(config.seed, "python", dist.rank))
    schedule = set(checkpoint_steps(config.checkpoint.every, updates_per_epoch=updates_per_epoch,
                                    epochs=config.epochs))
    saved = _existing_checkpoints(run, step) if dist.is_main else {}
    for old in checkpoints_to_delete(config.checkpoint.keep, sorted(saved)):  # a kill may have come before it
        saved.pop(old).unlink(missing_ok=True)
    clock = _Stopwatch()
    t_resumed = time.perf_counter()
    # Per-update loss, gradient norm and MoE loss of the current metrics row, kept on the device: reading them
    # every update would make the host wait for the accelerator. They are checked every CHECK_EVERY updates
    # and before every evaluation, so a diverged run stops before its weights reach a checkpoint.
    row_losses, row_norms, row_aux = [], [], []
    row_first_step = step + 1
    images_in_row, train_time_in_row = 0, 0.0

    def check_finite() -> None:
        if not row_losses:
            return
        losses, norms = torch.stack(row_losses), torch.stack(row_norms)
        bad = ~torch.isfinite(losses)
        if amp_dtype != torch.float16:  # fp16 skips steps with overflowing gradients by design
            bad |= ~torch.isfinite(norms)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise LandscapeError(_divergence_message(float(losses[i]), float(norms[i]), row_first_step + i,
                                                     epoch, saved))

    def finish_row(label: int, epoch_end: bool) -> dict[str, Any]:
        """Evaluate, append the metrics row, write the checkpoint if one is due, then the training state.

        ``label`` is the epoch the row belongs to (0 for the initial weights); the state records where to go
        on: the next epoch after an epoch's last update, else the next update of this epoch.
        """
        nonlocal row_losses, row_norms, row_aux, row_first_step, images_in_row, train_time_in_row
        check_finite()
        local = [float(torch.stack(v).sum()) if v else 0.0 for v in (row_losses, row_norms, row_aux)]
        loss_sum, norm_sum, aux_sum, n = distributed.all_reduce_sum([*local, len(row_losses)], dist, device)
        row: dict[str, Any] = {
            "epoch": label, "step": step, "images_seen": step * config.batch_size,
            "train_loss": loss_sum / n if n else None,
            **_prefixed("", evaluate(model, val_data, device, autocast, dist, mae=mae)),
            **(_prefixed("ema_", evaluate(ema.module, val_data, device, autocast, dist, mae=mae)) if ema is not None
               else {"ema_val_loss": None, "ema_val_top1": None, "ema_val_top5": None}),
            "lr": last_lr,
            "grad_norm": norm_sum / n if n else None,
            "wall_time": elapsed + (time.perf_counter() - t_resumed),
            "images_per_s": images_in_row / train_time_in_row if train_time_in_row > 0 else None,
            "schedule_epochs": config.epochs,
        }
        if has_moe:
            row["moe_aux_loss"] = aux_sum / n if n else None
        rows.append(row)
        clock.lap("eval")
        rng = distributed.gather(capture_rng(), dist)
        error = None
        if dist.is_main:
            try:
                _write_outputs(run, config, chash, model, ema, optimizer, scheduler, scaler, rows, row, rng,
                               step=step, epoch=label, epoch_end=epoch_end, checkpoint=step in schedule or step == 0,
                               resume_at=(label + 1, 0) if epoch_end else (label, u + 1), saved=saved)
            except LandscapeError as e:
                error = e
        distributed.broadcast_error(error, dist)
        clock.lap("checkpoint")
        if on_row is not None and dist.is_main:
            on_row(row)
        row_losses, row_norms, row_aux = [], [], []
        row_first_step = step + 1
        images_in_row, train_time_in_row = 0, 0.0
        return row

    last_lr = optimizer.param_groups[0]["lr"]
    u = -1
    if config.checkpoint.initial and step == 0:
        finish_row(0, epoch_end=True)

    # -- the loop --------------------------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(epoch, config.epochs + 1):
        net.train()
        bar = tqdm(total=updates_per_epoch, initial=start_update, desc=f"epoch {epoch}/{config.epochs}",
                   file=sys.stderr, leave=False, dynamic_ncols=True, disable=None if progress and dist.is_main else True)
        correct = torch.zeros((), device=device)  # training accuracy, for the progress bar only
        clock.lap("train")
        for u, micro_batches in enumerate(train_data.epoch(epoch, start_update), start=start_update):
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
            scaler.unscale_(optimizer)
            if o.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            last_lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if scheduler is not None:
                scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            row_losses.append(update_loss)
            row_norms.append(grad_norm.detach().float())
            if has_moe:
                row_aux.append(update_aux)
            if len(row_losses) % CHECK_EVERY == 0:
                check_finite()
            train_time_in_row += clock.lap("train")
            images_in_row += config.batch_size
            if on_update is not None and dist.is_main:
                on_update(step)
            if not bar.disable and (u % 10 == 0 or u == updates_per_epoch - 1):
                seen = (u - start_update + 1) * train_data.micro_batch_size * train_data.accum_steps
                bar.set_postfix(loss=f"{float(torch.stack(row_losses[-10:]).mean()):.4f}",
                                acc=f"{100 * float(correct) / seen:.1f}",
                                img_s=f"{images_in_row / max(train_time_in_row, 1e-9):.0f}", refresh=False)
            bar.update(1)
            epoch_end = u == updates_per_epoch - 1
            if epoch_end or step in schedule:
                bar.clear()
                finish_row(epoch, epoch_end)
        bar.close()
        start_update = 0

    clock.lap("train")
    timings = {"total": time.perf_counter() - t_start, **clock.seconds}
    checkpoints = [saved[s] for s in sorted(saved)]
    return TrainResult(run=run, rows=rows, checkpoints=checkpoints, timings=timings)


# -- the pieces the loop calls ------------------------------------------------------------------------------------
class _Stopwatch:
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
    except (AssertionError, ValueError, KeyError) as e:
        what = "optimizer" if "optim" in fn.__name__ else "schedule"
        raise ConfigError(f"timm refused the {what} settings {kwargs.get('opt') or kwargs.get('sched')!r} ({e}).") from None


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp fp16 needs a CUDA device; use amp bf16 or off on the CPU.")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def _prefixed(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {prefix + k: v for k, v in metrics.items()}


def _divergence_message(loss: float, grad_norm: float, step: int, epoch: int, saved: dict[int, Path]) -> str:
    what = f"the training loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
    last = f"the last good checkpoint {saved[max(saved)].name} is kept" if saved else "no checkpoint had been written"
    return (f"Training diverged at step {step} (epoch {epoch}): {what}; {last}; "
            "lower optim.lr or set optim.grad_clip and train again.")


def _prepare_run_dir(run: Run, config: TrainConfig | None, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if config is not None:
            raise ConfigError("A resumed run uses the config saved in its directory; give no other config.")
        if not run.config_path.exists():
            raise CheckpointError(f"{run.root} is not a run to resume (it has no config.yaml).")
        if not run.state_path.exists():
            if any(run.checkpoints_dir.glob("*.safetensors")):
                raise CheckpointError(
                    f"{run.root} cannot be resumed because its training state {run.state_path} is missing; nothing "
                    "was changed, and its checkpoints can still be analysed or used with --init in a new run.")
            raise CheckpointError(
                f"{run.root} cannot be resumed because it stopped before saving any state; it holds no checkpoint, "
                "so start it again with the same train command (without --resume).")
        for folder in (run.root, run.checkpoints_dir, run.state_dir, run.analysis_dir):
            remove_stale_temporaries(folder, recursive=folder == run.analysis_dir)  # interrupted writes
        return
    if config is None:
        raise ConfigError("A new run needs a config.")
    if run.root.exists() and not run.root.is_dir():
        raise LandscapeError(f"{run.root} exists and is not a directory.")
    if run.root.is_dir() and not overwrite and not _is_empty_run(run.root):
        raise LandscapeError(
            f"Run directory {run.root} already exists; continue it with --resume or replace it with --overwrite.")


def _remove_if_unused(root: Path, lock: RunLock) -> None:
    """Remove a run folder that holds nothing but its lock (a training that failed its checks), then unlock."""
    try:
        if lock.created and [p.name for p in root.iterdir()] == [lock.path.name]:
            lock.path.unlink()
            root.rmdir()
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


def _extend(run: Run, config: TrainConfig, epochs: int, state: dict | None, dist) -> TrainConfig:
    """``config`` with its total raised to ``epochs`` and the extension recorded, saved as the run's config.

    The saved state must belong to ``config`` or, when an earlier extension stopped before its first save, to the
    config before that extension (whose total then stays the one recorded in ``extended_from``)."""
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


def _save_preconditioner(run: Run, checkpoint: Path, model, optimizer, step: int, chash: str) -> None:
    """Adam's second moment and the optimizer's hyperparameters beside the checkpoint just written
    (:mod:`landscape.analyses.stability`)."""
    from landscape.analyses.stability import optimizer_preconditioner, preconditioner_path, save_preconditioner

    path = preconditioner_path(run.root, checkpoint.stem)
    tensors, meta = optimizer_preconditioner(model, optimizer)
    try:
        save_preconditioner(path, tensors, meta, checkpoint_step=step, config_hash=chash)
    except (OSError, WriteError) as e:
        raise CheckpointError(f"Writing {path} failed ({getattr(e, 'strerror', None) or e}); the checkpoint "
                              f"{checkpoint.name} itself is intact.") from None


def _existing_checkpoints(run: Run, step: int) -> dict[int, Path]:
    """Checkpoints up to ``step`` on disk; later ones (written after the saved state) are removed."""
    saved = {}
    for info in run.checkpoints():
        if info.step > step:
            info.path.unlink(missing_ok=True)
        else:
            saved[info.step] = info.path
    return saved


def _write_outputs(run, config, chash, model, ema, optimizer, scheduler, scaler, rows, row, rng, *, step, epoch,
                   epoch_end, checkpoint, resume_at, saved) -> None:
    """metrics.csv, then the checkpoint (if due), then state/last.pt, then the keep policy: each atomic."""
    run.write_metrics(rows)
    if checkpoint:
        path = run.checkpoint_path(epoch=epoch) if epoch_end else run.checkpoint_path(step=step)
        try:
            save_checkpoint(
                path, model.state_dict(), model=config.model.name, model_kwargs=config.model.kwargs,
                epoch=epoch if epoch_end else None, step=step, metrics=row, config_hash=chash,
                ema_state_dict=ema.module.state_dict() if ema is not None else None,
            )
        except (OSError, WriteError) as e:
            previous = f"the previous checkpoint {saved[max(saved)].name} is intact" if saved else "no checkpoint was lost"
            raise CheckpointError(f"Writing {path} failed ({e.strerror or e}); {previous}.") from None
        saved[step] = path
        if config.save_preconditioner:
            _save_preconditioner(run, path, model, optimizer, step, chash)
    state = {
        "step": step, "epoch": resume_at[0], "next_update": resume_at[1], "rows": rows, "elapsed": row["wall_time"],
        "config_hash": chash, "model": model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng,
    }
    try:
        save_state(run.state_path, state)
    except OSError as e:
        raise CheckpointError(f"Writing {run.state_path} failed ({e.strerror or e}); the previous state is intact.") from None
    for old in checkpoints_to_delete(config.checkpoint.keep, sorted(saved)):
        saved.pop(old).unlink(missing_ok=True)
