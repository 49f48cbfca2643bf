"""Baseline Vision Transformers: timm's ViT-B/16 and small-image ViTs for 28-36 px inputs.

ViT-B/16 is timm's own ``vit_base_patch16_224`` (86,567,656 parameters at 1000 classes); it needs no
registration here. The small-image ViTs are timm ``VisionTransformer`` instances with patch 4 at 32x32
(an 8x8 grid plus a class token, 65 tokens), depth 12 so that every group size 1, 2, 3, 4, 6, 12 of
:func:`landscape.models.share_mlps` divides it, and MLP ratio 4:

=====================  =====  =====  =====  ===========================
name                   width  depth  heads  parameters (10 classes)
=====================  =====  =====  =====  ===========================
``vit_pico_patch4_32``    64     12      2  0.61M
``vit_nano_patch4_32``    96     12      3  1.35M
``vit_micro_patch4_32``  128     12      4  2.40M
``vit_tiny_patch4_32``   192     12      3  5.36M (timm's ViT-Ti/DeiT-Ti shape)
=====================  =====  =====  =====  ===========================

Defaults are 3 channels, 32x32 and 10 classes; ``img_size=28, in_chans=1`` gives MNIST (a 7x7 grid).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from landscape.errors import ConfigError
from landscape.models.family import Family

# Every ViT name (timm's and ours) not claimed by a more specific family is a baseline (landscape.models.variants).
FAMILY = Family("baseline", matches=lambda name: "vit" in name and not name.startswith("mae"),
                label=lambda kwargs: "ViT baseline")
# Architecture arguments of every ViT that the MLP variants are built over, by registered name.
VIT_ARGS: dict[str, dict[str, Any]] = {
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_pico_patch4_32": dict(patch_size=4, embed_dim=64, depth=12, num_heads=2),
    "vit_nano_patch4_32": dict(patch_size=4, embed_dim=96, depth=12, num_heads=3),
    "vit_micro_patch4_32": dict(patch_size=4, embed_dim=128, depth=12, num_heads=4),
    "vit_tiny_patch4_32": dict(patch_size=4, embed_dim=192, depth=12, num_heads=3),
}

SMALL_IMAGE_VITS = [name for name in VIT_ARGS if name.endswith("_32")]


def imagenet_cfg(**kwargs) -> dict[str, Any]:
    """A timm default config for a 224x224 ImageNet model without pretrained weights."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


def small_image_cfg(**kwargs) -> dict[str, Any]:
    """A timm default config for a 32x32, 10-class model without pretrained weights."""
    return imagenet_cfg(**{"num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0, **kwargs})


def create_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Build a timm ``VisionTransformer`` under the registered name ``variant`` (its config supplies defaults)."""
    if pretrained:
        raise ConfigError(
            f"There are no pretrained weights for {variant}; train it, or bring weights in with 'landscape import'."
        )
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained=False,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({name: small_image_cfg() for name in SMALL_IMAGE_VITS})


@register_model
def vit_pico_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/4 for 32x32 images: width 64, depth 12, 2 heads (0.61M parameters)."""
    return create_vit("vit_pico_patch4_32", pretrained, **dict(VIT_ARGS["vit_pico_patch4_32"], **kwargs))


@register_model
def vit_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Nano/4 for 32x32 images: width 96, depth 12, 3 heads (1.35M parameters)."""
    return create_vit("vit_nano_patch4_32", pretrained, **dict(VIT_ARGS["vit_nano_patch4_32"], **kwargs))


@register_model
def vit_micro_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Micro/4 for 32x32 images: width 128, depth 12, 4 heads (2.40M parameters)."""
    return create_vit("vit_micro_patch4_32", pretrained, **dict(VIT_ARGS["vit_micro_patch4_32"], **kwargs))


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/4 for 32x32 images: width 192, depth 12, 3 heads (5.36M parameters)."""
    return create_vit("vit_tiny_patch4_32", pretrained, **dict(VIT_ARGS["vit_tiny_patch4_32"], **kwargs))
