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
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from landscape.checkpoints import save_checkpoint
from landscape.config import TrainConfig, coerce_types, from_dict, to_dict
from landscape.errors import CheckpointError, ConfigError, LandscapeError
from landscape.io import RunLock, WriteError, remove_stale_temporaries
from landscape.models import MaskedAutoencoder, MixtureOfSwiGLUExperts, create_model, moe_aux_loss
from landscape.runs import Run
from landscape.trainers import distributed
from landscape.trainers.batches import BatchAugment, _subset, derive_seed, epoch_order, validation_batches
from landscape.trainers.loop import TrainResult, load_init_weights, resolve_model_kwargs, run_hash
from landscape.trainers.recipes import validate
from landscape.trainers.schedule import checkpoint_steps, checkpoints_to_delete
from landscape.trainers.state import capture_rng, load_state, restore_rng, save_state

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
        keep = _subset(len(labels), config.data.train_size)
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
    # -- the run directories: each locked before it is checked --------------------------------------------------
    runs = [Run(o) for o in outs]
    if len({r.root.resolve() for r in runs}) != len(runs):
        raise ConfigError("Stacked runs need one run directory each; a folder is given twice.")
    if not resume and (configs is None or len(configs) != len(outs)):
        raise ConfigError("Stacked training needs one config per run directory.")
    for run in runs:
        if not resume or run.root.is_dir():
            held.enter_context(RunLock(run.root, create=not resume))
        _check_run_dir(run, resume=resume, overwrite=overwrite)
    if resume:
        if configs is not None:
            raise ConfigError("Resumed runs use the configs saved in their directories; give no other configs.")
        configs = [validate(coerce_types(from_dict(TrainConfig, r.load_config()))) for r in runs]
    configs = [copy.deepcopy(c) for c in configs]
    check_stackable(configs)
    states = [load_state(r.state_path) for r in runs] if resume else None
    if states is not None:
        where = {(s["step"], s["epoch"], s["next_update"]) for s in states}
        if len(where) > 1:
            steps = ", ".join(f"{r.root.name} at step {s['step']}" for r, s in zip(runs, states))
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
        if c.init and states is None:
            load_init_weights(module, c.init)
        module.to(device)
        if states is not None:
            module.load_state_dict(states[i]["model"])
        if emas is not None:
            from landscape.trainers.ema import ModelEma

            emas.append(ModelEma(module, decay=c.ema.decay, use_warmup=c.ema.warmup))
            if states is not None:
                emas[-1].module.load_state_dict(states[i]["ema"])
        modules.append(module)
    model = StackedModel(modules, emas, strategy)
    hashes = [run_hash(c) for c in configs]
    if states is not None:
        for run, state, chash in zip(runs, states, hashes):
            if state["config_hash"] != chash:
                raise CheckpointError(f"{run.config_path} was changed after {run.state_path} was saved; "
                                      "a resumed run must keep its config (start a new run instead).")

    # -- optimizer (run 0's parameter groups, pointed at the stacked tensors), schedule, loss --------------------
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    o, s, a = config.optim, config.schedule, config.augment
    lr = o.lr * (config.batch_size / o.lr_base_batch if o.lr_base_batch else 1.0)
    extra = {k: v for k, v in (("betas", tuple(o.betas) if o.betas else None), ("eps", o.eps)) if v is not None}
    optimizer = create_optimizer_v2(modules[0], opt=o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                    **extra)
    name_of = {id(p): n for n, p in modules[0].named_parameters()}
    for group in optimizer.param_groups:
        group["params"] = [model.params[name_of[id(p)]] for p in group["params"]]
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.sched, num_epochs=config.epochs,
                                       warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr, min_lr=s.min_lr,
                                       step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=a.label_smoothing) if a.label_smoothing > 0 else torch.nn.CrossEntropyLoss()
    amp_dtype = torch.bfloat16 if config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda") else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # saved for the state file's format; fp16 is refused
    if not resume:
        for run, c in zip(runs, configs):
            Run.create(run.root, overwrite=overwrite).save_config(c)

    # -- where to start -----------------------------------------------------------------------------------------
    step, epoch, start_update = 0, 1, 0
    rows: list[list[dict]] = [[] for _ in runs]
    elapsed = [0.0] * len(runs)
    if states is not None:
        optimizer.load_state_dict(stack_optimizer_states([st["optimizer"] for st in states], optimizer))
        if scheduler is not None:
            scheduler.load_state_dict(states[0]["scheduler"])
        step, epoch, start_update = states[0]["step"], states[0]["epoch"], states[0]["next_update"]
        rows = [list(st["rows"]) for st in states]
        elapsed = [float(st["elapsed"]) for st in states]
        rngs = [st["rng"][0] for st in states]
    else:
        rngs = []
        for c in configs:
            torch.manual_seed(derive_seed(c.seed, "train", 0))
            np.random.seed(derive_seed(c.seed, "numpy", 0) % 2**32)
            random.seed(derive_seed(c.seed, "python", 0))
            rngs.append(capture_rng())
    schedule = set(checkpoint_steps(config.checkpoint.every, updates_per_epoch=updates_per_epoch, epochs=config.epochs))
    saved = [_existing_checkpoints(run, step) for run in runs]
    for found in saved:
        for old in checkpoints_to_delete(config.checkpoint.keep, sorted(found)):
            found.pop(old).unlink(missing_ok=True)
    t_resumed = time.perf_counter()
    row_losses, row_norms, row_aux = [], [], []
    row_first_step = step + 1
    images_in_row, train_time_in_row = 0, 0.0
    timings = {"train": 0.0, "eval": 0.0, "checkpoint": 0.0}

    def finish_rows(label: int, epoch_end: bool, update: int) -> None:
        nonlocal row_losses, row_norms, row_aux, row_first_step, images_in_row, train_time_in_row
        t0 = time.perf_counter()
        _check_finite(row_losses, row_norms, row_first_step, epoch, runs, saved)
        sums = [torch.stack(v).sum(0).tolist() if v else [0.0] * len(runs) for v in (row_losses, row_norms, row_aux)]
        n = len(row_losses)
        raw = evaluate_stacked(model, val, autocast)
        ema = evaluate_stacked(model, val, autocast, ema=True) if model.ema is not None else None
        t1 = time.perf_counter()
        timings["eval"] += t1 - t0
        for k, run in enumerate(runs):
            row = {
                "epoch": label, "step": step, "images_seen": step * config.batch_size,
                "train_loss": sums[0][k] / n if n else None, **raw[k],
                **({f"ema_{key}": v for key, v in ema[k].items()} if ema is not None
                   else {"ema_val_loss": None, "ema_val_top1": None, "ema_val_top5": None}),
                "lr": last_lr, "grad_norm": sums[1][k] / n if n else None,
                "wall_time": elapsed[k] + (time.perf_counter() - t_resumed),
                "images_per_s": images_in_row / train_time_in_row if train_time_in_row > 0 else None,
                "schedule_epochs": config.epochs,
            }
            if model.has_moe:
                row["moe_aux_loss"] = sums[2][k] / n if n else None
            rows[k].append(row)
            module, ema_module = model.run_modules(k)
            _write_outputs(run, configs[k], hashes[k], module, ema_module, optimizer_state_for_run(optimizer, model, k),
                           scheduler, scaler, rows[k], row, [rngs[k]], step=step, epoch=label, epoch_end=epoch_end,
                           checkpoint=step in schedule or step == 0,
                           resume_at=(label + 1, 0) if epoch_end else (label, update + 1), saved=saved[k])
        timings["checkpoint"] += time.perf_counter() - t1
        row_losses, row_norms, row_aux = [], [], []
        row_first_step = step + 1
        images_in_row, train_time_in_row = 0, 0.0

    last_lr = optimizer.param_groups[0]["lr"]
    if config.checkpoint.initial and step == 0:
        finish_rows(0, True, -1)

    # -- the loop ---------------------------------------------------------------------------------------------
    trainable = model.trainable()
    model.template.train()
    for epoch in range(epoch, config.epochs + 1):
        bar = tqdm(total=updates_per_epoch, initial=start_update, desc=f"epoch {epoch}/{config.epochs} x{len(runs)}",
                   file=sys.stderr, leave=False, dynamic_ncols=True, disable=None if progress else True)
        t_lap = time.perf_counter()
        for u, (x, y) in enumerate(batches.epoch(epoch, start_update), start=start_update):
            with autocast():
                logits, aux = model(x, rngs)
                losses = torch.func.vmap(loss_fn)(logits, y)
                total = losses + aux if aux is not None else losses
            total.sum().backward()
            grad_norm = per_run_grad_norm([p.grad for p in trainable if p.grad is not None], o.grad_clip)
            last_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if scheduler is not None:
                scheduler.step_update(step)
            if model.ema is not None:
                model.update_ema(emas[0].get_decay(step))
            row_losses.append(losses.detach().float())
            row_norms.append(grad_norm.detach().float())
            if aux is not None:
                row_aux.append(aux.detach().float())
            if len(row_losses) % CHECK_EVERY == 0:
                _check_finite(row_losses, row_norms, row_first_step, epoch, runs, saved)
            now = time.perf_counter()
            train_time_in_row += now - t_lap
            timings["train"] += now - t_lap
            images_in_row += config.batch_size
            bar.update(1)
            epoch_end = u == updates_per_epoch - 1
            if epoch_end or step in schedule:
                bar.clear()
                finish_rows(epoch, epoch_end, u)
            t_lap = time.perf_counter()
        bar.close()
        start_update = 0
    timings["total"] = time.perf_counter() - t_start
    return [TrainResult(run=run, rows=r, checkpoints=[found[s] for s in sorted(found)], timings=dict(timings))
            for run, r, found in zip(runs, rows, saved)]


