"""The resumable per-checkpoint results files shared by every analysis."""

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from landscape.analyses import results as results_module
from landscape.analyses.results import (
    AnalysisResults,
    analysis_attrs,
    combine_checkpoints,
    finished_checkpoints,
    netcdf_attrs,
    read_results,
)
from landscape.errors import LandscapeError

SETTINGS = {"samples": 64, "top_k": 2, "params": None, "tol": 1e-3}


def entry(value: float, k: int = 2) -> xr.Dataset:
    return xr.Dataset(
        {"eigenvalue_largest": (("k",), value + np.arange(k)[::-1].astype(float)), "loss": ((), value / 10)},
        coords={"k": np.arange(1, k + 1)},
    )


def test_appending_builds_a_checkpoint_dimension_sorted_by_step_that_xarray_opens(tmp_path):
    path = tmp_path / "analysis" / "hessian.nc"
    results = AnalysisResults(path, "hessian", SETTINGS, seed=3)
    results.append(entry(2.0), name="epoch-0002", epoch=2, step=20)
    results.append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    results.append(entry(1.5), name="step-00000015", epoch=None, step=15)
    with xr.open_dataset(path) as ds:  # the default engine, no options
        assert list(ds["checkpoint"].values) == ["epoch-0001", "step-00000015", "epoch-0002"]
        assert list(ds["step"].values) == [10, 15, 20]
        epochs = ds["epoch"].values
        assert epochs[0] == 1.0 and np.isnan(epochs[1]) and epochs[2] == 2.0
        assert ds["eigenvalue_largest"].dims == ("checkpoint", "k")
        assert ds["eigenvalue_largest"].sel(checkpoint="epoch-0002").values.tolist() == [3.0, 2.0]
        assert ds.attrs["analysis"] == "hessian" and int(ds.attrs["seed"]) == 3
        assert json.loads(ds.attrs["settings"]) == SETTINGS
        assert set(json.loads(ds.attrs["library_versions"])) >= {"torch", "timm", "numpy", "scipy", "xarray", "landscape"}
        assert ds.attrs["host"] and ds.attrs["created"] <= ds.attrs["updated"]
    assert finished_checkpoints(path) == ["epoch-0001", "step-00000015", "epoch-0002"]


def test_finished_checkpoints_are_skipped_on_reopening(tmp_path):
    path = tmp_path / "hessian.nc"
    AnalysisResults(path, "hessian", SETTINGS, seed=0).append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    again = AnalysisResults(path, "hessian", SETTINGS, seed=0)
    assert again.is_finished("epoch-0001") and not again.is_finished("epoch-0002")
    again.append(entry(2.0), name="epoch-0002", epoch=2, step=20)
    assert finished_checkpoints(path) == ["epoch-0001", "epoch-0002"]


def test_other_settings_are_refused_with_the_differences_named(tmp_path):
    path = tmp_path / "hessian.nc"
    AnalysisResults(path, "hessian", SETTINGS, seed=0).append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    with pytest.raises(LandscapeError) as error:
        AnalysisResults(path, "hessian", {**SETTINGS, "samples": 128}, seed=1)
    message = str(error.value)
    assert "samples 64 there vs 128 now" in message and "seed 0 there vs 1 now" in message and "--force" in message
    assert message.rstrip().endswith(".") and "\n" not in message


