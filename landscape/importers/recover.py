"""Architecture recovery: a timm ``VisionTransformer``'s arguments from its (timm-named) tensor shapes and the
source's hints, then the registered model name and keyword arguments that rebuild it.

See :mod:`landscape.importers` for what is read from which tensor. The family of the rebuilt model (GroupedMLP,
ShallowMLP) is named by the suffix its family declares in :mod:`landscape.models.variants`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import timm
import torch

from landscape.errors import CheckpointError, LandscapeError
from landscape.importers.filters import VIT_ONLY, StateDict, describe_non_vit
from landscape.importers.read import ForeignCheckpoint
from landscape.models import architecture_signature
from landscape.models import create_model as zoo_create_model
from landscape.models.variants import families, family_of
from landscape.models.vit import VIT_ARGS


# Heads of the registered ViTs and of timm's standard widths, by embedding width.
CONVENTIONAL_HEADS = {64: 2, 96: 3, 128: 4, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
TIMM_MLP_RATIO = 4.0
TIMM_NORM_EPS = 1e-6
BASE_MODEL = "vit_base_patch16_224"
DISTILLED_BASE_MODEL = "deit_base_distilled_patch16_224"


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
    proj_bias: bool = True
    pos_embed: bool = True
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

    img_size, no_embed_class, size_rule = _image_size(state, ph, prefix_tokens, hints.get("img_size"), notes)
    if "img_size" in sources and img_size == hints.get("img_size"):
        facts["img_size"] = _read(img_size, sources["img_size"])
    elif size_rule:
        facts["img_size"] = _guessed(img_size, size_rule)
    else:
        facts["img_size"] = {"value": img_size, "how": "read", "from": "the position embedding's length"}
    head = state.get("head.weight")
    if head is None and "head.bias" in state:  # a classifier cut in half: say so, not "head.bias is unexpected"
        raise CheckpointError("The weights have a classifier bias (head.bias) but no classifier matrix "
                              "(head.weight); the file is incomplete.")
    fc_norm = "fc_norm.weight" in state
    num_heads, rule = _num_heads(embed_dim, hints, state)
    if rule:
        notes.append(f"num_heads={num_heads} {rule} (the weights cannot tell); pass --model-arg num_heads=N "
                     "if the source used another")
        facts["num_heads"] = _guessed(num_heads, rule)
    else:
        where = sources.get("num_heads") or (f"the named architecture {hints.get('arch')}" if "arch" in hints else
                                             "--model-arg" if hints.get("num_heads") else
                                             "the query norm's length (one head dimension)")
        facts["num_heads"] = _read(num_heads, where)
    global_pool = _global_pool(class_token, fc_norm, hints, sources, facts, notes)
    if global_pool in ("avg", "max", "avgmax") and prefix_tokens:
        if hints.get("pool_include_prefix") is not None:
            facts["pool_include_prefix"] = _read(bool(hints["pool_include_prefix"]),
                                                 sources.get("pool_include_prefix", "--model-arg"))
        else:  # timm's option of pooling the class and register tokens with the patches: the same weights
            rule = (f"{global_pool} pooling over the patch tokens alone is timm's default, but pooling the "
                    f"{prefix_tokens} class/register token(s) with them has the same weights")
            notes.append(f"pool_include_prefix=False guessed ({rule}); pass --model-arg pool_include_prefix=True if "
                         "the source pooled them too, or --check-logits FILE to verify")
            facts["pool_include_prefix"] = _guessed(False, rule)
    if hints.get("layer_norm_eps") is not None:
        facts["norm_eps"] = _read(float(hints["layer_norm_eps"]), sources.get("layer_norm_eps", "--model-arg"))
    if hints.get("group_size") is not None:  # stated (--model-arg): equal MLPs may be separate copies
        group_size = int(hints["group_size"])
        if group_size < 1 or depth % group_size:  # unequal MLPs in a group: load_into_model's sharing check
            raise CheckpointError(f"group_size={group_size} does not divide the {depth} blocks.")
        facts["group_size"] = _read(group_size, sources.get("group_size", "--model-arg"))
    else:
        group_size = mlp_group_size(state, depth)
    if "group_size" not in facts and group_size > 1 and not mlp_stored_once(state, depth, group_size):
        # Equal values in separate tensors: a GroupedMLP written by a tool that cannot store shared tensors, or
        # separate MLPs copied from each other (depth up-scaling) and not trained since: the curvature differs.
        notes.append(f"blocks hold equal MLP weights in groups of {group_size} as separate tensors: built as "
                     f"GroupedMLP g={group_size} (one MLP trained for each group); if they are separate copies, import "
                     "with --model-arg group_size=1")
        facts["group_size"] = _guessed(group_size, "adjacent blocks with equal MLP weights share one MLP")
    elif "group_size" not in facts and group_size > 1:
        facts["group_size"] = _read(group_size, "one MLP tensor stored for each group of blocks")
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
        proj_bias="blocks.0.attn.proj.bias" in state or "blocks.0.mlp.fc1.bias" in state,  # timm drops both together
        pos_embed="pos_embed" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        layer_scale="blocks.0.ls1.gamma" in state,
        pre_norm="norm_pre.weight" in state,
        final_norm="norm.weight" in state or fc_norm,
        fc_norm=fc_norm,
        global_pool=global_pool,
        distilled=distilled,
        group_size=group_size,
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

    The tensors never decide it: without a class token, average, max and avg+max pooling have the same weights;
    with a class token and no ``fc_norm``, token pooling and average pooling without ``fc_norm`` do; with
    ``fc_norm``, average, max, avg+max and token pooling do. The common choice is taken and said.
    """
    stated = hints.get("global_pool")
    if stated is not None:
        if stated == "token" and not class_token:
            raise CheckpointError("The source states class-token pooling (global_pool='token'), but the weights "
                                  "have no class token; pass --model-arg global_pool=avg.")
        facts["global_pool"] = _read(stated, sources.get("global_pool", "--model-arg"))
        return stated
    if not class_token:
        pool, other = "avg", "max or avgmax"
        rule = "no class token: average pooling is the usual choice, but max and avg+max pooling have the same weights"
    elif fc_norm:
        pool, other = "avg", "max, avgmax or token"
        rule = ("fc_norm present: average pooling is the usual choice, but max, avg+max and token pooling have the "
                "same weights")
    else:
        pool, other = "token", "avg"
        rule = ("class token and no fc_norm: token pooling is the usual choice, but average pooling without fc_norm "
                "has the same weights")
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
) -> tuple[int | None, bool, str]:
    """``(img_size, no_embed_class, rule)`` from ``pos_embed``'s length ``L``.

    ``L - T`` must be a square number of patches ``(h/p)^2`` with the ``T`` prefix tokens embedded (timm's
    default), or ``L`` itself when they are not (``no_embed_class``). A stated image size picks between the two;
    when both fit and none is stated, timm's default is taken and ``rule`` says it was guessed (else ``""``).
    """
    pos = state.get("pos_embed")
    if pos is None:  # built with pos_embed='none'
        if hinted is None:
            raise CheckpointError("The weights have no position embedding, so the image size is unknown; "
                                  "give it with --model-arg img_size=N (the model is built without one).")
        return int(hinted), False, ""
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
    if len(fits) == 2 and not stated:  # both layouts fit: timm's default (prefix tokens embedded) is taken
        (size, _), (other, _) = fits
        rule = (f"the position embedding's {length} tokens fit img_size={size} with the {prefix_tokens} prefix tokens "
                f"embedded (timm's default, taken) and img_size={other} with them not embedded (no_embed_class)")
        notes.append(f"img_size={size} guessed: {rule}; pass --model-arg img_size={other} if the source took "
                     f"{other}-pixel images")
        return size, False, rule
    return (*(stated or fits)[0], "")


