"""GroupedMLP: adjacent transformer blocks share one MLP (arXiv 2512.01059).

The blocks ``0 .. depth-1`` form consecutive groups of ``g = group_size`` blocks, ``(0, .., g-1), (g, .., 2g-1),
...``. The model is first initialised at full size; then in each group the first block's MLP is scaled,

.. math::  W_1 \\leftarrow s W_1,\\quad b_1 \\leftarrow s b_1,\\quad W_2 \\leftarrow s W_2
           \\qquad (b_2 \\text{ untouched}),\\quad s = \\texttt{init\\_scale} = 1/\\sqrt{g} \\text{ by default},

and every other block of the group is given that very module. The blocks of a group therefore compute
``x + mlp(norm2_i(x))`` with one set of weights :math:`\\theta`, whose gradient is the sum over its uses,
:math:`\\partial L/\\partial\\theta = \\sum_{i \\in \\text{group}} \\partial L/\\partial\\theta_i`. ``norm2``,
attention, layer scale and drop-path stay per block. ``state_dict()`` lists the shared tensors under every
block's name (one storage; :mod:`landscape.checkpoints` stores them once).

ViT-B/16 with pairs (``g = 2``) has 58,233,064 parameters instead of 86,567,656, at the same GMACs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from landscape.errors import ConfigError
from landscape.models.family import Family
from landscape.models.vit import VIT_ARGS, create_vit, imagenet_cfg, small_image_cfg


def _label(kwargs: dict) -> str:
    scale = kwargs.get("init_scale")
    return f"GroupedMLP g={int(kwargs.get('group_size', 2))}" + ("" if scale is None else f" s={float(scale):g}")


# <vit>_grouped_mlp names; group size and initial scale make a variant (landscape.models.variants).
FAMILY = Family("grouped", matches=lambda name: name.endswith("_grouped_mlp"), label=_label,
                knobs=("group_size", "init_scale"), suffix="_grouped_mlp")


def share_mlps(model: nn.Module, group_size: int, init_scale: float | None = None) -> nn.Module:
    """Make each group of ``group_size`` consecutive blocks of ``model`` use its first block's MLP, in place.

    ``model.blocks`` is any sequence of blocks with an ``mlp`` attribute (every timm ``VisionTransformer``);
    an MLP's input projections are its parameters named ``fc1*`` (``Mlp``: ``fc1``; ``SwiGLU``: ``fc1_g``,
    ``fc1_x``) and its output weight is ``fc2.weight``. The first MLP of each group is multiplied by
    ``init_scale`` (default ``1/sqrt(group_size)``, so ``group_size=1`` leaves the model as it is).
    Returns ``model``.
    """
    blocks = _blocks(model)
    depth = len(blocks)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer, got {group_size!r}.")
    if depth % group_size:
        divisors = ", ".join(str(d) for d in range(1, depth + 1) if depth % d == 0)
        raise ConfigError(
            f"group_size {group_size} does not divide the depth {depth}; accepted group sizes are {divisors}."
        )
    scale = 1.0 / math.sqrt(group_size) if init_scale is None else float(init_scale)
    for start in range(0, depth, group_size):
        group = [blocks[i] for i in range(start, start + group_size)]
        shared = group[0].mlp
        for other in group[1:]:
            if _shapes(other.mlp) != _shapes(shared):
                raise ConfigError(
                    f"Blocks {start} and {start + group_size - 1} have MLPs of different shapes, so they cannot "
                    "share one; share_mlps needs blocks with equal MLPs."
                )
        _scale_mlp(shared, scale)
        for other in group[1:]:
            other.mlp = shared
    return model


def _blocks(model: nn.Module) -> nn.Sequential:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "mlp") for b in blocks):
        raise ConfigError(
            f"{type(model).__name__} has no sequence of transformer blocks with MLPs; "
            "the MLP variants work on timm VisionTransformer models."
        )
    return blocks


def _shapes(mlp: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in mlp.named_parameters()]


@torch.no_grad()
def _scale_mlp(mlp: nn.Module, scale: float) -> None:
    """Multiply the input projections (weights and biases) and the output weight by ``scale``."""
    params = dict(mlp.named_parameters())
    inputs = [p for name, p in params.items() if name.startswith("fc1")]
    if not inputs or "fc2.weight" not in params:
        raise ConfigError(
            f"{type(mlp).__name__} has no fc1/fc2 layers to scale; share_mlps supports timm Mlp, SwiGLU and "
            "the mixture-of-experts MLPs."
        )
    if scale == 1.0:
        return
    for p in inputs + [params["fc2.weight"]]:
        p.mul_(scale)


def unique_mlps(model: nn.Module) -> int:
    """How many distinct MLP modules the blocks of ``model`` use (``depth / group_size`` for GroupedMLP)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return 0
    return len({id(b.mlp) for b in blocks if hasattr(b, "mlp")})


def create_grouped_vit(
    variant: str, base: str, pretrained: bool = False, group_size: int = 2, init_scale: float | None = None, **kwargs
) -> VisionTransformer:
    """Build the ViT ``base`` at full size under the name ``variant``, then share its MLPs."""
    model = create_vit(variant, pretrained, **dict(VIT_ARGS[base], **kwargs))
    return share_mlps(model, group_size, init_scale)


default_cfgs = generate_default_cfgs(
    {
        "vit_base_patch16_224_grouped_mlp": imagenet_cfg(),
        **{f"{name}_grouped_mlp": small_image_cfg() for name in VIT_ARGS if name.endswith("_32")},
    }
)


@register_model
def vit_base_patch16_224_grouped_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 with each MLP shared by a group of adjacent blocks (default pairs: 58.2M parameters)."""
    return create_grouped_vit("vit_base_patch16_224_grouped_mlp", "vit_base_patch16_224", pretrained, **kwargs)


@register_model
def vit_pico_patch4_32_grouped_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/4 (32x32) with MLPs shared by groups of adjacent blocks (default pairs)."""
    return create_grouped_vit("vit_pico_patch4_32_grouped_mlp", "vit_pico_patch4_32", pretrained, **kwargs)


@register_model
def vit_nano_patch4_32_grouped_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Nano/4 (32x32) with MLPs shared by groups of adjacent blocks (default pairs)."""
    return create_grouped_vit("vit_nano_patch4_32_grouped_mlp", "vit_nano_patch4_32", pretrained, **kwargs)


@register_model
def vit_micro_patch4_32_grouped_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Micro/4 (32x32) with MLPs shared by groups of adjacent blocks (default pairs)."""
    return create_grouped_vit("vit_micro_patch4_32_grouped_mlp", "vit_micro_patch4_32", pretrained, **kwargs)


@register_model
def vit_tiny_patch4_32_grouped_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/4 (32x32) with MLPs shared by groups of adjacent blocks (default pairs)."""
    return create_grouped_vit("vit_tiny_patch4_32_grouped_mlp", "vit_tiny_patch4_32", pretrained, **kwargs)
