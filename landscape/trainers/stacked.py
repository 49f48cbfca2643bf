"""Several seeds of one run trained together as one batched model, each still an ordinary run directory.

Small models use an accelerator badly one at a time: a step of a 200k-parameter ViT is a few hundred tiny kernels.
:func:`train_stacked` trains the runs of ``configs`` (the same config but for ``seed``) as one model whose every
parameter has a leading run axis ``K``: the per-run modules are stacked with ``torch.func.stack_module_state``
and called through ``torch.func.functional_call`` under ``torch.func.vmap``, so one kernel serves all ``K`` runs.
The training images sit on the device as ``uint8`` and are gathered, normalised and augmented there.

Everything a run's numbers depend on stays per run, equal to what :func:`landscape.trainers.loop.train` does:

- initial weights drawn after ``torch.manual_seed(seed)``; data order ``epoch_order(seed, epoch)``; shifts and
  flips drawn from ``derive_seed(seed, "batch", epoch, update, 0, 0)`` (the same draws, applied on the device);
- the loss is the sum of the runs' losses, whose gradient with respect to run ``k``'s slice is run ``k``'s gradient;
- gradient norms and clipping per run (global norm over run ``k``'s slices); the optimizer is timm's, built on run
  0's module so its parameter groups (weight-decay rules) are the ordinary ones, then pointed at the stacked
  tensors: elementwise optimizers (AdamW, Adam, SGD) update every slice as they would update that run alone;
- one learning-rate schedule (it depends on the step only), EMA with the same decay rule, per run;
- models that draw random numbers (dropout, drop-path) or route tokens with data-dependent shapes (mixture of
  experts, which ``vmap`` cannot batch) run one ``functional_call`` per run in a loop, each under its own
  generator state, and share the data pipeline, the optimizer step and the EMA update.

Each run gets its own ``config.yaml``, ``metrics.csv``, checkpoints (same metadata and config hash) and
``state/last.pt`` in the ordinary format, so a stacked run resumes alone with ``landscape train --resume`` or
stacked with ``train_stacked(..., resume=True)``, and ends with the weights it would have had trained alone (to
float tolerance: batched kernels sum in another order). ``images_per_s`` is per run (each run's images over the
shared wall time); ``wall_time`` is the shared clock.

Not stacked (refused with a sentence): MixUp/CutMix and random erasing (they draw from the global generators
inside the batch), image-by-image augmentation, gradient accumulation, fp16, ``torch.compile``, MAE pre-training,
saving the preconditioner, optimizers whose update is not elementwise (LAMB, LARS, ...), several processes.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.config import TrainConfig, coerce_types, from_dict, to_dict
from landscape.errors import CheckpointError, ConfigError
from landscape.models import MaskedAutoencoder, MixtureOfSwiGLUExperts, create_model, moe_aux_loss
from landscape.progress import progress_bar
from landscape.runs import Run
from landscape.trainers import distributed
from landscape.trainers.batches import BatchAugment, derive_seed, epoch_order, fixed_subset, validation_batches
from landscape.trainers.ema import ModelEma
from landscape.trainers.loop import (
    Stopwatch,
    create_run,
    TrainResult,
    after_update,
    apply_keep_policy,
    build_loss,
    build_optimizer,
    build_schedule,
    check_finite,
    claim_run_dir,
    existing_checkpoints,
    load_init_weights,
    metrics_row,
    resolve_model_kwargs,
    run_hash,
    write_outputs,
)
from landscape.trainers.recipes import validate
from landscape.trainers.schedule import checkpoint_steps
from landscape.trainers.state import RowTally, TrainState, capture_rng, load_state, restore_rng

STACKABLE_OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nesterov")
CHECK_EVERY = 32  # updates between checks of the losses for NaN/inf (each check waits for the device)


def train_stacked(
    configs: Sequence[TrainConfig] | None,
    outs: Sequence[str | Path],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    data_dir=None,
    progress: bool = True,
    strategy: str = "auto",
) -> list[TrainResult]:
    """Train the runs ``configs[k] -> outs[k]`` together; return each run's :class:`TrainResult`.

    ``resume=True`` continues the runs in ``outs`` from their ``state/last.pt`` (``configs`` must be None), which
    must all be at the same step. ``strategy``: ``vmap`` (one batched call), ``loop`` (one call per run) or ``auto``
    (``vmap`` unless the model draws random numbers or routes tokens to experts).
    """
    dist, device = distributed.setup(device)
    held = contextlib.ExitStack()
    try:
        if dist.enabled:
            raise ConfigError("Stacked training runs in one process; start it without torchrun.")
        return _train_stacked(configs, [Path(o) for o in outs], device, resume=resume, overwrite=overwrite,
                              data_dir=data_dir, progress=progress, strategy=strategy, held=held)
    finally:
        held.close()
        distributed.teardown(dist)


def check_stackable(configs: Sequence[TrainConfig]) -> None:
    """Refuse runs that cannot be trained as one batched model, with one sentence naming the reason."""
    if not configs:
        raise ConfigError("Stacked training needs at least one run.")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"Stacked runs need distinct seeds, got {seeds}.")
    first = {k: v for k, v in to_dict(configs[0]).items() if k != "seed"}
    for c in configs[1:]:
        other = {k: v for k, v in to_dict(c).items() if k != "seed"}
        if other != first:
            differ = sorted(k for k in first if first[k] != other.get(k))
            raise ConfigError(f"Stacked runs may differ in their seed only; these differ in {', '.join(differ)}.")
    c = configs[0]
    a = c.augment
    refusals = [
        (c.task != "classify", f"task {c.task}"),
        (a.mixup > 0 or a.cutmix > 0, "MixUp/CutMix"),
        (a.re_prob > 0, "random erasing"),
        (a.crop == "rrc" or bool(a.auto_augment), "image-by-image augmentation (rrc, auto_augment)"),
        (c.optim.accum_steps != 1, "gradient accumulation"),
        (c.amp == "fp16", "amp fp16"),
        (c.compile, "compile"),
        (c.save_preconditioner, "save_preconditioner"),
        (c.optim.opt.lower() not in STACKABLE_OPTIMIZERS, f"optimizer {c.optim.opt}"),
    ]
    for refused, what in refusals:
        if refused:
            raise ConfigError(f"Stacked training does not support {what}; it supports the optimizers "
                              f"{', '.join(STACKABLE_OPTIMIZERS)} with shift/flip augmentation; train these runs "
                              "one at a time instead.")
    from landscape import data

    if not data.get_dataset_info(c.data.name, **c.data.options).in_memory:
        raise ConfigError(f"Stacked training keeps the dataset in memory; {c.data.name} is read file by file.")


class DeviceBatches:
    """The training images of all stacked runs: ``uint8`` on the device, normalised and augmented there.

    Update ``u`` of epoch ``e`` gives ``x (K, B, C, S, S)`` and ``y (K, B)``: run ``k`` sees positions
    ``[u B, (u + 1) B)`` of ``epoch_order(seed_k, e)``, shifted and flipped with the draws of
    :class:`~landscape.trainers.batches.TrainBatches` (``derive_seed(seed_k, "batch", e, u, 0, 0)``)."""

    def __init__(self, config: TrainConfig, seeds: Sequence[int], device: torch.device, *, data_dir=None):
        from landscape import data

        self.seeds, self.device = list(seeds), device
        self.name, self.img_size, self.options = config.data.name, config.data.img_size, config.data.options
        self.batch_size, self.repeats = config.batch_size, config.augment.repeated_aug
        self.info = info = data.get_dataset_info(self.name, **self.options)
        images, labels = data.load_arrays(self.name, "train", data_dir=data_dir, **self.options)
        keep = fixed_subset(len(labels), config.data.train_size)
        self.images = torch.from_numpy(np.ascontiguousarray(images[keep])).to(device)
        self.labels = torch.from_numpy(labels[keep]).to(device)
        self.num_samples = len(keep)
        self.updates_per_epoch = self.num_samples // self.batch_size
        if self.updates_per_epoch < 1:
            raise ConfigError(f"batch_size {self.batch_size} is larger than the training set ({self.num_samples} images).")
        aug = config.augment
        hflip = aug.hflip if aug.hflip is not None else (0.5 if info.hflip else 0.0)
        self.augment = BatchAugment(shift=aug.crop_padding if aug.crop == "pad" else 0, hflip=hflip,
                                    fill=-torch.tensor(info.mean) / torch.tensor(info.std))

    def epoch(self, epoch: int, start: int = 0):
        from landscape import data

        orders = torch.stack([epoch_order(self.num_samples, seed=s, epoch=epoch, repeats=self.repeats)
                              for s in self.seeds]).to(self.device)
        k, b = len(self.seeds), self.batch_size
        for u in range(start, self.updates_per_epoch):
            index = orders[:, u * b:(u + 1) * b]
            x = data.to_eval_tensor(self.images[index.reshape(-1)], self.name, self.img_size, **self.options)
            if self.augment.active:
                x = self._augmented(x, epoch, u)
            yield x.view(k, b, *x.shape[1:]), self.labels[index]

    def _augmented(self, x: torch.Tensor, epoch: int, update: int) -> torch.Tensor:
        """:class:`BatchAugment` for every run at once: its random draws, in its order, on the CPU; the pixels here."""
        a, b = self.augment, self.batch_size
        dy, dx, flip = [], [], []
        for seed in self.seeds:
            g = torch.Generator().manual_seed(derive_seed(seed, "batch", epoch, update, 0, 0))
            if a.shift > 0:
                dy.append(torch.randint(0, 2 * a.shift + 1, (b,), generator=g))
                dx.append(torch.randint(0, 2 * a.shift + 1, (b,), generator=g))
            if a.hflip > 0:
                flip.append(torch.rand(b, generator=g) < a.hflip)
        if a.shift > 0:
            x = _shift(x, torch.cat(dy).to(x.device), torch.cat(dx).to(x.device), a.shift, a.fill)
        if a.hflip > 0:
            x = torch.where(torch.cat(flip).to(x.device)[:, None, None, None], x.flip(-1), x)
        return x


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int, fill: torch.Tensor) -> torch.Tensor:
    """:func:`~landscape.trainers.batches.random_shift` with the offsets given (on ``x``'s device)."""
    n, c, h, w = x.shape
    padded = fill.view(1, c, 1, 1).to(x).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad:pad + h, pad:pad + w] = x
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


