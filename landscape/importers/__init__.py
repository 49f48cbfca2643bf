"""Checkpoints from other codebases: key filters, architecture recovery and ``landscape import``.

A foreign file goes through four steps, each a small function:

1. **read** (:func:`read_foreign_checkpoint`): only safetensors or ``torch.load(weights_only=True)``, through
   :func:`landscape.checkpoints.load_foreign_state`. The one class allowed beyond tensors and plain containers
   is ``argparse.Namespace``, which timm's ``train.py`` stores as ``args``: unpickling it only sets attributes.
   Training checkpoints are unpacked into raw and EMA weights (timm: ``state_dict`` / ``state_dict_ema``;
   DeiT and torchvision references: ``model`` / ``model_ema``).
2. **filter** (one function per source format, as timm's ``checkpoint_filter_fn``): the prefixes
   ``module.`` (DataParallel/DDP), ``_orig_mod.`` (``torch.compile``) and ``model.`` are stripped, then the keys
   are renamed to timm ``VisionTransformer`` names: :func:`filter_timm`, :func:`filter_deit`,
   :func:`filter_hf_vit`, :func:`filter_torchvision_vit`. A shared MLP that a deduplicating writer stored under
   one block of its group only is given back to every block (:func:`restore_shared_mlps`).
3. **recover the architecture** (:func:`recover_architecture`) from the tensor shapes:

   - ``embed_dim``, ``in_chans``, ``patch_size`` from ``patch_embed.proj.weight`` ``(D, C, p, p)``;
   - ``depth`` from the block indices, the MLP hidden width ``H`` from ``blocks.i.mlp.fc1.weight`` ``(H, D)``;
   - ``num_classes`` from ``head.weight`` (0 without a head);
   - the image size from ``pos_embed`` ``(1, L, D)``: ``L = T + (h/p)^2`` with ``T`` prefix tokens (class and
     register tokens) or ``L = (h/p)^2`` when the prefix tokens carry no position embedding;
   - ``num_heads`` cannot be read from the weights (the ``qkv`` projection is ``3D x D`` for any head count):
     the source's own config when it has one (Hugging Face ``config.json``, the timm architecture named in a
     ``train.py`` checkpoint), else the convention of the registered models for their widths (64: 2, 96: 3,
     128: 4, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16), else a head dimension of 64, else 32, else one head.
     ``--model-arg num_heads=N`` overrides it;
   - GroupedMLP: adjacent blocks whose MLP tensors are equal (``torch.equal``) form a group, and equal-sized
     groups give ``group_size``; a narrowed MLP has ``H < 4 D``;
   - the LayerNorm epsilon (Hugging Face's ``layer_norm_eps``, 1e-12 by default; timm uses 1e-6) is passed
     as ``norm_eps`` when it differs, or dropped with a note when the model cannot take it: the normalised
     features then change by a relative :math:`\\approx (\\epsilon_1 - \\epsilon_2) / 2\\sigma^2` for a token
     of feature variance :math:`\\sigma^2`.

4. **build and save** (:func:`import_checkpoint`): the model is built by its registered name and keyword
   arguments, the weights are loaded strictly (a mismatch is one readable block listing missing, unexpected
   and mis-shaped keys) and a run directory with one checkpoint is written in a temporary sibling directory
   that is renamed into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from landscape.checkpoints import load_foreign_state, load_state_dict_strict, save_checkpoint
from landscape.config import config_hash
from landscape.errors import CheckpointError, LandscapeError
from landscape.runs import Run

StateDict = dict[str, torch.Tensor]

PREFIXES = ("module.", "_orig_mod.", "model.")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")

# Heads of the registered ViTs and of timm's standard widths, by embedding width.
CONVENTIONAL_HEADS = {64: 2, 96: 3, 128: 4, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
TIMM_MLP_RATIO = 4.0
TIMM_NORM_EPS = 1e-6
BASE_MODEL = "vit_base_patch16_224"
DISTILLED_BASE_MODEL = "deit_base_distilled_patch16_224"


# == 1. reading ===============================================================================================
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
    raw = _strip_prefixes(raw)
    ema = _strip_prefixes(ema) if ema is not None else None
    if format is None:
        format = detect_format(raw, container=extra.get("container"), path=path)
    if config_file is not None:
        config_hints(_load_json(config_file), format, hints)
    filter_fn = FILTERS[format]
    return ForeignCheckpoint(
        path, format, restore_shared_mlps(filter_fn(raw)),
        restore_shared_mlps(filter_fn(ema)) if ema is not None else None,
        hints=hints, extra=extra, weights_file=weights_file,
    )


def read_weights_file(path: Path) -> Any:
    """The object stored in ``path``, read safely; ``argparse.Namespace`` (timm's ``args``) is allowed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_foreign_state(path)


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
    for raw_key, ema_key in (("state_dict", "state_dict_ema"), ("model", "model_ema"), ("model_state_dict", None)):
        if isinstance(obj.get(raw_key), dict):
            raw = obj[raw_key]
            ema = obj.get(ema_key) if ema_key else None
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
        extra["source_ema_n_averaged"] = int(ema["n_averaged"].reshape(-1)[0])  # torchvision's AveragedModel
        ema = {k: v for k, v in ema.items() if k != "n_averaged"}
    if isinstance(ema, dict) and not ema:
        ema = None
    return _tensors_only(raw, path), (_tensors_only(ema, path) if isinstance(ema, dict) else None), extra, hints


# Architecture facts a file may state that the tensors leave open; only these reach the model's arguments.
STATED_FACTS = ("num_heads", "global_pool", "img_size", "layer_norm_eps")
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


def _tensors_only(state: dict, path: Path) -> StateDict:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict: entries {', '.join(map(repr, bad[:5]))} are not tensors; "
            "give a state dict or a timm/DeiT/torchvision training checkpoint."
        )
    return dict(state)