def _num_heads(embed_dim: int, hints: dict[str, Any], state: StateDict | None = None) -> tuple[int, str]:
    """``(num_heads, how it was chosen)``; an empty rule means the source stated it or the weights tell it (the
    per-head query norm of ``qk_norm`` is one head dimension long)."""
    if hints.get("num_heads"):
        heads = int(hints["num_heads"])
        if embed_dim % heads:
            where = (hints.get("sources") or {}).get("num_heads", "--model-arg")
            raise CheckpointError(f"{heads} attention heads ({where}) do not divide the width {embed_dim} of the "
                                  "weights: the heads or the weights are another model's.")
        return heads, ""
    if hints.get("arch") and _is_model(hints["arch"]):
        heads = _heads_of(hints["arch"])
        if heads is not None:
            return heads, ""
    q_norm = (state or {}).get("blocks.0.attn.q_norm.weight")
    if q_norm is not None and q_norm.ndim == 1 and 0 < q_norm.numel() and embed_dim % q_norm.numel() == 0:
        return embed_dim // q_norm.numel(), ""
    if embed_dim in CONVENTIONAL_HEADS:
        return CONVENTIONAL_HEADS[embed_dim], f"by the convention for width {embed_dim}"
    for head_dim in (64, 32):
        if embed_dim % head_dim == 0:
            return embed_dim // head_dim, f"guessed from a head dimension of {head_dim}"
    return 1, "guessed (width not divisible by 32)"


