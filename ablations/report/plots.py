"""Figures of one grid, from the tidy frames `ablations.report` builds (nothing here reads MLflow).

Figures are `matplotlib.figure.Figure` objects made without pyplot: no global state, no GUI
backend, nothing left open; they render with Agg (PNG) and the PDF backend when saved, and show
inline in a notebook. Every figure names variants as the paper's table does (the `label` column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator
from matplotlib.transforms import offset_copy

FORMATS = ("png", "pdf")
PLAIN_COLOR = "0.35"
MARKERS = "osD^v<>Ph*"
PLAIN_MARKER = "X"
ERRORS = (("top1", "top-1 error (%)"), ("top5", "top-5 error (%)"))
WIDTH = 10.0  # inches; at 150 dpi a 1500-pixel-wide PNG


def palette(order: Sequence[str], plain: str | None) -> dict[str, tuple]:
    """label -> colour, the same in every figure of a grid; the plain backbone in grey."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colours = [cmap(i) for i in range(10) if i != 7]  # tab10's 7th is grey, kept for the plain backbone
    out, i = {}, 0
    for label in order:
        if label == plain:
            out[label] = PLAIN_COLOR
        else:
            out[label] = colours[i % len(colours)]
            i += 1
    return out


def _marker(order: Sequence[str], label: str, plain: str | None) -> str:
    if label == plain:
        return PLAIN_MARKER  # the plain backbone looks the same in every grid's figures
    others = [x for x in order if x != plain]
    return MARKERS[others.index(label) % len(MARKERS)]


def _legend_right(fig: Figure, ax: Axes, title: str) -> None:
    """One column beside the axes, in the table's order (a wrapped legend below reads column-major)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", title=title, frameon=False, alignment="left")


def _figure(height: float, ncols: int = 2) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _offsets_by(runs: pd.DataFrame, key: str) -> np.ndarray:
    """_offsets within each group of `key` (e.g. the seeds of each r)."""
    out = np.zeros(len(runs))
    for _, idx in runs.groupby(key).indices.items():
        out[idx] = _offsets(runs["seed"].iloc[idx])
    return out


def _offsets(seeds: pd.Series) -> np.ndarray:
    """Spread a variant's seeds a little apart (by rank, not at random: the figure must be reproducible)."""
    ranks = seeds.rank(method="first").to_numpy() - 1
    n = len(seeds)
    return (ranks - (n - 1) / 2) * (0.25 / max(n - 1, 1)) if n > 1 else np.zeros(n)


def errors_by_variant(runs: pd.DataFrame, order: Sequence[str], plain: str | None, grid: str,
                      header: str = "variant") -> Figure:
    """Per-seed errors of every variant (hollow circles) with mean ± std (filled marker and bar),
    variants down the y-axis in the table's order."""
    colours = palette(order, plain)
    fig, axes = _figure(1.6 + 0.45 * len(order))
    positions = {label: i for i, label in enumerate(order)}
    for ax, (col, name) in zip(axes, ERRORS):
        for label in order:
            sub = runs.loc[runs["label"] == label]
            y = positions[label]
            ax.scatter(sub[col], y + _offsets(sub["seed"]), s=22, facecolors="none", edgecolors=colours[label],
                       linewidths=1.0, zorder=3)
            std = sub[col].std() if len(sub) > 1 else 0.0
            ax.errorbar(sub[col].mean(), y, xerr=std, fmt="D", markersize=6, capsize=3, elinewidth=1.6,
                        color=colours[label], zorder=4)
        ax.set_yticks(range(len(order)), list(order))
        ax.set_ylim(len(order) - 0.5, -0.5)  # the table's order, top to bottom
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    axes[0].set_ylabel(header)
    axes[1].tick_params(labelleft=False)
    note = _spread_note(runs) or "circles: one seed each; diamond and bar: mean ± std"
    fig.suptitle(f"{grid}: test error per variant ({note})")
    return fig


def error_vs_r(runs: pd.DataFrame, plain: str | None, grid: str) -> Figure:
    """Error against the reduction ratio r (log2 axis), mean ± std over seeds; the plain backbone as a band."""
    fig, axes = _figure(4.2)
    se = runs.loc[runs["r"].notna()]
    ratios = sorted(se["r"].unique())
    one = _spread_note(runs) is not None
    for ax, (col, name) in zip(axes, ERRORS):
        stats = se.groupby("r")[col].agg(["mean", "std"]).reindex(ratios)
        # seeds a little to the side (x 2^±0.1), so the error bar's caps do not hide them
        if not one:
            dodge = 2.0 ** (0.1 * _offsets_by(se, "r") / 0.125)
            ax.scatter(se["r"] * dodge, se[col], s=16, color="C0", alpha=0.5, label="one seed", zorder=3)
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), fmt="-o", color="C0", capsize=4,
                    label="SE (one seed)" if one else "SE: mean ± std", zorder=4)
        base = runs.loc[runs["label"] == plain, col] if plain else pd.Series(dtype=float)
        if len(base) > 1:
            m, s = base.mean(), base.std()
            ax.axhspan(m - s, m + s, color=PLAIN_COLOR, alpha=0.18, lw=0, label=f"{plain}: mean ± std")
            ax.axhline(m, color=PLAIN_COLOR, lw=1.2, ls="--")
        elif len(base):
            ax.axhline(base.mean(), color=PLAIN_COLOR, lw=1.2, ls="--", label=f"{plain} (one seed)")
        ax.margins(y=0.1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ratios))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(int(r)) for r in ratios])
        ax.set_xlabel("reduction ratio r")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle(f"{grid}: error vs reduction ratio r" + (" (one seed per variant: no spread)" if one else ""))
    return fig


