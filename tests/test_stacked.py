"""Stacked training: seeds of one run trained as one batched model equal the same runs trained alone."""

from pathlib import Path

import pytest
import torch

from landscape.checkpoints import load_checkpoint
from landscape.errors import CheckpointError, ConfigError
from landscape.trainers import build_config, train
from landscape.trainers.stacked import train_stacked
from landscape.trainers.state import load_state

# Every per-run source of difference the stacked trainer must keep per run: init, data order, shift and flip draws,
# AdamW with its weight-decay groups, warm-up and cosine schedule, EMA, gradient clipping; 2 epochs of 4 updates,
# a checkpoint every 3 updates so that a state lands in the middle of an epoch.
TINY = ["epochs=2", "data.train_size=64", "data.val_size=48", "batch_size=16", "crop=pad", "crop_padding=1",
        "hflip=0.5", "ema.decay=0.9", "optim.grad_clip=0.5", "optim.weight_decay=0.05", "model.kwargs.depth=1",
        "model.kwargs.embed_dim=16", "every=steps:3"]
SEEDS = (0, 1, 2)
TIMING = ("wall_time", "images_per_s")


def configs(extra=()):
    return [build_config("digits", options={"seed": s}, overrides=[*TINY, *extra]) for s in SEEDS]


def assert_same_rows(stacked, alone):
    assert len(stacked) == len(alone)
    for a, b in zip(stacked, alone):
        assert a.keys() == b.keys()
        for key in a:
            if key in TIMING:
                continue
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)


def assert_same_checkpoint(path_a: Path, path_b: Path):
    assert path_a.name == path_b.name
    for weights in ("raw", "ema"):
        meta_a, a = load_checkpoint(path_a, weights=weights)
        meta_b, b = load_checkpoint(path_b, weights=weights)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{weights} {k}")
        assert (meta_a.config_hash, meta_a.step, meta_a.epoch, meta_a.model_kwargs) == (
            meta_b.config_hash, meta_b.step, meta_b.epoch, meta_b.model_kwargs)


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    root = tmp_path_factory.mktemp("alone")
    return [train(c, root / f"s{c.seed}", progress=False) for c in configs()]


