"""Figures of the role-of-SE analysis (paper Figs. 6 and 7), from `ablations.report.blockstats` statistics.

Made without pyplot (no global state, no GUI backend), saved as PNG and PDF without dates in them.
Blocks are named as in the paper, SE_<stage>_<block>.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

from ablations.report.blockstats import BlockStats, ExcitationStats
from ablations.report.plots import FORMATS, save_figure

MAX_CHANNELS = 64  # Fig. 6 shows a sample of channels; more than 64 lines' worth of x is unreadable
MAX_CLASSES = 10  # more class curves than tab10 has colours cannot be told apart
WIDTH = 12.0  # inches
GATE_FLOOR = {"sigmoid": 0.0, "hardsigmoid": 0.0, "relu": 0.0, "tanh": -1.0}  # the lowest value each gate outputs


def figure_blocks(stats: ExcitationStats) -> list[BlockStats]:
    """The paper's choice: the last SE block of each stage, and every block of the last stage."""
    last_stage = max(b.stage for b in stats.blocks)
    last_of_stage = {b.stage: b.name for b in stats.blocks}  # forward order: the last one wins
    keep = {b.name for b in stats.blocks if b.stage == last_stage} | set(last_of_stage.values())
    return [b for b in stats.blocks if b.name in keep]


def shown_channels(channels: int) -> np.ndarray:
    """The first MAX_CHANNELS channel indices: channels have no order, so any fixed sample serves."""
    return np.arange(min(channels, MAX_CHANNELS))


def shown_classes(n_classes: int) -> np.ndarray:
    """All classes up to MAX_CLASSES, else MAX_CLASSES evenly spaced class indices."""
    if n_classes <= MAX_CLASSES:
        return np.arange(n_classes)
    return np.unique(np.linspace(0, n_classes - 1, MAX_CLASSES).round().astype(int))


def _stage_colour(stage: int) -> tuple:
    return matplotlib.colormaps["tab10"](stage % 10)


def _panels(n: int, height: float) -> tuple[Figure, list[Axes]]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(WIDTH, height * nrows + 1.2), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.remove()  # empty slots of the grid
    for i, ax in enumerate(axes[:n]):
        if i + ncols >= n:  # the lowest panel of its column; a figure-wide label would collide with the legend
            ax.set_xlabel("channel index")
    return fig, axes[:n]


def _channel_note(b: BlockStats) -> str:
    shown = len(shown_channels(b.channels))
    return f"{b.label} ({b.channels} channels" + (")" if shown == b.channels else f", 0-{shown - 1} shown)")


def _bounded_ylim(ax: Axes, bound: float | None, low: float, high: float) -> None:
    if bound is not None:  # bounded gate: show its whole range up to the bound, as the paper does
        ax.set_ylim(min(0.0, low) - 0.02 * bound, max(1.04 * bound, high + 0.02 * bound))


def _channel_axis(ax: Axes, channels: np.ndarray) -> None:
    ax.set_xlim(channels[0] - 0.5, channels[-1] + 0.5)
    step = 8 if len(channels) > 16 else 2
    ax.set_xticks(channels[::step])
    ax.grid(alpha=0.3, linewidth=0.5)


def class_means_figure(stats: ExcitationStats, title: str) -> Figure:
    """Fig. 6: mean excitation of each channel per class, against the mean over all classes."""
    blocks = figure_blocks(stats)
    classes = shown_classes(len(stats.classes))
    fig, axes = _panels(len(blocks), 2.8)
    cmap = matplotlib.colormaps["tab10"]
    for ax, b in zip(axes, blocks):
        ch = shown_channels(b.channels)
        for colour, k in enumerate(classes):
            ax.plot(ch, b.class_mean[k, ch], color=cmap(colour), linewidth=0.9, alpha=0.85, label=stats.classes[k])
        ax.plot(ch, b.all_mean[ch], color="black", linewidth=2.2, label="all classes")
        ax.set_title(_channel_note(b), fontsize=10)
        _channel_axis(ax, ch)
        shown = b.class_mean[np.ix_(classes, ch)]
        _bounded_ylim(ax, stats.bound, float(np.nanmin(shown)), float(np.nanmax(shown)))
    fig.supylabel(f"mean excitation ({stats.gate})")
    which = "" if len(classes) == len(stats.classes) else f"; {len(classes)} of {len(stats.classes)} classes (evenly spaced indices)"
    _suptitle(fig, f"{title}\nMean excitation per class (colours) and over all classes (black); "
                   f"channels: the first {MAX_CHANNELS} indices of each block (all if fewer){which}{_spatial_note(stats)}")
    _bottom_legend(fig, axes[0])
    return fig


