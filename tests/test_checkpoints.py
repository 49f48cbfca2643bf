import os
import pickle

import pytest
import torch

from landscape.checkpoints import (
    load_checkpoint,
    load_foreign_state,
    load_state_dict_strict,
    read_checkpoint_info,
    save_checkpoint,
)
from landscape.errors import CheckpointError
from landscape.io import WriteError


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g)}


def test_checkpoint_round_trips_weights_ema_and_metadata(tmp_path):
    path = tmp_path / "epoch-0003.safetensors"
    raw, ema = _state(0), _state(1)
    save_checkpoint(
        path, raw, model="vit_x", model_kwargs={"depth": 2, "img_size": 8}, epoch=3, step=120,
        metrics={"val_top1": 91.5, "val_loss": float("nan")}, config_hash="abc", ema_state_dict=ema,
    )
    info = read_checkpoint_info(path)
    assert (info.model, info.model_kwargs, info.epoch, info.step) == ("vit_x", {"depth": 2, "img_size": 8}, 3, 120)
    assert info.metrics == {"val_top1": 91.5, "val_loss": None}
    assert info.config_hash == "abc" and info.has_ema and info.num_params == 15
    _, got_raw = load_checkpoint(path)
    _, got_ema = load_checkpoint(path, weights="ema")
    assert set(got_raw) == set(raw) and all(torch.equal(got_raw[k], raw[k]) for k in raw)
    assert all(torch.equal(got_ema[k], ema[k]) for k in ema)


def test_shared_tensors_are_stored_once_and_restored_as_one_storage(tmp_path):
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.ModuleDict({"b0": shared, "b1": shared, "head": torch.nn.Linear(4, 2)})
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model.state_dict(), model="m")
    info, state = load_checkpoint(path)
    assert info.num_params == 20 + 10  # the shared Linear counted once
    assert state["b1.weight"].data_ptr() == state["b0.weight"].data_ptr()
    assert torch.equal(state["b1.weight"], shared.weight.detach())


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(0), model="m", step=1)

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(WriteError, match=r"Could not write .*last.safetensors \(No space left on device"):
        save_checkpoint(path, _state(1), model="m", step=2)
    assert read_checkpoint_info(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_a_full_disk_wrapped_by_safetensors_is_one_sentence_naming_the_cause(tmp_path, monkeypatch):
    """safetensors reports the operating system's error inside its own ``SafetensorError`` text."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(WriteError, match=r"new.safetensors \(No space left on device; free some space") as e:
        save_checkpoint(tmp_path / "new.safetensors", _state(1), model="m", step=2)
    assert e.value.errno == 28 and list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "epoch-0001.safetensors"
    save_checkpoint(path, _state(), model="m")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="epoch-0001.safetensors"):
        read_checkpoint_info(path)


def test_non_checkpoint_files_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint_info(text)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file(_state(), str(foreign))
    with pytest.raises(CheckpointError, match="landscape import"):
        read_checkpoint_info(foreign)


class _CreatesAFile:
    """Unpickling this runs ``open(target, "w")``: the classic code-execution payload."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, legacy):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.zeros(2)}, "extra": _CreatesAFile(str(target))}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=True)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="Refused to load"):
        load_foreign_state(path)
    assert not target.exists()


def test_plain_state_dict_pth_loads_safely(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(_state(), path)
    state = load_foreign_state(path)
    assert torch.equal(state["a.weight"], _state()["a.weight"])


def test_truncated_pth_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(_state(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="weights.pth"):
        load_foreign_state(path)


def test_key_mismatch_lists_missing_unexpected_and_shapes():
    model = torch.nn.Linear(4, 3)
    state = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(model, state, source="f.pth")
    msg = str(e.value)
    assert "missing from the file (1)" in msg and "bias" in msg
    assert "unexpected in the file (1)" in msg and "extra" in msg
    assert "weight: file (2, 4) vs model (3, 4)" in msg


def test_raw_and_ema_sharing_storage_are_saved_once(tmp_path):
    state = _state(0)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, state, model="m", ema_state_dict=state)
    _, ema = load_checkpoint(path, weights="ema")
    assert all(torch.equal(ema[k], state[k]) for k in state)


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    import os

    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _state(), model="m")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_pytorch_file_points_to_import(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_state(), path)
    with pytest.raises(CheckpointError, match="landscape import"):
        read_checkpoint_info(path)


@pytest.mark.parametrize("content", [b"garbage", b"root:x:0:0:root:/root:/bin/bash\n", b""])
def test_files_that_are_not_pytorch_are_a_clear_error(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.pth.*(not a readable PyTorch|not a plain PyTorch)"):
        load_foreign_state(path)


TINY_KWARGS = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2)


@pytest.mark.parametrize("extra", [
    {"pretrained": True, "pretrained_cfg_overlay": {"url": "https://example.com/w.pth"}},
    {"checkpoint_path": "/etc/passwd"},
    {"pretrained_cfg": {"file": "/tmp/w.safetensors"}},
    {"global_pool": "https://example.com/x"},
])
def test_header_settings_that_load_or_fetch_never_reach_timm(tmp_path, monkeypatch, extra):
    import timm

    from landscape.checkpoints import build_model

    model = timm.create_model("vit_tiny_patch16_224", **TINY_KWARGS)
    path = tmp_path / "forged.safetensors"
    save_checkpoint(path, model.state_dict(), model="vit_tiny_patch16_224", model_kwargs={**TINY_KWARGS, **extra},
                    epoch=1, step=1)
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k))
    info, state = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="(not architecture arguments|not plain numbers or words)"):
        build_model(info, state)
    assert calls == [], "timm was called with settings read from the file"


def test_header_with_architecture_settings_only_builds_the_model(tmp_path):
    import timm

    from landscape.checkpoints import build_model

    model = timm.create_model("vit_tiny_patch16_224", **TINY_KWARGS, qkv_bias=False, global_pool="avg")
    path = tmp_path / "ok.safetensors"
    save_checkpoint(path, model.state_dict(), model="vit_tiny_patch16_224",
                    model_kwargs={**TINY_KWARGS, "qkv_bias": False, "global_pool": "avg"}, epoch=1, step=1)
    info, state = load_checkpoint(path)
    rebuilt = build_model(info, state)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


def test_a_checkpoint_this_user_may_not_read_is_said_so_not_called_corrupt(tmp_path, monkeypatch):
    # safetensors reports a file it may not open as "No such file or directory", which read as a damaged checkpoint
    import landscape.checkpoints as checkpoints

    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, model="m", epoch=1, step=1)
    monkeypatch.setattr(checkpoints.os, "access", lambda p, mode: not (str(p) == str(path) and mode == os.R_OK))
    with pytest.raises(CheckpointError, match=r"cannot be read \(permission denied\)"):
        checkpoints.read_checkpoint_info(path)
