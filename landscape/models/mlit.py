"""mLiT: a Vision Transformer with mixture-of-experts feed-forward layers (arXiv 2407.17783).

The model is a timm ``VisionTransformer`` (patch embedding as the only convolution, a class token, learned
position embeddings, pre-norm blocks, a final LayerNorm and a linear head on the class token) whose blocks
differ from ViT's in two ways.

**Feed-forward: a mixture of SwiGLU experts with shared V and W2.** For a token :math:`x \\in \\mathbb{R}^d`,
layer :math:`\\ell` has :math:`E_\\ell` experts of hidden size :math:`h_\\ell`; expert :math:`e` is

.. math::  f_e(x) = W_2\\big(\\mathrm{silu}(W_e x + b_e) \\odot (V x + c)\\big) + b_2,

where the gate projection :math:`W_e \\in \\mathbb{R}^{h\\times d}` is the expert's own and the value projection
:math:`V \\in \\mathbb{R}^{h\\times d}` and output :math:`W_2 \\in \\mathbb{R}^{d\\times h}` are shared by all experts
of the layer. A linear router :math:`r(x) = R x + b_r \\in \\mathbb{R}^{E}` picks the top-:math:`k` experts
(:math:`k = 2`) and weighs them by a softmax over the chosen logits, :math:`g = \\mathrm{softmax}(r(x)_{T(x)})`:

.. math::  y = \\sum_{e \\in T(x)} g_e f_e(x)
             = W_2\\Big(\\big(\\textstyle\\sum_{e \\in T(x)} g_e\\,\\mathrm{silu}(W_e x + b_e)\\big)
               \\odot (V x + c)\\Big) + b_2,

the second form (exact, since :math:`\\sum g_e = 1`) being what is computed: :math:`V x` and :math:`W_2` once per
token, :math:`W_e x` only for the two chosen experts. Routing is a deterministic function of the input (no
noise); derivatives are those of the loss at fixed routing. Dispatching tokens to experts has data-dependent
shapes: it works under autograd and ``torch.func.grad``/``jvp``, not under ``torch.func.vmap`` nor on the
meta device. A Switch-Transformer load-balancing loss,

.. math::  L_\\text{aux} = E \\sum_{e=1}^{E} f_e P_e, \\qquad
           f_e = \\tfrac{1}{kT}\\#\\{(t, j): T_j(x_t) = e\\}, \\quad
           P_e = \\tfrac{1}{T}\\textstyle\\sum_t \\mathrm{softmax}(r(x_t))_e,

(1 when balanced) is stored by every layer after each forward; :func:`moe_aux_loss` returns
``aux_loss_weight * sum over layers`` for the trainer to add to the task loss. Forwards inside ``torch.func``
transforms (``grad``, ``jvp``, ``vmap``) are not recorded, since their tensors are only valid inside the
transform; copies and pickles of the model (``copy.deepcopy``, timm's ``ModelEmaV3``) leave the last forward's
statistics behind, since they belong to that forward's autograd graph.

**Depth-wise scaling and grouped-query attention.** The hidden size shrinks linearly from ``hidden_first`` in
the first layer to ``hidden_last`` in the last, rounded to integers,
:math:`h_\\ell = \\mathrm{round}(h_0 + (h_{L-1} - h_0)\\,\\ell/(L-1))`; the depth is cut into three equal stages
with 3, 4 and 5 experts (layer :math:`\\ell` is in stage :math:`\\lfloor 3\\ell/L \\rfloor`); attention has
``num_heads`` query heads sharing ``num_kv_heads`` key/value heads (timm's ``AttentionRope`` with separate
q/k/v projections, without rotary embeddings).

Choices beyond the description above, taken here: every linear layer has a bias (timm's default, so
``qkv_bias=True``), the experts' gate projections too; the router is a biased linear layer; hidden sizes are
rounded half up; the head reads the class token. At 100 classes and 36x36 inputs with patch 3 (145 tokens)
mLiT-S is 0.39% above the paper's 2.36M and mLiT-XXS 1.29% below its 0.67M:

==============  =====  =====  ===========  ===========  =============  ===========  =========
name            width  depth  hidden       heads / kv   experts        parameters   paper
==============  =====  =====  ===========  ===========  =============  ===========  =========
``mlit_s``        144     15  144 -> 72    8 / 4        3, 4, 5        2,369,314    2.36M
``mlit_xs``       128     12  96 -> 32     8 / 4        3, 4, 5        1,213,402    -
``mlit_xxs``      108      9  81 -> 27     6 / 3        3, 4, 5          661,358    0.67M
==============  =====  =====  ===========  ===========  =============  ===========  =========
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import AttentionRope, DropPath, LayerNorm, LayerScale, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from landscape.errors import ConfigError
from landscape.models.family import Family

# mlit_* names (landscape.models.variants).
FAMILY = Family("mlit", matches=lambda name: name.startswith("mlit"), label=lambda kwargs: "mLiT")


class MixtureOfSwiGLUExperts(nn.Module):
    """Top-k mixture of SwiGLU experts whose value projection ``fc1_x`` and output ``fc2`` are shared.

    Parameters: ``router`` (d -> E), ``fc1_g_weight`` (E, h, d) and ``fc1_g_bias`` (E, h), the experts' own
    gate projections; ``fc1_x`` (d -> h) and ``fc2`` (h -> d), shared. Input and output: (..., d). After each
    forward outside ``torch.func`` transforms, ``aux_loss`` holds the load-balancing loss of that forward (a
    0-dim tensor, attached to its graph) and ``tokens_per_expert`` the number of tokens routed to each expert,
    shape (E,); both are ``None`` before the first such forward and in copies of the module.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        num_experts: int,
        top_k: int = 2,
        bias: bool = True,
        drop: float = 0.0,
        aux_loss_weight: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be between 1 and the number of experts {num_experts}, got {top_k}.")
        self.in_features, self.hidden_features = in_features, hidden_features
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_weight = aux_loss_weight
        self.router = nn.Linear(in_features, num_experts, bias=True, **dd)
        self.fc1_g_weight = nn.Parameter(torch.empty(num_experts, hidden_features, in_features, **dd))
        self.fc1_g_bias = nn.Parameter(torch.empty(num_experts, hidden_features, **dd)) if bias else None
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT initialisation for the experts' gate projections: truncated normal (std 0.02), zero bias."""
        trunc_normal_(self.fc1_g_weight, std=0.02)
        if self.fc1_g_bias is not None:
            nn.init.zeros_(self.fc1_g_bias)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (T, E), chosen experts (T, k) and their weights (T, k) for tokens (T, d)."""
        logits = self.router(tokens)
        top_logits, chosen = logits.topk(self.top_k, dim=-1)
        return logits, chosen, top_logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.in_features)
        logits, chosen, weights = self.route(tokens)
        gate = tokens.new_zeros(tokens.shape[0], self.hidden_features)
        counts = []
        for e in range(self.num_experts):
            token_index, slot = (chosen == e).nonzero(as_tuple=True)
            counts.append(token_index.numel())
            if token_index.numel() == 0:
                continue
            bias = None if self.fc1_g_bias is None else self.fc1_g_bias[e]
            activation = F.silu(F.linear(tokens[token_index], self.fc1_g_weight[e], bias))
            # Out of place: forward-mode AD (Hessian-vector products) cannot write into a tensor without tangent.
            # In the gate's dtype: under autocast the expert's linear layer computes in bf16, the gate is float32.
            gate = gate.index_add(0, token_index, (activation * weights[token_index, slot, None]).to(gate.dtype))
        hidden = self.drop1(gate * self.fc1_x(tokens))
        out = self.drop2(self.fc2(hidden))
        if not _inside_function_transform(logits):
            self.tokens_per_expert = torch.tensor(counts)
            self.aux_loss = self._load_balancing_loss(logits, chosen)
        return out.reshape(shape)

    def __getstate__(self) -> dict:
        # The last forward's loss is a non-leaf tensor of that forward's graph, which deepcopy and pickle refuse;
        # a copy starts without forward statistics, as a freshly built module does.
        state = super().__getstate__()
        state["aux_loss"] = state["tokens_per_expert"] = None
        return state

    def _load_balancing_loss(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        assigned = F.one_hot(chosen, self.num_experts).sum(dim=1).to(logits.dtype)  # (T, E), 0/1 entries
        fraction = assigned.mean(dim=0) / self.top_k
        probability = logits.softmax(dim=-1).mean(dim=0)
        return self.num_experts * (fraction * probability).sum()


def _inside_function_transform(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.func`` wrapper (grad, jvp, vmap), only valid inside its transform."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped(tensor)) if is_wrapped is not None else False


class MLiTBlock(Block):
    """A pre-norm transformer block with grouped-query attention and a mixture of SwiGLU experts.

    Built by ``VisionTransformer`` with its usual block arguments; ``depth`` is the block's index, which
    selects its hidden size ``hidden_sizes[depth]`` and expert count ``num_experts[depth]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        hidden_sizes: Sequence[int],
        num_experts: Sequence[int],
        num_kv_heads: int,
        top_k: int = 2,
        aux_loss_weight: float = 0.01,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = LayerNorm,
        depth: int = 0,
        device=None,
        dtype=None,
        **unused,  # the ViT's mlp_ratio, act_layer, mlp_layer, attn_layer: mLiT sets its own
    ) -> None:
        nn.Module.__init__(self)
        dd = {"device": device, "dtype": dtype}
        if "num_kv_heads" not in inspect.signature(AttentionRope).parameters:
            raise ConfigError("mLiT needs grouped-query attention from timm (AttentionRope with num_kv_heads); "
                              "upgrade timm.")
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AttentionRope(
            dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            qkv_fused=False,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = MixtureOfSwiGLUExperts(
            dim,
            hidden_sizes[depth],
            num_experts[depth],
            top_k=top_k,
            bias=proj_bias,
            drop=proj_drop,
            aux_loss_weight=aux_loss_weight,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()


def hidden_size_schedule(hidden_first: int, hidden_last: int, depth: int) -> list[int]:
    """Hidden sizes shrinking linearly from ``hidden_first`` (layer 0) to ``hidden_last`` (layer depth-1)."""
    if depth == 1:
        return [int(hidden_first)]
    step = (hidden_last - hidden_first) / (depth - 1)
    return [int(math.floor(hidden_first + step * i + 0.5)) for i in range(depth)]


def expert_schedule(experts_per_stage: Sequence[int], depth: int) -> list[int]:
    """Expert count of each layer: the depth cut into ``len(experts_per_stage)`` equal stages."""
    stages = len(experts_per_stage)
    return [int(experts_per_stage[i * stages // depth]) for i in range(depth)]


class MLiT(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks are :class:`MLiTBlock` (see the module docstring).

    Args beyond ``VisionTransformer``'s: ``num_kv_heads`` (key/value heads of grouped-query attention),
    ``hidden_first``/``hidden_last`` (expert hidden size of the first and last layer), ``experts_per_stage``
    (expert counts of the equal depth stages), ``top_k`` (experts per token), ``aux_loss_weight`` (factor
    of the load-balancing loss returned by :func:`moe_aux_loss`).
    """

    def __init__(
        self,
        img_size: int = 36,
        patch_size: int = 3,
        in_chans: int = 3,
        num_classes: int = 100,
        embed_dim: int = 128,
        depth: int = 12,
        num_heads: int = 8,
        num_kv_heads: int = 4,
        hidden_first: int = 96,
        hidden_last: int = 32,
        experts_per_stage: Sequence[int] = (3, 4, 5),
        top_k: int = 2,
        aux_loss_weight: float = 0.01,
        **kwargs,
    ) -> None:
        if embed_dim % num_heads or num_heads % num_kv_heads:
            raise ConfigError(
                f"mLiT needs embed_dim divisible by num_heads and num_heads by num_kv_heads, got {embed_dim}, "
                f"{num_heads} and {num_kv_heads}."
            )
        if depth < len(experts_per_stage):
            raise ConfigError(f"mLiT needs at least one layer per stage: depth {depth} < {len(experts_per_stage)}.")
        if top_k > min(experts_per_stage):
            raise ConfigError(f"top_k {top_k} exceeds the smallest expert count {min(experts_per_stage)}.")
        hidden_sizes = hidden_size_schedule(hidden_first, hidden_last, depth)
        num_experts = expert_schedule(experts_per_stage, depth)
        block_fn = partial(
            MLiTBlock,
            hidden_sizes=hidden_sizes,
            num_experts=num_experts,
            num_kv_heads=num_kv_heads,
            top_k=top_k,
            aux_loss_weight=aux_loss_weight,
        )
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            block_fn=block_fn,
            **kwargs,
        )
        self.hidden_sizes, self.num_experts = hidden_sizes, num_experts


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The load-balancing term to add to the task loss after a forward: ``sum_layers aux_loss_weight * L_aux``.

    Of the last forward outside ``torch.func`` transforms, attached to its graph. Zero (a 0-dim tensor) for
    models without mixture-of-experts layers, before the first forward and in a fresh copy of the model.
    """
    total = None
    for module in model.modules():
        if isinstance(module, MixtureOfSwiGLUExperts) and module.aux_loss is not None:
            term = module.aux_loss_weight * module.aux_loss
            total = term if total is None else total + term
    if total is None:
        first = next(model.parameters(), None)
        return torch.zeros((), device=None if first is None else first.device)
    return total


def create_mlit(variant: str, pretrained: bool = False, **kwargs) -> MLiT:
    """Build an :class:`MLiT` under the registered name ``variant`` (its config supplies defaults)."""
    if pretrained:
        raise ConfigError(
            f"There are no pretrained weights for {variant}; train it, or bring weights in with 'landscape import'."
        )
    feature_cfg = dict(out_indices=3, feature_cls="getter")
    return build_model_with_cfg(MLiT, variant, pretrained=False, feature_cfg=feature_cfg, **kwargs)


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 100,
        "input_size": (3, 36, 36),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


MLIT_ARGS = {
    "mlit_s": dict(embed_dim=144, depth=15, num_heads=8, num_kv_heads=4, hidden_first=144, hidden_last=72),
    "mlit_xs": dict(embed_dim=128, depth=12, num_heads=8, num_kv_heads=4, hidden_first=96, hidden_last=32),
    "mlit_xxs": dict(embed_dim=108, depth=9, num_heads=6, num_kv_heads=3, hidden_first=81, hidden_last=27),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in MLIT_ARGS})


@register_model
def mlit_s(pretrained: bool = False, **kwargs) -> MLiT:
    """mLiT-S: width 144, depth 15, MoE hidden 144->72, 8/4 heads, 36x36 patch 3 (2.36M parameters)."""
    return create_mlit("mlit_s", pretrained, **dict(MLIT_ARGS["mlit_s"], **kwargs))


@register_model
def mlit_xs(pretrained: bool = False, **kwargs) -> MLiT:
    """mLiT-XS: width 128, depth 12, MoE hidden 96->32, 8/4 heads, 36x36 patch 3 (1.21M parameters)."""
    return create_mlit("mlit_xs", pretrained, **dict(MLIT_ARGS["mlit_xs"], **kwargs))


@register_model
def mlit_xxs(pretrained: bool = False, **kwargs) -> MLiT:
    """mLiT-XXS: width 108, depth 9, MoE hidden 81->27, 6/3 heads, 36x36 patch 3 (0.66M parameters)."""
    return create_mlit("mlit_xxs", pretrained, **dict(MLIT_ARGS["mlit_xxs"], **kwargs))
