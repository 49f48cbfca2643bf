"""Reading a foreign file: only safetensors or ``torch.load(weights_only=True)``, through
:func:`landscape.checkpoints.load_foreign_state`.

The one class allowed beyond tensors and plain containers is ``argparse.Namespace``, which timm's ``train.py``
stores as ``args``: unpickling it only sets attributes. Training checkpoints are unpacked into raw and EMA weights
(timm: ``state_dict`` / ``state_dict_ema``; DeiT and torchvision references: ``model`` / ``model_ema``), and what the
source states about its own architecture (``args``, a model directory's ``config.json``) is kept as hints.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from landscape.checkpoints import load_foreign_state
from landscape.errors import CheckpointError, LandscapeError
from landscape.importers.filters import (
    FILTERS,
    FORMATS,
    PREFIXES,
    VIT_ONLY,
    StateDict,
    describe_hf_type,
    detect_format,
    restore_shared_mlps,
    strip_prefixes,
)


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")


@dataclass
class ForeignCheckpoint:
    """Weights from another codebase, renamed to timm ``VisionTransformer`` keys.

    ``hints`` holds what the source says about its own architecture (``num_heads``, ``img_size``,
    ``layer_norm_eps``, ``arch`` for a timm model name, ...); ``extra`` what it says about its training
    (source epoch, best metric).
    """

    path: Path
    format: str
    state_dict: StateDict
    ema_state_dict: StateDict | None = None
    hints: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    weights_file: Path | None = None


HF_LAYER_NORM_EPS = 1e-12
"""``layer_norm_eps`` of a Hugging Face ViTConfig unless its config.json says otherwise."""


def read_foreign_checkpoint(path: str | os.PathLike, format: str | None = None) -> ForeignCheckpoint:
    """Read ``path`` (a weights file, or a Hugging Face model directory) and map its keys to timm names.

    ``format`` is one of :data:`FORMATS` or ``None`` to detect it from the file layout and key names.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise LandscapeError(f"Unknown format {format!r}; accepted are {', '.join(FORMATS)}.")
    config_file, weights_file = _model_dir_files(path)
    if weights_file is None:
        raise CheckpointError(
            f"{path} is a directory without a weights file; give a weights file (.pth, .pt, .bin, .safetensors) "
            f"or a model directory holding config.json and one of {', '.join(HF_WEIGHT_FILES)}."
        )
    if weights_file.name.endswith(".index.json"):
        obj: Any = _read_sharded(weights_file)
    else:
        obj = read_weights_file(weights_file)
    raw, ema, extra, hints = unpack_training_checkpoint(obj, weights_file)
    if extra.get("ema_key") == "ema/":  # a checkpoint of `landscape train`: its header states the architecture
        _landscape_header_hints(weights_file, hints)
    raw = strip_prefixes(raw)
    ema = strip_prefixes(ema) if ema is not None else None
    submodule, left_out = model_submodule(raw) if format is None else (None, [])
    if submodule is not None:  # a Lightning-style module: the network under one attribute, other parts beside it
        whole = raw
        raw = strip_prefixes({k[len(submodule) + 1:]: v for k, v in whole.items() if k.startswith(submodule + ".")})
        if ema is not None and any(k.startswith(submodule + ".") for k in ema):
            ema = strip_prefixes({k[len(submodule) + 1:]: v for k, v in ema.items() if k.startswith(submodule + ".")})
        beside = next((g for g in left_out if "ema" in g.lower()), None)
        if ema is None and beside is not None:  # its EMA copy under its own attribute (timm's ModelEmaV2: module.)
            ema = strip_prefixes({k[len(beside) + 1:]: v for k, v in whole.items() if k.startswith(beside + ".")})
            left_out = [g for g in left_out if g != beside]
            extra["ema_key"] = beside
        extra["submodule"] = submodule
        extra["left_out"] = left_out
    if format is None:
        format = detect_format(raw, container=extra.get("container"), path=path)
    if config_file is not None:
        config_hints(_load_json(config_file), format, hints)
    if format in ("hf", "torchvision") and "global_pool" not in hints:  # both classify the class token's output
        _hint(hints, "global_pool", "token", "the source library's classifier (the class token's output)")
    if format == "hf" and "layer_norm_eps" not in hints:  # a bare Hugging Face state dict: ViTConfig's default,
        # not timm's 1e-6 (which changes the logits by about 1e-4 of their size)
        _hint(hints, "layer_norm_eps", HF_LAYER_NORM_EPS, "Hugging Face ViTConfig's default (no config.json)")
    filter_fn = FILTERS[format]
    return ForeignCheckpoint(
        path, format, restore_shared_mlps(filter_fn(raw)),
        restore_shared_mlps(filter_fn(ema)) if ema is not None else None,
        hints=hints, extra=extra, weights_file=weights_file,
    )


