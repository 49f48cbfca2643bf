"""Foreign key names to timm ``VisionTransformer`` names: one filter per source format, and the detection of the
format from the key names (as timm's ``checkpoint_filter_fn``).

The prefixes ``module.`` (DataParallel/DDP), ``_orig_mod.`` (``torch.compile``) and ``model.`` are stripped first
(:func:`strip_prefixes`); then :func:`filter_timm`, :func:`filter_deit`, :func:`filter_hf_vit` or
:func:`filter_torchvision_vit` renames the keys. A shared MLP that a deduplicating writer stored under one block of
its group only is given back to every block (:func:`restore_shared_mlps`). Adding a source format is one filter
here, entered in :data:`FILTERS`, and its key names in :func:`detect_format`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from landscape.errors import CheckpointError

StateDict = dict[str, torch.Tensor]


PREFIXES = ("module.", "_orig_mod.", "model.")


def strip_prefixes(state: StateDict) -> StateDict:
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


def filter_timm(state_dict: StateDict) -> StateDict:
    """timm ``VisionTransformer`` weights (bare, or the unpacked ``state_dict`` of a ``train.py`` checkpoint).

    The keys are already timm's; GroupedMLP checkpoints saved by plain timm code list a shared MLP under every
    block of its group, which is what the GroupedMLP model expects too.
    """
    return strip_prefixes(dict(state_dict))


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
    state = strip_prefixes(dict(state_dict))
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
    state = strip_prefixes(dict(state_dict))
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


VIT_ONLY = ("landscape imports plain ViTs (timm VisionTransformer and DeiT, Hugging Face ViT and DeiT, torchvision "
            "vit_*), and builds any other timm model only from its own registered name with --model NAME.")
_HF_TYPES = {"swin": "a Swin Transformer", "swinv2": "a Swin Transformer V2", "beit": "a BEiT",
             "convnext": "a ConvNeXt", "resnet": "a ResNet", "dinov2": "a DINOv2 ViT (layer scale, SwiGLU options)",
             "vit_mae": "a ViT-MAE pre-training model", "levit": "a LeViT", "mobilevit": "a MobileViT",
             "deit": "a DeiT", "vit_hybrid": "a hybrid CNN-ViT", "dpt": "a DPT", "clip": "a CLIP model"}


def describe_hf_type(model_type: Any) -> str:
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