def _strip_prefixes(state: StateDict) -> StateDict:
    """Remove ``module.``, ``_orig_mod.`` and ``model.`` while every key starts with the same one of them."""
    while state:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def detect_format(state: StateDict, *, container: str | None = None, path: Path | None = None) -> str:
    """The source format from its key names: timm (``patch_embed``), torchvision (``conv_proj``), hf (``embeddings``).

    timm-named weights inside a ``{"model": ...}`` container are DeiT's.
    """
    keys = list(state)
    what = describe_non_vit(state)
    if what is not None:
        raise CheckpointError(f"{path or 'The file'} is {what}; {VIT_ONLY}")
    if any(k.startswith(("patch_embed.", "blocks.")) for k in keys):
        return "deit" if container == "model" else "timm"
    if any(k.startswith(("conv_proj.", "encoder.layers.encoder_layer_")) for k in keys):
        return "torchvision"
    if any(k.startswith(("vit.embeddings.", "deit.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf"
    shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
    raise CheckpointError(
        f"Could not recognise the key names of {path or 'the file'} ({shown or 'no keys'}); accepted are the "
        f"formats {', '.join(FORMATS)}: name one with --format if the keys are of that kind."
    )


# == 2. key filters, one per source format ====================================================================
def filter_timm(state_dict: StateDict) -> StateDict:
    """timm ``VisionTransformer`` weights (bare, or the unpacked ``state_dict`` of a ``train.py`` checkpoint).

    The keys are already timm's; GroupedMLP checkpoints saved by plain timm code list a shared MLP under every
    block of its group, which is what the GroupedMLP model expects too.
    """
    return _strip_prefixes(dict(state_dict))


def filter_deit(checkpoint: dict) -> StateDict:
    """DeiT (``facebookresearch/deit``): ``{"model": state_dict}`` with timm names, distilled models included."""
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
    return filter_timm(state)


# Hugging Face ViT: saved files use the names of transformers 4 (which transformers 5 still writes);
# the in-memory names of transformers 5 are accepted too.
_HF_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"layers\.(\d+)\.attention\.(q|k|v)_proj\.", r"blocks.\1.attn.\2."),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
    (r"layernorm\.", "norm."),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"cls_classifier\.", "head."),
    (r"distillation_classifier\.", "head_dist."),
    (r"classifier\.", "head."),
]
# Unused by the classifier's logits: the masked-image-modelling token and ViTModel's pooler.
_HF_UNUSED = (r"embeddings\.mask_token", r"pooler\.")


def filter_hf_vit(state_dict: StateDict) -> StateDict:
    """Hugging Face ``ViTForImageClassification`` (or ``ViTModel``) weights to timm names.

    ``DeiTForImageClassificationWithTeacher`` maps to timm's distilled DeiT: its logits are the mean of the
    class-token head (``cls_classifier`` -> ``head``) and the distillation-token head
    (``distillation_classifier`` -> ``head_dist``), as timm's in eval mode.

    The separate query, key and value projections are stacked into timm's ``qkv`` as ``[W_q; W_k; W_v]``
    (shape ``(3D, D)``), the order in which timm splits ``qkv`` into heads. The mask token and pooler are
    dropped: the classifier reads the normalised class token only.
    """
    state = _strip_prefixes(dict(state_dict))
    if any(k.endswith("embeddings.distillation_token") for k in state) and not any(
            k.startswith("distillation_classifier.") for k in state):
        raise CheckpointError(
            "This is a Hugging Face DeiTForImageClassification: its classifier reads the class token alone while a "
            "distillation token takes part in attention, a model timm does not build (its distilled DeiT averages "
            "a class-token and a distillation-token head); save the model as DeiTForImageClassificationWithTeacher "
            "(both heads), whose logits landscape rebuilds exactly."
        )
    out: StateDict = {}
    for key, value in state.items():
        name = key.split(".", 1)[1] if key.startswith(("vit.", "deit.")) else key
        if any(re.fullmatch(p + ".*", name) for p in _HF_UNUSED):
            continue
        out[_rename(name, _HF_RENAMES)] = value
    return _stack_qkv(out, {"query": "q", "key": "k", "value": "v"})


