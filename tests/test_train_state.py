"""The trainer's state and its public pieces: position, per-row tallies, metrics rows, checkpoints, optimizer."""

import copy
import math
import types

import pytest
import torch

from landscape.checkpoints import build_model, load_checkpoint, read_checkpoint_info
from landscape.errors import ConfigError
from landscape.runs import Run
from landscape.trainers import build_config
from landscape.trainers.distributed import Distributed
from landscape.trainers.loop import (
    build_loss, build_optimizer, metrics_row, resolve_model_kwargs, run_hash, write_checkpoint,
)
from landscape.trainers.state import RowTally, TrainState, load_state, save_state

DIGITS = types.SimpleNamespace(num_classes=10, in_chans=1, img_size=8)
TINY = ["model.kwargs.depth=1", "model.kwargs.embed_dim=8", "epochs=2"]
COLUMNS = ["epoch", "step", "images_seen", "train_loss", "val_loss", "val_top1", "val_top5", "ema_val_loss",
           "ema_val_top1", "ema_val_top5", "lr", "grad_norm", "wall_time", "images_per_s", "schedule_epochs"]


def tiny_config(*overrides):
    config = build_config("digits", overrides=[*TINY, *overrides])
    config.model.kwargs = resolve_model_kwargs(config, DIGITS)
    return config


def tiny_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return TrainState(model, optimizer, None, torch.amp.GradScaler("cpu", enabled=False))


def test_position_moves_to_the_next_epoch_after_the_epochs_last_update():
    state = tiny_state()
    positions = []
    for _ in range(7):
        state.advance(updates_per_epoch=3)
        positions.append((state.step, state.epoch, state.next_update))
    assert positions == [(1, 1, 1), (2, 1, 2), (3, 2, 0), (4, 2, 1), (5, 2, 2), (6, 3, 0), (7, 3, 1)]


def test_saved_state_restores_weights_optimizer_position_and_rows_exactly(tmp_path):
    state = tiny_state(seed=0)
    state.model(torch.ones(4, 3)).square().sum().backward()
    state.optimizer.step()
    state.advance(updates_per_epoch=5)
    state.rows.append({"epoch": 1, "step": 1, "wall_time": 2.5})
    save_state(tmp_path / "last.pt", state.state_dict("abc", rng=[]))

    restored = tiny_state(seed=1)
    saved = load_state(tmp_path / "last.pt")
    restored.load_state_dict(saved)
    assert saved["config_hash"] == "abc" and saved["elapsed"] == 2.5
    assert (restored.step, restored.epoch, restored.next_update, restored.rows) == (1, 1, 1, state.rows)
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), restored.model.parameters()))
    moments = [s["exp_avg_sq"] for s in state.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, s["exp_avg_sq"]) for a, s in zip(moments, restored.optimizer.state_dict()["state"].values()))


def test_row_tally_names_the_first_update_whose_loss_or_gradient_norm_is_not_finite():
    tally = RowTally(first_step=11, lr=0.1)
    tally.add(torch.tensor(1.0), torch.tensor(2.0))
    tally.add(torch.tensor(1.0), torch.tensor(math.inf))
    tally.add(torch.tensor(math.nan), torch.tensor(2.0))
    assert tally.first_nonfinite() == (12, 1.0, math.inf)
    step, loss, _ = tally.first_nonfinite(norms=False)  # fp16 skips overflowing gradients: only the loss counts
    assert step == 13 and math.isnan(loss)
    assert RowTally(first_step=1, lr=0.1).first_nonfinite() is None


def test_row_tally_summary_is_the_mean_over_the_rows_updates():
    tally = RowTally(first_step=1, lr=0.05, aux=[])
    for loss, norm, aux in [(1.0, 4.0, 0.5), (2.0, 5.0, 0.25), (6.0, 9.0, 0.75)]:
        tally.add(torch.tensor(loss), torch.tensor(norm), torch.tensor(aux))
    tally.images, tally.seconds = 96, 2.0
    assert tally.summary(Distributed(), torch.device("cpu")) == {
        "train_loss": 3.0, "lr": 0.05, "grad_norm": 6.0, "images_per_s": 48.0, "moe_aux_loss": 0.5}
    empty = RowTally(first_step=1, lr=0.05).summary(Distributed(), torch.device("cpu"))
    assert empty == {"train_loss": None, "lr": 0.05, "grad_norm": None, "images_per_s": None}


def test_metrics_row_has_the_documented_columns_in_order():
    config = tiny_config()
    train = {"train_loss": 2.0, "lr": 0.1, "grad_norm": 1.5, "images_per_s": 10.0}
    val = {"val_loss": 2.1, "val_top1": 30.0, "val_top5": 70.0}
    row = metrics_row(config, epoch=1, step=4, train=train, val=val, ema_val=None, wall_time=3.0)
    assert list(row) == COLUMNS
    assert row["images_seen"] == 4 * config.batch_size and row["schedule_epochs"] == 2
    assert row["ema_val_loss"] is row["ema_val_top1"] is row["ema_val_top5"] is None
    moe = metrics_row(config, epoch=1, step=4, train={**train, "moe_aux_loss": 0.2}, val=val,
                      ema_val={"val_loss": 2.0, "val_top1": 31.0, "val_top5": 71.0}, wall_time=3.0)
    assert list(moe) == [*COLUMNS, "moe_aux_loss"] and moe["ema_val_top1"] == 31.0


