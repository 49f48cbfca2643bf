"""Typed configurations (dataclasses) and their YAML form.

Every config is a dataclass of plain values so that ``config.yaml`` in a run directory rebuilds exactly what
was run. :func:`from_dict` refuses unknown keys with the list of accepted ones: a typo in a recipe or an
override must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from landscape.errors import ConfigError
from landscape.io import atomic_write_text

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass (nested ones included) as a plain dict of YAML-safe values."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields are built recursively."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown {where} field(s) {', '.join(unknown)}; accepted fields are {', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints.get(name))
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where=f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_type(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


class DuplicateKey(ValueError):
    """A YAML mapping that gives one key twice (PyYAML keeps the last one without a word)."""

    def __init__(self, key: Any, line: int):
        super().__init__(f"the key {key!r} is given twice (the second at line {line})")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping; keys a merge (``<<: *anchor``) brings in
    may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: PyYAML refuses it itself
                    continue
                if duplicate:
                    raise DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(stream: Any) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKey` for a key given twice in one mapping."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a :class:`ConfigError`."""
    from landscape.io import refuse_special

    path = Path(path)
    refuse_special(path, "a config file", error=ConfigError)
    try:
        with open(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > YAML_BYTES:  # parsing 100 MB took minutes
                raise ConfigError(f"Config file {path} holds {size / 2 ** 20:.0f} MB; a config is a few kilobytes, "
                                  "so this one is not a config (or is damaged).")
            data = safe_load_unique(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except DuplicateKey as e:
        raise ConfigError(f"Config file {path}: {e}; YAML would keep only the last, so give it once.") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:  # nested past the parser's depth
        raise ConfigError(f"Config file {path} is not valid YAML ({e.__class__.__name__}).") from None
    except IsADirectoryError:
        raise ConfigError(f"Config file {path} is a folder, not a file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of field names to values.")
    if expanded_size(data, YAML_VALUES) > YAML_VALUES:
        raise ConfigError(f"Config file {path} expands to more than {YAML_VALUES:,} values (aliases of aliases, "
                          "a 'billion laughs'); no config is that large: write it out without them.")
    return data


YAML_BYTES = 1 << 20
"""The largest config, recipe or run settings file read (they are a few kilobytes)."""
YAML_VALUES = 1_000_000
"""The most values a YAML file read by :func:`load_yaml` may expand to, its aliases counted at every use."""


def expanded_size(data: Any, limit: int) -> int:
    """The number of values ``data`` holds with every shared list or mapping counted at each place it is used (what
    printing or hashing it would visit), counted up to just past ``limit``."""
    seen, stack = 0, [data]
    while stack and seen <= limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return seen


def save_yaml(data: dict[str, Any] | Any, path: str | os.PathLike) -> None:
    """Write a mapping (or dataclass) as YAML, atomically."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    text = yaml.safe_dump(_plain(data), sort_keys=False)
    atomic_write_text(Path(path), text)


def config_hash(data: dict[str, Any] | Any) -> str:
    """A short stable hash of a config, stored in every checkpoint to tie it to its run."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    blob = json.dumps(_plain(data), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` (``key`` may be dotted) with the value parsed as YAML: ``lr=1e-3``, ``mixup=0``."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must have the form key=value.")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def parse_value(value: str) -> Any:
    """A command-line value as YAML, except that numbers like ``1e-3`` are numbers (YAML 1.1 says strings)."""
    for number in (int, float):
        try:
            return number(value)
        except ValueError:
            pass
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        return value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], *, merge: bool = False) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides applied.

    With ``merge`` a non-empty mapping given for a key that already holds one is merged into it, key by key at
    every depth (``augment: {mixup: 0}`` changes MixUp alone), and an empty one empties it (``model.kwargs={}``);
    without ``merge`` a mapping replaces (the section's other keys then fall back to their defaults, which is what
    the config's own resets mean: a new model's ``kwargs: {}``)."""
    out = json.loads(json.dumps(data, default=str))
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {key!r} goes through {part!r}, which is not a section.")
        last = parts[-1]
        node[last] = _merged(node[last], value) if merge and value and isinstance(node.get(last), dict) else value
    return out


def _merged(base: dict[str, Any], value: Any) -> Any:
    """``value`` merged into ``base`` when both are mappings (recursively), else ``value``."""
    if not isinstance(value, dict):
        return value
    out = dict(base)
    for k, v in value.items():
        out[k] = _merged(out[k], v) if v and isinstance(out.get(k), dict) else v
    return out


# == training configuration (the sections of a run's config.yaml) ============================================
@dataclasses.dataclass
class ModelConfig:
    """The network: a registered (or any timm) model name and the keyword arguments it is built with."""

    name: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    drop_path: float = 0.0  # stochastic depth rate, passed as ``drop_path_rate`` when positive


@dataclasses.dataclass
class DataConfig:
    """The dataset, its image size (``None`` = native) and the loader."""

    name: str = "digits"
    img_size: int | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # generator settings of ``synthetic``
    num_workers: int = 0  # only the image-by-image path (RandAugment, RandomResizedCrop, imagefolder) uses workers
    train_size: int | None = None  # train on a fixed seeded subset of N images (None = all)
    val_size: int | None = None  # evaluate on a fixed seeded subset of N validation images (None = all)


@dataclasses.dataclass
class OptimConfig:
    """The optimizer (timm ``create_optimizer_v2``) and the update rule around it."""

    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list[float] | None = None
    eps: float | None = None
    lr_base_batch: int | None = None  # when set, lr is scaled by batch_size / lr_base_batch; None = no scaling
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    accum_steps: int = 1  # micro-batches per update (batch_size is the global batch of one update)


@dataclasses.dataclass
class ScheduleConfig:
    """The learning-rate schedule (timm ``create_scheduler_v2``), stepped after every update."""

    sched: str = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0


@dataclasses.dataclass
class AugmentConfig:
    """Data augmentation and label regularisation."""

    crop: str = "none"  # none | pad (shift by up to crop_padding px) | rrc (RandomResizedCrop, image by image)
    crop_padding: int = 4
    crop_scale: list[float] | None = None  # area range of rrc (None = the dataset's default)
    interpolation: str | None = None  # resize interpolation of rrc (None = the dataset's default)
    hflip: float | None = None  # flip probability (None = 0.5 where mirroring keeps the class, else 0)
    auto_augment: str | None = None  # a timm policy such as rand-m9-mstd0.5-inc1 (image by image)
    re_prob: float = 0.0  # random erasing probability
    re_mode: str = "pixel"
    repeated_aug: int = 1  # repeated augmentation: each image appears this many times per epoch (DeiT)
    mixup: float = 0.0  # MixUp alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.0


@dataclasses.dataclass
class EmaConfig:
    """Exponential moving average of the weights (timm ``ModelEmaV3``), evaluated next to the raw weights."""

    decay: float | None = None  # None or 0 = no EMA
    warmup: bool = False


@dataclasses.dataclass
class CheckpointConfig:
    """When weights are written and which are kept.

    ``every``: ``epoch``, ``epochs:N``, ``steps:N`` or ``log:N`` (N log-spaced steps, dense early), joined with
    ``+`` for a union (``epoch+log:30``). ``keep``: ``all`` or ``last:K``. ``initial`` also writes the
    weights before the first update (step 0).
    """

    every: str = "epoch"
    keep: str = "all"
    initial: bool = False


@dataclasses.dataclass
class MaeConfig:
    """Masked-autoencoder pre-training (``task: mae``): passed to the MAE model as keyword arguments."""

    mask_ratio: float = 0.75
    norm_pix_loss: bool = True


@dataclasses.dataclass
class TrainConfig:
    """Everything ``landscape train`` needs; saved resolved as the run's ``config.yaml``."""

    recipe: str | None = None
    task: str = "classify"  # classify | mae
    seed: int = 0
    epochs: int = 10
    batch_size: int = 128  # global images per update, over all processes and accumulation steps
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    init: str | None = None  # a run directory (or checkpoint file) whose weights start this run
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mae: MaeConfig = dataclasses.field(default_factory=MaeConfig)
    # Adam's second moment (and the optimizer's lr, betas, eps) beside every checkpoint, for the preconditioned
    # sharpness of `landscape analyze hessian RUN --preconditioned` (landscape/analyses/stability.py).
    save_preconditioner: bool = False
    # Set by `landscape train --resume RUN --extend-to N`: the epochs the run had before its latest extension and
    # when (UTC) it was extended. A record, not a setting: the run hash leaves both out.
    extended_from: int | None = None
    extended_at: str | None = None