def _rename(name: str, renames: list[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        new, n = re.subn("^" + pattern, replacement, name)
        if n:
            return new
    return name


def _stack_qkv(state: StateDict, aliases: dict[str, str]) -> StateDict:
    """Join ``blocks.i.attn.{q,k,v}.{weight,bias}`` into ``blocks.i.attn.qkv.{weight,bias}``."""
    parts = {**{a: a for a in aliases.values()}, **aliases}
    pattern = re.compile(r"^(blocks\.\d+\.attn)\.(" + "|".join(map(re.escape, parts)) + r")\.(weight|bias)$")
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out: StateDict = {}
    for key, value in state.items():
        m = pattern.match(key)
        if m is None:
            out[key] = value
        else:
            grouped.setdefault((m.group(1), m.group(3)), {})[parts[m.group(2)]] = value
    for (attn, kind), qkv in grouped.items():
        if set(qkv) != {"q", "k", "v"}:
            for part, value in qkv.items():
                out[f"{attn}.{part}.{kind}"] = value  # left as is: shows up as unexpected
            continue
        out[f"{attn}.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


_TORCHVISION_RENAMES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.", "patch_embed.proj."),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_weight", r"blocks.\1.attn.qkv.weight"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_bias", r"blocks.\1.attn.qkv.bias"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.ln\.", "norm."),
    (r"heads\.head\.", "head."),
]


def filter_torchvision_vit(state_dict: StateDict) -> StateDict:
    """torchvision ``VisionTransformer`` (``vit_b_16`` and kin) weights to timm names.

    ``nn.MultiheadAttention``'s ``in_proj_weight`` is already ``[W_q; W_k; W_v]`` with heads contiguous, as
    timm's ``qkv``. MLP layers are ``mlp.0``/``mlp.3`` (or ``linear_1``/``linear_2`` in older files).
    A ``heads.pre_logits`` layer (``representation_size``) has no timm counterpart and is refused.
    """
    state = _strip_prefixes(dict(state_dict))
    if any(k.startswith("heads.pre_logits") for k in state):
        raise CheckpointError(
            "This torchvision ViT has a pre-logits layer (representation_size), which timm's VisionTransformer "
            "does not have; only ViTs whose head is a single linear layer can be imported."
        )
    return {_rename(k, _TORCHVISION_RENAMES): v for k, v in state.items()}


def restore_shared_mlps(state: StateDict) -> StateDict:
    """Give every block its MLP names back when a deduplicating writer kept a shared MLP under one block only.

    safetensors' ``save_model`` stores a tensor shared by several names once, under one of them. If ``k`` of
    the ``depth`` blocks have MLP weights and the others none, the blocks are taken to form ``k`` groups of
    ``g = depth / k`` adjacent blocks (the GroupedMLP layout), each holding exactly one stored MLP, which
    every block of the group then points to. Any other pattern is left for the strict load to report.
    """
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    with_mlp = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.mlp\.", k))})
    depth = max(blocks, default=-1) + 1
    if not with_mlp or len(with_mlp) == depth or depth % len(with_mlp):
        return state
    group_size = depth // len(with_mlp)
    if [i // group_size for i in with_mlp] != list(range(len(with_mlp))):
        return state
    out = dict(state)
    for source in with_mlp:
        prefix = f"blocks.{source}.mlp."
        mlp = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        start = source // group_size * group_size
        for block in range(start, start + group_size):
            out.update({f"blocks.{block}.mlp.{name}": v for name, v in mlp.items()})
    return out


FILTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "timm": filter_timm,
    "deit": filter_deit,
    "hf": filter_hf_vit,
    "torchvision": filter_torchvision_vit,
}
FORMATS = tuple(FILTERS)


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
    shards = sorted(set((index.get("weight_map") or {}).values()))
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
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
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
        pretrained = config.get("pretrained_cfg")
        if "img_size" not in hints and isinstance(pretrained, dict):
            _hint(hints, "img_size", pretrained.get("input_size"), "config.json pretrained_cfg.input_size")
        return hints
    model_type = config.get("model_type", "vit")
    if model_type not in ("vit", "deit"):
        raise CheckpointError(f"config.json describes {_describe_hf_type(model_type)}; {VIT_ONLY}")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(
            f"config.json uses the activation {act!r}; only the exact GELU ('gelu') of timm's ViT is accepted."
        )
    for hf_key, key in (("num_attention_heads", "num_heads"), ("image_size", "img_size"),
                        ("layer_norm_eps", "layer_norm_eps")):
        if config.get(hf_key) is not None:
            _hint(hints, key, config[hf_key], f"config.json {hf_key}")
    hints["hf_model_type"] = model_type
    return hints


VIT_ONLY = ("landscape imports plain ViTs (timm VisionTransformer and DeiT, Hugging Face ViT and DeiT, torchvision "
            "vit_*), and builds any other timm model only from its own registered name with --model NAME.")
_HF_TYPES = {"swin": "a Swin Transformer", "swinv2": "a Swin Transformer V2", "beit": "a BEiT",
             "convnext": "a ConvNeXt", "resnet": "a ResNet", "dinov2": "a DINOv2 ViT (layer scale, SwiGLU options)",
             "vit_mae": "a ViT-MAE pre-training model", "levit": "a LeViT", "mobilevit": "a MobileViT",
             "deit": "a DeiT", "vit_hybrid": "a hybrid CNN-ViT", "dpt": "a DPT", "clip": "a CLIP model"}


def _describe_hf_type(model_type: Any) -> str:
    what = _HF_TYPES.get(str(model_type))
    return f"{what} model (model_type {model_type!r})" if what else f"a {model_type!r} model, not a ViT"


def describe_non_vit(state: StateDict) -> str | None:
    """What a state dict is when its key names show a known model that is not a plain ViT, else ``None``."""
    keys = list(state)
    has = lambda pattern: any(re.search(pattern, k) for k in keys)  # noqa: E731
    if has(r"relative_position_bias_table") and has(r"(^|\.)layers\.\d+\.blocks\.\d+\."):
        return "a Swin Transformer checkpoint"
    if has(r"(^|\.)layers\.\d+\.blocks\.\d+\.") and has(r"downsample"):
        return "a hierarchical (Swin-like) transformer checkpoint"
    if has(r"relative_position_bias_table") or has(r"rel_pos_bias"):
        return "a BEiT-style ViT with relative position biases"
    if has(r"(^|\.)stages\.\d+\.") and has(r"(^|\.)stem\."):
        return "a convolutional network with stages (ConvNeXt, RegNet or similar)"
    if has(r"(^|\.)layer[1-4]\.\d+\.conv\d") or has(r"^conv1\.weight$"):
        return "a ResNet-style convolutional network"
    if has(r"(^|\.)decoder_blocks?\.") or has(r"(^|\.)decoder_embed\."):
        return "a masked-autoencoder (MAE) pre-training checkpoint with its decoder"
    return None


# == 3. architecture recovery =================================================================================
@dataclass
class Architecture:
    """A timm ``VisionTransformer`` as far as its weights (and the source's hints) determine it."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_hidden: int
    num_classes: int
    patch_size: int
    in_chans: int
    img_size: int | None
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool = False
    global_pool: str = "token"
    distilled: bool = False
    group_size: int = 1
    norm_eps: float | None = None
    notes: list[str] = field(default_factory=list)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.embed_dim

    @property
    def width_ratio(self) -> float:
        """MLP width relative to ViT's standard ``4 D``."""
        return self.mlp_hidden / (TIMM_MLP_RATIO * self.embed_dim)


_UNSUPPORTED = {
    "attn_pool.": "attention pooling (global_pool='map')",
    "patch_embed.backbone.": "a hybrid CNN stem",
}


def recover_architecture(state: StateDict, hints: dict[str, Any] | None = None) -> Architecture:
    """Infer a timm ``VisionTransformer``'s arguments from its (timm-named) weights; see the module docstring."""
    hints = dict(hints or {})
    sources = dict(hints.get("sources") or {})
    notes: list[str] = []
    facts: dict[str, dict[str, Any]] = {}
    what = describe_non_vit(state)
    if what is not None:
        raise CheckpointError(f"This is {what}; {VIT_ONLY}")
    for prefix, what in _UNSUPPORTED.items():
        if any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"The weights use {what}, which cannot be rebuilt from weights alone; "
                                  "name the model with --model.")
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise CheckpointError(
            "The weights have no 4-d patch embedding (patch_embed.proj.weight), so this is not a ViT that "
            "can be recovered from its tensors; name the model with --model."
        )
    embed_dim, in_chans, ph, pw = (int(s) for s in proj.shape)
    if ph != pw:
        raise CheckpointError(f"The patch embedding has non-square {ph}x{pw} patches; only square patches are supported.")

    depth = _depth(state)
    hidden = _mlp_hidden(state, depth)
    class_token = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    distilled = "dist_token" in state
    prefix_tokens = int(class_token) + reg_tokens + int(distilled)

    img_size, no_embed_class = _image_size(state, ph, prefix_tokens, hints.get("img_size"), notes)
    if "img_size" in sources and img_size == hints.get("img_size"):
        facts["img_size"] = _read(img_size, sources["img_size"])
    else:
        facts["img_size"] = {"value": img_size, "how": "read", "from": "the position embedding's length"}
    head = state.get("head.weight")
    fc_norm = "fc_norm.weight" in state
    num_heads, rule = _num_heads(embed_dim, hints)
    if rule:
        notes.append(f"num_heads={num_heads} {rule} (the weights cannot tell); pass --model-arg num_heads=N "
                     "if the source used another")
        facts["num_heads"] = _guessed(num_heads, rule)
    else:
        where = sources.get("num_heads") or (f"the named architecture {hints.get('arch')}" if "arch" in hints else
                                             "--model-arg")
        facts["num_heads"] = _read(num_heads, where)
    global_pool = _global_pool(class_token, fc_norm, hints, sources, facts, notes)
    if hints.get("layer_norm_eps") is not None:
        facts["norm_eps"] = _read(float(hints["layer_norm_eps"]), sources.get("layer_norm_eps", "--model-arg"))
    arch = Architecture(
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        mlp_hidden=hidden,
        num_classes=int(head.shape[0]) if head is not None else 0,
        patch_size=ph,
        in_chans=in_chans,
        img_size=img_size,
        class_token=class_token,
        reg_tokens=reg_tokens,
        no_embed_class=no_embed_class,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        layer_scale="blocks.0.ls1.gamma" in state,
        pre_norm="norm_pre.weight" in state,
        final_norm="norm.weight" in state or fc_norm,
        fc_norm=fc_norm,
        global_pool=global_pool,
        distilled=distilled,
        group_size=mlp_group_size(state, depth),
        norm_eps=float(hints["layer_norm_eps"]) if hints.get("layer_norm_eps") is not None else None,
        notes=notes,
        facts=facts,
    )
    return arch


