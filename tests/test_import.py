"""``landscape import``: files written by each source library import with the logits of the source model."""

import argparse
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from landscape.checkpoints import build_model, load_checkpoint
from landscape.cli import cli
from landscape.errors import CheckpointError, LandscapeError
from landscape.importers import (
    _num_heads,
    filter_torchvision_vit,
    import_checkpoint,
    read_foreign_checkpoint,
    recover_architecture,
)
from landscape.runs import Run

TINY = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tiny_timm(name: str = "vit_tiny_patch16_224", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **overrides}).eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out)


def imported(out: Path, weights: str = "raw") -> torch.nn.Module:
    """The model an analysis would build from the imported run's only checkpoint."""
    (info,) = Run.open(out).checkpoints()
    info, state = load_checkpoint(info.path, weights=weights)
    return build_model(info, state).eval()


def assert_same_logits(source: torch.nn.Module, out: Path, x: torch.Tensor, weights: str = "raw") -> None:
    torch.testing.assert_close(logits(imported(out, weights), x), logits(source, x), atol=1e-5, rtol=0)


# -- timm -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_imports_with_equal_logits(tmp_path, x, suffix):
    source = tiny_timm()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    result = import_checkpoint(path, tmp_path / "run", model_args={"num_heads": 2})
    assert result.format == "timm" and result.model_kwargs["depth"] == 2 and result.model_kwargs["embed_dim"] == 32
    assert_same_logits(source, tmp_path / "run", x)


def test_timm_train_checkpoint_imports_raw_and_ema_weights_and_heads_from_its_arch(tmp_path, x):
    # embed_dim 24 is in no head convention: the head count (3) can only come from the named architecture.
    source = tiny_timm(embed_dim=24, num_heads=3)
    ema = tiny_timm(seed=1, embed_dim=24, num_heads=3)
    checkpoint = {
        "epoch": 299,
        "arch": "vit_tiny_patch16_224",
        "state_dict": source.state_dict(),
        "state_dict_ema": ema.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]},
        "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=0.001, img_size=32, mixup=0.8),
        "metric": 71.5,
        "version": 2,
    }
    path = tmp_path / "last.pth.tar"
    torch.save(checkpoint, path)
    result = import_checkpoint(path, tmp_path / "run")
    assert result.has_ema and result.model_kwargs["num_heads"] == 3 and result.model == "vit_tiny_patch16_224"
    assert_same_logits(source, tmp_path / "run", x)
    assert_same_logits(ema, tmp_path / "run", x, weights="ema")
    source_info = Run.open(tmp_path / "run").load_config()["source"]
    assert source_info["source_epoch"] == 299 and source_info["format"] == "timm"


def test_register_tokens_without_class_position_embedding_are_recovered(tmp_path, x):
    source = tiny_timm(reg_tokens=2, no_embed_class=True)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    result = import_checkpoint(tmp_path / "vit.pth", tmp_path / "run", model_args={"num_heads": 2})
    assert result.model_kwargs["reg_tokens"] == 2 and result.model_kwargs["no_embed_class"] is True
    assert result.model_kwargs["img_size"] == 32
    assert_same_logits(source, tmp_path / "run", x)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, x, prefix):
    source = tiny_timm()
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "vit.pth")
    import_checkpoint(tmp_path / "vit.pth", tmp_path / "run", model_args={"num_heads": 2})
    assert_same_logits(source, tmp_path / "run", x)


# -- GroupedMLP and ShallowMLP ---------------------------------------------------------------------------------
def test_grouped_mlp_saved_by_plain_timm_round_trips_to_the_grouped_variant(tmp_path, x):
    from landscape.models import unique_mlps

    source = tiny_timm(depth=4)
    for first in (0, 2):  # adjacent blocks share one Mlp module, as in the GroupedMLP code
        source.blocks[first + 1].mlp = source.blocks[first].mlp
    torch.save(source.state_dict(), tmp_path / "grouped.pth")
    result = import_checkpoint(tmp_path / "grouped.pth", tmp_path / "run", model_args={"num_heads": 2})
    assert result.model.endswith("_grouped_mlp") and result.model_kwargs["group_size"] == 2
    model = imported(tmp_path / "run")
    assert unique_mlps(model) == 2
    assert result.num_params == sum(p.numel() for p in source.parameters())  # shared weights counted once
    assert_same_logits(source, tmp_path / "run", x)


