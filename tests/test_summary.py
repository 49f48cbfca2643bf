"""The summary of runs: results classified by their attributes, never by their file names; several settings of one
analysis side by side; the measures at the final checkpoint."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_run

from landscape.cli import cli
from landscape.summary import load_results, load_run, surface_width

TINY = dict(img_size=8, in_chans=1, num_classes=10, patch_size=4, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0,
            class_token=False, global_pool="avg")


def _cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_adaptive_sharpness_from_the_cli_is_reported_as_adaptive(tmp_path):
    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY, 0)
    _cli("analyze", "sharpness", run.root, "--adaptive", "--rho", "0.5", "--steps", "1", "--draws", "1",
         "--samples", "16", "--checkpoints", "last", "--device", "cpu")
    loaded = load_run(run.root)
    assert loaded.sharpness is None and loaded.adaptive_sharpness is not None
    _cli("report", run.root, "--out", tmp_path / "report.md", "--no-figures")
    text = (tmp_path / "report.md").read_text()
    assert "adaptive worst-case sharpness, ρ = 0.5" in text
    assert "worst-case sharpness (SAM)" not in text
    assert "`analysis/sharpness-adaptive.nc`: adaptive sharpness" in text  # the setup table, from the attrs


def test_plain_and_adaptive_sharpness_live_side_by_side_and_force_replaces_only_its_own(tmp_path):
    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY, 0)
    common = ("--steps", "1", "--draws", "0", "--samples", "16", "--checkpoints", "last", "--device", "cpu")
    _cli("analyze", "sharpness", run.root, "--rho", "0.05", *common)
    _cli("analyze", "sharpness", run.root, "--adaptive", "--rho", "0.5", *common)
    _cli("analyze", "sharpness", run.root, "--adaptive", "--rho", "0.5,1", *common, "--force")
    loaded = load_run(run.root)
    assert loaded.sharpness["rho"].values.tolist() == [0.05]
    assert loaded.adaptive_sharpness["rho"].values.tolist() == [0.5, 1.0]


def test_raw_then_ema_hessians_are_both_kept(tmp_path):
    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY, 0)
    common = ("--top-k", "1", "--tol", "0.01", "--samples", "16", "--checkpoints", "last", "--device", "cpu")
    _cli("analyze", "hessian", run.root, *common)
    _cli("analyze", "hessian", run.root, *common, "--weights", "ema")
    results = [r for r in load_run(run.root).results if r.kind == "hessian"]
    assert sorted(r.weights for r in results) == ["ema", "raw"]
    raw, ema = (load_run(run.root, weights=w).hessian for w in ("raw", "ema"))
    assert json.loads(raw.attrs["settings"])["weights"] == "raw"
    assert json.loads(ema.attrs["settings"])["weights"] == "ema"
    assert float(raw["eigenvalue_largest"][0, 0]) != float(ema["eigenvalue_largest"][0, 0])


def test_results_of_a_params_pattern_are_kept_apart_from_the_whole_model(tmp_path):
    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY, 0)
    common = ("--top-k", "1", "--tol", "0.01", "--samples", "16", "--checkpoints", "last", "--device", "cpu")
    _cli("analyze", "hessian", run.root, *common)
    _cli("analyze", "hessian", run.root, *common, "--params", "head.*")
    loaded = load_run(run.root)
    patterns = sorted(str(r.params) for r in loaded.results if r.kind == "hessian")
    assert patterns == ["None", "head.*"]
    assert json.loads(loaded.hessian.attrs["settings"])["params"] is None


@pytest.mark.slow
def test_compare_and_the_summary_read_the_same_final_measures(analysed_study):
    from landscape.compare import compare_runs
    from landscape.summary import final_measures

    table, _ = final_measures(load_results(analysed_study[:2]))
    rows = compare_runs(analysed_study[:2])
    for (_, a), (_, b) in zip(table.iterrows(), rows.iterrows()):
        assert a["top_eigenvalue"] == b["top_eigenvalue"] and a["trace"] == b["trace"]
        assert a["worst_case_sharpness"] == b["sharpness[rho=0.05]"]
        assert a["adaptive_sharpness"] == b["adaptive_sharpness[rho=0.5]"]


def test_surface_width_of_a_parabola_is_exact():
    a = np.linspace(-1, 1, 41)
    # loss = 4 a^2 rises by 0.1 at |a| = sqrt(0.025); the grid is linear between points, so compare to the chord
    width = surface_width(a, 4 * a**2, rise=0.1)
    assert width == pytest.approx(2 * np.sqrt(0.025), abs=0.01)
    assert np.isnan(surface_width(a, 1e-3 * a**2, rise=0.1))  # never rises enough: beyond the grid, not 2
    asymmetric = np.where(a > 0, 10 * a, 0.0)  # rises only to the right, at a = 0.01: the left edge is unknown
    assert np.isnan(surface_width(a, asymmetric, rise=0.1))
    assert surface_width(a, np.where(a > 0, 10 * a, -10 * a), rise=0.1) == pytest.approx(0.02)


@pytest.mark.slow
def test_a_run_trained_on_after_its_analyses_is_read_from_metrics_and_its_older_measures_are_said(tmp_path):
    import shutil

    import torch

    from landscape.analyses.dynamics import write_dynamics
    from landscape.analyses.hessian import HessianSettings, run_hessian_analysis
    from landscape.analyses.surface import SurfaceSettings, run_surface_analysis
    from landscape.checkpoints import save_checkpoint
    from landscape.compare import compare_runs
    from landscape.models import create_model

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY, 0)
    run_hessian_analysis(run, HessianSettings(top_k=1, tol=1e-2, samples=16), checkpoints="last", device="cpu")
    run_surface_analysis(run, SurfaceSettings(dims=1, range=(-1e-4, 1e-4), points=5, samples=16),
                         checkpoints="last", device="cpu")  # far too narrow for the loss to rise 0.1 nats
    write_dynamics(run)
    assert not [p for p in load_run(run.root).problems if "dynamics.nc is older" in p or "before its final" in p]
    # the run trains on (as --resume --extend-to 4 would): a 4th epoch whose top-1 falls 20 points
    rows = run.read_metrics().to_dict("records")
    rows.append({**rows[-1], "epoch": 4, "step": 40, "val_top1": rows[-1]["val_top1"] - 20})
    run.write_metrics(rows)
    state = create_model("vit_pico_patch4_32", **TINY).state_dict()
    save_checkpoint(run.checkpoint_path(epoch=4), state, model="vit_pico_patch4_32", model_kwargs=TINY, epoch=4,
                    step=40, metrics=rows[-1])

    loaded = load_run(run.root)
    assert int(loaded.dynamics["final_epoch"]) == 4
    assert float(loaded.dynamics["peak_to_final_drop"].sel(weights="raw")) > 19
    text = " ".join(loaded.problems)
    assert "analysis/dynamics.nc is older than its metrics.csv" in text
    assert "Hessian (step 30, epoch 3), 1D surface (step 30, epoch 3) results are of a checkpoint before its final "\
           "one (step 40)" in text
    assert "1D loss surface rises less than 0.1 nats within its grid" in text
    (row,) = compare_runs([run.root]).to_dict("records")
    assert row["step"] == 40 and row["hessian_step"] == 30 and row["peak_to_final_drop"] > 19

    kept = tmp_path / "kept"  # a committed study keeps results without their checkpoints: compare still reads it
    shutil.copytree(run.root, kept)
    shutil.rmtree(kept / "checkpoints")
    (row,) = compare_runs([kept]).to_dict("records")
    assert row["step"] == 40 and row["epoch"] == 4 and row["params"] == loaded.num_params
    assert row["top1"] == pytest.approx(rows[-1]["val_top1"]) and row["peak_to_final_drop"] > 19
    assert torch.isfinite(torch.tensor(row["top_eigenvalue"]))


@pytest.mark.slow
def test_runs_measured_with_different_settings_are_said_and_left_out_of_the_verdicts(tmp_path):
    from conftest import TINY_VIT, make_tiny_run

    from landscape.analyses.hessian import HessianSettings, run_hessian_analysis
    from landscape.report import build_report
    from landscape.summary import caveats, load_results, settings_disagreements

    runs = [make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, seed) for seed in (0, 1)]
    for run, samples in zip(runs, (16, 32)):
        run_hessian_analysis(run, HessianSettings(top_k=1, tol=1e-2, trace=True, trace_matvecs=2, samples=samples,
                                                  batch_size=samples // 2 if samples == 32 else 256),
                             checkpoints="last", device="cpu")
    results = load_results([r.root for r in runs])
    unlike = settings_disagreements(results)
    assert list(unlike) == ["hessian"]
    assert "samples 16 (baseline-s0) vs 32 (baseline-s1)" in unlike["hessian"]
    assert "batch_size" not in unlike["hessian"]  # memory only: not a difference in what was measured
    assert unlike["hessian"] in caveats(results)
    blocks, hypotheses = build_report(results)
    text = "\n".join(str(b) for b in blocks)
    assert "measured with different settings" in text
    same = [make_tiny_run(tmp_path / "same", "baseline", "vit_pico_patch4_32", TINY_VIT, seed) for seed in (0, 1)]
    for run in same:
        run_hessian_analysis(run, HessianSettings(top_k=1, tol=1e-2, trace=True, trace_matvecs=2, samples=16),
                             checkpoints="last", device="cpu")
    assert settings_disagreements(load_results([r.root for r in same])) == {}


@pytest.mark.slow
def test_runs_are_compared_on_the_data_they_were_measured_on_not_on_how_it_was_named(tmp_path):
    # --data digits on a digits run is the run's own data; --data synthetic on another is not, though neither run
    # names data in the same way
    from conftest import TINY_VIT

    from landscape.analyses.hessian import HessianSettings, run_hessian_analysis
    from landscape.summary import settings_disagreements

    runs = [make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, seed) for seed in (0, 1, 2)]
    for run, dataset in zip(runs, (None, "digits", "synthetic")):
        run_hessian_analysis(run, HessianSettings(top_k=1, tol=1e-2, samples=16, dataset=dataset),
                             checkpoints="last", device="cpu")
    assert settings_disagreements(load_results([r.root for r in runs[:2]])) == {}
    unlike = settings_disagreements(load_results([runs[0].root, runs[2].root]))["hessian"]
    assert 'data "digits" (baseline-s0) vs "synthetic" (baseline-s2)' in unlike
    assert "dataset" not in unlike
    output = _cli("compare", runs[0].root, runs[2].root)
    assert 'data "digits" (baseline-s0) vs "synthetic" (baseline-s2)' in output
