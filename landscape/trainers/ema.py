"""The exponential moving average of the weights, once per tensor.

timm's ``ModelEmaV3`` walks the state dict, where a module shared by several blocks (GroupedMLP) appears under
every block's name: its average would be updated once per use, i.e. with decay :math:`\\beta^g` instead of
:math:`\\beta` for a group of size :math:`g`. :class:`ModelEma` walks parameters and buffers, each of which
PyTorch lists once, so every tensor gets :math:`\\bar w \\leftarrow \\beta \\bar w + (1 - \\beta) w` exactly once.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3


class ModelEma(ModelEmaV3):
    """``ModelEmaV3`` (warm-up, decay schedule, device handling) with one update per unique tensor."""

    _pairs: tuple | None = None

    def _tensor_pairs(self, model: torch.nn.Module) -> tuple[Any, list, list]:
        """The (average, model) tensor pairs: floating ones to average, the others to copy. Walked once per model:
        the walk of the module tree cost as much as the update itself on a small model. Training updates tensors in
        place (optimizer steps, ``load_state_dict``), which keeps the pairs valid."""
        first = next(model.parameters(), None)  # held by the pairs, so its id names this model's tensors
        key = (id(model), id(self.module), id(first))
        if self._pairs is None or self._pairs[0] != key:
            values = [*model.parameters(), *model.buffers()]
            ema_values = [*self.module.parameters(), *self.module.buffers()]
            floats = [(e, m) for e, m in zip(ema_values, values) if e.is_floating_point()]
            others = [(e, m) for e, m in zip(ema_values, values) if not e.is_floating_point()]
            self._pairs = (key, floats, others)
        return self._pairs

    @torch.no_grad()
    def apply_update_(self, model: torch.nn.Module, decay: float) -> None:
        _, floats, others = self._tensor_pairs(model)
        move = (lambda v: v.to(device=self.device)) if self.device is not None else (lambda v: v)
        for ema_v, model_v in others:
            ema_v.copy_(move(model_v))
        lerp_ema = [e for e, _ in floats]
        lerp_model = [move(m) for _, m in floats]
        if self.foreach:
            self._foreach_lerp_(lerp_ema, lerp_model, weight=1.0 - decay)
        else:
            for ema_v, model_v in zip(lerp_ema, lerp_model):
                self._lerp_(ema_v, model_v, weight=1.0 - decay)
