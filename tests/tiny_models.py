"""Problems small enough for a dense float64 Hessian, shared by the curvature and Hessian tests."""

import timm
import torch
from torch import nn


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, num_classes=3,
                             embed_dim=8, depth=1, num_heads=2, mlp_ratio=2).double()


def tiny_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 3)).double()


def data(n: int = 10):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
