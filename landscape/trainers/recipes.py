"""Named training recipes (YAML presets) and how a run's config is resolved from them.

A recipe is a partial :class:`~landscape.config.TrainConfig` in ``landscape/trainers/recipes/<name>.yaml``.
The config of a run is, each layer overriding the previous one:

1. the defaults of :class:`~landscape.config.TrainConfig`,
2. the recipe,
3. the first-class command-line options (``--model``, ``--data``, ``--epochs``, ``--lr``, ...),
4. ``key=value`` overrides (``--set optim.lr=1e-3``); a key without a dot names a top-level field or the one
   section field of that name (``lr`` is ``optim.lr``, ``mixup`` is ``augment.mixup``).

The recipe's ``model.kwargs`` describe the recipe's own model, so they are dropped when another model is named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from landscape.config import TrainConfig, apply_overrides, coerce_types, from_dict, load_yaml, parse_override
from landscape.errors import ConfigError
from landscape.trainers.schedule import checkpoint_steps, checkpoints_to_delete

RECIPE_DIR = Path(__file__).parent / "recipes"

# First-class options of ``landscape train`` and the field each one sets.
OPTION_FIELDS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "optim.lr",
    "seed": "seed",
    "img_size": "data.img_size",
}


def recipe_names() -> list[str]:
    """The names of the bundled recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def default_recipe(data: str | None) -> str:
    """The recipe a run without one trains with: ``digits`` on the embedded digits (and synthetic data), else
    ``small-images``."""
    return "digits" if data in (None, "digits", "synthetic") else "small-images"


def load_recipe(name: str) -> dict[str, Any]:
    """A bundled recipe by name, or a YAML file by path, as a plain mapping."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.exists():
        if name.endswith((".yaml", ".yml")) and Path(name).exists():
            path = Path(name)
        else:
            raise ConfigError(f"Unknown recipe {name!r}; accepted are {', '.join(recipe_names())} or a YAML file.")
    data = load_yaml(path)
    data.setdefault("recipe", Path(name).stem if path != RECIPE_DIR / f"{name}.yaml" else name)
    return data


def resolve_key(key: str) -> str:
    """The full dotted name of a config field given by its full name or its unique short name."""
    if "." in key:
        return key
    sections = {f.name: f for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory)}
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    if key in top:
        return key
    owners = [s for s, f in sections.items() if key in {g.name for g in dataclasses.fields(f.default_factory)}]
    if len(owners) > 1:
        choices = ", ".join(f"{s}.{key}" for s in owners)
        raise ConfigError(f"Override key {key!r} is ambiguous; write one of {choices}.")
    if not owners:  # a typo: name the field meant, whichever section it is in
        import difflib

        names = {f"{s}.{g.name}": g.name for s, f in sections.items() for g in dataclasses.fields(f.default_factory)}
        names.update({t: t for t in top if t not in sections})
        close = difflib.get_close_matches(key, list(set(names.values())), n=1, cutoff=0.75)
        if close:
            meant = next(full for full, short in names.items() if short == close[0])
            raise ConfigError(f"Unknown config field {key!r}; did you mean {meant}?")
    return f"{owners[0]}.{key}" if owners else key


def warmup_note(config: TrainConfig) -> str | None:
    """What to tell a user whose warm-up is longer than the run (allowed: a short look at a recipe), or None."""
    warmup = config.schedule.warmup_epochs
    if warmup <= config.epochs:
        return None
    return (f"the warm-up ({warmup} epochs) is longer than the run ({config.epochs}): the learning rate rises "
            "throughout and never reaches its peak, nor decays.")


def build_config(
    recipe: str | None = None,
    *,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data: str | None = None,
    options: dict[str, Any] | None = None,
    overrides: Iterable[str] | dict[str, Any] = (),
) -> TrainConfig:
    """Resolve a run's config from a recipe, the first-class options and ``key=value`` overrides."""
    layers: dict[str, Any] = load_recipe(recipe) if recipe else {}
    if not isinstance(overrides, dict):
        overrides = dict(parse_override(text) for text in overrides)
    overrides = {resolve_key(k): v for k, v in overrides.items()}
    emptied, overrides = _split_empty_sections(overrides)
    if emptied:  # an empty section empties the recipe's values, not those the options and --set beside it give
        layers = apply_overrides(layers, emptied, merge=True)
    named = overrides.get("model.name", (overrides.get("model") or {}).get("name")
                          if isinstance(overrides.get("model"), dict) else None)
    model = model if model is not None else named if isinstance(named, str) else None
    if model is not None and model != (layers.get("model") or {}).get("name"):
        # another model than the recipe's: its arguments were the recipe model's (--model, or the name in --set)
        layers = apply_overrides(layers, {"model.name": model, "model.kwargs": {}})
    if model_kwargs:
        layers = apply_overrides(layers, {f"model.kwargs.{k}": v for k, v in model_kwargs.items()})
    if data is not None:
        layers = apply_overrides(layers, {"data.name": data})
    for option, value in (options or {}).items():
        if value is not None:
            layers = apply_overrides(layers, {OPTION_FIELDS[option]: value})
    layers = apply_overrides(layers, overrides, merge=True)
    recorded = [k for k in ("extended_from", "extended_at") if layers.get(k) is not None]
    if recorded:  # a new run's config: one recorded as extended would take --extend-to of its total as a resume
        raise ConfigError(f"{recorded[0]} is a record --resume RUN --extend-to N writes, not a setting; leave it out "
                          "of the recipe, --set and the study's overrides.")
    if isinstance(layers.get("amp"), bool):  # YAML reads a bare off/on as a boolean
        layers["amp"] = "auto" if layers["amp"] else "off"
    return validate(coerce_types(from_dict(TrainConfig, layers)))