_VIT_KEYS = ("patch_embed.", "blocks.", "conv_proj.", "encoder.layers.encoder_layer_", "vit.embeddings.",
             "deit.embeddings.", "embeddings.patch_embeddings.")


def model_submodule(state: StateDict) -> tuple[str | None, list[str]]:
    """``(attribute, other attributes)`` when the ViT's keys are not at the top but under exactly one attribute
    (``net.``, ``model.`` beside ``criterion.``, ...) of a training module; ``(None, [])`` otherwise."""
    if any(k.startswith(_VIT_KEYS) for k in state):
        return None, []
    groups: dict[str, list[str]] = {}
    for key in state:
        head, dot, rest = key.partition(".")
        if dot:
            groups.setdefault(head, []).append(rest)
    vits = [g for g, keys in groups.items()
            if any(k.startswith(_VIT_KEYS) or k.startswith(tuple(f"{p}{v}" for p in PREFIXES for v in _VIT_KEYS))
                   for k in keys)]
    if len(vits) == 2 and sum("ema" in g.lower() for g in vits) == 1:  # model.* beside model_ema.* (ModelEmaV2)
        vits = [g for g in vits if "ema" not in g.lower()]
    if len(vits) > 1:
        raise CheckpointError(f"The file holds {len(vits)} networks ({', '.join(g + '.*' for g in sorted(vits))}); "
                              "save the one to import as a state dict of its own (torch.save(module.state_dict())).")
    if not vits:
        return None, []
    others = sorted({k.partition(".")[0] if "." in k else k for k in state} - {vits[0]})
    return vits[0], others


def read_weights_file(path: Path) -> Any:
    """The object stored in ``path``, read safely; ``argparse.Namespace`` (timm's ``args``) is allowed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_foreign_state(path)


EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "model_ema_state_dict", "ema_model",
            "ema_weights", "state_dict_ema_model")
"""Where training checkpoints keep their EMA weights, beside the raw ones."""


def unpack_training_checkpoint(obj: Any, path: Path) -> tuple[StateDict, StateDict | None, dict, dict]:
    """Split a training checkpoint into ``(raw, ema, extra, hints)``; a bare state dict is returned as raw.

    timm ``train.py``: ``state_dict``, ``state_dict_ema``, ``epoch``, ``metric``, ``arch``, ``args``.
    DeiT and torchvision references: ``model``, ``model_ema``, ``epoch``, ``args``; torchvision's EMA is an
    ``AveragedModel`` state dict (``n_averaged`` plus the averaged model's keys under ``module.``).
    ``args`` (an ``argparse.Namespace``) gives the architecture facts it records: ``model`` (a timm name),
    ``model_kwargs`` (timm's ``--model-kwargs``), ``gp`` (timm's global pool), ``img_size`` / ``input_size``.
    A reference input and output (``reference_input`` / ``reference_logits``) are kept for
    :func:`verify_logits`.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict.")
    extra: dict[str, Any] = {}
    hints: dict[str, Any] = {"sources": {}}
    raw: Any = obj
    ema: Any = None
    from landscape.checkpoints import EMA_PREFIX

    if any(isinstance(k, str) and k.startswith(EMA_PREFIX) for k in obj):  # a checkpoint of `landscape train`
        raw = {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith(EMA_PREFIX))}
        ema = {k[len(EMA_PREFIX):]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(EMA_PREFIX)}
        extra["ema_key"] = EMA_PREFIX
        return raw, ema, extra, hints
    for raw_key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(raw_key), dict):
            raw = obj[raw_key]
            # timm's, DeiT's and torchvision's names first, then those other training loops use
            ema_key = next((k for k in EMA_KEYS if isinstance(obj.get(k), dict) and obj[k]
                            and all(isinstance(v, torch.Tensor) for v in obj[k].values())), None)
            ema = obj[ema_key] if ema_key else None
            if ema_key:
                extra["ema_key"] = ema_key
            extra["container"] = raw_key
            break
    if "container" in extra:
        for key in ("epoch", "metric", "arch"):
            if isinstance(obj.get(key), (int, float, str)):
                extra[f"source_{key}"] = obj[key]
        args = obj.get("args")
        arch = obj.get("arch") or getattr(args, "model", None)
        if isinstance(arch, str):
            _hint(hints, "arch", arch, "the checkpoint's arch" if obj.get("arch") else "args.model")
        if isinstance(args, argparse.Namespace):
            _args_hints(vars(args), hints)
        reference = {k: obj.get(k) for k in ("reference_input", "reference_logits")}
        if all(isinstance(v, torch.Tensor) for v in reference.values()):
            extra["reference"] = (reference["reference_input"], reference["reference_logits"])
    if isinstance(ema, dict) and isinstance(ema.get("n_averaged"), torch.Tensor):
        count = ema["n_averaged"].reshape(-1)  # torchvision's AveragedModel: a counter, kept when it is one number
        if count.numel() == 1 and bool(torch.isfinite(count.double()).all()):
            extra["source_ema_n_averaged"] = int(count[0])
        ema = {k: v for k, v in ema.items() if k != "n_averaged"}
    if isinstance(ema, dict) and not ema:
        ema = None
    return _tensors_only(raw, path), (_tensors_only(ema, path) if isinstance(ema, dict) else None), extra, hints