def _suptitle(fig: Figure, text: str, fontsize: float = 11) -> None:
    """The figure's title, each line wrapped to the figure's width (a long study label would be cut
    off at both edges: the title is centred)."""
    per_line = max(40, int(fig.get_figwidth() * 72 / (fontsize * 0.6)))  # ~0.6 em per character
    fig.suptitle("\n".join(textwrap.fill(line, per_line) for line in text.split("\n")), fontsize=fontsize)


def _bottom_legend(fig: Figure, ax: Axes) -> None:
    # below the panels: at the upper right it collides with a long two-line suptitle
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=9, frameon=False)


def _spatial_note(stats: ExcitationStats) -> str:
    return "\nsqueeze=none: each image's excitation map is averaged over positions first" if stats.spatial else ""


def within_class_figure(stats: ExcitationStats, title: str, class_index: int = 0) -> Figure:
    """Fig. 7: mean +/- one standard deviation of each channel's excitation within one class."""
    blocks = figure_blocks(stats)
    fig, axes = _panels(len(blocks), 2.8)
    name = stats.classes[class_index]
    n = int(blocks[0].counts[class_index])
    for ax, b in zip(axes, blocks):
        ch = shown_channels(b.channels)
        mean, std = b.class_mean[class_index, ch], b.class_std[class_index, ch]
        ax.fill_between(ch, mean - std, mean + std, color="tab:blue", alpha=0.25, linewidth=0, label="mean ± 1 std")
        ax.plot(ch, mean, color="tab:blue", linewidth=1.4, label=f"mean of '{name}'")
        ax.plot(ch, b.all_mean[ch], color="0.3", linewidth=1.0, linestyle="--", label="mean of all classes")
        ax.set_title(_channel_note(b), fontsize=10)
        _channel_axis(ax, ch)
        _bounded_ylim(ax, stats.bound, float(np.nanmin(mean - std)), float(np.nanmax(mean + std)))
    fig.supylabel(f"excitation ({stats.gate})")
    _suptitle(fig, f"{title}\nExcitation within class '{name}' ({n} images): mean ± 1 std (population) per channel; "
                   f"channels: the first {MAX_CHANNELS} indices (all if fewer){_spatial_note(stats)}")
    _bottom_legend(fig, axes[0])
    return fig


def _depth_axis(ax: Axes, table: pd.DataFrame) -> None:
    every = max(1, math.ceil(len(table) / 24))  # at most ~24 labels stay readable
    depth = table["depth"].to_numpy()
    ax.set_xticks(depth[::every], table["block"].to_numpy()[::every],
                  rotation=45 if len(table) > 8 else 0, ha="right" if len(table) > 8 else "center")
    ax.set_xticks(depth, minor=True)  # every block keeps a tick, labelled or not
    ax.set_xlim(0.4, len(table) + 0.6)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)


def _stage_legend(ax: Axes, table: pd.DataFrame, bars: bool) -> None:
    stages = sorted(table["stage"].unique())
    if bars:
        handles = [Patch(color=_stage_colour(s), label=f"stage {s}") for s in stages]
    else:
        handles = [Line2D([], [], color=_stage_colour(s), marker="o", linestyle="", label=f"stage {s}") for s in stages]
    handles += ax.get_legend_handles_labels()[0]  # e.g. the chance level
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)


SPECIFICITY_DEFINITION = (
    "class-specificity = mean over channels c of B_c / T_c, where B_c = Σ_k (n_k/N)(μ_kc − μ_c)² is the variance of the "
    "class means and T_c = (1/N) Σ_i (s_ic − μ_c)² the total variance of channel c's excitation over the N test images "
    "(0: class-agnostic, 1: fully class-determined)"
)


def specificity_figure(table: pd.DataFrame, title: str) -> Figure:
    """Class-specificity score of every SE block against depth, with its chance level."""
    fig = Figure(figsize=(WIDTH * 0.75, 4.8), layout="constrained")
    ax = fig.subplots()
    x, y = table["depth"].to_numpy(), table["class_specificity"].to_numpy()
    ax.plot(x, y, color="0.6", linewidth=1, zorder=1)
    ax.scatter(x, y, c=[_stage_colour(s) for s in table["stage"]], s=40, zorder=2)
    chance = float(table["chance_specificity"].iloc[0])
    # in the legend, not on the axes: a label on the line would sit on the points of a deep network
    ax.axhline(chance, color="0.3", linestyle="--", linewidth=1, label=f"chance level\n(K−1)/(N−1) = {chance:.3f}")
    ax.set_ylim(0, max(1.1 * np.nanmax(y), 1.6 * chance, 0.05))
    _depth_axis(ax, table)
    ax.set_xlabel("SE block (forward order)")
    ax.set_ylabel("class-specificity (between-class share of variance)")
    ax.set_title("\n".join(textwrap.wrap(SPECIFICITY_DEFINITION, 120)), fontsize=8, loc="left")
    _stage_legend(ax, table, bars=False)
    _suptitle(fig, title)
    return fig


