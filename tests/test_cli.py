import os
import stat
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from landscape.checkpoints import save_checkpoint
from landscape.cli import cli


def test_a_table_shows_a_note_that_only_a_later_row_carries(capsys):
    # the columns came from the first row: "worst case still rising: raise --steps" on the second never showed
    from landscape.cli import print_table

    print_table([{"rho": 0.01, "worst_case": 0.0128}, {"rho": 0.05, "worst_case": 0.1436,
                                                        "note": "worst case still rising: raise --steps"}])
    header, rule, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["rho", "worst_case", "note"]
    assert second.endswith("worst case still rising: raise --steps") and first.split() == ["0.01", "0.0128"]


def test_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "datasets" in result.output and "inspect" in result.output


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.output


@pytest.mark.parametrize("args, name", [
    (["demo", "--out", ""], "--out"), (["demo", "--smoke", "--figures-out", " "], "--figures-out"),
    (["report", "runs/a", "--figures", "", "--out", "r.md"], "--figures"), (["figures", "runs/a", "--out", ""], "--out"),
    (["analyze", "hessian", ""], "RUN"), (["import", "", "--out", "runs/x"], "SOURCE"),
    (["train", "--data", "digits", "--model", "vit_pico_patch4_32", "--out", " "], "--out"),
    (["datasets", "--data-dir", ""], "--data-dir")])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, args, name):
    # `--out "$OUT"` with OUT unset: pathlib reads '' as '.', and the demo wrote its runs and figures there
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and f"{name} is empty; give a path ('.' for the current folder)." in result.output, \
        result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["report", "runs/a", "--out", "results/"], "--out results/ names a folder (it ends with '/'), and --out is a "
                                                "file; give a file name, e.g. results/report.md."),
    (["compare", "runs/a", "--out", "tables/"], "--out tables/ names a folder"),
    (["compare", "runs/a", "--figure", "figs/"], "--figure figs/ names a folder"),
    (["study", "studies/"], "STUDY.yaml studies/ names a folder")])
def test_a_file_option_given_a_folder_path_is_refused_not_written_as_a_file_of_that_name(tmp_path, monkeypatch,
                                                                                         args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_refuses_a_device_name_no_machine_has_and_notes_one_this_machine_lacks():
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--model", "vit_pico_patch4_32", "--device", " ",
                                      "--dry-run"])
    assert result.exit_code == 1 and "Unknown device ' '" in result.output, result.output
    if not torch.cuda.is_available():  # a dry run on a laptop of a run for a GPU machine
        lacking = CliRunner().invoke(cli, ["train", "--data", "digits", "--model", "vit_pico_patch4_32", "--device",
                                           "cuda", "--dry-run"])
        assert lacking.exit_code == 0 and "Note: the run trains on device 'cuda', which this machine cannot (no CUDA GPU is visible)" in \
            lacking.output, lacking.output