def coerce_types(config: T, *, where: str = "config") -> T:
    """Check every field of a (nested) dataclass against its annotation, converting where it is lossless.

    Values from the command line arrive as YAML scalars (``1e-3`` is a string in YAML), so numbers written as
    strings become numbers, integers become floats where a float is expected and integral floats become ints;
    anything else that does not fit is a :class:`ConfigError` naming the field and the expected type.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        name = f"{where}.{f.name}" if where != "config" else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            if not dataclasses.is_dataclass(value):
                raise ConfigError(f"{name} is a section of fields, not a single value ({value!r}).")
            setattr(config, f.name, coerce_types(value, where=name))
        else:
            setattr(config, f.name, _coerce(value, hints[f.name], name))
    return config


def _coerce(value: Any, hint: Any, name: str) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, name)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return value
    if origin is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name} must be a number, not {value!r}.")
    if origin is int:
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be a whole number, not {value!r}.")
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, not {value!r}.")
    if origin is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a text value, not {value!r}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list such as [0.9, 0.999], not {value!r}.")
        inner = args[0] if args else Any
        return [_coerce(v, inner, name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of names to values, not {value!r}.")
        return dict(value)
    return value


_RESOLVED_KWARGS = ("num_classes", "in_chans", "img_size", "drop_path_rate", "mask_ratio", "norm_pix_loss")
"""Model arguments training fills in from other config fields (the data, ``model.drop_path``, ``mae``), which are
compared themselves: a saved run's config has them where the study's does not."""


def config_differences(saved: dict[str, Any], wanted: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings (dotted keys, less ``ignore``) in which a run's saved config.yaml differs from a wanted
    :class:`TrainConfig` dict, as ``"KEY SAVED, not WANTED"``; empty when it is that run. Every training setting
    counts (model, data and its subset, optimiser, schedule, augmentation, EMA, checkpoints, seed...): a study never
    reuses a run trained otherwise, and a report says when runs of one variant differ. A config written by an
    older version is read with the defaults of the fields it lacks."""
    def filled(config: dict[str, Any]) -> dict[str, Any]:
        try:
            return to_dict(from_dict(TrainConfig, config, where="config.yaml"))
        except (ConfigError, TypeError, ValueError):
            return config  # compared as it is: the differences name what is wrong

    saved, wanted = filled(saved), filled(wanted)
    saved_kwargs = dict(((saved.get("model") or {}).get("kwargs") or {}))
    wanted_kwargs = dict(((wanted.get("model") or {}).get("kwargs") or {}))
    for key in _RESOLVED_KWARGS:
        if key not in wanted_kwargs:
            saved_kwargs.pop(key, None)

    def flat(c: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in c.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a = flat({**saved, "model": {**(saved.get("model") or {}), "kwargs": saved_kwargs}})
    b = flat({**wanted, "model": {**(wanted.get("model") or {}), "kwargs": wanted_kwargs}})
    missing = object()
    return [f"{key} {a.get(key, 'unset')}, not {b.get(key, 'unset')}" for key in sorted(set(a) | set(b))
            if key not in ignore and a.get(key, missing) != b.get(key, missing)]
