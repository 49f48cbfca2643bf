"""``landscape compare``: the final-checkpoint measures of several runs, side by side."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from landscape.analyses.results import AnalysisResults
from landscape.checkpoints import save_checkpoint
from landscape.cli import cli
from landscape.compare import compare_figure, compare_runs
from landscape.errors import LandscapeError
from landscape.runs import Run


def make_run(root, *, steps=(10, 20), top1=None, params=5, model="vit_pico_patch4_32_grouped_mlp",
             kwargs=None) -> Run:
    run = Run.create(root)
    run.save_config({"model": {"name": model, "kwargs": kwargs or {"group_size": 2}},
                     "data": {"name": "digits", "img_size": 8}, "seed": 0})
    for epoch, step in enumerate(steps, start=1):
        metrics = {"val_top1": 11.0 * epoch} if top1 is None else {}  # runs with a history keep it in metrics.csv
        save_checkpoint(run.checkpoint_path(epoch=epoch), {"w": torch.zeros(params)}, model=model,
                        model_kwargs=kwargs or {"group_size": 2}, epoch=epoch, step=step, metrics=metrics)
    if top1 is not None:
        run.write_metrics([{"epoch": e, "step": 10 * e, "val_top1": a, "ema_val_top1": a + 1.0}
                           for e, a in enumerate(top1, start=1)])
    return run


def write_result(run: Run, name: str, entries: dict[int, dict], coords=None) -> None:
    """``analysis/<name>.nc`` through the analyses' own writer: one entry per checkpoint step."""
    results = AnalysisResults(run.analysis_path(name), name, {"made_by": "test"}, seed=0)
    for epoch, (step, data) in enumerate(sorted(entries.items()), start=1):
        results.append(xr.Dataset(data, coords=coords), name=f"epoch-{epoch:04d}", epoch=epoch, step=step)


def test_table_takes_each_measure_at_the_final_checkpoint_and_leaves_missing_ones_empty(tmp_path):
    a = make_run(tmp_path / "a", top1=[50.0, 70.0, 65.0], params=7)
    write_result(a, "hessian", {10: {"eigenvalue_largest": ("k", [9.0, 3.0]), "trace": ((), 100.0)},
                                20: {"eigenvalue_largest": ("k", [4.0, 2.0]), "trace": ((), 40.0)}},
                 coords={"k": [1, 2]})
    write_result(a, "sharpness", {10: {"worst_case": ("rho", [1.0, 2.0])}, 20: {"worst_case": ("rho", [0.1, 0.2])}},
                 coords={"rho": [0.05, 0.1]})
    b = make_run(tmp_path / "b", model="vit_pico_patch4_32", kwargs={"num_classes": 10})

    table = compare_runs([a.root, b.root]).set_index("run")
    ra, rb = table.loc[str(a.root)], table.loc[str(b.root)]
    assert ra["model"] == "vit_pico_patch4_32_grouped_mlp[group_size=2]" and ra["params"] == 7
    assert (ra["top_eigenvalue"], ra["trace"]) == (4.0, 40.0)  # step 20, not the larger values at step 10
    assert (ra["sharpness[rho=0.05]"], ra["sharpness[rho=0.1]"]) == (0.1, 0.2)
    assert ra["top1"] == 70.0 and ra["ema_top1"] == 71.0  # the metrics.csv row of the final checkpoint (step 20)
    assert ra["peak_to_final_drop"] == pytest.approx(5.0) and ra["ema_peak_to_final_drop"] == pytest.approx(5.0)
    # b has no analyses and no history: accuracy from its checkpoint, every other measure missing
    assert rb["top1"] == 22.0 and math.isnan(rb["ema_top1"])
    assert all(math.isnan(rb[c]) for c in ("top_eigenvalue", "trace", "sharpness[rho=0.05]", "peak_to_final_drop"))
    # one run spelled three ways is one row (it was three, counted as three seeds)
    assert len(compare_runs([a.root, f"{a.root}/", a.root / ".." / "a"])) == 1


def test_accuracy_saved_with_the_final_checkpoint_wins_over_metrics_csv(tmp_path):
    run = make_run(tmp_path / "a", steps=(10, 20))
    run.write_metrics([{"epoch": 1, "step": 10, "val_top1": 1.0}, {"epoch": 2, "step": 20, "val_top1": 2.0}])
    row = compare_runs([run.root]).iloc[0]
    assert row["top1"] == 22.0 and math.isnan(row["ema_top1"])


def test_latest_analysed_checkpoint_is_used_and_its_step_reported_when_the_final_one_is_missing(tmp_path):
    run = make_run(tmp_path / "a", steps=(10, 20, 30))
    write_result(run, "hessian", {10: {"trace": ((), 5.0)}, 20: {"trace": ((), 6.0)}})
    row = compare_runs([run.root]).iloc[0]
    assert row["trace"] == 6.0 and row["hessian_step"] == 20