def _read(value: Any, where: str) -> dict[str, Any]:
    return {"value": value, "how": "read", "from": where}


def _guessed(value: Any, rule: str) -> dict[str, Any]:
    return {"value": value, "how": "guessed", "rule": rule}


def _global_pool(class_token: bool, fc_norm: bool, hints: dict[str, Any], sources: dict[str, str],
                 facts: dict[str, dict[str, Any]], notes: list[str]) -> str:
    """The pooling of the classifier: stated by the source, else guessed from the tensors where they allow two.

    The tensors decide it only without a class token (average pooling). With a class token and no ``fc_norm``,
    token pooling and average pooling without ``fc_norm`` have the same weights; with ``fc_norm``, average, max
    and avg+max pooling do. The common choice is taken and said.
    """
    stated = hints.get("global_pool")
    if stated is not None:
        if stated == "token" and not class_token:
            raise CheckpointError("The source states class-token pooling (global_pool='token'), but the weights "
                                  "have no class token; pass --model-arg global_pool=avg.")
        facts["global_pool"] = _read(stated, sources.get("global_pool", "--model-arg"))
        return stated
    if not class_token:
        facts["global_pool"] = _read("avg", "the weights (no class token)")
        return "avg"
    pool = "avg" if fc_norm else "token"
    rule = ("fc_norm present: average pooling is the usual choice over max and avgmax" if fc_norm else
            "class token and no fc_norm: token pooling is the usual choice, but average pooling without fc_norm "
            "has the same weights")
    other = "max" if fc_norm else "avg"
    notes.append(f"global_pool={pool!r} guessed ({rule}); pass --model-arg global_pool={other} if the source "
                 "pooled otherwise, or --check-logits FILE to verify")
    facts["global_pool"] = _guessed(pool, rule)
    return pool


def _depth(state: StateDict) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not indices:
        raise CheckpointError("The weights have no transformer blocks (no keys blocks.<i>.*).")
    depth = max(indices) + 1
    missing = sorted(set(range(depth)) - indices)
    if missing:
        raise CheckpointError(f"The weights have no block(s) {', '.join(map(str, missing))} out of 0..{depth - 1}.")
    return depth


def _mlp_hidden(state: StateDict, depth: int) -> int:
    widths = []
    for i in range(depth):
        fc1 = state.get(f"blocks.{i}.mlp.fc1.weight")
        if fc1 is None:
            raise CheckpointError(
                f"Block {i} has no MLP weights (blocks.{i}.mlp.fc1.weight); a ViT with a plain MLP in every "
                "block is expected, or name the model with --model."
            )
        widths.append(int(fc1.shape[0]))
    if len(set(widths)) > 1:
        raise CheckpointError(
            f"The blocks have MLPs of different widths ({', '.join(map(str, widths))}), which a timm "
            "VisionTransformer cannot build; name the model with --model."
        )
    return widths[0]