class StackedModel:
    """``K`` copies of one architecture as stacked tensors (leading axis = run), called as one model.

    ``params``/``buffers`` map the module's (de-duplicated: a shared tensor appears once) names to ``(K, ...)``
    tensors; ``ema`` holds the EMA weights the same way. ``modules[k]`` is run ``k``'s module, used to write its
    state dicts (with every alias of a shared tensor) and, for ``k = 0``, as the template every call goes through.
    """

    def __init__(self, modules: list[torch.nn.Module], emas: list | None, strategy: str):
        self.modules, self.emas = modules, emas
        self.template = modules[0]
        self.params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in modules]).requires_grad_(p.requires_grad)
                       for n, p in self.template.named_parameters()}
        self.buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in modules]) for n, _ in self.template.named_buffers()}
        self.ema = None
        if emas:
            self.ema = {n: torch.stack([dict([*e.module.named_parameters(), *e.module.named_buffers()])[n].detach()
                                        for e in emas]) for n in [*self.params, *self.buffers]}
        self.has_moe = any(isinstance(m, MixtureOfSwiGLUExperts) for m in self.template.modules())
        self.draws_random = _draws_random_numbers(self.template)
        if strategy == "auto":
            strategy = "loop" if self.has_moe or self.draws_random else "vmap"
        if strategy not in ("vmap", "loop"):
            raise ConfigError(f"Unknown stacking strategy {strategy!r}; accepted are auto, vmap and loop.")
        if strategy == "vmap" and (self.has_moe or self.draws_random):
            raise ConfigError("This model draws random numbers or routes tokens to experts, which one batched call "
                              "cannot do per run; use the loop strategy.")
        self.strategy = strategy
        self.k = len(modules)

    def __call__(self, x: torch.Tensor, rngs: list | None = None, *, weights: dict | None = None,
                 shared_input: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(K, B, classes)`` of ``x`` (``(K, B, ...)``, or ``(B, ...)`` for every run when
        ``shared_input``) and the runs' load-balancing losses ``(K,)`` (mixture of experts, else None).
        ``weights`` replaces ``params`` and ``buffers`` (the EMA weights); ``rngs`` are the runs' generator
        states, swapped in around each run's call and updated, when the model draws random numbers."""
        params, buffers = (self.params, self.buffers) if weights is None else self._split(weights)
        if self.strategy == "vmap":
            def call(p, b, xk):
                return self._call({**p, **b}, xk)

            with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no batching rule: vmap would loop over runs
                return torch.func.vmap(call, in_dims=(0, 0, None if shared_input else 0), randomness="error")(
                    params, buffers, x), None
        outs, aux = [], []
        for k in range(self.k):
            if rngs is not None and self.draws_random and self.template.training:
                restore_rng(rngs[k])
            out = self._call({n: v[k] for n, v in [*params.items(), *buffers.items()]}, x if shared_input else x[k])
            if rngs is not None and self.draws_random and self.template.training:
                rngs[k] = capture_rng()
            outs.append(out)
            if self.has_moe:
                aux.append(moe_aux_loss(self.template))
        return torch.stack(outs), torch.stack(aux) if self.has_moe else None

    def _call(self, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # A module shared by several blocks (GroupedMLP) is swapped once, under its first name: swapping it under
        # every name (functional_call's tying) restores the later names to the swapped-in tensors afterwards.
        return torch.func.functional_call(self.template, tensors, (x,), tie_weights=False)

    def _split(self, weights: dict) -> tuple[dict, dict]:
        return ({n: weights[n] for n in self.params}, {n: weights[n] for n in self.buffers})

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.params.values() if p.requires_grad]

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """``ema <- decay ema + (1 - decay) w`` for every floating tensor, a copy for the rest (:mod:`.ema`)."""
        current = {**self.params, **self.buffers}
        floats = [n for n, v in self.ema.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.ema[n] for n in floats], [current[n].detach() for n in floats], 1.0 - decay)
        for n, v in self.ema.items():
            if not v.is_floating_point():
                v.copy_(current[n])

    @torch.no_grad()
    def run_modules(self, k: int) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """Run ``k``'s module (and EMA module) holding its current weights."""
        module = self.modules[k]
        for n, t in [*module.named_parameters(), *module.named_buffers()]:
            t.copy_(self.params[n][k] if n in self.params else self.buffers[n][k])
        ema = None
        if self.ema is not None:
            ema = self.emas[k].module
            for n, t in [*ema.named_parameters(), *ema.named_buffers()]:
                t.copy_(self.ema[n][k])
        return module, ema