def _heads_of(name: str) -> int | None:
    """The head count of a registered model at its defaults, built on the meta device (no memory, no init)."""
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


def mlp_stored_once(state: StateDict, depth: int, group_size: int) -> bool:
    """Whether each group's blocks hold the very same MLP tensors (one storage, as ``torch.save`` of a model with
    shared modules and :func:`~landscape.importers.filters.restore_shared_mlps` leave them), not equal copies."""
    for first in range(0, depth, group_size):
        head = _mlp_tensors(state, first)
        for block in range(first + 1, first + group_size):
            other = _mlp_tensors(state, block)
            if any(head[k].data_ptr() != other[k].data_ptr() for k in head):
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


def _is_model(name: str) -> bool:
    """Whether ``name`` is registered with timm (importing :mod:`landscape.models` registered the zoo's variants)."""
    return timm.is_model(name)


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """Build a registered model through the model zoo; a model that cannot take ``kwargs`` is one sentence."""
    try:
        return zoo_create_model(name, **kwargs)
    except LandscapeError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError, ArithmeticError, LookupError) as e:
        raise CheckpointError(
            f"Model {name} could not be built with {_kwargs_text(kwargs)} ({first_line(e)})."
        ) from None


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"


def first_line(e: BaseException) -> str:
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
    if not arch.proj_bias:
        kwargs["proj_bias"] = False
    if not arch.pos_embed:
        kwargs["pos_embed"] = "none"
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
    kwargs = vit_kwargs(arch)
    notes = list(arch.notes)
    if arch.distilled:
        if arch.group_size > 1:
            raise CheckpointError("A distilled DeiT with shared MLPs has no registered model; name one with --model.")
        return ModelSpec(DISTILLED_BASE_MODEL, kwargs, notes)
    base = _base_name(arch, hints, _is_model)

    def variant(family: str) -> str:
        # The zoo registers every family over ViT-B/16, so the fallback always exists.
        suffix = families()[family].suffix
        return next(n for n in (base + suffix, BASE_MODEL + suffix) if _is_model(n))

    if arch.group_size > 1:
        return ModelSpec(variant("grouped"), {**kwargs, "group_size": arch.group_size}, notes)
    if arch.mlp_hidden < TIMM_MLP_RATIO * arch.embed_dim and hints.get("mlp_ratio") is None:  # else a plain ViT
        stated = _stated_shallow(arch, hints.get("shallow"))
        if stated is not None:  # a landscape ShallowMLP's header: its own ratios and init
            return ModelSpec(variant("shallow"), {**kwargs, **stated}, notes)
        notes.append(f"MLP width {arch.mlp_hidden} < 4 x {arch.embed_dim}: built as the ShallowMLP variant")
        return ModelSpec(variant("shallow"), {**kwargs, "mlp_ratio": TIMM_MLP_RATIO, "width_ratio": arch.width_ratio},
                         notes)
    return ModelSpec(base, kwargs, notes)


def _stated_shallow(arch: Architecture, stated: Any) -> dict[str, Any] | None:
    """The ShallowMLP arguments a landscape header states (``mlp_ratio``, ``width_ratio``, ``mlp_init``), when they
    give the weights' MLP width (as :func:`landscape.models.shallow_mlp.narrow_mlps` narrows it), else ``None``."""
    if not isinstance(stated, dict):
        return None
    ratio, width, init = stated.get("mlp_ratio", TIMM_MLP_RATIO), stated.get("width_ratio", 0.5), stated.get("mlp_init")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (ratio, width)):
        return None
    if max(1, int(round(int(arch.embed_dim * ratio) * width))) != arch.mlp_hidden:
        return None
    out = {"mlp_ratio": float(ratio), "width_ratio": float(width)}
    if init in ("sliced", "random"):
        out["mlp_init"] = init
    return out


_TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def _base_name(arch: Architecture, hints: dict[str, Any], is_model: Callable[[str], bool]) -> str:
    """A registered name whose family the weights belong to; the explicit keyword arguments do the rest."""
    if hints.get("arch") and is_model(hints["arch"]):
        return hints["arch"]
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


