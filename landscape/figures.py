"""The figure gallery: one function per figure kind, each taking a study's results and returning a Figure.

Every function takes the list of :class:`~landscape.summary.RunResults` of a study and a style map from
:func:`variant_styles` (one colour, line style and marker per variant, the same in every figure), and returns a
:class:`matplotlib.figure.Figure`, or ``None`` when the runs have none of the results it draws. Figures are
sized for a paper column (3.3 in wide, fonts of 7 pt and more) unless they hold one panel per variant, which
take the page width (6.9 in). :func:`write_figures` draws them all and saves each as PNG and PDF.

Figures never use ``pyplot``: they are plain ``Figure`` objects rendered by the Agg (PNG) and PDF backends, so
drawing them needs no display and leaves no global state behind.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from landscape.errors import LandscapeError
from landscape.models.variants import Variant
from landscape.summary import RunResults

COLUMN_WIDTH = 3.3  # inches: one column of a two-column paper
PAGE_WIDTH = 6.9  # inches: both columns
FORMATS = ("png", "pdf")

STYLE = {
    "font.size": 7.5,
    "axes.titlesize": 7.5,
    "axes.labelsize": 7.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "legend.frameon": False,
    "lines.linewidth": 1.1,
    "lines.markersize": 4,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "savefig.dpi": 200,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text for the journal's tools
}

# Okabe & Ito's palette, distinguishable under the common colour-vision deficiencies.
_BLACK, _ORANGE, _SKY, _GREEN, _YELLOW, _BLUE, _VERMILLION, _PURPLE = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
_GROUP_COLORS = ("#E69F00", "#C98A00", "#A87300", "#7A5200", "#5E3F00", "#3D2900")  # GroupedMLP: darker for larger
_GROUP_MARKERS = ("^", "<", ">", "p", "h", "*")  # groups, each with its own marker and dash
_GROUP_LINES = ("-", (0, (4, 1.5)), (0, (1.5, 1)), (0, (6, 1.5, 1.5, 1.5)), (0, (3, 1, 1, 1, 1, 1)), (0, (8, 2)))
_SHALLOW_MARKERS = ("v", "d", "8", "H", "<", ">")  # ShallowMLP widths: one marker and dash per width ratio
_SHALLOW_LINES = ((0, (4, 1.5)), (0, (1.5, 1)), (0, (6, 1.5, 1.5, 1.5)), (0, (3, 1, 1, 1, 1, 1)), (0, (8, 2)))
_OTHER_COLORS = (_GREEN, _VERMILLION, "#8C564B", "#7F7F7F", "#BCBD22", "#17BECF")
_OTHER_MARKERS = ("X", "o", "s", "d", "*", "h", "P", "v")  # past six other variants: the colours again, with
_OTHER_LINES = (":", "-.", (0, (3, 1, 1, 1)), "--", (0, (1, 2)), (0, (5, 2, 1, 2)), "-", (0, (2, 1)))  # new marks


def _style_cycle(index: int, colors: Sequence[str], markers: Sequence[str], lines: Sequence[Any]):
    """The ``index``-th of ``len(colors) x len(markers)`` distinct styles: colours first, then the next marker and
    dash with every colour again."""
    turn = index // len(colors)
    return colors[index % len(colors)], markers[turn % len(markers)], lines[turn % len(lines)]


def _natural(text: str) -> tuple:
    """A sort key that orders numbers inside names by value: run 2 before run 10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))
_FAMILY_ORDER = {"baseline": 0, "grouped": 1, "shallow": 2, "mlit": 3, "other": 4}


@dataclasses.dataclass(frozen=True)
class VariantStyle:
    """How one variant is drawn everywhere: colour, line style, marker, legend label and legend position."""

    color: str
    linestyle: str
    marker: str
    label: str
    order: int


def variant_styles(results: Iterable[RunResults]) -> dict[str, VariantStyle]:
    """``{variant key: VariantStyle}`` for every variant among ``results``.

    The colour follows the variant's family, so a variant keeps its colour whatever else is in the study: the
    baseline black, GroupedMLP orange (darker, with another marker and dash, for larger groups), ShallowMLP blue
    (sliced init dark blue and solid, random init sky blue and dashed; each further width its own marker and
    dash), mLiT purple, anything else from the remaining colours in name order (numbers by value), then those
    colours again with other markers and dashes: no two variants share colour, marker and dash.
    """
    variants: dict[str, tuple[Variant, str]] = {}
    for r in results:
        variants.setdefault(r.variant.key, (r.variant, r.label or r.variant.label))
    group_sizes = sorted({v.group_size for v, _ in variants.values() if v.family == "grouped"})
    widths = {init: sorted({v.width_ratio or 0 for v, _ in variants.values() if v.family == "shallow"
                            and (v.mlp_init == "sliced") == init}) for init in (True, False)}
    ordered = sorted(variants.values(), key=lambda p: (_FAMILY_ORDER[p[0].family], p[0].group_size or 0,
                                                       p[0].mlp_init != "sliced", p[0].width_ratio or 0,
                                                       _natural(p[0].key)))
    styles, others, baselines = {}, 0, 0
    for order, (info, label) in enumerate(ordered):
        linestyle, marker = "-", "o"
        if info.family == "baseline":
            color, marker = _BLACK, "s"
            if baselines:  # another baseline architecture: black too, with its own mark and dash
                marker = _OTHER_MARKERS[baselines % len(_OTHER_MARKERS)]
                linestyle = _OTHER_LINES[(baselines - 1) % len(_OTHER_LINES)]
            baselines += 1
        elif info.family == "grouped":
            index = group_sizes.index(info.group_size)  # told apart by shade, mark and dash
            n = len(_GROUP_COLORS)  # past six sizes the dash shifts, so that shade, mark and dash stay unique
            color, marker = _GROUP_COLORS[index % n], _GROUP_MARKERS[index % n]
            linestyle = _GROUP_LINES[(index + index // n) % n]
        elif info.family == "shallow":
            sliced = info.mlp_init == "sliced"
            color, marker, linestyle = (_BLUE, "v", "-") if sliced else (_SKY, "D", "--")
            index = widths[sliced].index(info.width_ratio or 0)
            if index:  # another width with the same init: another mark and dash
                marker = _SHALLOW_MARKERS[index % len(_SHALLOW_MARKERS)]
                linestyle = _SHALLOW_LINES[(index - 1) % len(_SHALLOW_LINES)]
        elif info.family == "mlit":
            color, marker, linestyle = _PURPLE, "P", "-."
        else:
            color, marker, linestyle = _style_cycle(others, _OTHER_COLORS, _OTHER_MARKERS, _OTHER_LINES)
            others += 1
        styles[info.key] = VariantStyle(color=color, linestyle=linestyle, marker=marker, label=label, order=order)
    return styles


def _by_variant(results: Sequence[RunResults],
                styles: dict[str, VariantStyle]) -> list[tuple[VariantStyle, list[RunResults]]]:
    groups: dict[str, list[RunResults]] = {}
    for r in results:
        groups.setdefault(r.variant.key, []).append(r)
    return sorted(((styles[k], sorted(v, key=lambda r: r.seed)) for k, v in groups.items()), key=lambda p: p[0].order)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _legend_handles(styles: Iterable[VariantStyle], *, markers: bool = True, lines: bool = True):
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=s.color, linestyle=s.linestyle if lines else "none",
                   marker=s.marker if markers else None, markersize=3.5, label=s.label)
            for s in sorted(styles, key=lambda s: s.order)]


