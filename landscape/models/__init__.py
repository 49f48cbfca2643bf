"""The model zoo: every variant is registered with timm, so ``timm.create_model(NAME, **kwargs)`` builds it.

=================================  ===========================================================================
names                              what
=================================  ===========================================================================
``vit_base_patch16_224``           timm's ViT-B/16 (86,567,656 parameters at 1000 classes)
``vit_{pico,nano,micro,tiny}``     small-image ViTs, patch 4 at 32x32, depth 12 (:mod:`landscape.models.vit`)
``_patch4_32``
``<vit>_grouped_mlp``              MLP shared by groups of adjacent blocks; knobs ``group_size`` (2),
                                   ``init_scale`` (1/sqrt(group_size)) (:mod:`.grouped_mlp`)
``<vit>_shallow_mlp``              MLP width x ``width_ratio`` (0.5); ``mlp_init`` "sliced" | "random"
                                   (:mod:`.shallow_mlp`)
``mlit_{s,xs,xxs}``                mixture-of-experts ViT for 36x36 inputs (:mod:`.mlit`)
``mae_mlit_{s,xs,xxs}``            masked-autoencoder pre-training of an mLiT (:mod:`.mae`)
=================================  ===========================================================================

``<vit>`` is ``vit_base_patch16_224`` or one of the small-image ViTs. Every name accepts ``num_classes``,
``img_size``, ``in_chans`` and ``drop_path_rate``; any timm model name works too. The same name and keyword
arguments always build the same architecture, which is how checkpoints (name + kwargs) are rebuilt.

Second derivatives: attention runs through ``torch.nn.functional.scaled_dot_product_attention``, whose fused
kernels have no double backward; run Hessian-vector products under
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.

Functional calls on a GroupedMLP model: pass ``tie_weights=False`` to
``torch.func.functional_call(model, params, args, tie_weights=False)``, with ``params`` named as
``named_parameters()`` names them (each shared tensor once). A shared MLP is one module reachable under several
names (``blocks.0.mlp`` and ``blocks.1.mlp``); with the default ``tie_weights=True`` the call swaps it once per
name and the model keeps holding the passed tensors after the call (pytorch/pytorch#164759), while
``tie_weights=False`` swaps it once and restores the model's own parameters afterwards.

Costs: :func:`count_macs` counts multiply-accumulates with ``torch.utils.flop_counter``, which sees linear
layers, convolutions and the attention products (``q k^T`` and ``softmax(.) v``, also inside fused kernels)
but not LayerNorm, softmax or GELU. Published ViT figures follow fvcore's convention instead (timm quotes
ViT-B/16 at 16.87 GMACs): linear layers and convolutions, plus 5 per element of every LayerNorm, and no
attention products (fvcore does not see into the fused attention kernel). For ViT-B/16 at 224x224,
flop_counter gives 16.85 GMACs without the attention products and 17.56 with them; the 0.02 left to fvcore's
16.87 are its LayerNorms (25 of 197 x 768 elements, x5). :func:`model_table` shows both columns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from landscape.errors import ConfigError
from landscape.models import grouped_mlp, mae, mlit, shallow_mlp, vit  # noqa: F401  (registers the names)
from landscape.models.grouped_mlp import share_mlps, unique_mlps
from landscape.models.mae import MaskedAutoencoder, encoder_state_dict
from landscape.models.mlit import MLiT, MixtureOfSwiGLUExperts, moe_aux_loss
from landscape.models.shallow_mlp import narrow_mlps

__all__ = [
    "architecture_signature",
    "create_model",
    "list_variants",
    "model_table",
    "count_parameters",
    "count_macs",
    "MACS_CONVENTION",
    "share_mlps",
    "narrow_mlps",
    "unique_mlps",
    "moe_aux_loss",
    "encoder_state_dict",
    "MLiT",
    "MixtureOfSwiGLUExperts",
    "MaskedAutoencoder",
]

_MODULES = (vit, grouped_mlp, shallow_mlp, mlit, mae)


def list_variants() -> list[str]:
    """The model names that landscape registers with timm, in table order."""
    names: list[str] = []
    for module in _MODULES:
        names.extend(n for n in module.default_cfgs)
    return names


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` (a landscape variant or any timm model) with ``kwargs``.

    ``norm_eps=E`` builds every LayerNorm with epsilon ``E`` (Hugging Face ViTs use 1e-12, timm 1e-6); it is
    a plain number so that it round-trips through a checkpoint's metadata, unlike a ``norm_layer`` class.
    """
    import timm

    given = dict(kwargs)
    loading = sorted(set(kwargs) & WEIGHT_LOADING_ARGUMENTS)
    if loading:  # weights come from checkpoints read safely (landscape import, --init), never from a path here
        raise ConfigError(f"Model argument {loading[0]} would load weights from a file or the network; give a "
                          "checkpoint to landscape import or --init instead.")
    if "norm_eps" in kwargs:
        from functools import partial

        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=float(kwargs.pop("norm_eps")))

    if not timm.is_model(name):
        raise ConfigError(
            f"Unknown model {name!r}; the landscape models are {', '.join(list_variants())}, "
            "and any timm model name (timm.list_models()) works too."
        )
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise _build_error(name, given, e) from e
        bad = str(e).split("unexpected keyword argument")[-1].strip()
        raise ConfigError(f"Model {name} does not accept the keyword argument {bad}.") from None
    except (AssertionError, ValueError) as e:
        # Models check their arguments with asserts and conversions (num_heads dividing the width, a number
        # for init_scale): to the user these are configuration errors, not crashes.
        raise _build_error(name, given, e) from e
    except (RuntimeError, MemoryError, OverflowError, ZeroDivisionError) as e:  # a zero, negative or enormous size
        raise _build_error(name, given, e) from None
    _check_flags(name, model, given)
    return model