def _image_size(
    state: StateDict, patch: int, prefix_tokens: int, hinted: Any, notes: list[str]
) -> tuple[int | None, bool]:
    """``(img_size, no_embed_class)`` from ``pos_embed``'s length ``L``.

    ``L - T`` must be a square number of patches ``(h/p)^2`` with the ``T`` prefix tokens embedded (timm's
    default), or ``L`` itself when they are not (``no_embed_class``). A stated image size picks between the two.
    """
    pos = state.get("pos_embed")
    if pos is None:
        if hinted is None:
            raise CheckpointError("The weights have no position embedding, so the image size is unknown; "
                                  "give it with --model-arg img_size=N.")
        return int(hinted), False
    length = int(pos.shape[1])
    layouts = [(length - prefix_tokens, False)] + ([(length, True)] if prefix_tokens else [])
    fits = [(math.isqrt(n) * patch, no_embed) for n, no_embed in layouts if n > 0 and math.isqrt(n) ** 2 == n]
    if not fits:
        raise CheckpointError(
            f"The position embedding has {length} tokens, which is no square grid of patches "
            f"(with or without {prefix_tokens} prefix tokens); give the image size with --model-arg img_size=N."
        )
    stated = [f for f in fits if hinted is not None and f[0] == int(hinted)]
    if hinted is not None and not stated:
        notes.append(f"the source states image size {hinted}, but the position embedding fits {fits[0][0]}")
    return (stated or fits)[0]


def _num_heads(embed_dim: int, hints: dict[str, Any]) -> tuple[int, str]:
    """``(num_heads, how it was chosen)``; an empty rule means the source stated it."""
    if hints.get("num_heads"):
        return int(hints["num_heads"]), ""
    if hints.get("arch") and _is_model(hints["arch"]):
        heads = _heads_of(hints["arch"])
        if heads is not None:
            return heads, ""
    if embed_dim in CONVENTIONAL_HEADS:
        return CONVENTIONAL_HEADS[embed_dim], f"by the convention for width {embed_dim}"
    for head_dim in (64, 32):
        if embed_dim % head_dim == 0:
            return embed_dim // head_dim, f"guessed from a head dimension of {head_dim}"
    return 1, "guessed (width not divisible by 32)"


def _heads_of(name: str) -> int | None:
    """The head count of a registered model at its defaults, built on the meta device (no memory, no init)."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name)
        return int(model.blocks[0].attn.num_heads)
    except Exception:  # not a ViT with timm blocks: fall back to the conventions
        return None


def _mlp_tensors(state: StateDict, block: int) -> dict[str, torch.Tensor]:
    prefix = f"blocks.{block}.mlp."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if not a or a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.data_ptr() == y.data_ptr() and x.stride() == y.stride():
            continue
        if not torch.equal(x, y):
            return False
    return True


def mlp_group_size(state: StateDict, depth: int) -> int:
    """Size of the groups of adjacent blocks whose MLP tensors are all equal (1: no sharing).

    Blocks ``0..depth-1`` split into runs of equal MLPs; the runs must all have one length ``g`` that divides
    ``depth`` (the GroupedMLP layout), else the sharing cannot be rebuilt and the file is refused.
    """
    runs = [1]
    for i in range(1, depth):
        if _same_tensors(_mlp_tensors(state, i - 1), _mlp_tensors(state, i)):
            runs[-1] += 1
        else:
            runs.append(1)
    if len(set(runs)) > 1:
        raise CheckpointError(
            f"The blocks share MLP weights in runs of {', '.join(map(str, runs))} adjacent blocks; "
            "only equal groups (GroupedMLP) can be rebuilt."
        )
    return runs[0]


# -- from architecture to (registered name, keyword arguments) -----------------------------------------------
@dataclass
class ModelSpec:
    """A registered model name and the keyword arguments that rebuild the imported model."""

    name: str
    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    label: str | None = None  # what the model is, when the registered name alone would not say it
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)


def _registered_models() -> Callable[[str], bool]:
    _import_zoo()
    import timm

    return timm.is_model


def _import_zoo() -> None:
    try:
        import landscape.models  # noqa: F401  (registers the variants with timm)
    except ImportError:
        pass


def _is_model(name: str) -> bool:
    return _registered_models()(name)


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """Build a registered model through the model zoo (plain timm while the zoo is absent)."""
    try:
        from landscape.models import create_model as zoo_create_model
    except ImportError:
        import timm

        zoo_create_model = timm.create_model
    try:
        return zoo_create_model(name, **kwargs)
    except LandscapeError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(
            f"Model {name} could not be built with {_kwargs_text(kwargs)} ({_first_line(e)})."
        ) from None


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else e.__class__.__name__)[:200]


def vit_kwargs(arch: Architecture) -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments for ``arch``: the shape always, other options when not default."""
    kwargs: dict[str, Any] = {
        "img_size": arch.img_size,
        "patch_size": arch.patch_size,
        "in_chans": arch.in_chans,
        "num_classes": arch.num_classes,
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
    }
    kwargs["num_heads"] = arch.num_heads
    kwargs["mlp_ratio"] = arch.mlp_ratio
    if not arch.distilled:
        optional = {
            "class_token": (arch.class_token, True),
            "reg_tokens": (arch.reg_tokens, 0),
            "no_embed_class": (arch.no_embed_class, False),
            "global_pool": (arch.global_pool, "token"),
            "fc_norm": (arch.fc_norm, arch.global_pool in ("avg", "max", "avgmax")),  # timm's default follows the pool
            "final_norm": (arch.final_norm, True),
            "pre_norm": (arch.pre_norm, False),
        }
        kwargs.update({k: v for k, (v, default) in optional.items() if v != default})
    if not arch.qkv_bias:
        kwargs["qkv_bias"] = False
    if arch.qk_norm:
        kwargs["qk_norm"] = True
    if arch.layer_scale:
        kwargs["init_values"] = 1e-5  # only makes the layer-scale parameters exist; the file sets them
    if arch.norm_eps is not None and arch.norm_eps != TIMM_NORM_EPS:
        kwargs["norm_eps"] = arch.norm_eps
    return kwargs