def _draws_random_numbers(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward of ``model`` draws from the global generators (dropout, drop-path)."""
    for m in model.modules():
        p = getattr(m, "p", None) if isinstance(m, torch.nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if isinstance(p, (int, float)) and p > 0:
            return True
    return False


def per_run_grad_norm(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Each run's global gradient norm ``(K,)`` before clipping; with ``max_norm``, every run's slices scaled by
    ``min(1, max_norm / (norm + 1e-6))`` as :func:`torch.nn.utils.clip_grad_norm_` scales one run's."""
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads])
    total = torch.linalg.vector_norm(norms, dim=0)
    if max_norm is not None:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.ndim - 1)).to(g.dtype))
    return total


@torch.no_grad()
def evaluate_stacked(model: StackedModel, batches, autocast, *, ema: bool = False) -> list[dict[str, Any]]:
    """:func:`landscape.trainers.loop.evaluate` of every run at once (raw or EMA weights)."""
    was_training = model.template.training
    model.template.eval()
    k, device = model.k, next(iter(model.params.values())).device
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(2, k, dtype=torch.float64, device=device)
    count, num_classes = 0, None
    for x, y in batches:
        with autocast():
            logits, _ = model(x, weights=model.ema if ema else None, shared_input=True)
        logits = logits.float()
        num_classes = logits.shape[-1]
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1).sum(1)
        hit = logits.topk(min(5, num_classes), dim=-1).indices == y[None, :, None]
        correct[0] += hit[..., 0].sum(1)
        correct[1] += hit.any(dim=-1).sum(1)
        count += len(y)
    model.template.train(was_training)
    loss, top1, top5 = loss_sum.tolist(), *correct.tolist()
    return [{"val_loss": loss[i] / count, "val_top1": 100 * top1[i] / count,
             "val_top5": 100 * top5[i] / count if (num_classes or 0) >= 5 else None} for i in range(k)]


