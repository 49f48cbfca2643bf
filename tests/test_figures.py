"""Figures drawn from small hand-made runs: files written, axes labelled, fonts readable, one colour per variant."""

import matplotlib
import numpy as np
import pytest
import xarray as xr

from landscape.figures import FIGURES, STYLE, variant_styles, write_figures
from landscape.runs import Run
from landscape.study import load_results

matplotlib.use("Agg")

VARIANTS = [
    ("baseline", "vit_pico_patch4_32", {}, 1000),
    ("grouped", "vit_pico_patch4_32_grouped_mlp", {"group_size": 2}, 700),
    ("sliced", "vit_pico_patch4_32_shallow_mlp", {"width_ratio": 0.5, "mlp_init": "sliced"}, 700),
    ("random", "vit_pico_patch4_32_shallow_mlp", {"width_ratio": 0.5, "mlp_init": "random"}, 700),
    ("mlit", "mlit_xxs", {}, 800),
]
EPOCHS = np.arange(1, 6)


def write_results(ds, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="h5netcdf")


def _checkpoint_coords(n):
    return {"checkpoint": [f"epoch-{e:04d}" for e in EPOCHS[-n:]], "epoch": ("checkpoint", EPOCHS[-n:].astype(float)),
            "step": ("checkpoint", 10 * EPOCHS[-n:])}


def _make_run(root, name, model, kwargs, params, seed, scale, *, analyses=True):
    run = Run.create(root / f"{name}-s{seed}")
    run.save_config({"model": {"name": model, "kwargs": {"embed_dim": 16, **kwargs}}, "data": {"name": "digits"},
                     "seed": seed})
    rng = np.random.default_rng(seed + 10 * len(name))
    rows = []
    for e in EPOCHS:
        top1 = float(90 - 60 * np.exp(-e) - (scale * (e == EPOCHS[-1])) + rng.normal(0, 0.2))
        rows.append({"epoch": int(e), "step": int(10 * e), "train_loss": float(np.exp(-e / 2)),
                     "val_loss": float(np.exp(-e / 2) + 0.05 * e * scale), "val_top1": top1,
                     "ema_val_top1": top1 + 0.3})
    run.write_metrics(rows)
    if not analyses:
        return run
    n = len(EPOCHS)
    grid = np.linspace(-1, 30, 50)
    curv = scale * (1 + 0.1 * seed) * EPOCHS
    write_results(xr.Dataset(
        {"eigenvalue_largest": (("checkpoint", "k"), curv[:, None] * [10.0, 5.0]),
         "trace": ("checkpoint", curv * params / 10), "trace_standard_error": ("checkpoint", curv),
         "num_parameters": ("checkpoint", np.full(n, params)),
         "density": (("checkpoint", "grid"), np.exp(-((grid[None] - curv[:, None]) ** 2)) + 1e-4),
         "density_eigenvalue": (("checkpoint", "grid"), np.tile(grid, (n, 1))),
         "density_linthresh": ("checkpoint", np.full(n, 0.1))},
        coords={**_checkpoint_coords(n), "k": [1, 2]}), run.analysis_path("hessian"))
    rho = np.array([0.01, 0.05, 0.1])
    for file, factor in (("sharpness", 1.0), ("sharpness-adaptive", 3.0)):
        worst = factor * scale * rho[None] ** 2 * 50
        write_results(xr.Dataset(
            {"worst_case": (("checkpoint", "rho"), worst), "average_case": (("checkpoint", "rho"), worst / 10),
             "average_case_standard_error": (("checkpoint", "rho"), worst / 100)},
            coords={**_checkpoint_coords(1), "rho": rho}), run.analysis_path(file))
    a = np.linspace(-1, 1, 11)
    write_results(xr.Dataset({"loss": (("checkpoint", "a"), [0.1 + scale * a**2])},
                             coords={**_checkpoint_coords(1), "a": a}), run.analysis_path("surface-random-1d"))
    plane = 0.1 + scale * (a[:, None] ** 2 + 2 * a[None] ** 2)
    write_results(xr.Dataset({"loss": (("checkpoint", "a", "b"), plane[None])},
                             coords={**_checkpoint_coords(1), "a": a, "b": a}), run.analysis_path("surface-random-2d"))
    return run


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    paths = []
    for i, (name, model, kwargs, params) in enumerate(VARIANTS):
        for seed in (0, 1):
            paths.append(_make_run(root, name, model, kwargs, params, seed, scale=1.0 + i).root)
    return load_results(paths)


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
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == len(EPOCHS)]
    assert len(curves) == len(study)
    expected = sorted(matplotlib.colors.to_hex(styles[r.variant.key].color) for r in study)
    assert sorted(matplotlib.colors.to_hex(line.get_color()) for line in curves) == expected


def test_runs_without_analyses_get_only_the_dynamics_figures(tmp_path):
    runs = [_make_run(tmp_path, name, model, kwargs, params, 0, 1.0, analyses=False).root
            for name, model, kwargs, params in VARIANTS[:2]]
    written = write_figures(load_results(runs), tmp_path / "figures", formats=("png",))
    assert set(written) == {"accuracy_curves", "peak_to_final_drop", "drop_from_best", "generalization_gap"}
