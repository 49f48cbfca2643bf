"""The checkpoint store: safetensors weights with their metadata, written atomically, read safely.

A checkpoint is one ``.safetensors`` file. Raw weights are stored under their state-dict names, EMA weights
under ``ema/<name>``. The header metadata (strings only, as safetensors requires) holds JSON for the model
name and keyword arguments, epoch, step, metrics at save time and the hash of the run config, so a
checkpoint alone is enough to rebuild its model.

Modules whose weights are shared (GroupedMLP uses one MLP in several blocks) appear under several names in
a state dict with one storage. safetensors refuses shared storage, so each tensor is written once and the
other names are recorded as aliases and restored on loading.

Files from elsewhere are read with safetensors or ``torch.load(weights_only=True)`` only: loading never runs
code from a file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from landscape.io import atomic_write, refuse_special
from landscape.errors import CheckpointError

FORMAT = "landscape-checkpoint/1"
EMA_PREFIX = "ema/"
_META_KEYS = ("model", "model_kwargs", "epoch", "step", "metrics", "config_hash", "aliases", "extra")


@dataclass
class CheckpointInfo:
    """What a checkpoint header says, without reading its tensors."""

    path: Path
    model: str
    model_kwargs: dict[str, Any]
    epoch: int | None
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    config_hash: str | None = None
    has_ema: bool = False
    num_params: int = 0
    num_tensors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem


def _unique_tensors(
    state: dict[str, torch.Tensor], prefix: str, seen: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the first name of each storage; return the tensors to write and the alias -> canonical map.

    ``seen`` carries the storages already written across calls, so raw and EMA state dicts that share
    tensors are also written once.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen = {} if seen is None else seen
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"State entry {key!r} is a {type(value).__name__}, not a tensor.")
        t = value.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        name = prefix + key
        if t.numel() > 0 and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = t.to("cpu").contiguous().clone() if t.device.type != "cpu" or not t.is_contiguous() else t
    return tensors, aliases


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    *,
    model: str,
    model_kwargs: dict[str, Any] | None = None,
    epoch: int | None = None,
    step: int = 0,
    metrics: dict[str, Any] | None = None,
    config_hash: str | None = None,
    ema_state_dict: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write weights (and EMA weights) with their metadata to ``path`` atomically.

    A failed write (full disk, interrupted process) leaves any previous file at ``path`` intact.
    """
    from safetensors.torch import save_file

    path = Path(path)
    seen: dict = {}
    tensors, aliases = _unique_tensors(state_dict, "", seen)
    if ema_state_dict is not None:
        ema_tensors, ema_aliases = _unique_tensors(ema_state_dict, EMA_PREFIX, seen)
        tensors.update(ema_tensors)
        aliases.update(ema_aliases)
    meta = {
        "format": FORMAT,
        "model": json.dumps(model),
        "model_kwargs": json.dumps(model_kwargs or {}, default=str),
        "epoch": json.dumps(epoch),
        "step": json.dumps(int(step)),
        "metrics": json.dumps(_finite(metrics or {}), default=float),
        "config_hash": json.dumps(config_hash),
        "aliases": json.dumps(aliases),
        "extra": json.dumps(extra or {}, default=str),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            v = None  # strict JSON has no NaN/Infinity
        out[k] = v
    return out


def _open_header(path: Path) -> tuple[dict[str, str], list[str], dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    if not path.exists():
        from landscape.io import dangling

        raise CheckpointError(f"Checkpoint {path} does not exist{dangling(path)}.")
    if path.suffix in (".pt", ".pth", ".bin", ".tar", ".ckpt"):
        raise CheckpointError(
            f"{path} is a PyTorch file, not a landscape checkpoint; bring it in with 'landscape import {path} --out runs/NAME'."
        )
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file.")
    refuse_special(path, "a checkpoint file", error=CheckpointError)
    if not os.access(path, os.R_OK):  # safetensors says "No such file or directory" of a file it may not read
        raise CheckpointError(f"Checkpoint {path} cannot be read (permission denied); give this user read access "
                              "to it.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint (truncated or corrupt: {_short(e)})."
        ) from None
    return meta, keys, shapes


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
    return text[:160]


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """The metadata of a landscape checkpoint; a foreign or corrupt file is a :class:`CheckpointError`."""
    path = Path(path)
    meta, keys, shapes = _open_header(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a landscape checkpoint (no '{FORMAT}' metadata); "
            "bring weights from elsewhere in with 'landscape import'."
        )
    try:
        values = {k: json.loads(meta[k]) for k in _META_KEYS if k in meta}
    except (json.JSONDecodeError, RecursionError):  # nested beyond any real header's depth
        raise CheckpointError(f"{path} has corrupt metadata in its header.") from None
    kinds = {"model": str, "model_kwargs": dict, "metrics": dict, "aliases": dict, "extra": dict}
    wrong = [k for k, kind in kinds.items() if values.get(k) is not None and not isinstance(values[k], kind)]
    epoch, step = values.get("epoch"), values.get("step")
    def count(v: Any) -> bool:  # a whole number a results file can hold (int64)
        return v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63)

    aliases = values.get("aliases") or {}
    if not wrong and not all(isinstance(a, str) and isinstance(c, str) and c in keys and a not in keys
                             for a, c in aliases.items()):
        wrong = ["aliases"]  # each a name for a tensor the file holds
    if wrong or not all(count(v) for v in (epoch, step)):
        what = wrong[0] if wrong else ("epoch" if not count(epoch) else "step")
        raise CheckpointError(f"{path} has corrupt metadata in its header ({what} is not what a checkpoint "
                              "records).")
    num_params = sum(_numel(shapes[k]) for k in keys if not k.startswith(EMA_PREFIX))
    return CheckpointInfo(
        path=path,
        model=values.get("model") or "",
        model_kwargs=values.get("model_kwargs") or {},
        epoch=values.get("epoch"),
        step=int(values.get("step") or 0),
        metrics=values.get("metrics") or {},
        config_hash=values.get("config_hash"),
        has_ema=any(k.startswith(EMA_PREFIX) for k in [*keys, *(values.get("aliases") or {})]),
        num_params=num_params,
        num_tensors=sum(not k.startswith(EMA_PREFIX) for k in [*keys, *(values.get("aliases") or {})]),
        extra=values.get("extra") or {},
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_checkpoint(
    path: str | os.PathLike, *, weights: str = "raw", device: str | torch.device = "cpu"
) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """Read a checkpoint: its metadata and the raw (``weights="raw"``) or EMA (``"ema"``) state dict.

    Aliased names (shared modules) are restored, pointing at the same tensor as their canonical name.
    """
    from safetensors.torch import load_file

    if weights not in ("raw", "ema"):
        raise CheckpointError(f"Unknown weights {weights!r}; accepted are raw and ema.")
    info = read_checkpoint_info(path)
    if weights == "ema" and not info.has_ema:
        raise CheckpointError(f"Checkpoint {info.path} holds no EMA weights; use the raw weights.")
    try:
        tensors = load_file(str(info.path), device=str(device))
    except Exception as e:
        raise CheckpointError(f"{info.path} could not be read (truncated or corrupt: {_short(e)}).") from None
    aliases = json.loads(read_raw_metadata(info.path).get("aliases", "{}"))
    for alias, canonical in aliases.items():
        tensors[alias] = tensors[canonical]
    if weights == "ema":
        state = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    else:
        state = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    return info, state


def weights_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a checkpoint's tensor bytes (a safetensors file after its header): the same for the same
    weights (raw and EMA) saved twice, which the file's own hash is not (its header records timings)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        f.seek(8 + size)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_raw_metadata(path: str | os.PathLike) -> dict[str, str]:
    meta, _, _ = _open_header(Path(path))
    return meta


# The keyword arguments a checkpoint's header may pass to ``timm.create_model``: the shape and regularisation of
# the architecture (timm's VisionTransformer, the mLiT, the variants' knobs, the MAE decoder). Anything else
# (``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay``, ``checkpoint_path``, layer classes) would let a
# file make timm fetch a URL, open a path or run a named constructor, so it is refused.
ARCHITECTURE_ARGS = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "init_values",
    "class_token", "pos_embed", "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm",
    "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate",
    "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init", "norm_eps",
    "num_kv_heads", "hidden_first", "hidden_last", "hidden_sizes", "num_experts", "experts_per_stage", "top_k",
    "aux_loss_weight", "group_size", "init_scale", "width_ratio", "mlp_init",
    "mask_ratio", "decoder_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss",
})
_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def architecture_kwargs(kwargs: dict[str, Any], *, source: str) -> dict[str, Any]:
    """``kwargs`` read from a file, checked to be architecture arguments with plain values (numbers, booleans,
    lists of numbers, short words: no paths, no URLs); anything else is a :class:`CheckpointError`."""
    def plain(value: Any) -> bool:
        if value is None or isinstance(value, (bool, int, float)):
            return True
        if isinstance(value, str):
            return bool(_PLAIN_WORD.match(value))
        if isinstance(value, (list, tuple)):
            return all(v is None or isinstance(v, (bool, int, float)) for v in value)
        return False

    refused = sorted(k for k in kwargs if k not in ARCHITECTURE_ARGS)
    if refused:
        raise CheckpointError(
            f"{source} asks for the model setting(s) {', '.join(map(repr, refused))}, which are not architecture "
            "arguments; settings read from a file may only shape the network (for instance depth, embed_dim, "
            "num_heads, img_size), never name weights, paths or URLs to load."
        )
    odd = sorted(k for k, v in kwargs.items() if not plain(v))
    if odd:
        raise CheckpointError(
            f"{source} gives the model setting(s) {', '.join(f'{k}={kwargs[k]!r}' for k in odd)}, which are not "
            "plain numbers or words; settings read from a file may not hold paths, URLs or nested values."
        )
    return dict(kwargs)


