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
    return f"{owners[0]}.{key}" if owners else key


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
    if model is not None and model != (layers.get("model") or {}).get("name"):
        layers = apply_overrides(layers, {"model.name": model, "model.kwargs": {}})
    if model_kwargs:
        layers = apply_overrides(layers, {f"model.kwargs.{k}": v for k, v in model_kwargs.items()})
    if data is not None:
        layers = apply_overrides(layers, {"data.name": data})
    for option, value in (options or {}).items():
        if value is not None:
            layers = apply_overrides(layers, {OPTION_FIELDS[option]: value})
    if not isinstance(overrides, dict):
        overrides = dict(parse_override(text) for text in overrides)
    layers = apply_overrides(layers, {resolve_key(k): v for k, v in overrides.items()})
    if isinstance(layers.get("amp"), bool):  # YAML reads a bare off/on as a boolean
        layers["amp"] = "auto" if layers["amp"] else "off"
    return validate(coerce_types(from_dict(TrainConfig, layers)))


def validate(config: TrainConfig) -> TrainConfig:
    """Refuse values that would fail later, each with one sentence (names are checked where they are used)."""
    checks = [
        (config.task in ("classify", "mae"), f"task must be classify or mae, not {config.task!r}"),
        (config.epochs >= 1, "epochs must be at least 1"),
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
    ]
    for ok, sentence in checks:
        if not ok:
            raise ConfigError(f"The config is invalid: {sentence}.")
    checkpoint_steps(config.checkpoint.every, updates_per_epoch=1, epochs=1)
    checkpoints_to_delete(config.checkpoint.keep, [])
    return config
