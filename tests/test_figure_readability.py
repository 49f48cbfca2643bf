"""Figures a reader can read at a glance on data at its edges (no run needed): distinct styles per variant, levels
and ticks that follow the data, points that cannot be drawn marked, legends that fit, the compare figure."""

import matplotlib
import pytest

from landscape.figures import variant_styles

matplotlib.use("Agg")


def _runs_of(configs):
    """RunResults-like stand-ins with the variants of ``configs`` (model name, kwargs)."""
    import types

    from landscape.models.variants import describe_variant

    return [types.SimpleNamespace(variant=describe_variant({"model": {"name": name, "kwargs": kwargs}}), label=None)
            for name, kwargs in configs]


def test_no_two_variants_share_colour_marker_and_dash():
    # GroupedMLP g=6 and g=12 were drawn alike, as were ShallowMLP x0.25/x0.5/x0.75 and other models 1 and 7
    grouped = [("vit_pico_patch4_32_grouped_mlp", {"group_size": g}) for g in (2, 3, 4, 6, 12, 24, 48)]
    shallow = [("vit_pico_patch4_32_shallow_mlp", {"width_ratio": r, "mlp_init": i})
               for r in (0.25, 0.5, 0.75) for i in ("sliced", "random")]
    others = [(f"model_{i}", {}) for i in range(1, 15)]
    baselines = [("vit_pico_patch4_32", {}), ("vit_nano_patch4_32", {}), ("vit_micro_patch4_32", {})]
    styles = variant_styles(_runs_of(grouped + shallow + others + baselines))
    marks = [(s.color, s.marker, str(s.linestyle)) for s in styles.values()]
    assert len(set(marks)) == len(marks) == 7 + 6 + 14 + 3
    order = [s.label for s in sorted(styles.values(), key=lambda s: s.order) if s.label.startswith("model_")]
    assert order[:3] == ["model_1", "model_2", "model_3"] and order[-1] == "model_14"  # numbers by value


def test_surface_levels_and_ticks_follow_the_data_and_points_off_the_log_scale_are_marked():
    import numpy as np
    import xarray as xr

    import landscape as ls

    a = np.linspace(-1, 1, 11)

    def plane(loss):
        return xr.Dataset({"loss": (("a", "b"), loss), "top1": (("a", "b"), np.zeros_like(loss))},
                          coords={"a": a, "b": a}, attrs={"analysis": "surface", "settings": '{"dims": 2}'})

    A, B = np.meshgrid(a, a, indexing="ij")
    fig = ls.figure("surface_2d", ls.results(plane(1e-7 + 5e-5 * (A**2 + B**2) / 2)))
    bar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0]
    assert bar.get_ylim()[0] == pytest.approx(1e-7)  # the levels started at 1e-4: one flat colour, no basin
    line = xr.Dataset({"loss": ("a", 1e-6 + 1e3 * a**4), "top1": ("a", np.zeros(11))}, coords={"a": a},
                      attrs={"analysis": "surface", "settings": '{"dims": 1}'})
    fig = ls.figure("surface_1d", ls.results(line))
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert len([t for t in ax.get_yticks() if low <= t <= high]) >= 3  # ten decades had no tick at all
    assert ax.get_ylabel().startswith("loss")  # data given directly: not called the training subset
    ends = line.copy(deep=True)
    ends["loss"].values[[0, -1]] = [np.inf, np.nan]
    fig = ls.figure("surface_1d", ls.results(ends))
    assert fig.axes[0].get_xlim() == (-1.0, 1.0)  # the slice measured, not the finite part of it
    assert any(list(l.get_xdata()) == [-1.0, 1.0] and l.get_marker() == "x" for l in fig.axes[0].get_lines())


def test_a_lone_point_gets_its_marker_and_long_legend_labels_keep_what_tells_them_apart():
    import numpy as np

    from landscape.figures import _line, _shortened, variant_styles as styles_of

    style = next(iter(styles_of(_runs_of([("vit_pico_patch4_32", {})])).values()))
    fig = matplotlib.figure.Figure()
    ax = fig.subplots()
    _line(ax, np.array([1.0, 2.0, 3.0]), np.array([np.nan, -0.019, np.nan]), style)
    assert [list(l.get_xdata()) for l in ax.get_lines() if l.get_marker() == style.marker] == [[2.0]]
    labels = [f"vit_pico_patch4_32_grouped_mlp-width16-depth2-lr3e-3-seed{i}-a-very-long-descriptive-run-name"
              for i in range(3)]
    short = _shortened(labels, 40)
    assert all(len(s) <= 40 for s in short) and [f"seed{i}" in s for i, s in enumerate(short)] == [True] * 3
    assert len(set(short)) == 3
    alike = ["a" * 30 + str(i) + "b" * 30 for i in range(3)]  # differing only inside one long word: left whole
    assert _shortened(alike, 20) == alike


def test_the_compare_figure_marks_zero_apart_from_missing_and_names_units():
    import numpy as np
    import pandas as pd

    from landscape.compare import compare_figure

    table = pd.DataFrame({"run": ["a", "b", "c"], "top1": [20.0, 30.0, 25.0], "peak_to_final_drop": [0.0, 0.0, np.nan],
                          "sharpness[rho=0.01]": [2.5e-4, 5e-4, 1e-4]})
    fig = compare_figure(table)
    titles = {ax.get_title() for ax in fig.axes}
    assert {"top1 (%)", "peak_to_final_drop (points)", "sharpness[rho=0.01] (nats)"} <= titles
    drop = next(ax for ax in fig.axes if ax.get_title().startswith("peak_to_final_drop"))
    assert [t.get_text() for t in drop.texts] == ["not measured"]
    assert any(l.get_marker() == "o" and len(l.get_xdata()) == 2 for l in drop.get_lines())