def test_inspect_non_checkpoint_gives_one_sentence_and_nonzero_exit(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "landscape", "inspect", str(junk)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "notes.txt" in lines[0]
    assert "Traceback" not in proc.stderr


def test_inspect_checkpoint_shows_model_and_step(tmp_path):
    path = tmp_path / "epoch-0002.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)}, model="vit_x", epoch=2, step=40, metrics={"val_top1": 88.0})
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "vit_x" in result.output and "40" in result.output and "val_top1" in result.output



def test_inspect_of_a_results_file_shows_its_analysis_settings_and_variables(tmp_path):
    import xarray as xr

    path = tmp_path / "hessian.nc"
    ds = xr.Dataset({"trace": (("checkpoint",), [3.5], {"units": "nats per squared weight"})},
                    coords={"checkpoint": ["epoch-0001"]})
    ds.attrs.update(analysis="hessian", settings='{"samples": 16, "tol": 0.001}')
    ds.to_netcdf(path, engine="h5netcdf")
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output  # it was called a corrupt safetensors checkpoint
    assert "hessian" in result.output and "samples=16" in result.output and "epoch-0001" in result.output
    assert "trace" in result.output and "nats per squared weight" in result.output

def test_datasets_lists_digits_as_found():
    result = CliRunner().invoke(cli, ["datasets"])
    assert result.exit_code == 0, result.output
    digits = [line for line in result.output.splitlines() if line.startswith("digits")]
    assert digits and "yes" in digits[0].lower()


@pytest.mark.parametrize("args, named", [
    (["analyze", "sharpness", "run", "--rho", "0.01", "--rho", "0.05"], "--rho"),
    (["analyze", "hessian", "run", "--checkpoints", "last", "--checkpoints=all"], "--checkpoints"),
    (["analyze", "hessian", "run", "--params", "*attn*", "--params", "*mlp*"], "--params"),
])
def test_a_set_option_given_twice_is_refused(args, named):
    # click keeps the last: the first --rho would be dropped without a word
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert f"{named} was given more than once" in result.output and "Traceback" not in result.output
    if named == "--rho":
        assert "--rho 0.01,0.05" in result.output
    assert CliRunner().invoke(cli, [*args, "--help"]).exit_code == 0  # --help still helps


def test_other_options_may_repeat_and_the_last_counts():
    # a script's common options followed by an override; flags and repeatable options too
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--epochs", "1", "--dry-run", "--dry-run",
                                      "--model-arg", "depth=1", "--model-arg", "embed_dim=16", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "\nepochs: 3\n" in result.output


@pytest.mark.parametrize("args", [["datasets", "--data-dir"], ["inspect"]])
def test_missing_arguments_are_usage_errors(args):
    assert CliRunner().invoke(cli, args).exit_code == 2


def test_two_params_patterns_live_side_by_side_and_force_replaces_only_its_own(tmp_path):
    from conftest import TINY_VIT, make_tiny_run

    from landscape.analyses.results import read_results

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    common = ["--top-k", "1", "--tol", "0.01", "--samples", "16", "--checkpoints", "last", "--device", "cpu"]
    for args in (["--params", "*attn*"], ["--params", "*mlp*"], ["--params", "*mlp*", "--top-k", "2", "--force"]):
        result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *common, *args])
        assert result.exit_code == 0, result.output
    attn = read_results(run.analysis_path("hessian-params-attn"))
    mlp = read_results(run.analysis_path("hessian-params-mlp"))
    assert '"params": "*attn*"' in attn.attrs["settings"] and attn.sizes["k"] == 1
    assert '"params": "*mlp*"' in mlp.attrs["settings"] and mlp.sizes["k"] == 2
    assert int(attn["num_parameters"][0]) != int(mlp["num_parameters"][0])


def test_progress_bars_draw_on_a_terminal_that_reports_no_size():
    """A pseudo-terminal nobody sized (``script``, a test harness) reports 0 x 0; tqdm then drew nothing."""
    import os
    import pty
    import select

    from landscape.progress import progress_bar, terminal_columns

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        assert terminal_columns(terminal) == 0
        for _ in progress_bar(range(3), desc="work", file=terminal, mininterval=0):
            pass
        terminal.flush()
        drawn = ""
        while select.select([master], [], [], 2.0)[0]:  # a busy machine hands the output over in pieces
            drawn += os.read(master, 65536).decode()
            if "3/3" in drawn:
                break
    os.close(master)
    assert "work: 100%" in drawn and "3/3" in drawn, drawn


@pytest.mark.parametrize("columns, lines, shows", [(40, 0, "100% 00:00 left - work"), (10, 0, "100% 00:00"),
                                                    (100, 24, "work: 100%")])