GLOBAL_POOLS = ("token", "avg", "max", "avgmax")


def _hint(hints: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Record a stated fact and where it was read; a value of the wrong kind is ignored."""
    if key == "num_heads" and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    if key == "img_size":
        if isinstance(value, (list, tuple)):
            sizes = set(value[-2:]) if len(value) >= 2 else set(value)
            value = next(iter(sizes)) if len(sizes) == 1 else None
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return
    if key == "global_pool" and value not in GLOBAL_POOLS:
        return
    if key == "layer_norm_eps" and not (isinstance(value, (int, float)) and value > 0):
        return
    if key == "arch" and not isinstance(value, str):
        return
    if key == "mlp_ratio" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        return
    hints[key] = value
    hints.setdefault("sources", {})[key] = where


def _args_hints(args: dict[str, Any], hints: dict[str, Any]) -> None:
    """Facts from a training script's ``args``: timm ``train.py`` and DeiT ``main.py``."""
    model_kwargs = args.get("model_kwargs")
    if isinstance(model_kwargs, dict):
        for key in ("num_heads", "global_pool", "img_size"):
            if key in model_kwargs:
                _hint(hints, key, model_kwargs[key], f"args.model_kwargs[{key!r}]")
    if "global_pool" not in hints and args.get("gp") is not None:
        _hint(hints, "global_pool", args["gp"], "args.gp")
    if "img_size" not in hints:
        for key in ("img_size", "input_size"):
            if args.get(key) is not None:
                _hint(hints, "img_size", args[key], f"args.{key}")
                break


def _landscape_header_hints(path: Path, hints: dict[str, Any]) -> None:
    """The facts a landscape checkpoint's header states (its model's name and arguments)."""
    from landscape.checkpoints import header_kwargs, read_checkpoint_info

    try:
        info = read_checkpoint_info(path)
        kwargs = header_kwargs(info)
    except LandscapeError:  # a damaged header: the tensors alone are read, as for any other file
        return
    _hint(hints, "arch", info.model, "the landscape checkpoint's header")
    hints["header"] = {"model": str(info.model), "kwargs": dict(kwargs)}  # the whole model, for what recovery cannot
    for key in ("num_heads", "global_pool", "img_size"):
        if key in kwargs:
            _hint(hints, key, kwargs[key], f"the landscape checkpoint's header ({key})")
    from landscape.models.variants import families

    if not families()["shallow"].matches(str(info.model)):
        if "mlp_ratio" in kwargs:  # a plain ViT of a narrow MLP, not a ShallowMLP variant
            _hint(hints, "mlp_ratio", kwargs["mlp_ratio"], "the landscape checkpoint's header (mlp_ratio)")
        return
    stated = {k: kwargs[k] for k in ("mlp_ratio", "width_ratio", "mlp_init") if k in kwargs}
    if stated:  # a ShallowMLP: its base MLP ratio, its narrowing and its init (the weights cannot tell sliced from
        hints["shallow"] = stated  # random), used where they give the weights' MLP width
        hints.setdefault("sources", {})["shallow"] = "the landscape checkpoint's header"


def _tensors_only(state: dict, path: Path) -> StateDict:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict: entries {', '.join(map(repr, bad[:5]))} are not tensors; "
            "give a state dict or a timm/DeiT/torchvision training checkpoint."
        )
    return dict(state)


# -- model directories (Hugging Face layout) and their config.json ------------------------------------------
def _model_dir_files(path: Path) -> tuple[Path | None, Path | None]:
    """``(config.json or None, weights file or None)`` for a weights file or a model directory."""
    if path.is_dir():
        config = path / "config.json"
        weights = next((path / n for n in HF_WEIGHT_FILES if (path / n).exists()), None)
        return (config if config.exists() else None), weights
    config = path.parent / "config.json"
    if path.name in HF_WEIGHT_FILES and config.exists():
        return config, path
    return None, path