def build_model(info: CheckpointInfo, state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Rebuild the checkpoint's model (registered name + keyword arguments, checked by
    :func:`architecture_kwargs`) and load ``state_dict`` strictly."""
    from landscape.models import create_model

    model = create_model(info.model, **header_kwargs(info))
    if state_dict is not None:
        load_state_dict_strict(model, state_dict, source=str(info.path))
    return model


# Size arguments that count layers: a model has at least one tensor per layer.
_LAYER_COUNTS = ("depth", "decoder_depth")


def header_kwargs(info: CheckpointInfo) -> dict[str, Any]:
    """The checkpoint's model arguments, checked by :func:`architecture_kwargs` and against the file's own tensors:
    sizes a damaged or foreign header asks for are refused before timm spends minutes or terabytes building them
    (no size argument exceeds the number of weights, no layer count the number of tensors)."""
    kwargs = architecture_kwargs(info.model_kwargs, source=f"The header of {info.path}")
    numbers, tensors = max(info.num_params, 4096), max(info.num_tensors, 1)
    for key, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        ratios = [v for v in values if isinstance(v, float)]  # mlp_ratio, width_ratio, rates: a ratio of sizes
        if any(not math.isfinite(v) or abs(v) > numbers for v in ratios):
            raise CheckpointError(
                f"The header of {info.path} asks for {key}={value!r}, which no network of the {info.num_params:,} "
                "numbers the file holds has; the header is damaged or belongs to other weights.")
        sizes = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        limit, what = (tensors, "tensors") if key in _LAYER_COUNTS else (numbers, "numbers")
        if any(v > limit for v in sizes):
            held = info.num_tensors if key in _LAYER_COUNTS else info.num_params
            raise CheckpointError(
                f"The header of {info.path} asks for {key}={value!r}, more than the {held:,} {what} the file holds; "
                "the header is damaged or belongs to other weights.")
    return kwargs


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key is one readable error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(describe_key_mismatch(source, missing, unexpected, mismatched))
    check_real_weights(state_dict, [k for k in own if own[k].is_floating_point()], source=source)
    model.load_state_dict(state_dict, strict=True)


def check_real_weights(state_dict: dict[str, torch.Tensor], names: list[str], *, source: str) -> None:
    """Refuse tensors of ``names`` (those the model holds in floating point) that ``state_dict`` holds as
    integers, booleans or complex numbers, which loading would cast without a word."""
    kinds = [k for k in names if k in state_dict and not state_dict[k].is_floating_point()]
    if kinds:
        dtype = state_dict[kinds[0]].dtype
        raise CheckpointError(
            f"The weights in {source} hold {kinds[0]} as {str(dtype).removeprefix('torch.')}"
            f"{f' (and {len(kinds) - 1} more tensors not real floating-point)' if len(kinds) > 1 else ''}, where the "
            "model takes real floating-point values" + (", so loading would drop the imaginary part" if
                                                         dtype.is_complex else "") +
            "; give a checkpoint of floating-point weights.")


def check_finite_weights(path: Any, state: dict[str, torch.Tensor], weights: str) -> None:
    """Refuse a checkpoint with NaN or infinite ``weights`` (raw or EMA): a diverged run has no loss, gradient or
    curvature there."""
    broken = next((name for name, t in state.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)
    if broken is not None:
        raise CheckpointError(f"Checkpoint {path} has NaN or infinite {weights} weights ({broken}): the training "
                              "diverged before it, and nothing can be measured there; select earlier checkpoints with "
                              "--checkpoints.")


def describe_key_mismatch(source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """One readable block listing what does not fit, the first sentence saying what happened."""

    def block(title: str, items: list[str]) -> str:
        if not items:
            return ""
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        return f"\n  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown)

    return (
        f"The weights in {source} do not fit the model."
        + block("missing from the file", missing)
        + block("unexpected in the file", unexpected)
        + block("shape mismatch", mismatched)
    )


def load_foreign_state(path: str | os.PathLike) -> Any:
    """Read a weights file from another codebase without ever running code from it.

    ``.safetensors`` goes through safetensors; anything else through ``torch.load(weights_only=True)``, which
    refuses pickles that would build arbitrary objects. The result may be a state dict or a nested
    checkpoint dict; mapping its keys is the job of :mod:`landscape.importers`.
    """
    path = Path(path)
    if not path.exists():
        from landscape.io import dangling

        raise CheckpointError(f"File {path} does not exist{dangling(path)}.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a weights file.")
    refuse_special(path, "a weights file", error=CheckpointError)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt: {_short(e)}).") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the global it refused ("Unsupported global: GLOBAL ...");
        # any other unpickling failure is a damaged or non-PyTorch file.
        if "global" in str(e).lower():
            raise CheckpointError(
                f"Refused to load {path}: it contains Python objects other than tensors and plain containers, "
                "and unpickling them could run code; re-save it as a plain state dict or as safetensors."
            ) from None
        raise CheckpointError(
            f"Refused to load {path}: it is not a plain PyTorch weights file (its pickle uses instructions that the "
            "safe loader does not run); if it holds weights, re-save it as a plain state dict or as safetensors."
        ) from None
    except Exception as e:  # the weights-only unpickler fails on garbage with arbitrary errors (IndexError, ...)
        raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt: {_short(e)}).") from None