def test_a_dynamics_file_older_than_the_history_gives_way_to_it_with_a_caveat(tmp_path):
    run = make_run(tmp_path / "a", top1=[50.0, 70.0, 65.0])
    run.analysis_dir.mkdir()
    xr.Dataset({"peak_to_final_drop": (("weights",), [1.5, 0.5])}, coords={"weights": ["raw", "ema"]}).to_netcdf(
        run.analysis_path("dynamics"), engine="h5netcdf")
    table = compare_runs([run.root])
    assert table.iloc[0]["peak_to_final_drop"] == 5.0  # 70 - 65, from metrics.csv: the record the file came from
    assert any("dynamics.nc is older than its metrics.csv" in c for c in table.attrs["caveats"])
    from landscape.analyses.dynamics import write_dynamics

    write_dynamics(run)  # brought up to date: used as it is, no caveat
    table = compare_runs([run.root])
    assert table.iloc[0]["peak_to_final_drop"] == 5.0 and not any("dynamics.nc is older" in c for c in table.attrs["caveats"])


def test_two_architectures_under_one_short_name_are_told_apart(tmp_path):
    plain = make_run(tmp_path / "plain", model="vit_pico_patch4_32", kwargs={"depth": 2})
    normed = make_run(tmp_path / "normed", model="vit_pico_patch4_32", kwargs={"depth": 2, "qk_norm": True})
    same = make_run(tmp_path / "same", model="vit_pico_patch4_32", kwargs={"depth": 2})
    models = compare_runs([plain.root, normed.root, same.root])["model"].tolist()
    assert models[0] == models[2] != models[1] and "qk_norm=True" in models[1]
    assert compare_runs([plain.root, same.root])["model"].tolist() == ["vit_pico_patch4_32"] * 2


def test_run_without_checkpoints_is_refused(tmp_path):
    Run.create(tmp_path / "empty")
    with pytest.raises(LandscapeError, match="no checkpoints, results or metrics to compare"):
        compare_runs([tmp_path / "empty"])


def test_compare_command_prints_dashes_and_writes_csv_and_figure(tmp_path):
    a = make_run(tmp_path / "a", top1=[50.0, 70.0, 65.0])
    write_result(a, "hessian", {10: {"trace": ((), 1.0)}, 20: {"trace": ((), 2.0)}})
    b = make_run(tmp_path / "b")
    csv, png = tmp_path / "compare.csv", tmp_path / "compare.png"
    result = CliRunner().invoke(cli, ["compare", str(a.root), str(b.root), "--out", str(csv), "--figure", str(png)])
    assert result.exit_code == 0, result.output
    header, _, row_a, row_b = result.stdout.splitlines()[:4]
    assert "trace" in header and "peak_to_final_drop" in header
    assert row_b.split()[-1] == "-"  # b has no peak-to-final drop
    table = pd.read_csv(csv)
    assert list(table["trace"].isna()) == [False, True] and table.loc[0, "trace"] == 2.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_has_one_panel_per_measure(tmp_path):
    a = make_run(tmp_path / "a", top1=[50.0, 70.0, 65.0])
    table = compare_runs([a.root])
    fig = compare_figure(table)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["params", "top1 (%)", "ema_top1 (%)", "peak_to_final_drop (points)",
                      "ema_peak_to_final_drop (points)"]


def test_unknown_figure_extension_is_refused(tmp_path):
    a = make_run(tmp_path / "a", top1=[50.0, 70.0])
    result = CliRunner().invoke(cli, ["compare", str(a.root), "--figure", str(tmp_path / "x.docx")])
    assert result.exit_code == 1 and "accepted extensions" in result.output


def test_imported_checkpoint_is_analysed_and_compared(tmp_path):
    """An imported run is an ordinary run: an analysis accepts its checkpoint and data, compare reads the result."""
    import timm

    from landscape.analyses.sharpness import SharpnessSettings, run_sharpness_analysis
    from landscape.importers import import_checkpoint

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, num_classes=10,
                               embed_dim=16, depth=2, num_heads=2)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    result = import_checkpoint(tmp_path / "vit.pth", tmp_path / "run", model_args={"num_heads": 2})
    assert result.data == "digits"
    sharpness = run_sharpness_analysis(result.run, SharpnessSettings(rhos=(0.01, 0.1), steps=2, draws=0, samples=16))
    row = compare_runs([result.run.root]).iloc[0]
    assert row["sharpness[rho=0.1]"] == float(sharpness["worst_case"].sel(rho=0.1).item()) > 0
    assert row["params"] == sum(p.numel() for p in source.parameters())