def saturation_figure(table: pd.DataFrame, title: str, bound: float | None, level: float) -> Figure:
    """Per block: the fraction of saturated excitations (top) and the mean excitation ± std (bottom).
    `level`: a value counts as saturated above level x bound (blockstats.SATURATION_LEVEL)."""
    fig = Figure(figsize=(WIDTH * 0.75, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = table["depth"].to_numpy()
    colours = [_stage_colour(s) for s in table["stage"]]
    gate = str(table["gate"].iloc[0])
    if bound is None:
        top.text(0.5, 0.5, f"not defined: the {gate} gate has no upper bound", transform=top.transAxes,
                 ha="center", va="center")
        top.set_yticks([])
        top.set_ylabel("saturated fraction")
        top.set_title(f"Saturated excitations ({gate} gate)", fontsize=10, loc="left")
    else:
        bars = top.bar(x, table["saturated_fraction"].to_numpy(), color=colours, width=0.7)
        if len(table) <= 24:  # small shares are invisible on a 0-100% axis: print them
            top.bar_label(bars, labels=[f"{v:.1%}" for v in table["saturated_fraction"]], fontsize=7, padding=2)
        top.set_ylim(0, 1)
        top.yaxis.set_major_formatter(PercentFormatter(1.0))
        top.set_ylabel(f"share of values > {level * bound:g}")
        top.set_title(f"Saturated excitations: share of (image, channel) values above {level:g} × the "
                      f"{gate} gate's upper bound ({bound:g})", fontsize=10, loc="left")
    top.grid(axis="y", alpha=0.3, linewidth=0.5)
    _stage_legend(top, table, bars=True)
    mean, std = table["mean_activation"].to_numpy(), table["std_activation"].to_numpy()
    floor = GATE_FLOOR.get(gate, -np.inf)
    lower = np.minimum(std, mean - floor)  # a symmetric bar would reach below what the gate can output
    bottom.errorbar(x, mean, yerr=[lower, std], fmt="none", ecolor="0.5", capsize=3, linewidth=1)
    if bound is None and float((mean + std).max()) > 100:  # an unbounded gate far above 1: linear hides the rest
        _sparse_symlog(bottom, float((mean + std).max()))
    bottom.scatter(x, mean, c=colours, s=36, zorder=3)
    bottom.set_ylabel("mean excitation ± std")
    bottom.set_title("Mean excitation over all images and channels (± std over all values)", fontsize=10, loc="left")
    if bound is not None:
        _bounded_ylim(bottom, bound, float((mean - lower).min()), float((mean + std).max()))
    _depth_axis(bottom, table)
    bottom.set_xlabel("SE block (forward order)")
    _suptitle(fig, title)
    return fig


def _sparse_symlog(ax: Axes, top: float) -> None:
    """Symlog axis from 0 with at most ~8 decade labels (one per decade overprints on a tall range)."""
    ax.set_yscale("symlog", linthresh=1.0)
    decades = math.ceil(math.log10(top))
    step = max(1, math.ceil(decades / 8))
    ax.yaxis.set_major_locator(FixedLocator([0.0] + [10.0**k for k in range(0, decades + 1, step)]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(-0.3, 10.0 ** (decades + 0.3))


def save_all(stats: ExcitationStats, table: pd.DataFrame, directory: Path, title: str) -> list[Path]:
    figures = {
        "class_means": class_means_figure(stats, title),
        "within_class": within_class_figure(stats, title),
        "specificity": specificity_figure(table, title),
        "saturation": saturation_figure(table, title, stats.bound,
                                        stats.threshold / stats.bound if stats.bound else 1.0),
    }
    return [p for name, fig in figures.items() for p in save_figure(fig, directory / name)]


__all__ = [
    "FORMATS", "MAX_CHANNELS", "MAX_CLASSES", "class_means_figure", "figure_blocks", "saturation_figure",
    "save_all", "save_figure", "shown_channels", "shown_classes", "specificity_figure", "within_class_figure",
]
