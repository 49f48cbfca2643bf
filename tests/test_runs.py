import pytest
import torch

from landscape.checkpoints import save_checkpoint
from landscape.errors import CheckpointError, LandscapeError
from landscape.runs import Run, describe_path


def _make_run(tmp_path, epochs=(1, 2, 3, 4, 5)):
    run = Run.create(tmp_path / "run")
    run.save_config({"model": {"name": "m", "kwargs": {}}, "data": {"name": "digits", "img_size": None}, "seed": 0})
    for e in reversed(epochs):  # written out of order on purpose
        save_checkpoint(run.checkpoint_path(epoch=e), {"w": torch.full((2,), float(e))}, model="m", epoch=e, step=10 * e)
    return run


def test_checkpoints_are_listed_by_step(tmp_path):
    run = _make_run(tmp_path)
    save_checkpoint(run.checkpoint_path(step=15), {"w": torch.zeros(2)}, model="m", epoch=None, step=15)
    assert [c.step for c in run.checkpoints()] == [10, 15, 20, 30, 40, 50]
    assert run.checkpoint_path(step=15).name == "step-00000015.safetensors"


@pytest.mark.parametrize(
    "spec, epochs",
    [("all", [1, 2, 3, 4, 5]), ("last", [5]), ("every:2", [1, 3, 5]), ("every:3", [1, 4, 5]), ("epochs:5,1", [1, 5])],
)
def test_checkpoint_selection(tmp_path, spec, epochs):
    assert [c.epoch for c in _make_run(tmp_path).select_checkpoints(spec)] == epochs


@pytest.mark.parametrize("spec", ["first", "every:0", "epochs:9", "every:x"])
def test_bad_checkpoint_selection_is_a_clear_error(tmp_path, spec):
    with pytest.raises(CheckpointError):
        _make_run(tmp_path).select_checkpoints(spec)


def test_existing_run_is_never_overwritten_without_permission(tmp_path):
    run = _make_run(tmp_path)
    with pytest.raises(LandscapeError, match="--resume"):
        Run.create(run.root)
    assert len(run.checkpoints()) == 5
    Run.create(run.root, overwrite=True)
    assert run.checkpoints() == []


def test_metrics_round_trip_through_pandas(tmp_path):
    run = _make_run(tmp_path)
    run.write_metrics([{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 60.5, "ema_val_top1": 55.25}])
    df = run.read_metrics()
    assert list(df.columns) == ["epoch", "val_top1", "ema_val_top1"]
    assert df["val_top1"].tolist() == [50.0, 60.5]
    assert df["ema_val_top1"].isna().tolist() == [True, False]


def test_open_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        Run.open(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Run.open(tmp_path / "nope")


def test_describe_run_and_checkpoint(tmp_path):
    run = _make_run(tmp_path)
    tables = dict(describe_path(run.root))
    (header,) = [rows for title, rows in tables.items() if title.startswith("run ")]
    assert header[0]["checkpoints"] == 5 and header[0]["data"] == "digits"
    (title, rows), = describe_path(run.checkpoint_path(epoch=2))[:1]
    assert rows[0]["epoch"] == 2 and rows[0]["step"] == 20 and rows[0]["params"] == 2


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(LandscapeError, match="not a landscape run"):
            Run.create(folder, overwrite=overwrite)
    assert (folder / "a.jpg").read_text() == "precious"


def test_a_run_that_failed_before_saving_anything_can_be_retried(tmp_path):
    Run.create(tmp_path / "r")  # leaves checkpoints/ only, as a run failing on missing data does
    Run.create(tmp_path / "r")


def test_a_checkpoint_copied_over_another_is_named_not_analysed_as_its_name_says(tmp_path):
    import shutil

    import torch

    from landscape.checkpoints import save_checkpoint
    from landscape.errors import CheckpointError
    from landscape.runs import Run

    run = Run.create(tmp_path / "run")
    for epoch in (1, 2):
        save_checkpoint(run.checkpoint_path(epoch=epoch), {"w": torch.full((2,), float(epoch))}, model="m",
                        epoch=epoch, step=10 * epoch)
    assert [i.epoch for i in run.checkpoints()] == [1, 2]
    shutil.copy(run.checkpoint_path(epoch=1), run.checkpoint_path(epoch=2))
    with pytest.raises(CheckpointError, match="epoch-0002.safetensors is named epoch 2 but its header says epoch 1"):
        run.checkpoints()