def test_force_recomputes_and_drops_entries_made_with_other_settings(tmp_path):
    path = tmp_path / "hessian.nc"
    first = AnalysisResults(path, "hessian", SETTINGS, seed=0)
    first.append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    first.append(entry(2.0), name="epoch-0002", epoch=2, step=20)
    same = AnalysisResults(path, "hessian", SETTINGS, seed=0, force=True)
    assert not same.is_finished("epoch-0001")  # force: everything selected is recomputed
    same.append(entry(5.0), name="epoch-0001", epoch=1, step=10)
    ds = read_results(path)
    assert list(ds["checkpoint"].values) == ["epoch-0001", "epoch-0002"]
    assert float(ds["loss"].sel(checkpoint="epoch-0001")) == 0.5  # replaced, not duplicated
    assert same.is_finished("epoch-0001")
    other = AnalysisResults(path, "hessian", {**SETTINGS, "samples": 8}, seed=0, force=True)
    other.append(entry(7.0), name="epoch-0002", epoch=2, step=20)
    ds = read_results(path)
    assert list(ds["checkpoint"].values) == ["epoch-0002"] and json.loads(ds.attrs["settings"])["samples"] == 8


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "hessian.nc"
    results = AnalysisResults(path, "hessian", SETTINGS, seed=0)
    results.append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    before = path.read_bytes()

    def crash(self, data):
        with open(self, "wb") as f:
            f.write(data[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        results.append(entry(2.0), name="epoch-0002", epoch=2, step=20)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert finished_checkpoints(path) == ["epoch-0001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "hessian.nc"]


def test_entries_of_different_lengths_are_padded_with_nan():
    a = results_module.checkpoint_entry(entry(1.0, k=2), name="a", epoch=1, step=1)
    b = results_module.checkpoint_entry(entry(1.0, k=3), name="b", epoch=2, step=2)
    combined = combine_checkpoints([a, b])
    assert combined.sizes["k"] == 3 and np.isnan(combined["eigenvalue_largest"].sel(checkpoint="a", k=3))


def test_combining_keeps_the_last_entry_of_each_checkpoint_in_step_order():
    def entries(names_steps, value):
        return combine_checkpoints([results_module.checkpoint_entry(entry(value), name=n, epoch=None, step=s)
                                    for n, s in names_steps])

    first = entries([("a", 10), ("b", 20), ("c", 30)], 1.0)
    second = entries([("b", 20), ("d", 5)], 2.0)  # b measured again, and an earlier step
    third = entries([("c", 30)], 3.0)
    combined = combine_checkpoints([first, second, third])
    assert list(combined["checkpoint"].values) == ["d", "a", "b", "c"]
    assert list(combined["step"].values) == [5, 10, 20, 30]
    np.testing.assert_array_equal(combined["eigenvalue_largest"].isel(k=1).values, [2.0, 1.0, 2.0, 3.0])
    # entries of one step keep the order in which their names first appeared, whichever entry is kept
    tied = combine_checkpoints([entries([("x", 0), ("y", 0)], 1.0), entries([("x", 0)], 2.0)])
    assert list(tied["checkpoint"].values) == ["x", "y"]
    np.testing.assert_array_equal(tied["eigenvalue_largest"].isel(k=1).values, [2.0, 1.0])
    # a variable's attributes are those of the entry kept for the first checkpoint that has it: the first
    # checkpoint measured again with a new description keeps the new one
    old, again = entries([("a", 10), ("b", 20)], 1.0), entries([("a", 10)], 2.0)
    old["eigenvalue_largest"].attrs["long_name"] = "as first measured"
    again["eigenvalue_largest"].attrs["long_name"] = "as measured again"
    assert combine_checkpoints([old, again])["eigenvalue_largest"].attrs["long_name"] == "as measured again"


def test_attrs_are_netcdf_safe():
    attrs = netcdf_attrs({"flag": True, "none": None, "nested": {"b": [1, 2]}, "n": np.int64(4), "x": 0.5, "s": "t"})
    assert attrs == {"flag": 1, "none": "", "nested": '{"b": [1, 2]}', "n": 4, "x": 0.5, "s": "t"}
    full = analysis_attrs("hessian", {"path": tmp_path_like(), "grid": (1, 2)}, seed=1)
    assert all(isinstance(v, (str, int, float)) for v in full.values())
    assert json.loads(full["settings"]) == {"grid": [1, 2], "path": "/some/where"}


def tmp_path_like():
    from pathlib import Path

    return Path("/some/where")


def test_a_damaged_file_is_one_clear_error(tmp_path):
    path = tmp_path / "hessian.nc"
    path.write_bytes(b"not netcdf")
    with pytest.raises(LandscapeError, match=r"not a readable analysis file \(\w+\); delete it, or recompute it "
                                             r"with landscape analyze \.\.\. --force\."):
        AnalysisResults(path, "hessian", SETTINGS, seed=0)
    assert read_results(tmp_path / "absent.nc") is None and finished_checkpoints(tmp_path / "absent.nc") == []
    forced = AnalysisResults(path, "hessian", SETTINGS, seed=0, force=True)  # as the advice says: replaced
    assert forced.dataset is None
    forced.append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    assert finished_checkpoints(path) == ["epoch-0001"]


def test_two_processes_appending_to_one_file_keep_every_checkpoint(tmp_path):
    """Each append reads the file again under the lock: an entry written by another process since this one opened
    the file is merged, not overwritten."""
    path = tmp_path / "analysis" / "hessian.nc"
    first = AnalysisResults(path, "hessian", SETTINGS, seed=0)
    second = AnalysisResults(path, "hessian", SETTINGS, seed=0)  # opened before the first one wrote anything
    first.append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    first.append(entry(2.0), name="epoch-0002", epoch=2, step=20)
    second.append(entry(3.0), name="epoch-0003", epoch=3, step=30)
    assert finished_checkpoints(path) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    with xr.open_dataset(path) as ds:
        assert ds["loss"].values.tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_two_forced_analyses_with_other_settings_never_overwrite_each_other_without_a_word(tmp_path):
    # both said "Results in ...", and the file held the last writer's only
    path = tmp_path / "analysis" / "hessian.nc"
    old = AnalysisResults(path, "hessian", {**SETTINGS, "top_k": 5}, seed=0)
    old.append(entry(9.0), name="epoch-0001", epoch=1, step=10)
    first = AnalysisResults(path, "hessian", SETTINGS, seed=0, force=True)  # both replace the old file
    second = AnalysisResults(path, "hessian", {**SETTINGS, "top_k": 1}, seed=0, force=True)
    first.append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    written = path.read_bytes()
    with pytest.raises(LandscapeError, match=r"was written with other settings by another process while this "
                                             r"analysis ran \(.*\); it was left as that process wrote it and this "
                                             r"analysis's results were not saved: wait for that process to finish"):
        second.append(entry(2.0), name="epoch-0001", epoch=1, step=10)
    assert path.read_bytes() == written
    first.append(entry(3.0), name="epoch-0002", epoch=2, step=20)  # the first goes on adding to its own file
    assert finished_checkpoints(path) == ["epoch-0001", "epoch-0002"]


def test_a_full_disk_is_one_sentence_and_leaves_the_file_and_no_temporary(tmp_path, monkeypatch):
    import errno

    from landscape.io import WriteError

    path = tmp_path / "analysis" / "hessian.nc"
    results = AnalysisResults(path, "hessian", SETTINGS, seed=0)
    results.append(entry(1.0), name="epoch-0001", epoch=1, step=10)
    before = path.read_bytes()

    def full(self, data):
        with open(self, "wb") as f:
            f.write(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(WriteError, match=r"Could not write .*hessian.nc \(No space left on device; free some space"):
        results.append(entry(2.0), name="epoch-0002", epoch=2, step=20)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "hessian.nc"]