def _read_sharded(index_file: Path) -> StateDict:
    index = _load_json(index_file)
    weight_map = index.get("weight_map") or {}
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise CheckpointError(f"{index_file}'s weight_map must map tensor names to shard file names.")
    shards = sorted(set(weight_map.values()))
    if not shards:
        raise CheckpointError(f"{index_file} lists no weight shards.")
    state: StateDict = {}
    for shard in shards:
        obj = read_weights_file(index_file.parent / shard)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{index_file.parent / shard} holds a {type(obj).__name__}, not a state dict.")
        state.update(_tensors_only(obj, index_file.parent / shard))
    return state


def _load_json(path: Path) -> dict:
    from landscape.io import refuse_special

    refuse_special(path, "a JSON file", error=CheckpointError)  # a pipe blocked the import forever
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{path} is not readable JSON ({e.__class__.__name__}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return data


def config_hints(config: dict, format: str, hints: dict[str, Any] | None = None) -> dict[str, Any]:
    """Architecture facts from a model directory's ``config.json``, added to ``hints`` (with where each was read).

    Hugging Face ``ViTConfig`` / ``DeiTConfig`` (format ``hf``): heads, image size, LayerNorm epsilon; another
    model type or a non-GELU activation is refused. timm's Hub export (other formats): the ``architecture``
    name, ``model_args`` (``num_heads``, ``global_pool``, ``img_size``) and ``pretrained_cfg.input_size``.
    """
    hints = hints if hints is not None else {}
    if format != "hf":
        _hint(hints, "arch", config.get("architecture"), "config.json architecture")
        model_args = config.get("model_args")
        if isinstance(model_args, dict):
            for key in ("num_heads", "global_pool", "img_size"):
                if key in model_args:
                    _hint(hints, key, model_args[key], f"config.json model_args.{key}")
            for key in STATED_SIZES:
                _state_size(hints, key, model_args.get(key), f"config.json model_args.{key}")
        pretrained = config.get("pretrained_cfg")
        if "img_size" not in hints and isinstance(pretrained, dict):
            _hint(hints, "img_size", pretrained.get("input_size"), "config.json pretrained_cfg.input_size")
        return hints
    model_type = config.get("model_type", "vit")
    if model_type not in ("vit", "deit"):
        raise CheckpointError(f"config.json describes {describe_hf_type(model_type)}; {VIT_ONLY}")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(
            f"config.json uses the activation {act!r}; only the exact GELU ('gelu') of timm's ViT is accepted."
        )
    for hf_key, key in (("num_attention_heads", "num_heads"), ("image_size", "img_size"),
                        ("layer_norm_eps", "layer_norm_eps")):
        if config.get(hf_key) is not None:
            _hint(hints, key, config[hf_key], f"config.json {hf_key}")
    for hf_key, key in (("num_hidden_layers", "depth"), ("hidden_size", "embed_dim"), ("num_channels", "in_chans"),
                        ("patch_size", "patch_size"), ("intermediate_size", "mlp_hidden")):
        _state_size(hints, key, config.get(hf_key), f"config.json {hf_key}")
    hints["hf_model_type"] = model_type
    return hints


STATED_SIZES = ("depth", "embed_dim", "in_chans", "patch_size")
"""Sizes a model folder's ``config.json`` may state, checked against the tensors after the architecture is read
from them (:func:`landscape.importers.recover.check_stated_sizes`)."""


def _state_size(hints: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Record a size ``config.json`` states (a positive whole number; anything else is ignored) under
    ``hints["stated"]``, for the check against the weights."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        hints.setdefault("stated", {})[key] = (value, where)


# -- a reference input and the source's logits on it ----------------------------------------------------------------------------------------
CHECK_INPUT_KEYS = ("input", "inputs", "x", "pixel_values")
CHECK_OUTPUT_KEYS = ("logits", "output", "outputs", "y")


def read_logits_pair(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """An input batch and the source model's logits on it, from ``path``.

    The file is written with ``torch.save({"input": x, "logits": y}, path)`` or safetensors'
    ``save_file({"input": x, "logits": y}, path)``: ``x`` float ``(N, C, H, W)`` as the source model takes it
    (already normalised), ``y`` ``(N, num_classes)``. ``inputs`` / ``x`` / ``pixel_values`` and ``output`` /
    ``outputs`` / ``y`` are accepted as names too.
    """
    path = Path(path)
    obj = read_weights_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}; --check-logits takes a dict with 'input' and "
                              "'logits' tensors (torch.save or safetensors).")
    x = next((obj[k] for k in CHECK_INPUT_KEYS if isinstance(obj.get(k), torch.Tensor)), None)
    y = next((obj[k] for k in CHECK_OUTPUT_KEYS if isinstance(obj.get(k), torch.Tensor)), None)
    if x is None or y is None:
        raise CheckpointError(f"{path} has no {'input' if x is None else 'logits'} tensor; --check-logits takes a "
                              "dict with 'input' (N, C, H, W) and 'logits' (N, classes) tensors.")
    return x, y