def test_stacked_runs_equal_each_run_trained_alone(tmp_path, alone):
    results = train_stacked(configs(), [tmp_path / f"s{s}" for s in SEEDS], progress=False)
    for stacked, single in zip(results, alone):
        assert (stacked.run.root / "config.yaml").read_text() == (single.run.root / "config.yaml").read_text()
        assert_same_rows(stacked.rows, single.rows)
        assert [p.name for p in stacked.checkpoints] == [p.name for p in single.checkpoints]
        for a, b in zip(stacked.checkpoints, single.checkpoints):
            assert_same_checkpoint(a, b)
        state_a, state_b = load_state(stacked.run.state_path), load_state(single.run.state_path)
        assert state_a.keys() == state_b.keys()
        assert state_a["optimizer"]["param_groups"] == state_b["optimizer"]["param_groups"]
        for i, entry in state_b["optimizer"]["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(state_a["optimizer"]["state"][i][key], value, rtol=1e-4, atol=1e-6)
    # the seeds really differ: otherwise the comparison above could not tell runs apart
    assert alone[0].rows[-1]["val_loss"] != alone[1].rows[-1]["val_loss"]


def test_stacked_loop_strategy_keeps_each_runs_drop_path_stream(tmp_path):
    """Drop-path draws from the global generator: the loop strategy swaps each run's generator state in."""
    extra = ["model.drop_path=0.2", "epochs=1"]
    cs = configs(extra)[:2]
    stacked = train_stacked(cs, [tmp_path / f"st{c.seed}" for c in cs], progress=False)
    for c, result in zip(cs, stacked):
        single = train(c, tmp_path / f"al{c.seed}", progress=False)
        assert_same_rows(result.rows, single.rows)
        assert_same_checkpoint(result.checkpoints[-1], single.checkpoints[-1])


def test_stacked_run_resumed_stacked_or_alone_ends_as_the_uninterrupted_run(tmp_path, alone):
    """Killed after the state of step 3 (mid epoch 1), two runs resume stacked and one alone."""
    partial = [tmp_path / f"p{s}" for s in SEEDS]
    _train_until(configs(), partial, step=3)
    for p in partial:
        assert load_state(p / "state" / "last.pt")["step"] == 3
    results = train_stacked(None, partial[:2], resume=True, progress=False)
    alone_result = train(None, partial[2], resume=True, progress=False)
    for result, single in zip([*results, alone_result], alone):
        assert_same_rows(result.rows, single.rows)
        assert_same_checkpoint(result.checkpoints[-1], single.checkpoints[-1])


def _train_until(cs, outs, *, step):
    """A stacked training killed right after the state of ``step`` was written."""
    import landscape.trainers.loop as loop  # the writer of every run's outputs, stacked or alone

    original = loop.save_state

    def save_then_stop(path, state):
        original(path, state)
        if state["step"] == step and path.parent.parent == outs[-1]:
            raise KeyboardInterrupt

    loop.save_state = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train_stacked(cs, outs, progress=False)
    finally:
        loop.save_state = original


def test_stacked_runs_resume_together_only_from_one_step(tmp_path):
    cs = configs(["epochs=1"])[:2]
    outs = [tmp_path / "a", tmp_path / "b"]
    _train_until(cs, outs, step=3)
    train(None, outs[0], resume=True, progress=False)  # one run finishes alone: the two now stand apart
    with pytest.raises(CheckpointError, match="same step"):
        train_stacked(None, outs, resume=True, progress=False)


def test_stacked_training_refuses_runs_that_differ_in_more_than_the_seed(tmp_path):
    a, b = configs()[:2]
    b.optim.lr = 1.0
    with pytest.raises(ConfigError, match="differ in optim"):
        train_stacked([a, b], [tmp_path / "a", tmp_path / "b"], progress=False)
    mixed = configs(["mixup=0.2"])[:2]
    with pytest.raises(ConfigError, match="MixUp"):
        train_stacked(mixed, [tmp_path / "c", tmp_path / "d"], progress=False)


def test_a_refused_stacked_training_leaves_no_run_folder_behind(tmp_path):
    """The run directories are claimed as a run trained alone claims its own: a training refused by its checks
    removes the folders it created (only their locks were in them)."""
    a, b = configs()[:2]
    b.optim.lr = 1.0
    with pytest.raises(ConfigError, match="differ in optim"):
        train_stacked([a, b], [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_diverged_stacked_run_stops_naming_its_folder_and_keeps_its_last_good_checkpoint(tmp_path):
    from landscape.errors import LandscapeError
    from landscape.runs import Run

    cs = configs(["optim.opt=sgd", "optim.lr=1e6", "epochs=1"])[:2]
    for c in cs:
        c.optim.grad_clip = None
    with pytest.raises(LandscapeError, match=r"diverged at step 4 \(epoch 1\) in .*a: .*step-00000003.safetensors "
                                             "is kept"):
        train_stacked(cs, [tmp_path / "a", tmp_path / "b"], progress=False)
    for name in ("a", "b"):
        run = Run(tmp_path / name)
        assert [i.step for i in run.checkpoints()] == [3]
        assert list(run.read_metrics()["step"]) == [3]  # no row of the diverged updates
        _, weights = load_checkpoint(run.checkpoints()[0].path)
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_study_file_train_stack_trains_each_variant_once_and_skips_finished_runs(tmp_path):
    from landscape.config import parse_override
    from landscape.study import ensure_trained_stacked, resolved_study, study_from_dict, train_config

    raw = {"data": "digits", "recipe": "digits", "seeds": 2, "train": {"stack": True}, "overrides": dict(
        parse_override(o) for o in [*TINY, "epochs=1"]),
        "variants": [{"name": "vit", "model": "vit_tiny_patch16_224", "kwargs": {"patch_size": 4, "embed_dim": 16,
                                                                               "depth": 1, "num_heads": 2}}]}
    spec = study_from_dict(raw)
    assert spec.stack and resolved_study(spec)["train"] == {"stack": True}
    assert not study_from_dict({**raw, "train": {}}).stack
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        study_from_dict({**raw, "train": {"stack": "yes"}})
    cs = [train_config(spec, v, s) for v, s, _ in spec.run_names()]
    dirs = [tmp_path / name for _, _, name in spec.run_names()]
    events = []
    ensure_trained_stacked(cs, dirs, emit=events.append)
    assert [e.message.split(":")[0] for e in events] == ["trained stacked with 2 seeds"] * 2
    assert all((d / "checkpoints" / "epoch-0001.safetensors").exists() for d in dirs)
    events.clear()
    ensure_trained_stacked(cs, dirs, emit=events.append)
    assert [e.message for e in events] == ["already trained"] * 2


@pytest.mark.parametrize("model, kwargs", [
    ("vit_pico_patch4_32_grouped_mlp", {"group_size": 3}),
    ("mlit_xxs", {"num_heads": 2, "num_kv_heads": 1, "hidden_first": 32, "hidden_last": 16}),
])
def test_stacked_forward_of_shared_mlp_and_expert_models_equals_each_model_and_leaves_them_intact(model, kwargs):
    from landscape.models import create_model
    from landscape.trainers.stacked import StackedModel

    kw = dict(embed_dim=16, depth=3, patch_size=7, img_size=28, class_token=False, global_pool="avg", num_classes=10,
              in_chans=1, **({"num_heads": 2, "mlp_ratio": 2.0} if "grouped" in model else {}), **kwargs)
    modules = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        modules.append(create_model(model, **kw))
    x = torch.randn(2, 5, 1, 28, 28)
    stacked = StackedModel(modules, None, "auto")
    assert stacked.strategy == ("loop" if model.startswith("mlit") else "vmap")
    logits, aux = stacked(x)
    for k, module in enumerate(modules):
        torch.testing.assert_close(logits[k], module(x[k]), rtol=1e-5, atol=1e-5)
    assert (aux is not None) == model.startswith("mlit")
    again = StackedModel(modules, None, "auto")  # the modules still hold their own tensors after the call
    torch.testing.assert_close(again.params, stacked.params)