def model_spec(arch: Architecture, hints: dict[str, Any] | None = None) -> ModelSpec:
    """The registered name and keyword arguments for ``arch``, always with explicit shape arguments.

    The base name is the timm architecture the source names (timm ``train.py``'s ``arch``), else the registered
    ViT of the same patch, width, depth and heads, else timm's ``vit_{tiny,small,base,large,huge}_patch{p}_{img}``
    of that width, else ``vit_base_patch16_224``. Shared MLPs use its ``_grouped_mlp`` variant with
    ``group_size``; MLPs narrower than ``4 D`` (and not shared) its ``_shallow_mlp`` variant with
    ``width_ratio = H / 4D``; DeiT's distilled ViT is ``deit_base_distilled_patch16_224``.
    """
    hints = hints or {}
    is_model = _registered_models()
    kwargs = vit_kwargs(arch)
    notes = list(arch.notes)
    if arch.distilled:
        if arch.group_size > 1:
            raise CheckpointError("A distilled DeiT with shared MLPs has no registered model; name one with --model.")
        return ModelSpec(DISTILLED_BASE_MODEL, kwargs, notes)
    base = _base_name(arch, hints, is_model)
    variant = lambda suffix: next((n for n in (base + suffix, BASE_MODEL + suffix) if is_model(n)), None)  # noqa: E731
    if arch.group_size > 1:
        grouped = variant("_grouped_mlp")
        if grouped is None:
            raise CheckpointError(
                f"The weights share MLPs in groups of {arch.group_size} adjacent blocks, but no GroupedMLP model "
                "is registered (landscape.models is missing)."
            )
        return ModelSpec(grouped, {**kwargs, "group_size": arch.group_size}, notes)
    shallow = variant("_shallow_mlp")
    if arch.mlp_hidden < TIMM_MLP_RATIO * arch.embed_dim and shallow is not None:
        notes.append(f"MLP width {arch.mlp_hidden} < 4 x {arch.embed_dim}: built as the ShallowMLP variant")
        return ModelSpec(shallow, {**kwargs, "mlp_ratio": TIMM_MLP_RATIO, "width_ratio": arch.width_ratio}, notes)
    return ModelSpec(base, kwargs, notes)


_TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def _base_name(arch: Architecture, hints: dict[str, Any], is_model: Callable[[str], bool]) -> str:
    """A registered name whose family the weights belong to; the explicit keyword arguments do the rest."""
    if hints.get("arch") and is_model(hints["arch"]):
        return hints["arch"]
    try:
        from landscape.models.vit import VIT_ARGS
    except ImportError:
        VIT_ARGS = {}
    shape = (arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads)
    for name, args in VIT_ARGS.items():
        if (args.get("patch_size"), args.get("embed_dim"), args.get("depth"), args.get("num_heads")) == shape:
            if is_model(name):
                return name
    size = _TIMM_SIZES.get(arch.embed_dim)
    timm_name = f"vit_{size}_patch{arch.patch_size}_{arch.img_size}"
    if size and is_model(timm_name):
        return timm_name
    return BASE_MODEL


def resolve_model(
    foreign: ForeignCheckpoint, model: str | None = None, model_args: dict[str, Any] | None = None
) -> ModelSpec:
    """The model to build: recovered from the weights, or ``model`` with the data-facing sizes recovered.

    With ``model`` named, only ``img_size``, ``in_chans`` and ``num_classes`` are taken from the weights (when
    they can be read) and the name supplies the rest. ``model_args`` override the keyword arguments in both
    cases.
    """
    model_args = dict(model_args or {})
    hints = dict(foreign.hints)
    hints["sources"] = dict(hints.get("sources") or {})
    for key in ("num_heads", "img_size", "global_pool"):
        if key in model_args:
            hints[key] = model_args[key]
            hints["sources"][key] = "--model-arg"
    if model is None:
        arch = recover_architecture(foreign.state_dict, hints)
        spec = model_spec(arch, hints)
        spec.kwargs.update(model_args)
        spec.facts = dict(arch.facts)
        for key, value in model_args.items():
            spec.facts[key] = _read(value, "--model-arg")
        spec.label = model_label(spec)
        return spec
    try:
        arch = recover_architecture(foreign.state_dict, hints)
    except CheckpointError:
        return ModelSpec(model, model_args, facts={k: _read(v, "--model-arg") for k, v in model_args.items()})
    kwargs = {"img_size": arch.img_size, "in_chans": arch.in_chans, "num_classes": arch.num_classes, **model_args}
    facts = {"img_size": arch.facts["img_size"], **{k: _read(v, "--model-arg") for k, v in model_args.items()}}
    return ModelSpec(model, kwargs, [n for n in arch.notes if n.startswith("the source states image size")],
                     facts=facts)


# Arguments that say which architecture a ViT is (the data-facing ones, classes and input, are not its identity).
_LABEL_ARGS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size")


def model_label(spec: ModelSpec) -> str | None:
    """What the imported model is, when its registered name would say something else; ``None`` when it fits.

    The registered name fits when the model built from it at its defaults (classes and input channels aside)
    has the same tensors, heads and pooling as the imported one. Otherwise the label is the recovered
    architecture, e.g. ``vit(embed_dim=192,depth=12,num_heads=3,patch_size=16,img_size=224)``, with the
    family's suffix (``deit_distilled(...)``, ``vit(...)_grouped_mlp``) and any other argument that differs
    from timm's default (``mlp_ratio``, ``global_pool``, ``reg_tokens``, ...).
    """
    if _same_as_registered(spec):
        return None
    kwargs = spec.kwargs
    family = "deit_distilled" if spec.name.startswith("deit_") and "distilled" in spec.name else "vit"
    shown = [f"{k}={kwargs[k]}" for k in _LABEL_ARGS if k in kwargs]
    skip = set(_LABEL_ARGS) | {"num_classes", "in_chans", "group_size", "width_ratio", "mlp_ratio", "init_values"}
    if "_shallow_mlp" not in spec.name and kwargs.get("mlp_ratio", TIMM_MLP_RATIO) != TIMM_MLP_RATIO:
        shown.append(f"mlp_ratio={kwargs['mlp_ratio']:g}")
    shown += [f"{k}={v}" for k, v in kwargs.items() if k not in skip]
    suffix = next((x for x in ("_grouped_mlp", "_shallow_mlp") if spec.name.endswith(x)), "")
    return f"{family}({','.join(shown)}){suffix}"