def _figure_legend(fig: Figure, styles: Iterable[VariantStyle], *, ncol: int | None = None, **kwargs) -> None:
    """A legend above the panels, in as many columns (at most ``ncol``, else 3) as fit the figure's width."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    handles = _legend_handles(styles, **kwargs)
    renderer = FigureCanvasAgg(fig).get_renderer() if not hasattr(fig.canvas, "get_renderer") \
        else fig.canvas.get_renderer()
    ncol = max(1, ncol or min(len(handles), 3))
    limit = None  # characters of a label, once one column is still too wide
    originals = [h.get_label() for h in handles]
    while True:
        legend = fig.legend(handles=handles, loc="outside upper center", ncol=ncol, handlelength=2.2,
                            columnspacing=1.0)
        width = legend.get_window_extent(renderer).width
        if width <= 0.98 * fig.bbox.width or (ncol == 1 and limit is not None and limit <= 12):
            return
        legend.remove()  # wider than the figure: its ends, colour keys included, would be cut off
        if ncol > 1:
            ncol -= 1
            continue
        longest = max(len(h.get_label()) for h in handles)
        limit = max(12, min(longest - 1, int(longest * 0.95 * fig.bbox.width / width)))
        # one column and still too wide: what the labels share left out, the part that tells them apart kept
        for h, label in zip(handles, _shortened(originals, limit)):
            h.set_label(label)


_SEPARATORS = " -_/=,.:;|()[]"


def _shortened(labels: Sequence[str], limit: int) -> list[str]:
    """Each label in at most ``limit`` characters: the part where the labels differ kept (a seed, a setting in
    the middle of a long run name), what they all share before and after it cut to its ends with an ellipsis."""
    import os.path

    if len(labels) > 1:
        prefix = len(os.path.commonprefix(list(labels)))
        suffix = len(os.path.commonprefix([label[::-1] for label in labels]))
    else:
        prefix = suffix = 0
    out = []
    for label in labels:
        if len(label) <= limit:
            out.append(label)
            continue
        p, q = min(prefix, len(label)), min(suffix, len(label) - min(prefix, len(label)))
        while p and label[p - 1] not in _SEPARATORS:  # whole words: "seed0", not "0"
            p -= 1
        while q and label[len(label) - q] not in _SEPARATORS:
            q -= 1
        core = label[p:len(label) - q]
        if len(core) + 2 >= limit or not (p or q):  # nothing shared to cut: the middle goes
            head = (limit - 1) // 2
            out.append(label[:head] + "…" + label[len(label) - (limit - 1 - head):])
            continue
        room = limit - len(core) - 2  # characters left for the shared start and end, beside two ellipses
        head = min(p, max(room // 2, room - q))
        tail = min(q, room - head)
        start = label[:p] if head >= p else label[:head] + "…"
        end = label[len(label) - q:] if tail >= q else "…" + label[len(label) - tail:] if tail else "…"
        out.append(start + core + end)
    return out if len(set(out)) == len(set(labels)) else list(labels)  # never two runs under one label


def _weights_label(weights: str) -> str:
    return {"raw": "raw weights", "ema": "EMA weights"}.get(weights, f"{weights} weights")


# == dynamics ====================================================================================================
def accuracy_curves(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Validation top-1 (%) against epoch, one line per run, one panel per weights (raw, EMA); each run's peak
    is marked with an open circle of its colour, so the distance from it down to the curve's end is the
    peak-to-final drop."""
    runs = [r for r in results if r.dynamics is not None]
    if not runs:
        return None
    weights = [w for w in ("raw", "ema") if any(w in r.dynamics["weights"].values for r in runs)]
    fig = _figure(COLUMN_WIDTH, 1.55 * len(weights) + 0.75)
    axes = fig.subplots(len(weights), 1, sharex=True, squeeze=False)[:, 0]
    for ax, w in zip(axes, weights):
        for style, group in _by_variant(runs, styles):
            for r in group:
                if w not in r.dynamics["weights"].values:
                    continue
                curve = r.dynamics["top1"].sel(weights=w)
                epochs = r.dynamics["epoch"].values
                _line(ax, epochs, curve.values, style)
                peak_epoch = float(r.dynamics["peak_epoch"].sel(weights=w))
                if math.isfinite(peak_epoch):
                    ax.plot([peak_epoch], [float(r.dynamics["peak_top1"].sel(weights=w))], linestyle="none",
                            marker="o", markersize=4, markerfacecolor="white", markeredgecolor=style.color,
                            markeredgewidth=0.9, zorder=3)
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(_weights_label(w), loc="left")
    axes[-1].set_xlabel("epoch")
    _add_peak_note(axes[0])
    _figure_legend(fig, [s for s, _ in _by_variant(runs, styles)], markers=False, ncol=2)  # a column-wide figure
    return fig


