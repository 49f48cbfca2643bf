"""ShallowMLP: every MLP's hidden width multiplied by ``width_ratio`` (arXiv 2512.01059; paper: 0.5).

With hidden width :math:`H` narrowed to :math:`h = \\mathrm{round}(r H)`, an MLP
:math:`y = W_2\\,\\sigma(W_1 x + b_1) + b_2` with :math:`W_1 \\in \\mathbb{R}^{H\\times d}`,
:math:`W_2 \\in \\mathbb{R}^{d \\times H}` keeps

- ``init="sliced"`` (the paper): the full-width initialisation's first :math:`h` hidden units,
  :math:`W_1[:h,:]`, :math:`b_1[:h]`, :math:`W_2[:,:h]`, and :math:`b_2` untouched;
- ``init="random"`` (the ablation): fresh weights drawn by the model's own initialisation scheme at width
  :math:`h` (for a timm ``VisionTransformer`` its ``weight_init`` mode, including ``fix_init``).

Everything else is identical between the two: the model is always built at full width first, so with one
seed the attention, embeddings and head are the same and only the MLP weights differ. With timm's default
initialisation (truncated normal, std 0.02, for every linear layer, independent of width) the two inits
have the same distribution and differ only in the draw; width-dependent schemes (``weight_init="jax"``:
Xavier) change the scale as well.

ViT-B/16 at 0.5 (3072 -> 1536): 58,237,672 parameters, 11.27 GMACs in its linear layers.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, get_init_weights_vit
from timm.models._manipulate import named_apply

from landscape.errors import ConfigError
from landscape.models.grouped_mlp import _blocks
from landscape.models.family import Family
from landscape.models.vit import VIT_ARGS, create_vit, imagenet_cfg, small_image_cfg

MLP_INITS = ("sliced", "random")


def _label(kwargs: dict) -> str:
    ratio = float(kwargs.get("width_ratio", 0.5))
    return f"ShallowMLP {kwargs.get('mlp_init', 'sliced')}" + ("" if ratio == 0.5 else f" r={ratio:g}")


# <vit>_shallow_mlp names; width ratio and MLP initialisation make a variant (landscape.models.variants).
FAMILY = Family("shallow", matches=lambda name: name.endswith("_shallow_mlp"), label=_label,
                knobs=("width_ratio", "mlp_init"), suffix="_shallow_mlp")


def narrow_mlps(model: nn.Module, width_ratio: float, init: str = "sliced") -> nn.Module:
    """Replace every block's MLP by one of hidden width ``round(width_ratio * H)``, in place; returns ``model``.

    Works on timm ``Mlp`` and ``SwiGLU`` MLPs (input layers ``fc1`` or ``fc1_g``/``fc1_x``, output ``fc2``,
    optional ``norm``); an MLP with any other parameter (a mixture of experts' router and expert weights) is a
    :class:`ConfigError`. MLPs shared between blocks (GroupedMLP) stay shared. ``0 < width_ratio <= 1``.
    """
    if init not in MLP_INITS:
        raise ConfigError(f"Unknown MLP init {init!r}; accepted are {', '.join(MLP_INITS)}.")
    if isinstance(width_ratio, bool) or not isinstance(width_ratio, (int, float)) or not 0 < width_ratio <= 1:
        raise ConfigError(f"width_ratio must be a number in (0, 1], got {width_ratio!r}.")
    blocks = _blocks(model)
    init_fn = get_init_weights_vit(getattr(model, "weight_init_mode", "") or "", head_bias=0.0)
    narrowed: dict[int, nn.Module] = {}
    for i, block in enumerate(blocks):
        old = block.mlp
        if id(old) not in narrowed:
            new = _narrow(old, width_ratio)
            if init == "random":
                with torch.no_grad():
                    # include_root: the MLP's own init_weights runs too (SwiGLU's gate), as in the full model's init.
                    named_apply(init_fn, new, name=f"blocks.{i}.mlp", include_root=True)
                    if getattr(model, "fix_init", False):
                        new.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
            narrowed[id(old)] = new
        block.mlp = narrowed[id(old)]
    return model


def _narrow(mlp: nn.Module, width_ratio: float) -> nn.Module:
    inputs = [name for name in ("fc1", "fc1_g", "fc1_x") if isinstance(getattr(mlp, name, None), nn.Linear)]
    packed = type(mlp).__name__ == "GluMlp"  # gate and value halves packed in one fc1
    if packed or not inputs or not isinstance(getattr(mlp, "fc2", None), nn.Linear):
        raise ConfigError(f"narrow_mlps supports timm Mlp and SwiGLU MLPs, not {type(mlp).__name__}.")
    norm = getattr(mlp, "norm", None)
    narrowed = {f"{layer}.{p}" for layer in (*inputs, "fc2", "norm") for p in ("weight", "bias")}
    others = [name for name, _ in mlp.named_parameters() if name not in narrowed]
    if others:
        raise ConfigError(
            f"narrow_mlps narrows only the layers fc1 (or fc1_g and fc1_x), fc2 and norm of an MLP, but "
            f"{type(mlp).__name__} also has the parameters {', '.join(others)}, so it cannot be narrowed."
        )
    width = max(1, int(round(mlp.fc2.in_features * width_ratio)))
    # Copy the module without copying its wide layers (they are replaced right after).
    layers = [getattr(mlp, name) for name in inputs] + [mlp.fc2]
    new = copy.deepcopy(mlp, memo={id(layer): None for layer in layers})
    for name in inputs:
        setattr(new, name, _keep_rows(getattr(mlp, name), width))
    new.fc2 = _keep_columns(mlp.fc2, width)
    if norm is not None and not isinstance(norm, nn.Identity):
        new.norm = _narrow_norm(norm, width)
    return new


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
    return layer


def _keep_rows(layer: nn.Linear, width: int) -> nn.Linear:
    return _linear_like(layer.weight[:width], None if layer.bias is None else layer.bias[:width])


def _keep_columns(layer: nn.Linear, width: int) -> nn.Linear:
    return _linear_like(layer.weight[:, :width], layer.bias)


def _narrow_norm(norm: nn.Module, width: int) -> nn.Module:
    if not isinstance(norm, nn.LayerNorm):
        raise ConfigError(f"narrow_mlps cannot narrow a {type(norm).__name__} inside an MLP; LayerNorm is supported.")
    new = copy.deepcopy(norm)
    new.normalized_shape = (width,)
    if norm.weight is not None:
        new.weight = nn.Parameter(norm.weight.detach()[:width].clone())
    if norm.bias is not None:
        new.bias = nn.Parameter(norm.bias.detach()[:width].clone())
    return new


def create_shallow_vit(
    variant: str, base: str, pretrained: bool = False, width_ratio: float = 0.5, mlp_init: str = "sliced", **kwargs
) -> VisionTransformer:
    """Build the ViT ``base`` at full width under the name ``variant``, then narrow its MLPs."""
    model = create_vit(variant, pretrained, **dict(VIT_ARGS[base], **kwargs))
    return narrow_mlps(model, width_ratio, init=mlp_init)


default_cfgs = generate_default_cfgs(
    {
        "vit_base_patch16_224_shallow_mlp": imagenet_cfg(),
        **{f"{name}_shallow_mlp": small_image_cfg() for name in VIT_ARGS if name.endswith("_32")},
    }
)


@register_model
def vit_base_patch16_224_shallow_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 with MLP width x0.5 sliced from the full-width init (58.2M parameters)."""
    return create_shallow_vit("vit_base_patch16_224_shallow_mlp", "vit_base_patch16_224", pretrained, **kwargs)


@register_model
def vit_pico_patch4_32_shallow_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/4 (32x32) with MLP width x0.5 sliced from the full-width init."""
    return create_shallow_vit("vit_pico_patch4_32_shallow_mlp", "vit_pico_patch4_32", pretrained, **kwargs)


@register_model
def vit_nano_patch4_32_shallow_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Nano/4 (32x32) with MLP width x0.5 sliced from the full-width init."""
    return create_shallow_vit("vit_nano_patch4_32_shallow_mlp", "vit_nano_patch4_32", pretrained, **kwargs)


@register_model
def vit_micro_patch4_32_shallow_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Micro/4 (32x32) with MLP width x0.5 sliced from the full-width init."""
    return create_shallow_vit("vit_micro_patch4_32_shallow_mlp", "vit_micro_patch4_32", pretrained, **kwargs)


@register_model
def vit_tiny_patch4_32_shallow_mlp(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/4 (32x32) with MLP width x0.5 sliced from the full-width init."""
    return create_shallow_vit("vit_tiny_patch4_32_shallow_mlp", "vit_tiny_patch4_32", pretrained, **kwargs)
