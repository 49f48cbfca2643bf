"""The exponential moving average of the weights, once per tensor.

timm's ``ModelEmaV3`` walks the state dict, where a module shared by several blocks (GroupedMLP) appears under
every block's name: its average would be updated once per use, i.e. with decay :math:`\\beta^g` instead of
:math:`\\beta` for a group of size :math:`g`. :class:`ModelEma` walks parameters and buffers, each of which
PyTorch lists once, so every tensor gets :math:`\\bar w \\leftarrow \\beta \\bar w + (1 - \\beta) w` exactly once.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3


class ModelEma(ModelEmaV3):
    """``ModelEmaV3`` (warm-up, decay schedule, device handling) with one update per unique tensor."""

    @torch.no_grad()
    def apply_update_(self, model: torch.nn.Module, decay: float) -> None:
        ema_values = [*self.module.parameters(), *self.module.buffers()]
        model_values = [*model.parameters(), *model.buffers()]
        lerp_ema, lerp_model = [], []
        for ema_v, model_v in zip(ema_values, model_values):
            model_v = model_v.to(device=self.device) if self.device is not None else model_v
            if ema_v.is_floating_point():
                lerp_ema.append(ema_v)
                lerp_model.append(model_v)
            else:
                ema_v.copy_(model_v)
        if self.foreach:
            self._foreach_lerp_(lerp_ema, lerp_model, weight=1.0 - decay)
        else:
            for ema_v, model_v in zip(lerp_ema, lerp_model):
                self._lerp_(ema_v, model_v, weight=1.0 - decay)