def _add_peak_note(ax) -> None:
    from matplotlib.lines import Line2D

    marker = Line2D([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="0.3",
                    markersize=4, label="peak of each run")
    ax.legend(handles=[marker], loc="lower right")


def peak_to_final_drop(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Peak-to-final drop of top-1 (percentage points) per variant: one dot per seed, the mean as a bar
    with the seed standard deviation; raw weights filled, EMA weights open."""
    runs = [r for r in results if r.dynamics is not None]
    if not runs:
        return None
    groups = _by_variant(runs, styles)
    weights = [w for w in ("raw", "ema") if any(w in r.dynamics["weights"].values for r in runs)]
    fig = _figure(COLUMN_WIDTH, 2.5)
    ax = fig.subplots()
    offsets = np.linspace(-0.17, 0.17, len(weights)) if len(weights) > 1 else [0.0]
    for i, (style, group) in enumerate(groups):
        for w, dx in zip(weights, offsets):
            values = np.array([float(r.dynamics["peak_to_final_drop"].sel(weights=w)) for r in group
                               if w in r.dynamics["weights"].values])
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            filled = w == "raw"
            jitter = np.linspace(-0.05, 0.05, values.size) if values.size > 1 else np.zeros(1)
            ax.plot(i + dx + jitter, values, linestyle="none", marker=style.marker, markersize=3.5,
                    color=style.color, markerfacecolor=style.color if filled else "white", markeredgewidth=0.8,
                    alpha=0.9)
            mean = values.mean()
            std = values.std(ddof=1) if values.size > 1 else 0.0
            ax.errorbar(i + dx, mean, yerr=std, fmt="_", markersize=10, color=style.color, capsize=2,
                        elinewidth=0.8, markeredgewidth=1.2)
    ax.set_xticks(range(len(groups)), [s.label for s, _ in groups], rotation=25, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xlabel("variant")
    ax.set_ylabel("peak-to-final drop of top-1\n(percentage points)")
    ax.axhline(0, color="0.5", lw=0.5, zorder=0)
    ax.grid(axis="x", visible=False)
    _weights_legend(fig, weights)
    return fig


def _weights_legend(fig: Figure, weights: Sequence[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="none", marker="o", color="0.3",
                      markerfacecolor="0.3" if w == "raw" else "white", label=_weights_label(w)) for w in weights]
    handles.append(Line2D([], [], linestyle="none", marker="_", markersize=10, color="0.3",
                          label="mean ± sd over seeds"))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), handletextpad=0.3,
               columnspacing=0.9)


def generalization_gap(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Validation loss minus training loss (nats) against epoch, one line per run."""
    runs = [r for r in results if r.dynamics is not None and np.isfinite(r.dynamics["generalization_gap"].values).any()]
    if not runs:
        return None
    fig = _figure(COLUMN_WIDTH, 2.4)
    ax = fig.subplots()
    for style, group in _by_variant(runs, styles):
        for r in group:
            _line(ax, r.dynamics["epoch"].values, r.dynamics["generalization_gap"].values, style)
    ax.axhline(0, color="0.5", lw=0.5, zorder=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("generalisation gap (nats)\nvalidation − training loss")
    _figure_legend(fig, [s for s, _ in _by_variant(runs, styles)], markers=False)
    _caption(fig, "training loss: the mean over each epoch's updates as trained (augmented, label-smoothed)")
    return fig



def drop_from_best(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """The running drop from the best top-1 so far (percentage points) against epoch, one line per run; its value
    at the last epoch is the peak-to-final drop."""
    runs = [r for r in results if r.dynamics is not None and "drop_from_best" in r.dynamics]
    if not runs:
        return None
    weights = [w for w in ("raw", "ema") if any(w in r.dynamics["weights"].values for r in runs)]
    fig = _figure(COLUMN_WIDTH, 1.3 * len(weights) + 0.75)
    axes = fig.subplots(len(weights), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, w in zip(axes, weights):
        for style, group in _by_variant(runs, styles):
            for r in group:
                if w in r.dynamics["weights"].values:
                    _line(ax, r.dynamics["epoch"].values, r.dynamics["drop_from_best"].sel(weights=w).values, style)
        ax.set_ylabel("drop from best\ntop-1 (points)")
        ax.set_title(_weights_label(w), loc="left")
    axes[-1].set_xlabel("epoch")
    _figure_legend(fig, [s for s, _ in _by_variant(runs, styles)], markers=False)
    return fig


# == curvature ===================================================================================================
def _mean_band(ax, x: np.ndarray, curves: list[np.ndarray], style: VariantStyle, *, label: str | None = None) -> None:
    """The mean over seeds as a line with markers, each seed as a thin line, and the band from the lowest to the
    highest seed (drawn in data space, so it stays visible on a symlog axis whatever the sign of the values)."""
    stack = np.vstack(curves)
    with warnings.catch_warnings():  # a point no seed has (all NaN) stays a gap, without a warning on stderr
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
        low, high = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
    ax.plot(x, mean, color=style.color, linestyle=style.linestyle, marker=style.marker, markersize=2.8, label=label)
    if len(curves) > 1:
        for curve in curves:
            ax.plot(x, curve, color=style.color, linestyle=style.linestyle, lw=0.5, alpha=0.55)
        ax.fill_between(x, low, high, color=style.color, alpha=0.12, lw=0)


BAND_CAPTION = "markers: mean over seeds; thin lines: each seed; shaded: lowest to highest seed"


def _caption(fig: Figure, text: str) -> None:
    """A line (wrapped to the figure's width) under the panels saying how to read them (what a band or a bar
    is)."""
    import textwrap

    width = int(fig.get_figwidth() * 14)
    fig.supxlabel("\n".join(textwrap.fill(line, width=width) for line in text.split("\n")), fontsize=7,
                  color="0.35")


def _readable_log_ticks(axis) -> None:
    """Ticks of a log axis spanning about a decade at 1, 2 and 5 times the powers of ten, written as plain
    numbers (75, 100, 200, 500), not "10²" alone or "4.2×10⁰"."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _value_scale(ax, values: np.ndarray) -> None:
    """A log axis when every value is positive; otherwise symlog, linear within the smallest decade of the
    magnitudes, so that a value at or below zero (a negative trace estimate) stays on the axis."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or np.all(finite > 0):
        ax.set_yscale("log")
        if finite.size and finite.max() / finite.min() < 30:  # within a decade or so: plain numbers at 1, 2, 5
            _readable_log_ticks(ax.yaxis)
        return
    magnitudes = np.abs(finite[finite != 0])
    linthresh = 10.0 ** math.floor(math.log10(np.percentile(magnitudes, 10))) if magnitudes.size else 1.0
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.axhline(0.0, color="0.5", lw=0.5, zorder=0)


def _per_epoch(ds, variable: str, transform: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    epochs = ds["epoch"].values.astype(float)
    values = ds[variable]
    if "k" in values.dims:
        values = values.isel(k=0)
    values = values.values.astype(float)
    if transform is not None:
        values = transform(ds, values)
    keep = np.isfinite(epochs)
    return epochs[keep], values[keep]


def _aligned(group: list[RunResults], variable: str, transform=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The curves of ``variable`` of the runs of one variant on the union of their epochs (NaN where missing)."""
    return _on_union([_per_epoch(r.hessian, variable, transform) for r in group])


def _on_union(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(epochs, values)`` curves of several runs put on the union of their epochs (NaN where a run has none)."""
    if not pairs:
        return np.zeros(0), []
    epochs = np.unique(np.concatenate([e for e, _ in pairs]))
    curves = []
    for e, v in pairs:
        curve = np.full(len(epochs), np.nan)
        curve[np.searchsorted(epochs, e)] = v
        curves.append(curve)
    return epochs, curves


def hessian_vs_epoch(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Top Hessian eigenvalue, trace and trace per parameter against epoch: the mean over seeds, each seed, and the
    band from the lowest to the highest seed; log scale, or symlog where an estimate is at or below zero.
    Eigenvalues carry the units of the loss per squared parameter, so the axes name the quantity only."""
    runs = [r for r in results if r.hessian is not None and r.hessian.sizes.get("checkpoint", 0)
            and np.isfinite(r.hessian["epoch"].values.astype(float)).any()]  # drawn against epochs: needs some
    if not runs:
        return None
    unit = _loss_unit([r.hessian for r in runs])
    panels = [(v, label, fn) for v, label, fn in (
        ("eigenvalue_largest", f"top eigenvalue λ₁\n({unit} / weight²)", None),
        ("trace", f"trace tr H\n({unit} / weight²)", None),
        ("trace", f"mean eigenvalue tr H / P\n({unit} / weight²)",
         lambda ds, v: v / ds["num_parameters"].values.astype(float)),
    ) if all(v in r.hessian for r in runs) and (fn is None or all("num_parameters" in r.hessian for r in runs))]
    if not panels:
        return None
    fig = _figure(COLUMN_WIDTH, 1.25 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    groups = _by_variant(runs, styles)
    for ax, (variable, label, transform) in zip(axes, panels):
        drawn = []
        for style, group in groups:
            epochs, curves = _aligned(group, variable, transform)
            _mean_band(ax, epochs, curves, style)
            drawn.extend(curves)
        _value_scale(ax, np.concatenate(drawn))
        ax.set_ylabel(label)
    axes[-1].set_xlabel("epoch")
    _figure_legend(fig, [s for s, _ in groups], ncol=2)
    if any(len(group) > 1 for _, group in groups):
        _caption(fig, BAND_CAPTION)
    return fig


def spectral_density(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """The Hessian eigenvalue density at each run's final checkpoint (stochastic Lanczos quadrature with Gaussian
    broadening): one panel per variant with its seeds overlaid, on shared log-scaled density and symmetric-log
    eigenvalue axes."""
    from landscape.summary import final_entry

    sources = {id(r): ds for r in results for ds in (r.hessian, r.hessian_density)
               if ds is not None and "density" in ds and ds.sizes.get("checkpoint", 0)}
    runs = [r for r in results if id(r) in sources]
    if not runs:
        return None
    groups = _by_variant(runs, styles)
    fig, axes = _panel_grid(len(groups), PAGE_WIDTH if len(groups) > 1 else COLUMN_WIDTH, panel_height=1.55)
    peak, linthresh, ends, at_ends = 0.0, [], [], []
    seed_styles = ("-", "--", ":", "-.")
    for ax, (style, group) in zip(axes, groups):
        for i, r in enumerate(group):
            entry, _ = final_entry(sources[id(r)], r.final_step if r.final_step is not None else -1)
            grid, density = entry["density_eigenvalue"].values, entry["density"].values
            keep = np.isfinite(grid) & np.isfinite(density)
            ax.plot(grid[keep], density[keep], color=style.color, linestyle=seed_styles[i % len(seed_styles)],
                    lw=0.8, alpha=0.85, label=f"seed {r.seed}")
            peak = max(peak, float(np.nanmax(density)))
            if "density_linthresh" in entry:
                linthresh.append(float(entry["density_linthresh"]))
            # The extreme quadrature nodes are the outliers' Ritz values (lambda_1 among them): their bumps carry a
            # weight of about 1/P each, far below the bulk's peak, and must stay on the axes.
            nodes = entry["density_nodes"].values.ravel() if "density_nodes" in entry else np.array([])
            nodes = nodes[np.isfinite(nodes)]
            if nodes.size and keep.any():
                ends.extend([float(nodes.min()), float(nodes.max())])
                for node in (nodes.min(), nodes.max()):
                    at_ends.append(float(density[keep][np.argmin(np.abs(grid[keep] - node))]))
        ax.set_title(style.label, color=style.color)
        if len(group) > 1:
            ax.legend(loc="upper right", handlelength=1.6)
    positive = [d for d in at_ends if d > 0]
    floor = max(peak * 1e-12, min([peak * 1e-7] + [0.3 * d for d in positive]))
    threshold = float(np.median(linthresh)) if linthresh else 1.0
    visible = np.concatenate([np.asarray(line.get_xdata())[np.asarray(line.get_ydata()) > floor]
                              for ax in axes for line in ax.get_lines()] + [np.asarray(ends)])
    low, high = float(visible.min()), float(visible.max())
    ncols = min(len(groups), 3)
    for i, ax in enumerate(axes):
        ax.set_yscale("log")
        ax.set_ylim(floor, peak * 3)
        ax.set_xscale("symlog", linthresh=threshold)
        ax.set_xlim(low - 0.1 * abs(low), high + 0.1 * abs(high))
        _symlog_ticks(ax, threshold, max(abs(low), abs(high)))
        if i % ncols == 0:
            ax.set_ylabel("spectral density")
        ax.set_xlabel("eigenvalue λ (symlog)")
    return fig


def _symlog_ticks(ax, linthresh: float, largest: float) -> None:
    """Ticks at 0 and at every other power of ten between the linear threshold and the largest value, both signs
    (the default locator crowds the labels around zero)."""
    top = math.ceil(math.log10(max(largest, linthresh * 10)))
    bottom = math.ceil(math.log10(linthresh))
    powers = list(range(top, bottom - 1, -2))
    ticks = sorted([0.0] + [10.0**k for k in powers] + [-(10.0**k) for k in powers])
    labels = ["0" if t == 0 else ("−" if t < 0 else "") + f"$10^{{{round(math.log10(abs(t)))}}}$" for t in ticks]
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _loss_unit(datasets: Sequence[Any]) -> str:
    """The unit of the loss the figure's results measured: ``nats`` for cross-entropy (every file ``landscape
    analyze`` writes), ``loss`` when any of them measured another loss given through the API (its ``loss``
    variable then carries no unit)."""
    for ds in datasets:
        loss = ds["loss"] if ds is not None and "loss" in ds else None
        if loss is not None and "long_name" in loss.attrs and loss.attrs.get("units") != "nats":
            return "loss"
    return "nats"


# == sharpness ===================================================================================================
def sharpness_vs_rho(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Worst-case and average-case sharpness against the radius ρ at the final checkpoint, plain and adaptive:
    mean over seeds ± standard deviation, log-log.

    Worst case: the largest rise of the loss over the ball ‖δ‖₂ ≤ ρ (plain) or ‖δ/|w|‖₂ ≤ ρ (adaptive). Average:
    the mean rise for δ ~ N(0, ρ²I) (plain) or N(0, ρ² diag(w²)) (adaptive), whose norm is about ρ√P, so it is
    not smaller than the worst case at the same ρ."""
    from landscape.summary import final_entry, still_rising

    kinds = [(attr, title) for attr, title in (("sharpness", "plain: ‖δ‖₂ ≤ ρ"),
                                               ("adaptive_sharpness", "adaptive: ‖δ/|w|‖₂ ≤ ρ"))
             if any(getattr(r, attr) is not None for r in results)]
    if not kinds:
        return None
    unit = _loss_unit([getattr(r, attr) for r in results for attr, _ in kinds])
    measures = [("worst_case", f"worst-case rise ({unit})\nmax over the ball of ρ"),
                ("average_case", f"average rise ({unit})\nδ ~ Gaussian of scale ρ")]
    fig = _figure(COLUMN_WIDTH, 1.45 * len(measures) + 0.9)
    axes = fig.subplots(len(measures), len(kinds), squeeze=False, sharex="col", sharey="row")
    used, plotted, unsettled = [], [[] for _ in measures], False
    for j, (attr, title) in enumerate(kinds):
        runs = [r for r in results if getattr(r, attr) is not None and getattr(r, attr).sizes.get("checkpoint", 0)]
        for style, group in _by_variant(runs, styles):
            entries = [final_entry(getattr(r, attr), r.final_step if r.final_step is not None else -1)[0]
                       for r in group]
            used.append(style)
            for i, (variable, _) in enumerate(measures):
                if not all(variable in e for e in entries):
                    continue
                # seeds measured on other radii are aligned by ρ: each radius is the mean of the seeds that have it
                rho = np.array(sorted({float(v) for e in entries for v in e["rho"].values}))
                stack = np.full((len(entries), len(rho)), np.nan)
                for k, e in enumerate(entries):
                    at = np.searchsorted(rho, e["rho"].values.astype(float))
                    stack[k, at] = e[variable].values
                counts = np.isfinite(stack).sum(axis=0)
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a radius only one seed has: no spread
                    mean = np.nanmean(stack, axis=0)
                    sd = np.where(counts > 1, np.nanstd(stack, axis=0, ddof=1), 0.0)
                axes[i, j].errorbar(rho, mean, yerr=sd, color=style.color, linestyle=style.linestyle,
                                    marker=style.marker, markersize=2.8, capsize=1.5, elinewidth=0.6)
                plotted[i].append(mean)
                if variable == "worst_case":
                    rising = np.zeros(len(rho), dtype=bool)  # any seed's search still rising at that radius
                    for e in entries:
                        rising[np.searchsorted(rho, e["rho"].values.astype(float))] |= still_rising(e)
                    if rising.any():
                        axes[i, j].plot(rho[rising], mean[rising], linestyle="none", marker=style.marker,
                                        markersize=4.2, markerfacecolor="white", markeredgecolor=style.color,
                                        markeredgewidth=0.9, zorder=3)
                        unsettled = True
        axes[0, j].set_title(title)
        axes[-1, j].set_xlabel("radius ρ" + (" (units of |w|)" if attr == "adaptive_sharpness" else " (weight units)"))
        rhos = sorted({float(v) for r in runs for v in getattr(r, attr)["rho"].values})
        for i in range(len(measures)):
            axes[i, j].set_xscale("log")
        if rhos:
            axes[-1, j].set_xticks(rhos, [f"{v:g}" for v in rhos])
            axes[-1, j].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for i, (_, label) in enumerate(measures):
        values = np.concatenate(plotted[i]) if plotted[i] else np.array([])
        values = values[np.isfinite(values)]
        if values.size and (values <= 0).any():  # a log axis would drop them without a trace: symmetric log
            smallest = np.abs(values[values != 0]).min() if (values != 0).any() else 1e-6
            axes[i, 0].set_yscale("symlog", linthresh=10.0 ** np.floor(np.log10(smallest)))  # linear within a decade
            for ax in axes[i]:
                ax.axhline(0.0, color="0.6", linewidth=0.5, zorder=0)
            label += "\n(symlog axis: some ≤ 0)"
        elif values.size:
            axes[i, 0].set_yscale("log")
            if values.max() / values.min() < 30:
                _readable_log_ticks(axes[i, 0].yaxis)
        axes[i, 0].set_ylabel(label)
    unique = {s.label: s for s in used}
    _figure_legend(fig, unique.values(), ncol=3)
    _caption(fig, "markers: mean over the seeds measured at that ρ; bars: ± 1 standard deviation" + (
        "\nhollow: a worst-case search still rising at its last step (a lower bound; raise --steps)"
        if unsettled else ""))
    if unsettled:  # the caption's lines come out of the panels' height otherwise
        fig.set_figheight(fig.get_figheight() + 0.35)
    return fig


# == surfaces ====================================================================================================
def _final_surface(r: RunResults, name: str):
    from landscape.summary import final_entry

    ds = r.surfaces.get(name)
    if ds is None or not ds.sizes.get("checkpoint", 0):
        return None
    return final_entry(ds, r.final_step if r.final_step is not None else -1)[0]


def surface_1d(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """The loss along one filter-normalised random direction through each run's final weights, one line per run.
    One direction unit moves every filter by its own norm (Li et al. 2018)."""
    runs = [(r, e) for r in results if (e := _final_surface(r, "surface-random-1d")) is not None]
    if not runs:
        return None
    fig = _figure(COLUMN_WIDTH, 2.5)
    ax = fig.subplots()
    groups = _by_variant([r for r, _ in runs], styles)
    entries = {id(r): e for r, e in runs}
    positions, finite, missing = [], [], []
    for style, group in groups:
        for r in group:
            e = entries[id(r)]
            a, loss = np.asarray(e["a"].values, dtype=float), np.asarray(e["loss"].values, dtype=float)
            good = np.isfinite(loss) & (loss > 0)
            _line(ax, a, np.where(good, loss, np.nan), style)
            positions.append(a)
            finite.append(loss[good])
            missing.append((style, a[~good]))
    ax.set_yscale("log")
    values = np.concatenate(finite) if finite else np.zeros(0)
    if values.size and values.max() / values.min() < 30:  # within a decade or so: plain numbers at 1, 2, 5
        _readable_log_ticks(ax.yaxis)
    every = np.concatenate(positions)
    if every.size:  # the whole slice measured, also where the loss was not finite at its ends
        ax.set_xlim(float(every.min()), float(every.max()))
    if any(a.size for _, a in missing):  # where the loss was infinite, NaN or zero: marked on the top edge
        for style, a in missing:
            ax.plot(a, np.full(a.size, 0.97), transform=ax.get_xaxis_transform(), linestyle="none", marker="x",
                    markersize=4, color=style.color, clip_on=False)
        _caption(fig, "x on the top edge: the loss there is infinite, NaN or zero (off the log scale)")
    ax.set_xlabel("position along a filter-normalised random direction\n(direction units; 0 = final weights)")
    ax.set_ylabel(f"{_surface_loss_label([e for _, e in runs])} ({_loss_unit([e for _, e in runs])})")
    _figure_legend(fig, [s for s, _ in groups], markers=False)
    return fig


def _surface_loss_label(datasets: Sequence[Any]) -> str:
    """``training-subset loss`` (or ``validation-subset``) for surfaces of a run's examples (``landscape analyze
    surface``, which records its data and split), ``loss`` for those of data given through the API, which may be
    any split."""
    import json

    splits = set()
    for ds in datasets:
        try:
            splits.add(json.loads(ds.attrs["settings"]).get("split") if "data" in ds.attrs else None)
        except (KeyError, TypeError, ValueError):
            splits.add(None)
    split = splits.pop() if len(splits) == 1 else None
    return {"train": "training-subset loss", "val": "validation-subset loss"}.get(split, "loss")


def _line(ax, x, y, style: VariantStyle, **kwargs) -> None:
    """A run's curve; with its marker where a point has no finite neighbour to join (a run of one checkpoint),
    which a line alone would leave invisible."""
    y = np.asarray(y, dtype=float)
    good = np.isfinite(y)
    alone = good & ~np.r_[False, good[:-1]] & ~np.r_[good[1:], False]
    ax.plot(x, y, color=style.color, linestyle=style.linestyle, lw=kwargs.pop("lw", 0.9),
            alpha=kwargs.pop("alpha", 0.85), **kwargs)
    if alone.any():
        ax.plot(np.asarray(x)[alone], y[alone], linestyle="none", marker=style.marker, markersize=3.5,
                color=style.color)


def _planes(results: Sequence[RunResults], styles) -> list[tuple[VariantStyle, Any]]:
    """The 2D surface of the first seed of each variant that has one."""
    out = []
    for style, group in _by_variant(results, styles):
        for r in group:
            e = _final_surface(r, "surface-random-2d")
            if e is not None:  # one seed of the variant, named in the panel's title
                seed = f" (seed {r.seed})" if len(group) > 1 and r.seed is not None else ""
                out.append((dataclasses.replace(style, label=style.label + seed), e))
                break
    return out


def _panel_grid(count: int, width: float, *, panel_height: float, projection: str | None = None):
    ncols = min(count, 3)
    nrows = math.ceil(count / ncols)
    if ncols == 1:  # one panel: a column wide, not a page with the panel in a corner
        width = min(width, COLUMN_WIDTH)
    if projection is None:
        fig = _figure(width, panel_height * nrows + 0.5)
        return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(count)]
    # The constrained layout does not know the extent of 3D axes labels: place the panels by hand, with room above
    # each for its title.
    fig = Figure(figsize=(width, panel_height * nrows + 0.4))
    fig.subplots_adjust(left=0.0, right=0.94, bottom=0.02, top=0.9, wspace=0.12, hspace=0.2)
    return fig, [fig.add_subplot(nrows, ncols, i + 1, projection=projection) for i in range(count)]


def _log_levels(planes) -> np.ndarray:
    """Twelve logarithmic levels from the smallest to the largest finite positive loss of the planes (an infinite
    point is clipped to the top, a NaN or zero one left blank or at the bottom, never a level)."""
    finite = [v[np.isfinite(v) & (v > 0)] for v in (np.asarray(e["loss"].values, dtype=float) for _, e in planes)]
    finite = [v for v in finite if v.size]
    if not finite:  # nothing positive and finite to place levels on
        return np.geomspace(1e-4, 1e-3, 12)
    low = min(float(v.min()) for v in finite)  # the data's own minimum: a floor would hide a well-fitted basin
    high = max(float(v.max()) for v in finite)
    return np.geomspace(low, max(high, low * 1.01), 12)


def distinct_labels(values: Sequence[float]) -> list[str]:
    """Tick labels with the fewest significant digits (2 to 6) that tell every value apart: levels spread over a
    narrow range (2.20 to 2.45) would otherwise read 2.2, 2.2, 2.3, 2.3."""
    for digits in range(2, 7):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def surface_2d(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Contours of the loss on a plane of two filter-normalised random directions through the final weights
    (first seed of each variant), with the same logarithmic levels in every panel."""
    from matplotlib.colors import LogNorm

    planes = _planes(results, styles)
    if not planes:
        return None
    fig, axes = _panel_grid(len(planes), PAGE_WIDTH, panel_height=2.0)
    levels = _log_levels(planes)
    norm = LogNorm(levels[0], levels[-1])
    filled = None
    for ax, (style, e) in zip(axes, planes):
        a, b, loss = e["a"].values, e["b"].values, e["loss"].values
        filled = ax.contourf(a, b, np.clip(loss.T, levels[0], levels[-1]), levels=levels, norm=norm, cmap="viridis")
        ax.contour(a, b, loss.T, levels=levels, colors="white", linewidths=0.3, alpha=0.6)
        ax.plot([0], [0], marker="x", color="white", markersize=4)
        ax.set_title(style.label, color=style.color if style.color != "#000000" else "black")
        ax.set_aspect("equal")
        ax.grid(False)
        ax.set_xlabel("direction 1 (units)")
        ax.set_ylabel("direction 2 (units)")
    if filled is not None:
        bar = fig.colorbar(filled, ax=axes, shrink=0.9, pad=0.02, ticks=levels[::2])
        bar.ax.set_yticklabels(distinct_labels(levels[::2]))
        bar.ax.minorticks_off()
        bar.set_label(f"{_surface_loss_label([e for _, e in planes])} ({_loss_unit([e for _, e in planes])}, log scale)")
    return fig


def surface_3d(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """The planes of :func:`surface_2d` as surfaces: height is log₁₀ of the loss in nats, the same axes in every
    panel; directions in filter-normalised units."""
    planes = _planes(results, styles)
    if not planes:
        return None
    fig, axes = _panel_grid(len(planes), PAGE_WIDTH, panel_height=2.2, projection="3d")
    levels = _log_levels(planes)
    low, high = np.log10(levels[0]), np.log10(levels[-1])
    for ax, (style, e) in zip(axes, planes):
        a, b = np.meshgrid(e["a"].values, e["b"].values, indexing="ij")
        z = np.log10(np.clip(e["loss"].values, levels[0], levels[-1]))
        ax.plot_surface(a, b, z, cmap="viridis", vmin=low, vmax=high, linewidth=0, antialiased=True, alpha=0.95)
        ax.set_zlim(low, high)
        ax.set_title(style.label, color=style.color if style.color != "#000000" else "black")
        ax.set_xlabel("direction 1", labelpad=-6)
        ax.set_ylabel("direction 2", labelpad=-6)
        ax.set_zlabel("log₁₀(loss / nats)" if _loss_unit([e]) == "nats" else "log₁₀ loss", labelpad=-4)
        ax.tick_params(labelsize=7, pad=-3)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
        ax.view_init(elev=28, azim=-55)
        ax.set_box_aspect(None, zoom=0.78)
    return fig


# == flatness against the dynamics ===============================================================================
def _flatness_scatter(results: Sequence[RunResults], styles: dict[str, VariantStyle], response: str,
                      ylabel: str) -> Figure | None:
    from landscape.statistics import rank_correlation
    from landscape.summary import FLAG_REPARAMETERISATION, FLAG_SIZE, final_measures

    table, measures = final_measures(results)
    measures = [m for m in measures if table[m.name].notna().any()]
    if not measures or table[response].isna().all():
        return None
    ncols = min(3, len(measures))
    nrows = math.ceil(len(measures) / ncols)
    fig = _figure(PAGE_WIDTH, 1.75 * nrows + 0.55)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for ax, m in zip(axes.flat, measures):
        for _, row in table.iterrows():
            style = styles[row["variant"]]
            ax.plot(row[m.name], row[response], linestyle="none", marker=style.marker, color=style.color,
                    markersize=3.5, alpha=0.9)
        c = rank_correlation(table[m.name], table[response],
                             predicted="positive" if m.smaller_is_flatter else "negative")
        interval = f", 95% [{c.low:+.2f}, {c.high:+.2f}]" if math.isfinite(c.low) else ""
        title = f"r_s = {c.rho:+.2f}{interval}, n = {c.n}" if math.isfinite(c.rho) else f"n = {c.n}"
        ax.set_title(title, fontsize=7)
        ax.set_xlabel(_measure_axis_label(m, m.flags), fontsize=7)
        values = table[m.name].to_numpy(float)
        if np.all(values[np.isfinite(values)] > 0) and np.nanmax(values) / np.nanmin(values) > 20:
            ax.set_xscale("log")
    for row_axes in axes:
        row_axes[0].set_ylabel(ylabel)
    for ax in list(axes.flat)[len(measures):]:
        ax.set_visible(False)
    finite = table[response].notna() & table[[m.name for m in measures]].notna().any(axis=1)
    shown = set(table.loc[finite, "variant"])  # a variant without a point would be a legend entry for nothing
    _figure_legend(fig, [s for key, s in styles.items() if key in shown], lines=False, ncol=5)
    fig.text(0.5, 0.0, f"{FLAG_REPARAMETERISATION} changes under reparameterisation;  {FLAG_SIZE} grows with the "
             "parameter count (not comparable between model sizes).\nr_s: Spearman rank correlation over the runs, "
             "with its 95% interval (Fisher z).", ha="center", va="bottom", fontsize=7)
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    return fig


EIGENVALUE_MEASURES = ("top_eigenvalue", "trace", "trace_per_parameter")
"""Measures made of Hessian eigenvalues: units of loss per squared parameter, so their axes carry no unit."""


def _measure_axis_label(m, flags: str = "") -> str:
    """The measure's name (wrapped to fit a panel), then its units unless it is made of Hessian eigenvalues."""
    import textwrap

    units = "" if m.name in EIGENVALUE_MEASURES or not m.units else m.units
    flatter = "larger is flatter" if not m.smaller_is_flatter else ""
    detail = "; ".join(part for part in (units, flatter) if part)
    return textwrap.fill(m.label + flags, 34) + (f"\n({detail})" if detail else "")


def flatness_vs_drop(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Each flatness measure at the final checkpoint against the peak-to-final drop of top-1, one point per run,
    with Spearman's r_s and its 95% interval (Fisher z). † changes under reparameterisation, ‡ grows with the
    parameter count."""
    return _flatness_scatter(results, styles, "drop", "peak-to-final drop of\nraw top-1 (points)")


def flatness_vs_gap(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Each flatness measure at the final checkpoint against the final generalisation gap, one point per run."""
    return _flatness_scatter(results, styles, "gap", "generalisation gap\n(nats)")

# == the gallery =================================================================================================
def per_batch_eigenvalues(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """The distribution over mini-batches of the top eigenvalue at each run's final checkpoint (``landscape analyze
    hessian --per-batch N``; Park & Kim 2022): one box and its points per run, runs grouped by variant, log scale."""
    from landscape.summary import final_entry

    rows = []
    for style, group in _by_variant(results, styles):
        for r in group:
            found = r.find("hessian", lambda s: bool(s.get("per_batch")))
            if found is None or not found.dataset.sizes.get("checkpoint", 0):
                continue
            entry = final_entry(found.dataset, r.final_step if r.final_step is not None else -1)[0]
            values = np.asarray(entry["eigenvalue_per_batch"].values, dtype=float)
            rows.append((style, f"{style.label}\nseed {r.seed}", values[np.isfinite(values)], found.settings))
    if not rows:
        return None
    fig = _figure(COLUMN_WIDTH, 2.6)
    ax = fig.subplots()
    for i, (style, _, values, _) in enumerate(rows):
        ax.boxplot([values], positions=[i], widths=0.5, showfliers=False, medianprops={"color": style.color})
        jitter = np.random.default_rng(i).uniform(-0.12, 0.12, len(values))
        ax.scatter(i + jitter, values, s=6, color=style.color, alpha=0.6, linewidths=0)
    ax.set_xticks(range(len(rows)), [label for _, label, _, _ in rows])
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_yscale("log")
    settings = rows[0][3]
    matrix = {"ggn": "GGN", "fisher": "Fisher", "empirical-fisher": "empirical Fisher"}.get(
        settings.get("matrix"), "Hessian")
    ax.set_ylabel(f"top {matrix} eigenvalue λ₁\nper batch of {settings.get('per_batch')}")
    ax.set_xlabel("run (variant, seed)")
    return fig


# == curvature through training: where it sits, the edge of stability, the top subspace ============================
def _hessian_with(r: RunResults, variable: str):
    """The run's hessian results that hold ``variable`` (the one with the most checkpoints), or None."""
    found = [x for x in r.results if x.kind == "hessian" and x.weights == r.weights and x.params is None
             and variable in x.dataset and x.dataset.sizes.get("checkpoint", 0)]
    return max(found, key=lambda x: x.dataset.sizes["checkpoint"]).dataset if found else None


def _epoch_curves(group: list[RunResults], variable: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """``variable`` of each run of one variant on the union of their epochs (NaN where missing)."""
    return _on_union([_per_epoch(ds, variable) for ds in (_hessian_with(r, variable) for r in group)
                      if ds is not None])


def block_curvature(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """Where the curvature sits (``analyze hessian --per-block``): parameter groups x epochs, one panel per variant
    (its first seed); top row the largest eigenvalue of each group's restricted Hessian (log colour scale), bottom
    row, where the trace was measured, each group's share of the whole-model trace (%)."""
    from matplotlib.colors import LogNorm

    panels = []
    for style, group in _by_variant(results, styles):
        for r in group:
            ds = _hessian_with(r, "group_num_parameters")
            if ds is not None:
                panels.append((style, r, ds.isel(checkpoint=np.flatnonzero(np.isfinite(ds["epoch"].values)))))
                break
    if not panels:
        return None
    rows = [(v, label) for v, label in (("block_eigenvalue_largest",
                                         f"top eigenvalue of H_gg\n({_loss_unit([d for _, _, d in panels])} / weight²)"),
                                        ("block_trace", "share of tr H (%)\n(blank: tr H ≤ 2 s.e.)"))
            if all(v in ds for _, _, ds in panels)]
    if not rows:
        return None
    groups = max(ds.sizes["group"] for _, _, ds in panels)
    fig = _figure(PAGE_WIDTH if len(panels) > 1 else COLUMN_WIDTH, len(rows) * (1.0 + 0.14 * groups) + 0.3)
    axes = fig.subplots(len(rows), len(panels), squeeze=False)
    for row, (variable, label) in enumerate(rows):
        matrices = []
        for _, _, ds in panels:
            values = ds[variable].transpose("group", "checkpoint").values.astype(float)
            if variable == "block_trace":  # a share of a trace indistinguishable from 0 (or negative) is noise
                trace = ds["trace"].values.astype(float)
                se = (ds["trace_standard_error"].values.astype(float) if "trace_standard_error" in ds
                      else np.zeros_like(trace))
                trace = np.where((trace > 0) & (trace > 2 * se), trace, np.nan)
                values = 100 * values / trace[None, :]
            matrices.append(values)
        finite = np.concatenate([m[np.isfinite(m)].ravel() for m in matrices]) if matrices else np.zeros(0)
        log = variable == "block_eigenvalue_largest" and finite.size and (finite > 0).all()
        norm = LogNorm(finite.min(), finite.max()) if log and finite.size else None
        vmin, vmax = (None, None) if norm is not None or not finite.size else (finite.min(), finite.max())
        image = None
        for col, ((style, r, ds), values) in enumerate(zip(panels, matrices)):
            ax = axes[row, col]
            image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm,
                              vmin=vmin, vmax=vmax)
            epochs = ds["epoch"].values.astype(int)
            ticks = np.unique(np.linspace(0, len(epochs) - 1, min(len(epochs), 6)).astype(int))
            ax.set_xticks(ticks, [str(epochs[t]) for t in ticks])
            ax.set_yticks(range(ds.sizes["group"]), [str(g) for g in ds["group"].values])
            ax.grid(False)
            if row == 0:
                ax.set_title(f"{style.label} (seed {r.seed})")
            ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel("parameter group")
        if image is not None:
            fig.colorbar(image, ax=list(axes[row]), label=label, shrink=0.9)
    return fig


def edge_of_stability(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """The sharpness the optimizer sees against its stability threshold (``analyze hessian --preconditioned``):
    Adam's preconditioned sharpness (SGD's raw top eigenvalue) as a line per variant (mean over seeds, band from the
    lowest to the highest), the threshold (38/lr for Adam with beta1 = 0.9, 2/lr for plain SGD) dashed in the same
    colour, and below the learning-rate schedule from metrics.csv."""
    runs = [r for r in results if _hessian_with(r, "preconditioned_sharpness") is not None]
    if not runs:
        return None
    fig = _figure(COLUMN_WIDTH, 3.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    groups = _by_variant(runs, styles)
    for style, group in groups:
        epochs, curves = _epoch_curves(group, "preconditioned_sharpness")
        if curves:
            _mean_band(top, epochs, curves, style)
        epochs, thresholds = _epoch_curves(group, "stability_threshold")
        if thresholds:
            with np.errstate(all="ignore"):
                top.plot(epochs, np.nanmean(np.vstack(thresholds), axis=0), color=style.color, linestyle="--",
                         linewidth=0.8)
        metrics = group[0].run.read_metrics()
        if "lr" in metrics and len(metrics):
            bottom.plot(metrics["epoch"].values, metrics["lr"].values, color=style.color, linestyle=style.linestyle)
    top.set_yscale("log")
    top.set_ylabel("preconditioned sharpness\n(dashed: threshold)")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("epoch")
    _figure_legend(fig, [s for s, _ in groups])
    if any(len(group) > 1 for _, group in groups):
        _caption(fig, BAND_CAPTION)
    return fig


def subspace_dynamics(results: Sequence[RunResults], styles: dict[str, VariantStyle]) -> Figure | None:
    """How the top Hessian subspace moves (``analyze hessian --save-eigenvectors``): the overlap
    ||V_prev V^T||_F^2 / k of the top-k eigenvectors with the previous checkpoint's, and the fraction of the squared
    gradient norm in their span (Gur-Ari et al. 2018), against epoch; mean over seeds with the band of the seeds."""
    panels = [(v, label) for v, label in (("top_subspace_overlap", "top-k overlap with\nprevious checkpoint"),
                                          ("gradient_top_subspace_fraction", "gradient fraction\nin top-k subspace"))
              if any(_hessian_with(r, v) is not None for r in results)]
    if not panels:
        return None
    fig = _figure(COLUMN_WIDTH, 1.25 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    groups = _by_variant([r for r in results if any(_hessian_with(r, v) is not None for v, _ in panels)], styles)
    for ax, (variable, label) in zip(axes, panels):
        for style, group in groups:
            epochs, curves = _epoch_curves(group, variable)
            if curves:
                _mean_band(ax, epochs, curves, style)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(label)
    axes[-1].set_xlabel("epoch")
    _figure_legend(fig, [s for s, _ in groups])
    ks = sorted({int(h.sizes["k"]) for _, group in groups for r in group
                 for h in [_hessian_with(r, panels[0][0])] if h is not None and "k" in h.sizes})
    k = f"k = {', '.join(map(str, ks))} eigenvectors" if ks else ""
    _caption(fig, "; ".join(t for t in (k, BAND_CAPTION if any(len(g) > 1 for _, g in groups) else "") if t))
    return fig


FIGURES: dict[str, Callable[[Sequence[RunResults], dict[str, VariantStyle]], Figure | None]] = {
    "per_batch_eigenvalues": per_batch_eigenvalues,
    "accuracy_curves": accuracy_curves,
    "peak_to_final_drop": peak_to_final_drop,
    "drop_from_best": drop_from_best,
    "generalization_gap": generalization_gap,
    "hessian_vs_epoch": hessian_vs_epoch,
    "spectral_density": spectral_density,
    "sharpness_vs_rho": sharpness_vs_rho,
    "surface_1d": surface_1d,
    "surface_2d": surface_2d,
    "surface_3d": surface_3d,
    "flatness_vs_drop": flatness_vs_drop,
    "flatness_vs_gap": flatness_vs_gap,
    "block_curvature": block_curvature,
    "edge_of_stability": edge_of_stability,
    "subspace_dynamics": subspace_dynamics,
}


FIGURE_NEEDS: dict[str, str] = {
    "per_batch_eigenvalues": "landscape analyze hessian --per-batch N",
    "accuracy_curves": "a validation top-1 in metrics.csv (landscape train)",
    "peak_to_final_drop": "a validation top-1 in metrics.csv (landscape train)",
    "drop_from_best": "a validation top-1 in metrics.csv (landscape train)",
    "generalization_gap": "training and validation losses in metrics.csv (landscape train)",
    "hessian_vs_epoch": "landscape analyze hessian --top-k 1 --trace",
    "spectral_density": "landscape analyze hessian --density",
    "sharpness_vs_rho": "landscape analyze sharpness",
    "surface_1d": "landscape analyze surface --dims 1",
    "surface_2d": "landscape analyze surface --dims 2",
    "surface_3d": "landscape analyze surface --dims 2",
    "flatness_vs_drop": "a flatness measure (analyze hessian, sharpness or surface) and a top-1 drop",
    "flatness_vs_gap": "a flatness measure (analyze hessian, sharpness or surface) and a generalisation gap",
    "block_curvature": "landscape analyze hessian --per-block",
    "edge_of_stability": "landscape analyze hessian --preconditioned",
    "subspace_dynamics": "landscape analyze hessian --save-eigenvectors",
}
"""What each figure of :data:`FIGURES` draws from, said when a figure is left out for want of it."""


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` to ``path`` (format from the extension), atomically."""
    from landscape.io import atomic_write

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    with matplotlib.rc_context(STYLE):
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))
    return path


def write_figures(results: Sequence[RunResults], out_dir: str | os.PathLike, *,
                  formats: Sequence[str] = FORMATS, names: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Draw every figure of :data:`FIGURES` (or only ``names``) that the results support into ``out_dir``.

    Returns ``{figure name: [paths written]}``; a figure whose results are missing is left out.
    """
    unknown = sorted(set(names or ()) - set(FIGURES))
    if unknown:
        raise LandscapeError(f"Unknown figure {unknown[0]!r}; accepted are {', '.join(FIGURES)}.")
    out_dir = Path(out_dir)
    styles = variant_styles(results)
    written: dict[str, list[Path]] = {}
    for name in names or FIGURES:
        with matplotlib.rc_context(STYLE):
            fig = FIGURES[name](results, styles)
        if fig is None:
            continue
        written[name] = [save_figure(fig, out_dir / f"{name}.{fmt}") for fmt in formats]
    return written
