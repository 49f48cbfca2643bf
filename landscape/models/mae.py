"""Masked-autoencoder pre-training (He et al., arXiv 2111.06377) around any timm ViT encoder; mmLiT = MAE + mLiT.

For an image cut into :math:`L` patches, a random subset of :math:`K = \\lfloor L (1 - \\rho) \\rfloor` patches
(mask ratio :math:`\\rho = 0.75`) is kept per image. The encoder (class token, learned position embeddings,
its blocks and final norm) sees only the kept patches; a light decoder (a linear map to ``decoder_dim``,
a learned mask token in place of every removed patch, learned position embeddings, ``decoder_depth`` timm
``Block``\\ s, a norm and a linear map to :math:`p^2 C` pixel values) predicts every patch, and the loss is the
mean squared error over the removed patches only,

.. math::  \\mathcal{L} = \\frac{1}{|M|} \\sum_{i \\in M} \\frac{1}{p^2 C} \\lVert \\hat{x}_i - x_i \\rVert^2,

with targets :math:`x_i` normalised per patch (zero mean, unit variance) when ``norm_pix_loss``.
``forward(images) -> (loss, pred (B, L, p^2 C), mask (B, L), 1 = removed)``. The encoder is an ordinary
classifier built without head (``num_classes=0``), so fine-tuning loads :func:`encoder_state_dict` of the
pre-trained weights into the same architecture with a head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.layers import LayerNorm, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from landscape.errors import ConfigError
from landscape.models.mlit import MLIT_ARGS, _cfg as mlit_cfg, create_mlit

ENCODER_PREFIX = "encoder."


class MaskedAutoencoder(nn.Module):
    """MAE pre-training wrapper; ``encoder`` is a timm ``VisionTransformer`` with a class token and no head."""

    def __init__(
        self,
        encoder: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}.")
        if (
            getattr(encoder, "num_prefix_tokens", None) != 1
            or not getattr(encoder, "has_class_token", False)
            or getattr(encoder, "pos_embed", None) is None
            or getattr(encoder, "no_embed_class", True)
            or getattr(encoder, "dynamic_img_size", True)
        ):
            raise ConfigError(
                "The MAE encoder must be a timm VisionTransformer with one class token and learned position "
                "embeddings that include it."
            )
        if decoder_dim % decoder_num_heads:
            raise ConfigError(f"decoder_dim {decoder_dim} is not divisible by decoder_num_heads {decoder_num_heads}.")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.in_chans = encoder.patch_embed.proj.in_channels
        num_patches = encoder.patch_embed.num_patches
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim))
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_num_heads, qkv_bias=True, norm_layer=LayerNorm) for _ in range(decoder_depth)]
        )
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        self._init_decoder()

    @torch.no_grad()
    def _init_decoder(self) -> None:
        trunc_normal_(self.decoder_pos_embed, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("decoder") and isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), patches in the patch embedding's row-major order."""
        b, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def random_masking(self, batch: int, length: int, noise: torch.Tensor | None, device) -> tuple[torch.Tensor, ...]:
        """Indices of the kept patches (B, K), the mask (B, L; 1 = removed) and the order that undoes the shuffle."""
        if noise is None:
            noise = torch.rand(batch, length, device=device)
        keep = int(length * (1.0 - self.mask_ratio))
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        mask = torch.ones(batch, length, device=device)
        mask[:, :keep] = 0
        return shuffle[:, :keep], torch.gather(mask, 1, restore), restore

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        enc = self.encoder
        tokens = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        b, length, dim = tokens.shape
        kept, mask, restore = self.random_masking(b, length, noise, images.device)
        tokens = torch.gather(tokens, 1, kept[..., None].expand(-1, -1, dim))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        tokens = enc.norm_pre(torch.cat([cls, tokens], dim=1))
        return enc.norm(enc.blocks(tokens)), mask, restore

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, visible, dim = x.shape
        length = restore.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, length + 1 - visible, -1)], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, dim))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """``noise`` (B, L), if given, fixes the masking: the patches with the smallest noise are kept."""
        latent, mask, restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, restore)
        return self.loss(images, pred, mask), pred, mask


def encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights from a :class:`MaskedAutoencoder` state dict, named as in the plain classifier.

    Load them with ``strict=False`` into the classifier: only its head is then missing.
    """
    return {k[len(ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}


_MAE_KEYS = ("mask_ratio", "decoder_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss")


def create_mae_mlit(variant: str, base: str, pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoder:
    """An mLiT ``base`` without head wrapped for MAE pre-training; MAE keywords go to the wrapper."""
    mae_kwargs = {k: kwargs.pop(k) for k in _MAE_KEYS if k in kwargs}
    kwargs.pop("num_classes", None)
    encoder = create_mlit(variant, pretrained, **dict(MLIT_ARGS[base], num_classes=0, **kwargs))
    model = MaskedAutoencoder(encoder, **mae_kwargs)
    model.pretrained_cfg = encoder.pretrained_cfg
    return model


default_cfgs = generate_default_cfgs({f"mae_{name}": mlit_cfg(num_classes=0) for name in MLIT_ARGS})


@register_model
def mae_mlit_s(pretrained: bool = False, **kwargs) -> MaskedAutoencoder:
    """MAE pre-training of mLiT-S (mmLiT-S): mask ratio 0.75, 2-block decoder of width 128."""
    return create_mae_mlit("mae_mlit_s", "mlit_s", pretrained, **kwargs)


@register_model
def mae_mlit_xs(pretrained: bool = False, **kwargs) -> MaskedAutoencoder:
    """MAE pre-training of mLiT-XS (mmLiT-XS): mask ratio 0.75, 2-block decoder of width 128."""
    return create_mae_mlit("mae_mlit_xs", "mlit_xs", pretrained, **kwargs)


@register_model
def mae_mlit_xxs(pretrained: bool = False, **kwargs) -> MaskedAutoencoder:
    """MAE pre-training of mLiT-XXS (mmLiT-XXS): mask ratio 0.75, 2-block decoder of width 128."""
    return create_mae_mlit("mae_mlit_xxs", "mlit_xxs", pretrained, **kwargs)
