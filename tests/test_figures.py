"""Figures drawn from tiny runs measured by the real analyses: files written, axes labelled, fonts readable, one colour per variant."""

import matplotlib
import pytest
from conftest import STUDY_EPOCHS, STUDY_VARIANTS, make_tiny_run

from landscape.figures import FIGURES, STYLE, variant_styles, write_figures
from landscape.summary import load_results

matplotlib.use("Agg")


# Every test here draws from ten runs measured by the real analyses (about a minute and a half to build).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(analysed_study):
    """Five variants x two seeds, analysed by the real analyses (tests/conftest.py)."""
    return load_results(analysed_study)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a figure prints no numpy warning under the user's command
def test_every_figure_is_written(study, tmp_path):
    written = write_figures(study, tmp_path, formats=("png",))
    assert set(written) == set(FIGURES)
    for (path,) in written.values():
        assert path.suffix == ".png" and path.stat().st_size > 1000


def test_figures_are_written_as_png_and_pdf(study, tmp_path):
    written = write_figures(study, tmp_path, names=["peak_to_final_drop"])
    paths = written["peak_to_final_drop"]
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    assert paths[1].read_bytes().startswith(b"%PDF") or paths[0].read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_axes_are_labelled_and_fonts_are_readable_at_column_width(study, name):
    styles = variant_styles(study)
    with matplotlib.rc_context(STYLE):
        fig = FIGURES[name](study, styles)
        fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    assert fig.get_figwidth() <= 7.0
    for ax in fig.axes:
        if not ax.get_visible() or ax.get_label() == "<colorbar>":
            continue
        shared_x = ax.get_xlabel() or any(o.get_xlabel() for o in ax.get_shared_x_axes().get_siblings(ax))
        assert shared_x, f"{name}: an x axis has no label"
        assert ax.get_ylabel() or ax.get_subplotspec().colspan.start > 0, f"{name}: a y axis has no label"
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text() and t.get_visible()]
    assert min(sizes) >= 7, f"{name}: text smaller than 7 pt"


def test_a_variant_keeps_its_colour_whatever_else_is_in_the_study(study):
    full = variant_styles(study)
    without = variant_styles([r for r in study if r.variant.family not in ("mlit", "baseline")])
    for key, style in without.items():
        assert style.color == full[key].color
    assert len({s.color for s in full.values()}) == len(full)


def test_accuracy_lines_use_the_colour_of_their_variant(study):
    styles = variant_styles(study)
    fig = FIGURES["accuracy_curves"](study, styles)
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == len(STUDY_EPOCHS)]
    assert len(curves) == len(study)
    expected = sorted(matplotlib.colors.to_hex(styles[r.variant.key].color) for r in study)
    assert sorted(matplotlib.colors.to_hex(line.get_color()) for line in curves) == expected


def test_runs_without_analyses_get_only_the_dynamics_figures(tmp_path):
    runs = [make_tiny_run(tmp_path, name, model, kwargs, 0).root for name, model, kwargs in STUDY_VARIANTS[:2]]
    written = write_figures(load_results(runs), tmp_path / "figures", formats=("png",))
    assert set(written) == {"accuracy_curves", "peak_to_final_drop", "drop_from_best", "generalization_gap"}


def test_a_second_process_drawing_into_the_same_folder_is_refused_in_one_sentence(analysed_study, tmp_path):
    from click.testing import CliRunner

    from landscape.cli import cli
    from landscape.io import folder_lock

    out = tmp_path / "gallery"
    with folder_lock(out, "drawing figures into"):  # as another `landscape figures --out` would hold it
        result = CliRunner().invoke(cli, ["figures", *map(str, analysed_study), "--out", str(out), "--format", "png"])
        assert result.exit_code == 1
        assert "in use by another landscape process" in result.output and "Traceback" not in result.output
        assert list(out.iterdir()) == []
        report = CliRunner().invoke(cli, ["report", *map(str, analysed_study), "--out", str(tmp_path / "r.md"),
                                          "--figures", str(out)])
        assert report.exit_code == 1 and not (tmp_path / "r.md").exists()
    result = CliRunner().invoke(cli, ["figures", *map(str, analysed_study), "--out", str(out), "--format", "png"])
    assert result.exit_code == 0, result.output
    assert sorted(p.suffix for p in out.iterdir()) == [".png"] * len(list(out.iterdir()))


def test_sharpness_values_at_or_below_zero_stay_visible_and_colour_bar_labels_differ(study):
    import copy

    import numpy as np

    from landscape.figures import distinct_labels, sharpness_vs_rho

    assert distinct_labels([2.2, 2.24, 2.28, 2.33]) == ["2.2", "2.24", "2.28", "2.33"]
    assert distinct_labels([1.0, 10.0, 100.0]) == ["1", "10", "1e+02"]
    runs = copy.deepcopy([r for r in study if r.sharpness is not None])
    entry = runs[0].sharpness
    entry["average_case"] = -abs(entry["average_case"])  # a Monte Carlo mean below zero, as near a minimum
    with matplotlib.rc_context(STYLE):
        fig = sharpness_vs_rho(runs, variant_styles(runs))
    scales = [ax.get_yscale() for ax in fig.axes if ax.get_visible()]
    assert "symlog" in scales, scales  # a log axis dropped the point without a trace
    average_row = [ax for ax in fig.axes if "average" in ax.get_ylabel()]
    assert average_row and "some ≤ 0" in average_row[0].get_ylabel()
    drawn = np.concatenate([line.get_ydata() for ax in fig.axes for line in ax.get_lines()])
    assert (np.asarray(drawn, dtype=float) < 0).any()



def test_a_worst_case_search_still_rising_is_drawn_hollow_and_said_in_the_caveats(study):
    # compare, report and the figure showed such values as final: a 30% gap that shrank to 8% with more steps
    import copy

    from landscape.figures import sharpness_vs_rho
    from landscape.summary import caveats, unsettled_searches

    runs = copy.deepcopy([r for r in study if r.sharpness is not None])
    for r in runs:
        flags = r.sharpness["worst_case_still_rising"]
        r.sharpness["worst_case_still_rising"] = flags * 0
    assert unsettled_searches(runs) == []
    first = runs[0].sharpness["worst_case_still_rising"]
    first[..., -1] = 1  # the largest radius, at every checkpoint
    largest = float(runs[0].sharpness["rho"][-1])
    sentences = unsettled_searches(runs)
    assert len(sentences) == 1 and f"{runs[0].path.name} at ρ = {largest:g}" in sentences[0]
    assert "still rising" in sentences[0] and "--steps" in sentences[0] and sentences[0] in caveats(runs)
    other = runs[1].sharpness
    other["worst_case_still_rising"][..., 0] = 1
    other["worst_case"][..., 0] = float("nan")  # no value, so no lower bound to speak of
    assert unsettled_searches(runs) == sentences
    with matplotlib.rc_context(STYLE):
        fig = sharpness_vs_rho(runs, variant_styles(runs))
    hollow = [line for ax in fig.axes for line in ax.get_lines() if line.get_markerfacecolor() == "white"]
    assert [list(line.get_xdata()) for line in hollow] == [[largest]]
    assert "hollow" in fig._supxlabel.get_text()
