import pytest
import torch

from landscape.models import create_model
from landscape.trainers.ema import ModelEma


def _grouped():
    torch.manual_seed(0)
    return create_model("vit_pico_patch4_32_grouped_mlp", img_size=8, patch_size=4, in_chans=1, num_classes=3,
                        embed_dim=16, depth=2, num_heads=2, group_size=2)


@pytest.mark.parametrize("foreach", [True, False])
def test_shared_mlp_is_averaged_once_per_update(foreach):
    model = _grouped()
    ema = ModelEma(model, decay=0.5, foreach=foreach)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, start[name] + 0.5, msg=name)
    assert ema.module.blocks[0].mlp is ema.module.blocks[1].mlp