def test_progress_bars_show_the_time_left_on_half_sized_and_narrow_terminals(columns, lines, shows):
    """``stty cols 40`` sets the width alone: with 0 lines tqdm drew nothing; at 10 to 50 columns it cut the line
    before the time left, which now comes first."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios

    from landscape.progress import progress_bar

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    with os.fdopen(slave, "w") as terminal:
        for _ in progress_bar(range(3), desc="work", file=terminal, mininterval=0):
            pass
        terminal.flush()
        drawn = ""
        while select.select([master], [], [], 2.0)[0]:
            drawn += os.read(master, 65536).decode()
            if shows in drawn:
                break
    os.close(master)
    assert shows in drawn, drawn
    assert all(len(line) <= columns for line in drawn.replace("\r", "\n").split("\n")), drawn


def test_figures_left_out_for_want_of_results_are_named_with_the_command_that_makes_them(tmp_path):
    from conftest import STUDY_VARIANTS, make_tiny_run

    name, model, kwargs = STUDY_VARIANTS[0]
    run = make_tiny_run(tmp_path, name, model, kwargs, 0).root  # trained, nothing analysed
    out = tmp_path / "figures"
    asked = CliRunner().invoke(cli, ["figures", str(run), "--out", str(out), "--format", "png",
                                     "--only", "hessian_vs_epoch", "--only", "surface_1d"])
    assert asked.exit_code == 1 and "Traceback" not in asked.output
    assert ("No figure was drawn: the runs have nothing yet for hessian_vs_epoch (landscape analyze hessian "
            "--top-k 1 --trace); surface_1d (landscape analyze surface --dims 1).") in asked.output
    some = CliRunner().invoke(cli, ["figures", str(run), "--out", str(out), "--format", "png",
                                    "--only", "accuracy_curves", "--only", "sharpness_vs_rho"])
    assert some.exit_code == 0, some.output
    assert (out / "accuracy_curves.png").is_file() and not (out / "sharpness_vs_rho.png").exists()
    assert "Not drawn, nothing in the runs for them yet: sharpness_vs_rho (landscape analyze sharpness)." in some.output


@pytest.mark.slow
def test_figures_into_a_run_folder_go_to_its_figures_and_earlier_figures_are_named(tmp_path):
    from conftest import STUDY_VARIANTS, make_tiny_run

    name, model, kwargs = STUDY_VARIANTS[0]
    run = make_tiny_run(tmp_path, name, model, kwargs, 0).root
    result = CliRunner().invoke(cli, ["figures", str(run), "--out", str(run), "--format", "png"])
    assert result.exit_code == 0, result.output
    assert f"{run} is a run folder: the figures go to {run / 'figures'}." in result.output
    assert (run / "figures" / "accuracy_curves.png").is_file() and not list(run.glob("*.png"))
    stale = run / "figures" / "surface_1d.png"  # a gallery folder used before, with results these runs lack
    stale.write_bytes((run / "figures" / "accuracy_curves.png").read_bytes())
    again = CliRunner().invoke(cli, ["figures", str(run), "--out", str(run / "figures"), "--format", "png"])
    assert again.exit_code == 0, again.output
    assert (f"Warning: {run / 'figures'} also holds figures drawn earlier, not by this call (surface_1d.png); they "
            "may show other runs or older results.") in again.output
    assert stale.is_file()  # named, not deleted
    only = CliRunner().invoke(cli, ["figures", str(run), "--out", str(run / "figures"), "--format", "png",
                                    "--only", "accuracy_curves"])
    assert only.exit_code == 0 and "drawn earlier" not in only.output  # one figure asked for: the rest is known
    # the report drew into the run's root, after which train --overwrite no longer took the folder for a run
    report = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "r.md"), "--figures", str(run)])
    assert report.exit_code == 0, report.output
    assert f"{run} is a run folder: the figures go to {run / 'figures'}." in report.output
    assert not list(run.glob("*.png")) and not list(run.glob("*.pdf"))


@pytest.mark.parametrize("variant", [1, 3])  # GroupedMLP at mlp_ratio 2, ShallowMLP with random initialisation
def test_inspect_names_the_call_that_builds_the_network_it_shows(tmp_path, variant):
    # the model column used to keep only the sizes: mlp_ratio, group_size, mlp_init... built another network
    import ast

    import timm

    import landscape.models  # noqa: F401  (registers the variants with timm)
    from conftest import STUDY_VARIANTS, make_tiny_run
    from landscape.runs import describe_path

    name, model, kwargs = STUDY_VARIANTS[variant]
    run = make_tiny_run(tmp_path, name, model, kwargs, 0)
    rows = dict(describe_path(run.root))["checkpoints"]
    call = ast.parse(rows[-1]["model"], mode="eval").body
    built = timm.create_model(call.func.id, **{k.arg: ast.literal_eval(k.value) for k in call.keywords})
    assert sum(p.numel() for p in built.parameters()) == rows[-1]["params"]
    assert {k.arg: ast.literal_eval(k.value) for k in call.keywords} == kwargs


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:121] . "
                                                               "DefaultCPUAllocator: can't allocate memory: you "
                                                               "tried to allocate 768000000000 bytes.")])
def test_running_out_of_memory_is_one_sentence(tmp_path, monkeypatch, error):
    # --img-size 4000 or a huge --samples: an allocator traceback
    import landscape.runs

    def too_big(path):
        raise error

    monkeypatch.setattr(landscape.runs, "describe_path", too_big)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "ran out of memory" in result.output and "Traceback" not in result.output


def test_a_data_folder_that_is_a_file_is_named_where_it_was_given(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("LANDSCAPE_DATA_DIR", str(afile))
    from_env = CliRunner().invoke(cli, ["train", "--data", "mnist", "--dry-run"])
    assert from_env.exit_code == 2 and "'LANDSCAPE_DATA_DIR': " in from_env.output and "is a file" in from_env.output
    given = CliRunner().invoke(cli, ["train", "--data", "mnist", "--dry-run", "--data-dir", str(afile)])
    assert given.exit_code == 2 and "'--data-dir': " in given.output


def test_report_and_compare_never_write_over_a_runs_own_files_or_a_file_of_another_kind(tmp_path):
    from conftest import TINY_VIT, make_tiny_run

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    checkpoint = sorted(run.checkpoints_dir.glob("*.safetensors"))[-1]
    (tmp_path / "notes.yaml").write_text("mine\n")
    (tmp_path / "README.md").write_text("# My project\nimportant notes\n")  # a kind the report writes, not its own
    (tmp_path / "data.csv").write_text("x,y\n1,2\n")
    (tmp_path / "report.html").write_text("<html><title>mine</title></html>\n")
    os.mkfifo(tmp_path / "pipe")  # a device or pipe: the write renamed a file over it (as root: over /dev/null)
    mine = [tmp_path / n for n in ("notes.yaml", "README.md", "data.csv", "report.html")]
    kept = {p: p.read_bytes() for p in (run.config_path, checkpoint, run.metrics_path, *mine)}
    for args in (["report", run.root, "--no-figures", "--out", run.config_path],
                 ["report", run.root, "--no-figures", "--out", run.metrics_path],
                 ["compare", run.root, "--out", checkpoint],
                 ["compare", run.root, "--out", tmp_path / "notes.yaml"],
                 ["compare", run.root, "--figure", run.config_path],
                 ["report", run.root, "--no-figures", "--out", tmp_path / "README.md"],
                 ["report", run.root, "--no-figures", "--html", "--out", tmp_path / "report.md"],
                 ["compare", run.root, "--out", tmp_path / "data.csv"],
                 ["compare", run.root, "--out", tmp_path / "pipe"],
                 ["report", run.root, "--no-figures", "--out", tmp_path / "pipe"]):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1, (args, result.output)
        option = "--figure" if "--figure" in args else "--out"  # the option that gave the path, not always --out
        assert result.output.startswith("Error: ") and f"give {option} a" in result.output, result.output
    assert {p: p.read_bytes() for p in kept} == kept and stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    assert not (tmp_path / "report.md").exists()
    inside = sorted(p.name for p in run.checkpoints_dir.iterdir())  # 24 figures went among the checkpoints
    for args in (["figures", run.root, "--out", run.checkpoints_dir],
                 ["report", run.root, "--figures", run.checkpoints_dir, "--out", tmp_path / "r.md"]):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1 and "is the checkpoints/ folder of the run" in result.output, result.output
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == inside and not run.analysis_dir.exists()
    for args in (["report", run.root, "--no-figures", "--html", "--out", run.root / "report.md"],  # beside the run
                 ["compare", run.root, "--out", tmp_path / "table.csv"]):
        for _ in range(2):  # and over its own earlier output
            result = CliRunner().invoke(cli, [str(a) for a in args])
            assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    from conftest import TINY_VIT, make_tiny_run

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    # `true` leaves before the command writes (its imports take seconds): every write meets a closed pipe
    shell = f"{sys.executable} -m landscape inspect {run.root} | true; echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stderr == "" and done.stdout.strip() in ("0", "141"), (done.stdout, done.stderr)


@pytest.mark.parametrize("args, message", [
    (["hessian", "--top-k", "1", "--seed", "-1"], "--seed must be between 0 and 4294967295 (2**32 - 1), not -1."),
    (["sharpness", "--seed", str(2 ** 32)], "--seed must be between 0 and 4294967295"),
    (["sharpness", "--rho", "1e30"], "--rho must be radii between 1e-12 and 1e6"),
    (["sharpness", "--rho", "0.05,1e-300"], "--rho must be radii between 1e-12 and 1e6"),
    (["surface", "--range", "-1e308:1e308"], "Range '-1e308:1e308' reaches past 1,000,000 times the directions"),
    (["surface", "--range", "1e30:1e31"], "reaches past 1,000,000 times"),
    # a traceback after saving two grid points on one coordinate; numpy refusing the grid's size
    (["surface", "--range", "0:5e-324", "--points", "3"], "is too narrow for 3 distinct grid points"),
    (["surface", "--range", "1:1.0000000000000002", "--points", "3"], "is too narrow for 3 distinct grid points"),
    (["surface", "--dims", "2", "--points", "5000"], "--points must be from 2 to 1,001 for --dims 2"),
    (["sharpness", "--adaptive", "--eta", "1e30"], "is not finite at a perturbation of norm"),
    (["sharpness", "--rho", "1e6"], "is not finite at a perturbation of norm"),
])
def test_values_past_what_an_analysis_can_measure_are_one_sentence_and_write_nothing(tmp_path, args, message):
    # a traceback each (numpy's seed range, a NaN in the trust-region solver, an overflowing grid step), and the
    # overflowing surface was saved, NaN coordinates and all
    from conftest import TINY_VIT, make_tiny_run

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    result = CliRunner().invoke(cli, ["analyze", args[0], str(run.root), *args[1:], "--samples", "16",
                                      "--checkpoints", "last"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, result.output
    assert not list(run.analysis_dir.glob("*.nc"))


def test_refused_commands_leave_no_empty_folders_behind(tmp_path):
    from conftest import TINY_VIT, make_tiny_run

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    assert not run.analysis_dir.exists()
    for args in (["analyze", "hessian", run.root, "--top-k", "100000", "--samples", "16"],
                 ["analyze", "hessian", run.root, "--data", "bogus"],
                 ["analyze", "hessian", run.root, "--checkpoints", ""],  # it meant all: the costliest choice
                 ["figures", run.root, "--only", "bogus", "--out", tmp_path / "figs"]):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1 and "Error: " in result.output, result.output
    assert not run.analysis_dir.exists() and not (tmp_path / "figs").exists()
