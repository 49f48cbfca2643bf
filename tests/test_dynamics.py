import numpy as np
import pytest

from landscape.analyses.dynamics import across_seeds, drop_from_best, peak_to_final, run_dynamics, validation_size
from landscape.errors import LandscapeError
from landscape.runs import Run


def _run(tmp_path, name, top1, ema_top1, seed=0, model="vit_x", kwargs=None):
    run = Run.create(tmp_path / name)
    run.save_config({"model": {"name": model, "kwargs": kwargs or {}}, "data": {"name": "digits"}, "seed": seed})
    rows = []
    for e, (a, b) in enumerate(zip(top1, ema_top1), start=1):
        rows.append({"epoch": e, "step": 10 * e - 5, "val_top1": a - 5})  # a mid-epoch row, superseded
        rows.append({"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "val_loss": 1.5 / e + 0.1 * e,
                     "val_top1": a, "ema_val_top1": b})
    run.write_metrics(rows)
    return run


def test_peak_to_final_on_a_known_curve():
    out = peak_to_final(np.array([10.0, 50.0, 80.0, 80.0, 75.0]), np.arange(1, 6))
    assert out == {"peak_epoch": 3.0, "peak_top1": 80.0, "final_top1": 75.0, "peak_to_final_drop": 5.0}
    np.testing.assert_array_equal(drop_from_best(np.array([1.0, 3.0, 2.0, np.nan, 4.0])), [0, 0, 1, np.nan, 0])


def test_run_dynamics_uses_the_last_row_of_each_epoch(tmp_path):
    ds = run_dynamics(_run(tmp_path, "a", [60, 90, 85, 84], [55, 70, 88, 87.5]))
    assert list(ds["weights"].values) == ["raw", "ema"]
    assert ds.attrs["run"] == "a"  # its folder's name, true after a move (not the path as typed)
    assert ds["peak_to_final_drop"].sel(weights="raw").item() == 6.0
    assert ds["peak_epoch"].sel(weights="ema").item() == 3.0
    assert ds["peak_to_final_drop"].sel(weights="ema").item() == pytest.approx(0.5)
    np.testing.assert_allclose(ds["generalization_gap"], [1.5 / e + 0.1 * e - 1.0 / e for e in range(1, 5)])
    np.testing.assert_allclose(ds["drop_from_best"].sel(weights="raw"), [0, 0, 5, 6])



def test_a_missing_final_value_an_unfinished_run_and_impossible_top1_are_not_passed_off(tmp_path):
    # EMA has no value at the last epoch: its final top-1 and drop are unknown, not the peak's (a drop of 0)
    ds = run_dynamics(_run(tmp_path, "a", [50, 80, 70], [50, 80, float("nan")]))
    assert ds["peak_to_final_drop"].sel(weights="raw").item() == 10.0
    assert np.isnan(ds["final_top1"].sel(weights="ema").item())
    assert np.isnan(ds["peak_to_final_drop"].sel(weights="ema").item())
    assert int(ds["final_epoch"]) == 3
    # a run that stopped at epoch 3 of 5 says so: in the Dataset and in a report on it
    run = _run(tmp_path, "b", [50, 80, 70], [50, 80, 75])
    run.save_config({**run.load_config(), "epochs": 5})
    ds = run_dynamics(run)
    assert int(ds["final_epoch"]) == 3 and ds.attrs["planned_epochs"] == 5
    from landscape.summary import load_results

    (loaded,) = load_results([run.root])
    assert any("up to epoch 3 of its 5" in problem for problem in loaded.problems)
    for bad in (150.0, -5.0, float("inf")):
        with pytest.raises(LandscapeError, match="outside 0-100"):
            run_dynamics(_run(tmp_path, f"bad{bad}", [50, bad, 70], [50, 60, 70]))

def test_dynamics_record_how_many_validation_images_each_top1_is_measured_on(tmp_path):
    ds = run_dynamics(_run(tmp_path, "a", [60, 90, 85, 84], [55, 70, 88, 87.5]))
    assert ds.attrs["val_size"] == 360  # the digits validation split
    assert validation_size({"data": {"name": "fashion-mnist", "val_size": 2000}}) == 2000
    assert validation_size({"data": {"name": "fashion-mnist", "val_size": 50000}}) == 10000  # capped by the split
    assert validation_size({"data": {"name": "imagefolder"}}) is None