def _train_stacked(configs, outs: list[Path], device: torch.device, *, resume, overwrite, data_dir, progress, strategy,
                   held: contextlib.ExitStack) -> list[TrainResult]:
    t_start = time.perf_counter()
    # -- the run directories: each locked before it is checked (as a run trained alone) ------------------------
    runs = [Run(o) for o in outs]
    if len({r.root.resolve() for r in runs}) != len(runs):
        raise ConfigError("Stacked runs need one run directory each; a folder is given twice.")
    if (configs is None and not resume) or (configs is not None and len(configs) != len(outs)):
        raise ConfigError("Stacked training needs one config per run directory.")
    for k, run in enumerate(runs):
        claim_run_dir(run, None if configs is None else configs[k], held, resume=resume, overwrite=overwrite)
    if resume:
        configs = [validate(coerce_types(from_dict(TrainConfig, r.load_config()))) for r in runs]
    configs = [copy.deepcopy(c) for c in configs]
    check_stackable(configs)
    saved = [load_state(r.state_path) for r in runs] if resume else None
    if saved is not None:
        where = {(s["step"], s["epoch"], s["next_update"]) for s in saved}
        if len(where) > 1:
            steps = ", ".join(f"{r.root.name} at step {s['step']}" for r, s in zip(runs, saved))
            raise CheckpointError(f"Stacked runs resume together only from the same step ({steps}); resume each "
                                  "one alone with landscape train --resume.")
    config = configs[0]

    # -- data -------------------------------------------------------------------------------------------------
    batches = DeviceBatches(config, [c.seed for c in configs], device, data_dir=data_dir)
    val = [(x.to(device), y.to(device)) for x, y in validation_batches(
        config, distributed.Distributed(), data_dir=data_dir, batch_size=max(256, config.batch_size))]
    updates_per_epoch = batches.updates_per_epoch

    # -- models: each run's own initialisation, then stacked ------------------------------------------------------
    modules, emas = [], [] if config.ema.decay else None
    for i, c in enumerate(configs):
        c.model.kwargs = resolve_model_kwargs(c, batches.info)
        torch.manual_seed(c.seed)  # the initial weights depend on the seed alone
        module = create_model(c.model.name, **c.model.kwargs)
        if isinstance(module, MaskedAutoencoder):
            raise ConfigError(f"{c.model.name} is a masked autoencoder; stacked training classifies.")
        if c.init and saved is None:
            load_init_weights(module, c.init)
        module.to(device)
        if saved is not None:
            module.load_state_dict(saved[i]["model"])
        if emas is not None:
            emas.append(ModelEma(module, decay=c.ema.decay, use_warmup=c.ema.warmup))
            if saved is not None:
                emas[-1].module.load_state_dict(saved[i]["ema"])
        modules.append(module)
    model = StackedModel(modules, emas, strategy)
    if saved is not None:
        for run, state, c in zip(runs, saved, configs):
            if state["config_hash"] != run_hash(c):
                raise CheckpointError(f"{run.config_path} was changed after {run.state_path} was saved; "
                                      "a resumed run must keep its config (start a new run instead).")

    # -- optimizer (run 0's parameter groups, pointed at the stacked tensors), schedule, loss, precision -----------
    optimizer = build_optimizer(config, modules[0])
    name_of = {id(p): n for n, p in modules[0].named_parameters()}
    for group in optimizer.param_groups:
        group["params"] = [model.params[name_of[id(p)]] for p in group["params"]]
    scheduler = build_schedule(config, optimizer, updates_per_epoch)
    _, loss_fn = build_loss(config, batches.info.num_classes, config.batch_size)  # MixUp/CutMix are refused
    amp_dtype = torch.bfloat16 if config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda") else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # saved for the state file's format; fp16 is refused
    if not resume:
        for run, c in zip(runs, configs):
            create_run(run, c, overwrite=overwrite, data_dir=data_dir)

    # -- where to start: each run's TrainState (its module holds its weights whenever they are written) -----------
    states = [TrainState(modules[k], RunOptimizer(optimizer, model, k), scheduler, scaler,
                         emas[k] if emas is not None else None) for k in range(len(runs))]
    if saved is not None:
        optimizer.load_state_dict(stack_optimizer_states([s["optimizer"] for s in saved], optimizer))
        if scheduler is not None:
            scheduler.load_state_dict(saved[0]["scheduler"])
        for state, s in zip(states, saved):
            state.step, state.epoch, state.next_update = s["step"], s["epoch"], s["next_update"]
            state.rows, state.elapsed = list(s["rows"]), float(s["elapsed"])
        rngs = [s["rng"][0] for s in saved]
    else:
        rngs = []
        for c in configs:
            torch.manual_seed(derive_seed(c.seed, "train", 0))
            np.random.seed(derive_seed(c.seed, "numpy", 0) % 2**32)
            random.seed(derive_seed(c.seed, "python", 0))
            rngs.append(capture_rng())
    schedule = set(checkpoint_steps(config.checkpoint.every, updates_per_epoch=updates_per_epoch, epochs=config.epochs))
    for run, state in zip(runs, states):
        state.checkpoints = existing_checkpoints(run, state.step)
        apply_keep_policy(config, state.checkpoints)  # a kill may have come before it
    at = states[0]  # every run stands at the same position
    clock = Stopwatch()
    t_resumed = time.perf_counter()
    tallies = [RowTally(at.step + 1, lr=optimizer.param_groups[0]["lr"], aux=[] if model.has_moe else None)
               for _ in runs]
    trainable = model.trainable()
    row_due = config.checkpoint.initial and at.step == 0  # row 0 and a checkpoint of the initial weights
    bar = None

    # -- the loop: that of landscape.trainers.loop, every run's row and outputs written by its writer ---------------
    while True:
        if row_due:
            label = at.epoch - 1 if at.next_update == 0 else at.epoch  # after an epoch's last update
            for run, state, tally in zip(runs, states, tallies):
                check_finite(tally, label, state.checkpoints, run_dir=run.root)
            raw = evaluate_stacked(model, val, autocast)
            ema = evaluate_stacked(model, val, autocast, ema=True) if model.ema is not None else None
            wall = time.perf_counter() - t_resumed
            clock.lap("eval")
            checkpoint = at.step in schedule or at.step == 0
            for k, (run, state, tally) in enumerate(zip(runs, states, tallies)):
                state.rows.append(metrics_row(configs[k], epoch=label, step=state.step, train=tally.summary(
                    distributed.Distributed(), device), val=raw[k], ema_val=ema[k] if ema is not None else None,
                    wall_time=state.elapsed + wall))
                model.run_modules(k)  # run k's weights into its module, which the writer saves
                write_outputs(run, configs[k], state, [rngs[k]], checkpoint=checkpoint)
            clock.lap("checkpoint")
            tallies = [RowTally(at.step + 1, lr=tallies[0].lr, aux=[] if model.has_moe else None) for _ in runs]
        if at.epoch > config.epochs:
            break

        if bar is None:  # the first update of an epoch
            model.template.train()
            bar = progress_bar(total=updates_per_epoch, initial=at.next_update, desc=f"epoch {at.epoch}/"
                               f"{config.epochs} x{len(runs)}", leave=False, disable=None if progress else True)
            epoch_batches = batches.epoch(at.epoch, at.next_update)
            clock.lap("train")
        x, y = next(epoch_batches)
        with autocast():
            logits, aux = model(x, rngs)
            losses = torch.func.vmap(loss_fn)(logits, y)
            total = losses + aux if aux is not None else losses
        total.sum().backward()
        grad_norm = per_run_grad_norm([p.grad for p in trainable if p.grad is not None], config.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for state in states:
            state.advance(updates_per_epoch)
        if scheduler is not None:
            scheduler.step_update(at.step)
        if model.ema is not None:
            model.update_ema(emas[0].get_decay(at.step))
        losses = losses.detach().float()
        seconds = clock.lap("train")
        for k, tally in enumerate(tallies):
            tally.lr = lr
            tally.add(losses[k], grad_norm[k], aux[k].detach().float() if aux is not None else None)
            tally.seconds += seconds
            tally.images += config.batch_size
        if len(tallies[0]) % CHECK_EVERY == 0:
            for run, state, tally in zip(runs, states, tallies):
                check_finite(tally, at.epoch, state.checkpoints, run_dir=run.root)
        row_due, bar = after_update(bar, at, schedule)

    clock.lap("train")
    timings = {"total": time.perf_counter() - t_start, **clock.seconds}
    return [TrainResult.of(run, state, timings) for run, state in zip(runs, states)]


# -- the optimizer state of one run, and of all runs -----------------------------------------------------------------
class RunOptimizer:
    """Run ``k``'s view of the stacked optimizer, as its :class:`TrainState` saves it: its state dict is the one the
    optimizer of that run trained alone would give (:func:`optimizer_state_for_run`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: StackedModel, k: int):
        self.optimizer, self.model, self.k = optimizer, model, k

    def state_dict(self) -> dict[str, Any]:
        return optimizer_state_for_run(self.optimizer, self.model, self.k)


def optimizer_state_for_run(optimizer: torch.optim.Optimizer, model: StackedModel, k: int) -> dict[str, Any]:
    """Run ``k``'s optimizer state dict, as the optimizer of that run trained alone would give it: every state
    tensor shaped like a stacked parameter is sliced (and copied, so that saving it writes that slice only)."""
    state = optimizer.state_dict()
    shapes = _stacked_shapes(optimizer)
    out = {}
    for i, entry in state["state"].items():
        out[i] = {key: v[k].clone() if torch.is_tensor(v) and v.shape == shapes[i] else
                  (v.clone() if torch.is_tensor(v) else v) for key, v in entry.items()}
    return {"state": out, "param_groups": copy.deepcopy(state["param_groups"])}


def stack_optimizer_states(states: list[dict[str, Any]], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The stacked optimizer's state dict from the runs' own (the inverse of :func:`optimizer_state_for_run`)."""
    shapes = _stacked_shapes(optimizer)
    first = states[0]
    out = {}
    for i, entry in first["state"].items():
        out[i] = {key: torch.stack([s["state"][i][key] for s in states])
                  if torch.is_tensor(v) and v.shape == shapes[i][1:] else v for key, v in entry.items()}
    return {"state": out, "param_groups": copy.deepcopy(first["param_groups"])}


def _stacked_shapes(optimizer: torch.optim.Optimizer) -> dict[int, torch.Size]:
    """The stacked parameters' shapes by their index in the optimizer's state dict."""
    return {i: p.shape for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
