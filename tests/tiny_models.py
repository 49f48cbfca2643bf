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


def tiny_run(root):
    """A run directory with one checkpoint of a tiny ViT on 8x8 digits and no optimizer state."""
    from landscape.checkpoints import save_checkpoint
    from landscape.config import save_yaml
    from landscape.models import create_model
    from landscape.runs import Run

    kwargs = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=8, depth=1, num_heads=2,
                  mlp_ratio=2)
    run = Run.create(root)
    save_yaml({"model": {"name": "vit_tiny_patch16_224", "kwargs": kwargs}, "data": {"name": "digits", "img_size": 8},
               "seed": 0}, run.config_path)
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **kwargs)
    save_checkpoint(run.checkpoint_path(epoch=1), model.state_dict(), model="vit_tiny_patch16_224", model_kwargs=kwargs,
                    epoch=1, step=5)
    return run