def _check_flags(name: str, model: nn.Module, given: dict[str, Any]) -> None:
    """Refuse a value other than true or false for an argument the model's class declares as a flag (a ``bool``
    default or annotation): ``class_token=maybe`` built a class token (any non-empty text is true) and was recorded
    as ``maybe``."""
    import inspect

    for cls in type(model).__mro__:
        try:
            parameters = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            continue
        for key, value in given.items():
            p = parameters.get(key)
            if p is None or isinstance(value, bool):
                continue
            flag = isinstance(p.default, bool) or p.annotation in (bool, "bool")
            if flag:
                raise ConfigError(f"Model {name}'s argument {key} is true or false, not {value!r}.")


WEIGHT_LOADING_ARGUMENTS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                                      "pretrained_strict", "cache_dir"})
"""timm arguments that make a model load weights from a path or the network: refused by :func:`create_model`."""


def _build_error(name: str, kwargs: dict[str, Any], error: Exception) -> ConfigError:
    arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its default arguments"
    reason = " ".join(str(error).split()).rstrip(".") or f"a check of its arguments failed ({type(error).__name__})"
    return ConfigError(f"Model {name} cannot be built with {arguments}: {reason}.")


_NO_OP_AT_EVALUATION = {"Identity", "DropPath", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"}
_SIGNATURE_ATTRS = ("eps", "num_heads", "approximate", "global_pool", "num_prefix_tokens", "scale",
                    "negative_slope")


def architecture_signature(model: torch.nn.Module) -> list[tuple]:
    """What makes a network compute what it does beyond its tensors' names and shapes: every module's path and
    class with its plain settings (LayerNorm epsilon, attention heads, GELU approximation, pooling, prefix tokens)."""
    out = []
    for name, module in model.named_modules():
        if type(module).__name__ in _NO_OP_AT_EVALUATION:  # drop-path and dropout do nothing when evaluating
            continue
        settings = tuple((a, v) for a in _SIGNATURE_ATTRS
                         for v in [getattr(module, a, None)] if isinstance(v, (bool, int, float, str, tuple)))
        out.append((name, type(module).__name__, settings))
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, each storage counted once (an MLP shared by several blocks counts once)."""
    seen: set = set()
    total = 0
    for p in model.parameters():  # already unique by identity
        key = id(p) if p.device.type == "meta" else (p.untyped_storage().data_ptr(), p.storage_offset(), p.shape)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


MACS_CONVENTION = (
    "GMACs: every multiply-accumulate torch.utils.flop_counter sees, attention products included (ViT-B/16: "
    "17.56); GMACs w/o attn: convolutions and linear layers only (ViT-B/16: 16.85), comparable with timm's "
    "quoted 16.87, which is fvcore's convention (linear, convolution and 5 per LayerNorm element, fused "
    "attention not seen)."
)

_ATTENTION_OPS = ("bmm", "baddbmm", "scaled_dot_product", "flash_attention", "efficient_attention")


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates of one forward on one input of ``input_size`` (C, H, W), by ``FlopCounterMode``.

    Returns ``{"total": ..., "attention": ...}``; MACs = FLOPs / 2. ``attention`` are the products of
    attention scores and values (batched matrix products and fused attention kernels), which have no weights;
    ``total - attention`` is what the convolutions and linear layers cost. LayerNorm, softmax and activations
    are not counted. ViT-B/16 at 224x224: total 17.56 G, total - attention 16.85 G; timm's quoted 16.87 GMACs
    is fvcore's convention (linear + convolution + 5 per LayerNorm element, fused attention not seen; see the
    package docstring). The model runs in eval mode, without gradients, on its own device (``meta`` works for
    models without data-dependent shapes).
    """
    from torch.utils.flop_counter import FlopCounterMode

    first = next(model.parameters())
    x = torch.zeros((1, *input_size), device=first.device, dtype=first.dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in counts.items() if any(a in str(op) for a in _ATTENTION_OPS))
    return {"total": counter.get_total_flops() // 2, "attention": attention // 2}


def _build_and_count(name: str) -> tuple[nn.Module, dict[str, int]]:
    """The model and its MACs, on the meta device (no memory, no init cost) where it runs there, else on the CPU."""
    with torch.device("meta"):
        model = create_model(name)
    input_size = tuple(model.pretrained_cfg["input_size"])
    try:
        return model, count_macs(model, input_size)
    except NotImplementedError:  # data-dependent shapes (mixture-of-experts routing) need real values
        pass
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image through a small model: more threads only contend for the cores
    try:
        model = create_model(name)
        return model, count_macs(model, input_size)
    finally:
        torch.set_num_threads(threads)


def model_table(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per model: name, parameters, GMACs of one image at the default input size, unique MLPs, description.

    ``GMACs`` counts every multiply-accumulate seen by ``torch.utils.flop_counter``, attention products
    included (ViT-B/16: 17.56); ``GMACs w/o attn`` only those of convolutions and linear layers (ViT-B/16:
    16.85), the column to compare with published figures: timm quotes ViT-B/16 at 16.87 GMACs, fvcore's
    convention, which adds 5 per LayerNorm element (0.02 G) and does not see the fused attention products
    (:data:`MACS_CONVENTION`). Default names: timm's ``vit_base_patch16_224`` and every landscape variant.
    """
    import timm

    names = names or ["vit_base_patch16_224", *list_variants()]
    rows = []
    for name in names:
        model, macs = _build_and_count(name)
        input_size = tuple(model.pretrained_cfg["input_size"])
        doc = (timm.models.model_entrypoint(name).__doc__ or "").strip().splitlines()
        rows.append(
            {
                "name": name,
                "params": count_parameters(model),
                "input": "x".join(str(s) for s in input_size),
                "GMACs": round(macs["total"] / 1e9, 4),
                "GMACs w/o attn": round((macs["total"] - macs["attention"]) / 1e9, 4),
                "unique MLPs": unique_mlps(model.encoder if isinstance(model, MaskedAutoencoder) else model),
                "description": doc[0].strip() if doc else "",
            }
        )
    return rows