def _same_as_registered(spec: ModelSpec) -> bool:
    """Whether ``spec.name`` at its defaults is the model ``spec`` builds (tensors, heads, pooling, epsilon)."""
    data_facing = {k: spec.kwargs[k] for k in ("num_classes", "in_chans") if k in spec.kwargs}

    def signature(kwargs: dict[str, Any]) -> tuple | None:
        try:
            with torch.device("meta"):
                model = create_model(spec.name, **kwargs)
        except Exception:  # noqa: BLE001  (a name that cannot be built on its own cannot name the model)
            return None
        blocks = getattr(model, "blocks", None)
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks is not None else None
        eps = next((m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)), None)
        shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
        return shapes, heads, getattr(model, "global_pool", None), eps

    if "norm_eps" in spec.kwargs and spec.kwargs["norm_eps"] != TIMM_NORM_EPS:
        return False
    built = signature({k: v for k, v in spec.kwargs.items() if k != "norm_eps"})
    return built is not None and built == signature(data_facing)


def build_for_import(spec: ModelSpec) -> torch.nn.Module:
    """Build ``spec`` to be loaded; a LayerNorm epsilon that the model zoo cannot take is dropped with a note."""
    try:
        return _build_uninitialised(spec.name, spec.kwargs)
    except LandscapeError:
        if "norm_eps" not in spec.kwargs:
            raise
    eps = spec.kwargs.pop("norm_eps")
    spec.notes.append(
        f"the source's LayerNorm epsilon is {eps:g} but the model is built with timm's {TIMM_NORM_EPS:g}: "
        "logits differ where a token's features have a variance not far above these"
    )
    return _build_uninitialised(spec.name, spec.kwargs)


def _build_uninitialised(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The model without timm's weight initialisation, which the strict load overwrites entirely (ViT-B: ~5 s)."""
    try:
        return create_model(name, **kwargs, weight_init="skip")
    except LandscapeError as e:
        if "weight_init" not in str(e):
            raise
    return create_model(name, **kwargs)


def load_into_model(spec: ModelSpec, state: StateDict, *, source: str) -> torch.nn.Module:
    """Build ``spec`` and load ``state`` strictly; any key mismatch is one :class:`CheckpointError` block."""
    model = build_for_import(spec)
    load_state_dict_strict(model, state, source=source)
    _check_sharing(model, state, source)
    return model.eval()


def _check_sharing(model: torch.nn.Module, state: StateDict, source: str) -> None:
    """Every name of a shared parameter must hold the same values in the file (else loading kept only the last)."""
    names_by_param: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_param.setdefault(id(tensor), []).append(name)
    for names in names_by_param.values():
        first = state[names[0]]
        for other in names[1:]:
            if not torch.equal(state[other], first):
                raise CheckpointError(
                    f"The weights in {source} give {names[0]} and {other} different values, but the model "
                    "shares one parameter between them; build the model without sharing."
                )


# == 4. import ================================================================================================
@dataclass
class ImportResult:
    """What :func:`import_checkpoint` wrote."""

    run: Run
    checkpoint: Path
    format: str
    model: str
    model_kwargs: dict[str, Any]
    num_params: int
    has_ema: bool
    data: str
    notes: list[str]
    builder: str | None = None
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)


def guess_dataset(num_classes: int, in_chans: int, img_size: int | None) -> str:
    """The dataset an imported model was most likely trained on, from its classes, channels and image size."""
    if in_chans == 1 and num_classes == 10:
        return "digits" if img_size == 8 else "mnist"
    if in_chans == 3 and num_classes == 10:
        return "cifar10"
    if in_chans == 3 and num_classes == 100:
        return "cifar100"
    return "imagefolder"


def import_data_config(spec: ModelSpec, data: str | None, img_size: int | None, classes: int | None,
                       data_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[str]]:
    """The ``data`` section of an imported run and its notes; refuses data that does not fit the model.

    ``synthetic`` data takes the model's channels, image size and classes unless ``img_size`` / ``classes``
    say otherwise.
    """
    from landscape.data import check_data_fits

    kwargs = spec.kwargs
    model_size, in_chans, num_classes = kwargs.get("img_size"), kwargs.get("in_chans", 3), kwargs.get("num_classes")
    notes: list[str] = []
    name = data or guess_dataset(num_classes or 0, in_chans, model_size)
    if data is None:
        notes.append(f"dataset {name!r} guessed from classes, channels and image size; set it with --data "
                     "(--data synthetic analyses the model with no dataset on disk)")
    if classes is not None and name != "synthetic":
        raise LandscapeError(f"--classes sets the classes of synthetic data only; {name} has its own classes.")
    options: dict[str, Any] = {}
    if name == "synthetic":
        options = {"in_chans": in_chans, "num_classes": classes or num_classes or 10}
    size = img_size or model_size
    check_data_fits(name, img_size=size, options=options, model_in_chans=in_chans, model_img_size=model_size,
                    model_classes=num_classes, data_dir=data_dir)
    config: dict[str, Any] = {"name": name, "img_size": size}
    if options:
        config["options"] = options
    return config, notes


# -- verifying logits -----------------------------------------------------------------------------------------
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


LOGITS_RTOL = 1e-4