def test_grouped_mlp_saved_once_per_group_by_safetensors_save_model_round_trips(tmp_path, x):
    from safetensors.torch import load_file, save_model

    source = tiny_timm(depth=6)
    for first in (0, 3):
        source.blocks[first + 1].mlp = source.blocks[first + 2].mlp = source.blocks[first].mlp
    save_model(source, str(tmp_path / "grouped.safetensors"))
    stored = {k.split(".mlp.")[0] for k in load_file(str(tmp_path / "grouped.safetensors")) if ".mlp." in k}
    assert len(stored) == 2  # the writer kept each shared MLP under one block only
    result = import_checkpoint(tmp_path / "grouped.safetensors", tmp_path / "run", model_args={"num_heads": 2})
    assert result.model.endswith("_grouped_mlp") and result.model_kwargs["group_size"] == 3
    assert_same_logits(source, tmp_path / "run", x)


def test_unequal_groups_of_shared_mlps_are_refused(tmp_path):
    source = tiny_timm(depth=3)
    source.blocks[1].mlp = source.blocks[0].mlp
    torch.save(source.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="runs of 2, 1"):
        import_checkpoint(tmp_path / "odd.pth", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_narrowed_mlp_imports_as_the_shallow_variant(tmp_path, x):
    source = tiny_timm(mlp_ratio=2.0)
    torch.save(source.state_dict(), tmp_path / "shallow.pth")
    result = import_checkpoint(tmp_path / "shallow.pth", tmp_path / "run", model_args={"num_heads": 2})
    assert result.model.endswith("_shallow_mlp") and result.model_kwargs["width_ratio"] == 0.5
    assert_same_logits(source, tmp_path / "run", x)


# -- DeiT -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_deit_checkpoint_imports_with_equal_logits(tmp_path, x, name):
    source = tiny_timm(name)
    torch.save({"model": source.state_dict()}, tmp_path / "deit.pth")
    result = import_checkpoint(tmp_path / "deit.pth", tmp_path / "run", model_args={"num_heads": 2})
    assert result.format == "deit"
    assert ("distilled" in result.model) == ("distilled" in name)
    assert_same_logits(source, tmp_path / "run", x)


# -- torchvision ----------------------------------------------------------------------------------------------
def tiny_torchvision(**overrides):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128, num_classes=10)
    return VisionTransformer(**{**args, **overrides}).eval()


def test_torchvision_vit_imports_with_equal_logits(tmp_path, x):
    source = tiny_torchvision()
    torch.save(source.state_dict(), tmp_path / "vit_b_16.pth")
    result = import_checkpoint(tmp_path / "vit_b_16.pth", tmp_path / "run", model_args={"num_heads": 2})
    assert result.format == "torchvision" and result.model_kwargs["mlp_ratio"] == 4.0
    assert_same_logits(source, tmp_path / "run", x)


def test_torchvision_reference_training_checkpoint_imports(tmp_path, x):
    source = tiny_torchvision()
    torch.save({"model": source.state_dict(), "epoch": 3, "args": argparse.Namespace(model="vit_b_16")},
               tmp_path / "checkpoint.pth")
    result = import_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "run", model_args={"num_heads": 2})
    assert result.format == "torchvision"
    assert_same_logits(source, tmp_path / "run", x)


def test_torchvision_pre_logits_layer_is_refused():
    state = tiny_torchvision(representation_size=16).state_dict()
    with pytest.raises(CheckpointError, match="pre-logits"):
        filter_torchvision_vit(state)


# -- Hugging Face ---------------------------------------------------------------------------------------------
def tiny_hf(**overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_channels=3, num_labels=10, **overrides,
    )
    return transformers.ViTForImageClassification(config).eval()


def test_hf_vit_directory_imports_with_equal_logits_and_heads_from_config(tmp_path, x):
    source = tiny_hf(layer_norm_eps=1e-6)  # timm's epsilon: the architectures are then identical
    source.save_pretrained(tmp_path / "hf")
    result = import_checkpoint(tmp_path / "hf", tmp_path / "run")
    assert result.format == "hf" and result.model_kwargs["num_heads"] == 4
    assert Run.open(tmp_path / "run").load_config()["source"]["weights_file"].endswith("model.safetensors")
    assert_same_logits(source, tmp_path / "run", x)