def test_checkpoint_is_named_by_epoch_or_step_and_its_metadata_rebuilds_the_model(tmp_path):
    from landscape.models import create_model

    config = tiny_config()
    torch.manual_seed(0)
    model = create_model(config.model.name, **config.model.kwargs)
    run = Run.create(tmp_path / "run")
    row = {"epoch": 2, "step": 16, "val_top1": 50.0}
    at_epoch_end = write_checkpoint(run, config, model, model, row, epoch_end=True)
    mid_epoch = write_checkpoint(run, config, model, None, row, epoch_end=False, previous=at_epoch_end)
    assert (at_epoch_end.name, mid_epoch.name) == ("epoch-0002.safetensors", "step-00000016.safetensors")
    info = read_checkpoint_info(at_epoch_end)
    assert (info.epoch, info.step, info.metrics, info.config_hash, info.has_ema) == (2, 16, row, run_hash(config), True)
    assert read_checkpoint_info(mid_epoch).epoch is None and not read_checkpoint_info(mid_epoch).has_ema
    info, weights = load_checkpoint(at_epoch_end)
    rebuilt = build_model(info, weights)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))


def test_optimizer_rate_scales_with_the_batch_only_when_a_base_batch_is_set():
    model = torch.nn.Linear(3, 2)
    plain = build_optimizer(tiny_config("lr=0.01", "batch_size=64"), model)
    scaled = build_optimizer(tiny_config("lr=0.01", "batch_size=64", "optim.lr_base_batch=256"), model)
    assert plain.param_groups[0]["lr"] == 0.01 and scaled.param_groups[0]["lr"] == 0.01 * 64 / 256


@pytest.mark.parametrize("opt", ["adamw", "adam", "sgd", "momentum"])
def test_torch_optimizers_run_their_fused_update_with_the_same_groups_and_arithmetic(opt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    config = tiny_config(f"optim.opt={opt}", "lr=0.01", "optim.weight_decay=0.05")
    fused = build_optimizer(config, model)
    assert all(g["fused"] and not g["foreach"] for g in fused.param_groups)
    twin = copy.deepcopy(model)
    multi = build_optimizer(config, twin)
    for g in multi.param_groups:  # the multi-tensor update the trainer ran before, on the same groups
        g["fused"], g["foreach"] = None, True
    assert [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")} for g in fused.param_groups] == \
        [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")} for g in multi.param_groups]
    assert sorted(g["weight_decay"] for g in fused.param_groups) == [0.0, 0.05]  # timm's no-decay group kept
    assert {k: v for k, v in fused.defaults.items() if k not in ("fused", "foreach")} == \
        {k: v for k, v in multi.defaults.items() if k not in ("fused", "foreach")}  # a group added later gets them
    x = torch.randn(16, 6)
    for _ in range(5):
        for m, o in ((model, fused), (twin, multi)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_state_saved_by_the_multi_tensor_update_resumes_with_it_and_the_loss_scaler(tmp_path):
    # runs started before the fused update saved foreach groups; resumed, they keep that update, and torch must
    # not hand the loss scaler's found-inf flags to it (an assertion inside torch's multi-tensor Adam)
    config = tiny_config("optim.opt=adamw", "lr=0.01")
    old = build_optimizer(config, torch.nn.Linear(3, 2))
    for g in old.param_groups:
        g["fused"], g["foreach"] = None, True
    model = torch.nn.Linear(3, 2)
    state = TrainState(model, build_optimizer(config, model), None, torch.amp.GradScaler("cpu", enabled=True))
    state.rows.append({"wall_time": 0.0})
    saved = {**state.state_dict("abc", rng=[]), "optimizer": old.state_dict()}
    state = TrainState(model, build_optimizer(config, model), None, torch.amp.GradScaler("cpu", enabled=True))
    state.load_state_dict(saved)
    assert all(g["foreach"] and not g["fused"] for g in state.optimizer.param_groups)
    before = model.weight.detach().clone()
    state.scaler.scale(model(torch.ones(4, 3)).square().sum()).backward()
    state.scaler.unscale_(state.optimizer)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    assert not torch.equal(model.weight, before)


def test_mixing_trains_on_soft_targets_and_needs_an_even_micro_batch():
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup, loss_fn = build_loss(tiny_config("mixup=0.8"), num_classes=10, micro_batch_size=32)
    assert isinstance(mixup, Mixup) and isinstance(loss_fn, SoftTargetCrossEntropy)
    mixup, loss_fn = build_loss(tiny_config("augment.label_smoothing=0.1"), num_classes=10, micro_batch_size=32)
    assert mixup is None and isinstance(loss_fn, LabelSmoothingCrossEntropy)
    with pytest.raises(ConfigError, match="must be even"):
        build_loss(tiny_config("mixup=0.8"), num_classes=10, micro_batch_size=33)