def verify_logits(model: torch.nn.Module, x: torch.Tensor, expected: torch.Tensor, *, source: str,
                  facts: dict[str, dict[str, Any]] | None = None) -> float:
    """The largest absolute difference between ``model(x)`` and ``expected``; refused above the tolerance.

    The tolerance is :data:`LOGITS_RTOL` times the largest expected logit (at least 1): float32 models from two
    codebases agree to about 1e-6 of that, a wrong head count or pooling differs by whole units.
    """
    if x.ndim != 4 or expected.ndim != 2 or x.shape[0] != expected.shape[0]:
        raise CheckpointError(f"{source} must hold an input (N, C, H, W) and logits (N, classes) of the same N, "
                              f"not {tuple(x.shape)} and {tuple(expected.shape)}.")
    try:
        with torch.no_grad():
            out = model.eval()(x.float())
    except RuntimeError as e:
        raise CheckpointError(f"The imported model cannot take the input in {source} ({_first_line(e)}).") from None
    out = getattr(out, "logits", out)
    if tuple(out.shape) != tuple(expected.shape):
        raise CheckpointError(f"The imported model gives logits of shape {tuple(out.shape)}, but {source} holds "
                              f"{tuple(expected.shape)}.")
    diff = float((out.double() - expected.double()).abs().max())
    tol = LOGITS_RTOL * max(1.0, float(expected.double().abs().max()))
    if not diff <= tol:
        guessed = [f"{k}={f['value']!r}" for k, f in (facts or {}).items() if f.get("how") == "guessed"]
        hint = (f"the guessed {', '.join(guessed)} may be wrong: override with --model-arg KEY=VALUE" if guessed
                else "check the --model-arg values and the format")
        raise CheckpointError(f"The imported model's logits differ from those in {source} by up to {diff:.3g} "
                              f"(tolerance {tol:.3g}), so it is not the source's model; {hint}.")
    return diff


def _check_dataset(name: str) -> None:
    try:
        from landscape.data import dataset_names
    except ImportError:
        return
    names = list(dataset_names())
    if name not in names:
        raise LandscapeError(f"Unknown dataset {name!r}; accepted are {', '.join(names)}.")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes a private (0700) directory; the run should get the permissions of a plain mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


IMPORT_STAGES = ("reading the file", "building the model", "checking logits", "loading EMA weights", "writing the run")


def import_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    model: str | None = None,
    model_args: dict[str, Any] | None = None,
    data: str | None = None,
    img_size: int | None = None,
    classes: int | None = None,
    check_logits: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: Callable[[str], Any] | None = None,
) -> ImportResult:
    """Turn a foreign checkpoint into a run directory ``out`` with one checkpoint (step 0) and its config.

    ``progress`` is called with the name of each stage of :data:`IMPORT_STAGES` as it starts (a progress bar).

    Everything is checked (read, filter, recover, build, strict load of raw and EMA weights, the logits against
    ``check_logits`` or a reference output the file holds, the data against the model's input and classes)
    before anything is written; the run is then written into a temporary sibling directory renamed onto ``out``
    at the end. ``out`` must not exist or be an empty directory.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LandscapeError(f"{out} already exists; choose a new --out directory for the imported run.")
    if data is not None:
        _check_dataset(data)

    stage = progress or (lambda name: None)
    stage(IMPORT_STAGES[0])
    foreign = read_foreign_checkpoint(source, format)
    stage(IMPORT_STAGES[1])
    spec = resolve_model(foreign, model, model_args)
    label = str(foreign.path)
    raw_model = load_into_model(spec, foreign.state_dict, source=label)
    stage(IMPORT_STAGES[2])
    notes = list(spec.notes)
    checks = []
    if "reference" in foreign.extra:
        x, expected = foreign.extra.pop("reference")
        diff = verify_logits(raw_model, x, expected, source=f"{label} (its reference_logits)", facts=spec.facts)
        checks.append({"against": "reference_logits in the file", "inputs": int(x.shape[0]), "max_abs_diff": diff})
    if check_logits is not None:
        x, expected = read_logits_pair(check_logits)
        diff = verify_logits(raw_model, x, expected, source=str(check_logits), facts=spec.facts)
        checks.append({"against": str(Path(check_logits).resolve()), "inputs": int(x.shape[0]), "max_abs_diff": diff})
    for check in checks:
        notes.append(f"logits verified against {check['against']}: largest difference {check['max_abs_diff']:.2g} "
                     f"over {check['inputs']} inputs")
    ema_state = None
    stage(IMPORT_STAGES[3])
    if foreign.ema_state_dict is not None:
        ema_state = load_into_model(spec, foreign.ema_state_dict, source=f"{label} (EMA weights)").state_dict()
    state = raw_model.state_dict()
    num_params = sum(p.numel() for p in raw_model.parameters())

    data_config, data_notes = import_data_config(spec, data, img_size, classes, data_dir)
    data_name = data_config["name"]
    notes += data_notes

    weights_file = foreign.weights_file or foreign.path
    source_info = {
        "file": str(Path(source).resolve()),
        "format": foreign.format,
        "sha256": file_sha256(weights_file) if weights_file.is_file() else None,
        "weights": ["raw", "ema"] if ema_state is not None else ["raw"],
        "architecture": spec.facts,
        **{k: v for k, v in foreign.extra.items() if k != "container"},
    }
    if checks:
        source_info["logits_checks"] = checks
    if weights_file != foreign.path:
        source_info["weights_file"] = str(weights_file.resolve())
    model_config: dict[str, Any] = {"name": spec.label or spec.name, "kwargs": spec.kwargs}
    if spec.label:
        model_config["builder"] = spec.name
    config = {
        "model": model_config,
        "data": data_config,
        "seed": 0,
        "source": source_info,
    }

    stage(IMPORT_STAGES[4])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".importing", dir=out.parent))
    try:
        _chmod_like_mkdir(tmp)
        run = Run.create(tmp)
        run.save_config(config)
        checkpoint = run.checkpoint_path(epoch=0)
        save_checkpoint(
            checkpoint, state, model=spec.name, model_kwargs=spec.kwargs, epoch=0, step=0, metrics={},
            config_hash=config_hash(config), ema_state_dict=ema_state,
            extra={"source": source_info, **({"model_label": spec.label} if spec.label else {})},
        )
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    run = Run(out)
    return ImportResult(
        run=run, checkpoint=out / checkpoint.relative_to(tmp), format=foreign.format, model=spec.label or spec.name,
        model_kwargs=spec.kwargs, num_params=num_params, has_ema=ema_state is not None, data=data_name,
        notes=notes, builder=spec.name, facts=spec.facts,
    )