def test_hf_pytorch_model_bin_with_in_memory_key_names_imports_with_equal_logits(tmp_path, x):
    # A pickled state dict as older transformers wrote it, holding the key names the model has in memory.
    source = tiny_hf(layer_norm_eps=1e-6)
    source.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(source.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    result = import_checkpoint(tmp_path / "hf" / "pytorch_model.bin", tmp_path / "run")
    assert result.format == "hf" and result.model_kwargs["num_heads"] == 4
    assert_same_logits(source, tmp_path / "run", x)


def test_hf_default_layer_norm_epsilon_is_kept(tmp_path, x):
    source = tiny_hf()  # layer_norm_eps 1e-12
    source.save_pretrained(tmp_path / "hf")
    result = import_checkpoint(tmp_path / "hf", tmp_path / "run")
    if "norm_eps" not in result.model_kwargs:
        assert any("epsilon is 1e-12" in n for n in result.notes)
        pytest.skip("the model zoo does not take norm_eps yet, so the 1e-12 LayerNorm epsilon is not rebuilt")
    assert result.model_kwargs["norm_eps"] == 1e-12
    assert_same_logits(source, tmp_path / "run", x)


def test_non_vit_hf_config_is_refused(tmp_path):
    source = tiny_hf(layer_norm_eps=1e-6)
    source.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="relu"):
        read_foreign_checkpoint(tmp_path / "hf")


# -- architecture recovery rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("width, heads", [(64, 2), (192, 3), (384, 6), (768, 12), (1024, 16), (320, 5), (160, 5)])
def test_num_heads_follow_the_stated_rule(width, heads):
    assert _num_heads(width, {})[0] == heads


def test_stated_heads_win_over_the_convention():
    assert _num_heads(768, {"num_heads": 8}) == (8, "")


def test_image_size_comes_from_the_position_embedding():
    state = tiny_timm(img_size=48).state_dict()
    assert recover_architecture(state).img_size == 48


# -- refusals -------------------------------------------------------------------------------------------------
def test_keys_that_do_not_fit_give_one_block_a_nonzero_exit_and_no_run(tmp_path):
    state = tiny_timm().state_dict()
    del state["blocks.1.attn.proj.bias"]
    state["blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "broken.pth")
    out = tmp_path / "runs" / "broken"
    args = ["import", str(tmp_path / "broken.pth"), "--out", str(out), "--model", "vit_base_patch16_224"]
    for key, value in [("embed_dim", 32), ("depth", 2), ("num_heads", 2), ("mlp_ratio", 2.0)]:
        args += ["--model-arg", f"{key}={value}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "do not fit" in result.output
    assert "missing from the file (1)" in result.output and "blocks.1.attn.proj.bias" in result.output
    assert "unexpected in the file (1)" in result.output and "blocks.0.attn.extra.weight" in result.output
    assert "shape mismatch" in result.output and "blocks.0.mlp.fc1.weight" in result.output
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="Refused to load"):
        import_checkpoint(tmp_path / "evil.pth", tmp_path / "run")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_namespace_holding_an_unsafe_object_is_still_refused(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": tiny_timm().state_dict(), "args": argparse.Namespace(hook=Exploit())},
               tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="Refused to load"):
        read_foreign_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_unrecognised_keys_name_the_accepted_formats(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="timm, deit, hf, torchvision"):
        read_foreign_checkpoint(tmp_path / "other.pth")


def test_existing_run_directory_is_not_overwritten(tmp_path):
    torch.save(tiny_timm().state_dict(), tmp_path / "vit.pth")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(LandscapeError, match="already exists"):
        import_checkpoint(tmp_path / "vit.pth", tmp_path / "run")
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


# -- the command ----------------------------------------------------------------------------------------------
def test_import_command_writes_a_run_that_inspect_reads(tmp_path, x):
    source = tiny_timm()
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "runs" / "imported"
    result = CliRunner().invoke(cli, ["import", str(tmp_path / "vit.pth"), "--out", str(out),
                                      "--model-arg", "num_heads=2", "--data", "cifar10"])
    assert result.exit_code == 0, result.output
    assert "vit_base_patch16_224" in result.output and "num_heads=2" in result.output
    config = Run.open(out).load_config()
    assert config["data"] == {"name": "cifar10", "img_size": 32}
    assert config["model"]["kwargs"]["num_heads"] == 2 and len(config["source"]["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["imported"]  # no temporary directory left
    assert_same_logits(source, out, x)
    inspected = CliRunner().invoke(cli, ["inspect", str(out)])
    assert inspected.exit_code == 0 and "vit_base_patch16_224" in inspected.output