# -- the optimizer state of one run, and of all runs -----------------------------------------------------------------
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


# -- the run directory ---------------------------------------------------------------------------------------------
def _check_run_dir(run: Run, *, resume: bool, overwrite: bool) -> None:
    from landscape.runs import _is_empty_run

    if resume:
        if not run.config_path.exists():
            raise CheckpointError(f"{run.root} is not a run to resume (it has no config.yaml).")
        if not run.state_path.exists():
            raise CheckpointError(f"{run.root} cannot be resumed because its training state {run.state_path} is "
                                  "missing; nothing was changed.")
        for folder in (run.root, run.checkpoints_dir, run.state_dir, run.analysis_dir):
            remove_stale_temporaries(folder, recursive=folder == run.analysis_dir)
        return
    if run.root.exists() and not run.root.is_dir():
        raise LandscapeError(f"{run.root} exists and is not a directory.")
    if run.root.is_dir() and not overwrite and not _is_empty_run(run.root):
        raise LandscapeError(
            f"Run directory {run.root} already exists; continue it with --resume or replace it with --overwrite.")


def _existing_checkpoints(run: Run, step: int) -> dict[int, Path]:
    """Checkpoints up to ``step`` on disk; later ones (written after the saved state) are removed."""
    saved = {}
    for info in run.checkpoints():
        if info.step > step:
            info.path.unlink(missing_ok=True)
        else:
            saved[info.step] = info.path
    return saved