def _curve_band(ax: Axes, curve: pd.DataFrame, colour, label: str, dashed: bool) -> None:
    stats = curve.groupby("step")["value"].agg(["mean", "std", "count"])
    steps = stats.index.to_numpy()
    ax.plot(steps, stats["mean"], color=colour, lw=1.8, ls="--" if dashed else "-", label=label,
            marker="o" if len(steps) < 3 else None)
    if (stats["count"] > 1).any():
        sd = stats["std"].fillna(0)
        ax.fill_between(steps, stats["mean"] - sd, stats["mean"] + sd, color=colour, alpha=0.15, lw=0)


def learning_curves(history: pd.DataFrame, order: Sequence[str], plain: str | None, grid: str,
                    header: str = "variant") -> Figure:
    """Test top-1 error per epoch, mean with a ±std band per variant; right panel: the last half, zoomed."""
    colours = palette(order, plain)
    epochs = int(history["step"].max())
    zoom = epochs >= 4
    fig, axes = _figure(4.6, 2 if zoom else 1)
    start = epochs // 2 + 1
    for label in order:
        curve = history.loc[history["label"] == label]
        if curve.empty:
            continue
        _curve_band(axes[0], curve, colours[label], label, label == plain)
        if zoom:
            _curve_band(axes[1], curve.loc[curve["step"] >= start], colours[label], label, label == plain)
    if zoom:
        axes[0].set_title("all epochs")
        axes[1].set_title(f"epochs {start}-{epochs} (zoomed)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_right(fig, axes[0], header)
    one = history.groupby("label")["seed"].nunique().max() < 2
    fig.suptitle(f"{grid}: learning curves ({'one seed per variant: no band' if one else 'mean over seeds, band: ± std'})")
    return fig


def _dodge(x: pd.Series, near: float = 0.02, step: float = 10.0) -> pd.Series:
    """Sideways offsets in points for markers at (nearly) the same x, so none hides behind another.

    Offsets are drawn in screen space, so the data (and the axis ticks) keep the exact values.
    """
    span = float(x.max() - x.min())
    ranked = x.astype(float).sort_values(kind="stable")
    groups = (ranked.diff().fillna(np.inf) > near * span).cumsum()
    out = pd.Series(0.0, index=x.index)
    for _, members in ranked.groupby(groups):
        k = len(members)
        out[members.index] = (np.arange(k) - (k - 1) / 2) * step
    return out


def _spread_note(runs: pd.DataFrame) -> str | None:
    """What a figure must say when no variant has two seeds (nothing to draw a spread from)."""
    return "one seed per variant: no spread" if runs.groupby("label").size().max() < 2 else None


def error_vs_cost(summary: pd.DataFrame, order: Sequence[str], plain: str | None, grid: str,
                  header: str = "variant") -> Figure:
    """Mean top-1 error (± std) against trainable parameters and against GFLOPs, one marker per variant.

    Variants with (nearly) equal cost are nudged sideways by 2% of the axis so that all stay visible.
    """
    colours = palette(order, plain)
    fig, axes = _figure(4.6)
    rows = summary.set_index("label").reindex([label for label in order if label in set(summary["label"])])
    for ax, (col, name) in zip(axes, (("params_m", "trainable parameters (M)"), ("gflops", "GFLOPs (multiply-adds, G)"))):
        shift = _dodge(rows[col])
        std = rows["top1_std"].fillna(0.0)
        for label, row in rows.iterrows():
            moved = offset_copy(ax.transData, fig=fig, x=shift[label], y=0.0, units="points")
            ax.errorbar(row[col], row["top1_mean"], yerr=std[label], fmt=_marker(order, label, plain),
                        color=colours[label], markersize=7, capsize=3, label=label, transform=moved)
        # an offset transform keeps artists out of the data limits: give the axes the real extent
        for y in (rows["top1_mean"] - std, rows["top1_mean"] + std):
            ax.update_datalim(np.column_stack([rows[col], y]))
        ax.autoscale_view()
        ax.set_xlabel(name)
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.12)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # long labels such as 0.5554 need room
    _legend_right(fig, axes[0], header)
    one = rows["n"].max() < 2
    fig.suptitle(f"{grid}: top-1 error vs cost ({'one seed per variant: no error bars' if one else 'mean ± std over seeds'})")
    return fig


def save_figure(fig: Figure, stem: Path, dpi: int = 150) -> list[Path]:
    """Write <stem>.png and <stem>.pdf without creation dates or versions in them (same figure, same bytes)."""
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}
    paths = []
    for ext in FORMATS:
        path = stem.with_suffix(f".{ext}")
        fig.savefig(path, format=ext, dpi=dpi, metadata=metadata[ext])
        paths.append(path)
    return paths


__all__ = ["FORMATS", "error_vs_cost", "error_vs_r", "errors_by_variant", "learning_curves", "palette", "save_figure"]