def check_stated_sizes(arch: Architecture, hints: dict[str, Any]) -> None:
    """Refuse weights whose sizes disagree with what the model folder's ``config.json`` states (a block missing
    from the file, a config of another model): the weights alone would build a different network without a word."""
    found = {"depth": arch.depth, "embed_dim": arch.embed_dim, "in_chans": arch.in_chans,
             "patch_size": arch.patch_size, "mlp_hidden": arch.mlp_hidden}
    names = {"depth": "blocks", "embed_dim": "width", "in_chans": "input channels", "patch_size": "patch size",
             "mlp_hidden": "MLP width"}
    for key, (value, where) in (hints.get("stated") or {}).items():
        if key in found and found[key] != value:
            raise CheckpointError(
                f"{where} states {value} but the weights have {found[key]} ({names[key]}): the weights are "
                "incomplete, or the config.json beside them belongs to another model.")


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
    for key in ("num_heads", "img_size", "global_pool", "pool_include_prefix", "group_size", "mlp_ratio"):
        if key in model_args:
            hints[key] = model_args[key]
            hints["sources"][key] = "--model-arg"
    stated = hints.get("header") if isinstance(hints.get("header"), dict) else None
    if model is None:
        try:
            arch = recover_architecture(foreign.state_dict, hints)
        except CheckpointError:
            if stated is None or not _is_model(stated["model"]):
                raise
            return _header_spec(stated, model_args)  # an mLiT: built as its header states, loaded strictly
        check_stated_sizes(arch, hints)
        spec = model_spec(arch, hints)
        spec.kwargs.update({k: v for k, v in model_args.items() if k != "group_size"})  # the variant says it
        spec.facts = dict(arch.facts)
        for key, value in model_args.items():
            spec.facts[key] = _read(value, "--model-arg")
        spec.label = model_label(spec)
        return spec
    try:
        arch = recover_architecture(foreign.state_dict, hints)
    except CheckpointError:
        if stated is not None and stated["model"] == model:  # its header states the arguments --model-arg may change
            return _header_spec(stated, model_args)
        return ModelSpec(model, model_args, facts={k: _read(v, "--model-arg") for k, v in model_args.items()})
    kwargs = {"img_size": arch.img_size, "in_chans": arch.in_chans, "num_classes": arch.num_classes, **model_args}
    facts = {"img_size": arch.facts["img_size"], **{k: _read(v, "--model-arg") for k, v in model_args.items()}}
    return ModelSpec(model, kwargs, [n for n in arch.notes if n.startswith("the source states image size")],
                     facts=facts)


def _header_spec(stated: dict[str, Any], model_args: dict[str, Any]) -> ModelSpec:
    """The model a landscape checkpoint's header states (name and arguments), with ``model_args`` over them: for
    a model the weights alone do not describe (an mLiT's stages), checked by loading every tensor strictly."""
    where = "the landscape checkpoint's header"
    facts = {k: _read(v, where) for k, v in stated["kwargs"].items()}
    facts.update({k: _read(v, "--model-arg") for k, v in model_args.items()})
    return ModelSpec(stated["model"], {**stated["kwargs"], **model_args},
                     [f"the model and its arguments are those {where} states"], facts=facts)


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
    stem = "deit_distilled" if spec.name.startswith("deit_") and "distilled" in spec.name else "vit"
    family = family_of(spec.name)
    shown = [f"{k}={kwargs[k]}" for k in _LABEL_ARGS if k in kwargs]
    skip = set(_LABEL_ARGS) | {"num_classes", "in_chans", "group_size", "width_ratio", "mlp_ratio", "init_values"}
    if kwargs.get("mlp_ratio", TIMM_MLP_RATIO) != TIMM_MLP_RATIO:  # a ShallowMLP's too: its base MLP
        shown.append(f"mlp_ratio={kwargs['mlp_ratio']:g}")
    shown += [f"{k}={v}" for k, v in kwargs.items() if k not in skip]
    return f"{stem}({','.join(shown)}){family.suffix if family else ''}"


def _same_as_registered(spec: ModelSpec) -> bool:
    """Whether ``spec.name`` at its defaults is the model ``spec`` builds (tensors, and every module's settings:
    :func:`landscape.models.architecture_signature`)."""
    data_facing = {k: spec.kwargs[k] for k in ("num_classes", "in_chans") if k in spec.kwargs}

    def signature(kwargs: dict[str, Any]) -> tuple | None:
        try:
            with torch.device("meta"):
                model = create_model(spec.name, **kwargs)
        except Exception:  # noqa: BLE001  (a name that cannot be built on its own cannot name the model)
            return None
        shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
        return shapes, architecture_signature(model)

    if "norm_eps" in spec.kwargs and spec.kwargs["norm_eps"] != TIMM_NORM_EPS:
        return False
    built = signature({k: v for k, v in spec.kwargs.items() if k != "norm_eps"})
    return built is not None and built == signature(data_facing)