def _check_finite(losses, norms, first_step: int, epoch: int, runs: list[Run], saved: list[dict]) -> None:
    if not losses:
        return
    bad = ~torch.isfinite(torch.stack(losses)) | ~torch.isfinite(torch.stack(norms))  # (updates, K)
    if bad.any():
        i, k = (int(v) for v in bad.nonzero()[0])
        last = saved[k]
        kept = f"the last good checkpoint {last[max(last)].name} is kept" if last else "no checkpoint had been written"
        raise LandscapeError(f"Training diverged at step {first_step + i} (epoch {epoch}) in {runs[k].root}: the loss "
                             f"or gradient norm became {float(torch.stack(losses)[i, k])}; {kept}; lower optim.lr or "
                             "set optim.grad_clip and train again.")


def _write_outputs(run, config, chash, model, ema, optimizer_state, scheduler, scaler, rows, row, rng, *, step, epoch,
                   epoch_end, checkpoint, resume_at, saved) -> None:
    """metrics.csv, then the checkpoint (if due), then state/last.pt, then the keep policy: each atomic, each in the
    format of :mod:`landscape.trainers.loop`."""
    run.write_metrics(rows)
    if checkpoint:
        path = run.checkpoint_path(epoch=epoch) if epoch_end else run.checkpoint_path(step=step)
        try:
            save_checkpoint(path, model.state_dict(), model=config.model.name, model_kwargs=config.model.kwargs,
                            epoch=epoch if epoch_end else None, step=step, metrics=row, config_hash=chash,
                            ema_state_dict=ema.state_dict() if ema is not None else None)
        except (OSError, WriteError) as e:
            previous = f"the previous checkpoint {saved[max(saved)].name} is intact" if saved else "no checkpoint was lost"
            raise CheckpointError(f"Writing {path} failed ({getattr(e, 'strerror', None) or e}); {previous}.") from None
        saved[step] = path
    state = {
        "step": step, "epoch": resume_at[0], "next_update": resume_at[1], "rows": rows, "elapsed": row["wall_time"],
        "config_hash": chash, "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer_state, "scaler": scaler.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": rng,
    }
    try:
        save_state(run.state_path, state)
    except OSError as e:
        raise CheckpointError(f"Writing {run.state_path} failed ({e.strerror or e}); the previous state is intact.") from None
    for old in checkpoints_to_delete(config.checkpoint.keep, sorted(saved)):
        saved.pop(old).unlink(missing_ok=True)