def test_across_seeds_gives_mean_and_std_per_variant(tmp_path):
    a = run_dynamics(_run(tmp_path, "a", [50, 90, 80], [50, 90, 80], seed=0))
    b = run_dynamics(_run(tmp_path, "b", [50, 90, 86], [50, 90, 86], seed=1))
    c = run_dynamics(_run(tmp_path, "c", [50, 60, 60], [50, 60, 60], model="vit_y_grouped_mlp", kwargs={"group_size": 2}))
    out = across_seeds([a, b, c])
    drop = out["peak_to_final_drop_mean"].sel(variant="vit_x", weights="raw").item()
    assert drop == pytest.approx(7.0)
    assert out["peak_to_final_drop_std"].sel(variant="vit_x", weights="raw").item() == pytest.approx(np.std([10, 4], ddof=1))
    assert out["n_seeds"].sel(variant="vit_y_grouped_mlp[group_size=2]", weights="ema").item() == 1


def test_run_without_history_is_a_clear_error(tmp_path):
    run = Run.create(tmp_path / "imported")
    with pytest.raises(LandscapeError, match="no per-epoch metrics"):
        run_dynamics(run)


def test_grouped_runs_that_differ_only_in_init_scale_are_two_variants_across_seeds(tmp_path):
    kwargs = {"group_size": 2, "embed_dim": 32}
    a = run_dynamics(_run(tmp_path, "a", [50, 90, 80], [50, 90, 80], model="vit_y_grouped_mlp", kwargs=kwargs))
    b = run_dynamics(_run(tmp_path, "b", [50, 90, 86], [50, 90, 86], seed=1, model="vit_y_grouped_mlp",
                          kwargs={**kwargs, "init_scale": 0.25}))
    out = across_seeds([a, b])
    assert a.attrs["variant"] != b.attrs["variant"]
    assert out["n_seeds"].sel(weights="raw").values.tolist() == [1, 1]


def test_dynamics_file_is_written_by_the_results_writer_with_library_versions(tmp_path):
    import json

    import torch
    import xarray as xr

    from landscape.analyses.dynamics import write_dynamics
    from landscape.analyses.results import read_results

    run = _run(tmp_path, "a", [60, 90, 85, 84], [55, 70, 88, 87.5], seed=3)
    ds, path = write_dynamics(run)
    assert path == run.root / "analysis" / "dynamics.nc"
    on_disk = read_results(path)
    assert on_disk.attrs["analysis"] == "dynamics" and on_disk.attrs["seed"] == 3
    assert json.loads(on_disk.attrs["library_versions"])["torch"] == torch.__version__
    assert {"created", "updated", "host", "settings"} <= set(on_disk.attrs)
    xr.testing.assert_identical(on_disk.drop_attrs(), ds.drop_attrs())
    assert not [p.name for p in path.parent.iterdir() if p.name != "dynamics.nc" and not p.name.startswith(".")]
    # written again with nothing new: the file stays as it was
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    write_dynamics(run)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp
    path.write_bytes(path.read_bytes()[:100])  # damaged: written whole again
    write_dynamics(run)
    xr.testing.assert_identical(read_results(path).drop_attrs(), ds.drop_attrs())



def test_a_masked_autoencoder_run_is_said_to_have_no_top1_curve(tmp_path):
    run = Run.create(tmp_path / "mae")
    run.save_config({"model": {"name": "mae_mlit_xxs", "kwargs": {}}, "data": {"name": "digits"}, "seed": 0,
                     "task": "mae", "epochs": 1})
    run.write_metrics([{"epoch": 1, "step": 10, "train_loss": 0.5, "val_loss": 0.4, "val_top1": None}])
    with pytest.raises(LandscapeError, match="pre-trains a masked autoencoder: it has no top-1 curve"):
        run_dynamics(run)


def test_a_run_named_twice_is_one_run_and_two_runs_of_one_seed_are_said(tmp_path):
    import shutil

    from click.testing import CliRunner
    from conftest import TINY_VIT, make_tiny_run

    from landscape.cli import cli

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    twice = CliRunner().invoke(cli, ["analyze", "dynamics", str(run.root), str(run.root / ".." / run.root.name)])
    assert twice.exit_code == 0, twice.output
    assert "across seeds" not in twice.output and twice.output.count(f"{run.root}  ") == 2  # raw and EMA rows
    copy = shutil.copytree(run.root, tmp_path / "copy")
    same_seed = CliRunner().invoke(cli, ["analyze", "dynamics", str(run.root), str(copy)])
    assert same_seed.exit_code == 0, same_seed.output
    assert f"Warning: {run.root} and {copy} are both seed 0 of " in same_seed.output
    # every summary says it too: the report counted the copy as a second seed without a word
    from landscape.summary import caveats, load_results

    said = [c for c in caveats(load_results([run.root, copy])) if "both seed 0 of" in c]
    assert said == [f"{run.root} and {copy} are both seed 0 of ViT baseline; the spread over seeds counts them as "
                    "two seeds."]
    other_seed = shutil.copytree(run.root, tmp_path / "other")
    config = other_seed / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 1"))
    assert not [c for c in caveats(load_results([run.root, other_seed])) if "both seed" in c]