def _split_empty_sections(overrides: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """``overrides`` as ``(empty sections by dotted key, the rest)``: ``{"model": {"kwargs": {}}, "lr": 1}`` gives
    ``({"model.kwargs": {}}, {"lr": 1})``, at any depth."""
    emptied, rest = {}, {}
    for key, value in overrides.items():
        if isinstance(value, dict) and not value:
            emptied[prefix + key] = {}
        elif isinstance(value, dict):
            inner, kept = _split_empty_sections(value, f"{prefix}{key}.")
            emptied.update(inner)
            if kept:
                rest[key] = kept
        else:
            rest[key] = value
    return emptied, rest


def _check_augment_names(augment) -> None:
    """The interpolation and auto-augment policy names, checked by the timm functions that read them."""
    if augment.interpolation is not None and augment.interpolation != "random":
        from timm.data.transforms import str_to_interp_mode

        try:
            str_to_interp_mode(augment.interpolation)
        except (KeyError, ValueError):
            raise ConfigError(f"The config is invalid: augment.interpolation must be bilinear, bicubic, nearest, "
                              f"random or null, not {augment.interpolation!r}.") from None
    if augment.auto_augment:
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        policy = augment.auto_augment
        build = (rand_augment_transform if policy.startswith("rand") else
                 augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
        try:
            build(policy, {"translate_const": 10, "img_mean": (128, 128, 128)})
        except Exception:  # timm asserts, indexes and looks up names in the policy string
            raise ConfigError(f"The config is invalid: augment.auto_augment {policy!r} is not a timm policy (e.g. "
                              "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original or v0).") from None


def validate(config: TrainConfig) -> TrainConfig:
    """Refuse values that would fail later, each with one sentence (names are checked where they are used)."""
    checks = [
        (config.task in ("classify", "mae"), f"task must be classify or mae, not {config.task!r}"),
        (1 <= config.epochs <= 1_000_000, "epochs must be between 1 and 1,000,000"),
        (config.batch_size >= 1, "batch_size must be at least 1"),
        (config.data.img_size is None or config.data.img_size >= 1, "data.img_size must be at least 1 (or unset)"),
        (config.optim.accum_steps >= 1, "optim.accum_steps must be at least 1"),
        (0 < config.optim.lr < float("inf"), "optim.lr must be a positive finite number"),
        (config.amp in ("auto", "bf16", "fp16", "off"), f"amp must be auto, bf16, fp16 or off, not {config.amp!r}"),
        (config.augment.crop in ("none", "pad", "rrc"), f"augment.crop must be none, pad or rrc, not {config.augment.crop!r}"),
        (config.augment.repeated_aug >= 1, "augment.repeated_aug must be at least 1 (1 = off)"),
        (0 <= config.augment.label_smoothing < 1, "augment.label_smoothing must be in [0, 1)"),
        (config.augment.mixup_mode in ("batch", "pair", "elem"), "augment.mixup_mode must be batch, pair or elem"),
        (config.ema.decay is None or 0 <= config.ema.decay < 1, "ema.decay must be in [0, 1) or null"),
        (0 < config.mae.mask_ratio < 1, "mae.mask_ratio must be in (0, 1)"),
        (-(2 ** 63) <= config.seed < 2 ** 63, "seed must be a whole number between -2**63 and 2**63 - 1"),
        (config.optim.grad_clip is None or 0 < config.optim.grad_clip < float("inf"),
         "optim.grad_clip must be a positive finite gradient norm, or null for no clipping (0 would freeze the "
         "weights, a negative one turn every update around)"),
        (0 <= config.optim.weight_decay < float("inf"), "optim.weight_decay must be a finite number, 0 or more"),
        (0 <= config.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
        (config.optim.betas is None or (len(config.optim.betas) == 2 and all(0 <= b < 1 for b in config.optim.betas)),
         "optim.betas must be two numbers in [0, 1) such as [0.9, 0.999], or null"),
        (config.optim.eps is None or 0 < config.optim.eps < float("inf"), "optim.eps must be a positive number or null"),
        (config.optim.lr_base_batch is None or config.optim.lr_base_batch >= 1,
         "optim.lr_base_batch must be at least 1, or null"),
        (config.schedule.warmup_epochs >= 0, "schedule.warmup_epochs must be 0 or more"),
        (0 <= config.schedule.warmup_lr < float("inf") and 0 <= config.schedule.min_lr < float("inf"),
         "schedule.warmup_lr and schedule.min_lr must be finite numbers, 0 or more"),
        (0 <= config.model.drop_path < 1, "model.drop_path must be in [0, 1)"),
        (config.data.num_workers >= 0, "data.num_workers must be 0 or more"),
        (config.data.train_size is None or config.data.train_size >= 1,
         "data.train_size must be a number of images, 1 or more, or null for the whole training split"),
        (config.data.val_size is None or config.data.val_size >= 1,
         "data.val_size must be a number of images, 1 or more, or null for the whole validation split"),
        (config.augment.crop_padding >= 0, "augment.crop_padding must be 0 or more"),
        (config.augment.crop_scale is None or (len(config.augment.crop_scale) == 2
                                               and 0 < config.augment.crop_scale[0] <= config.augment.crop_scale[1] <= 1),
         "augment.crop_scale must be two areas 0 < low <= high <= 1 such as [0.35, 1.0], or null"),
        (config.augment.hflip is None or 0 <= config.augment.hflip <= 1, "augment.hflip must be in [0, 1] or null"),
        (0 <= config.augment.re_prob <= 1, "augment.re_prob must be in [0, 1]"),
        (config.augment.re_mode in ("const", "rand", "pixel"),
         f"augment.re_mode must be const, rand or pixel, not {config.augment.re_mode!r}"),
        (0 <= config.augment.mixup < float("inf") and 0 <= config.augment.cutmix < float("inf"),
         "augment.mixup and augment.cutmix must be finite alphas, 0 or more (0 = off)"),
        (0 <= config.augment.mixup_prob <= 1 and 0 <= config.augment.switch_prob <= 1,
         "augment.mixup_prob and augment.switch_prob must be in [0, 1]"),
    ]
    kwargs = config.model.kwargs if isinstance(config.model.kwargs, dict) else {}
    depth, ratio = kwargs.get("depth"), kwargs.get("mlp_ratio")
    scale = config.batch_size / config.optim.lr_base_batch if config.optim.lr_base_batch else 1.0
    checks += [
        (not isinstance(depth, (int, float)) or isinstance(depth, bool) or depth >= 1,
         f"model.kwargs.depth must be at least 1 block, not {depth}"),
        (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio > 0,
         f"model.kwargs.mlp_ratio must be more than 0 (an MLP of hidden width 0 is no MLP), not {ratio}"),
        (config.schedule.min_lr <= config.optim.lr * scale,
         f"schedule.min_lr {config.schedule.min_lr:g} is above the peak learning rate {config.optim.lr * scale:g}, "
         "so the decay would raise it; give a min_lr below the lr"),
    ]
    for ok, sentence in checks:
        if not ok:
            raise ConfigError(f"The config is invalid: {sentence}.")
    if config.optim.opt.lower() in ("sgd", "nesterov") and config.optim.momentum == 0:
        raise ConfigError("The config is invalid: timm's sgd is Nesterov momentum, which needs a momentum; for plain "
                          "SGD give --set optim.opt=momentum --set optim.momentum=0.")
    _check_augment_names(config.augment)
    checkpoint_steps(config.checkpoint.every, updates_per_epoch=1, epochs=1)
    checkpoints_to_delete(config.checkpoint.keep, [])
    return config
