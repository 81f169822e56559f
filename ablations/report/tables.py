"""A grid's summary as paper-style tables: Markdown and LaTeX cells, the title and the caption."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ablations.report.layout import Layout
from ablations.report.markdown import markdown_table
from ablations.report.paper import CITATION, SETTING, paper_table

SIGNIFICANCE = ((0.01, "**"), (0.05, "*"))  # Welch's t-test thresholds, strictest first
DASH = "—"


def _best(values: pd.Series) -> set[str]:
    """Variants whose mean is lowest as printed (ties bold together; nothing when all tie)."""
    shown = values.dropna().round(2)
    if shown.nunique() < 2:
        return set()
    return set(shown.index[shown == shown.min()])


def _marker(p: float) -> str:
    return next((mark for limit, mark in SIGNIFICANCE if p < limit), "")


@dataclass(frozen=True)
class _Style:
    """The few things that differ between a Markdown and a LaTeX cell."""

    pm: str  # between a mean and its std
    bold: Callable[[str], str]
    text: Callable[[str], str]  # escapes plain text
    signed: Callable[[str, str], str]  # a signed number and its significance marker


def tex_escape(text: str) -> str:
    """Plain (Unicode) text -> LaTeX text mode."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
             "±": r"$\pm$", "Δ": r"$\Delta$", "×": r"$\times$", "—": "---", "–": "--", "<": "$<$", ">": "$>$"}
    return "".join(table.get(ch, ch) for ch in text)


_MD = _Style(" ± ", lambda s: f"**{s}**", lambda s: s, lambda value, mark: f"{value}{mark}")
# In LaTeX a minus sign needs math mode (a bare '-' is a hyphen); the marker goes up as in papers.
_TEX = _Style(r" $\pm$ ", lambda s: rf"\textbf{{{s}}}", tex_escape,
              lambda value, mark: f"${value}^{{{mark}}}$" if mark else f"${value}$")


def _error_cell(mean: float, std: float, n: int, bold: bool, style: _Style) -> str:
    if n == 0:
        return style.text(DASH)
    text = f"{mean:.2f}" if n == 1 else f"{mean:.2f}{style.pm}{std:.2f}"
    return style.bold(text) if bold else text


def _delta_cell(row: pd.Series, is_reference: bool, n_ref: int, style: _Style) -> str:
    """Δ top-1 with its significance marker, or why there is no test."""
    if is_reference:
        return "ref."
    if row["n"] == 0 or n_ref == 0:
        return style.text(DASH)
    value = f"{row['delta']:+.2f}"
    if min(row["n"], n_ref) < 2:
        return f"{style.signed(value, '')} ({style.text('no test: n = 1')})"
    if math.isnan(row["p_value"]):
        return f"{style.signed(value, '')} ({style.text('no test: no spread')})"
    return style.signed(value, _marker(row["p_value"]))


def _digits(values: pd.Series, significant: int = 4) -> int:
    """Decimals that give the column's largest value `significant` digits (one count for the whole column)."""
    top = values.dropna().abs().max() if values.notna().any() else 0.0
    return max(0, significant - 1 - math.floor(math.log10(top))) if top > 0 else 2


def _columns(layout: Layout, style: _Style) -> list[str]:
    cols = [layout.header, "n", "top-1 err. (%)", "top-5 err. (%)"]
    if layout.gflops:
        cols.append("GFLOPs")
    if layout.params:
        cols.append("Params (M, trainable)")
    if layout.reference:
        cols.append(f"Δ top-1 vs {_reference_name(layout)}")
    if layout.paper:
        cols.append("Paper top-1 (ImageNet)")
    return [style.text(c) for c in cols]


def _reference_name(layout: Layout) -> str:
    prefix = layout.paper.prefix if layout.paper else ""
    return f"{prefix}{layout.label(layout.reference)}" if layout.reference else ""


def _cells(summary: pd.DataFrame, layout: Layout, style: _Style) -> list[list[str]]:
    best1, best5 = _best(summary["top1_mean"]), _best(summary["top5_mean"])
    gflops_digits = _digits(summary["gflops"])
    n_ref = int(summary.loc[layout.reference, "n"]) if layout.reference else 0
    rows = []
    for v, row in summary.iterrows():
        n = int(row["n"])
        cells = [style.text(row["label"]), str(n),
                 _error_cell(row["top1_mean"], row["top1_std"], n, v in best1, style),
                 _error_cell(row["top5_mean"], row["top5_std"], n, v in best5, style)]
        if layout.gflops:
            cells.append(f"{row['gflops']:.{gflops_digits}f}" if n else style.text(DASH))
        if layout.params:
            cells.append(f"{row['params_m']:.2f}" if n else style.text(DASH))
        if layout.reference:
            cells.append(_delta_cell(row, v == layout.reference, n_ref, style))
        if layout.paper:
            cells.append(style.text(DASH) if math.isnan(row["paper_top1"]) else f"{row['paper_top1']:.2f}")
        rows.append(cells)
    return rows


@dataclass(frozen=True)
class Context:
    """What a caption says about where the numbers come from."""

    grid: str
    dataset: str
    description: str = ""
    arch: str | None = None
    epochs: int | None = None
    train_size: str | None = None
    data_sources: tuple[str, ...] = ()
    left_out: int = 0
    differing: tuple[str, ...] = ()
    preset: str | None = None  # the runs were trained with this --preset
    study: str | None = None  # the preset's study label: real results of a recipe of their own
    image_size: int | None = None  # the resolution the model saw (px), when known
    other_presets: tuple[str, ...] = ()  # presets (or "" for none) with finished runs not shown here
    missing: str | None = None  # which expected cells have no finished run yet
    provenance: tuple[str, ...] = ()  # commits, command, machine, software, time (provenance.provenance)


def _source_name(source: str) -> str:
    """'jpeg-archive:/abs/path/cifar10-jpeg.tar.gz' -> 'cifar10-jpeg.tar.gz (jpeg-archive)': no machine paths."""
    kind, sep, where = source.partition(":")
    return f"{Path(where).name or where} ({kind})" if sep else source


def preset_label(grid: str, preset: str | None, study: str | None = None) -> str:
    """A grid's name as titles show it: a study preset's runs carry the study's label; other preset runs
    (e.g. smoke) are pipeline checks, and say so."""
    if study:
        return f"{grid}, {study}"
    return f"{grid} ({preset} preset)" if preset else grid


def title(layout: Layout | None, ctx: Context) -> str:
    head = f"{preset_label(ctx.grid, ctx.preset, ctx.study)} on {ctx.dataset}"
    if layout is not None and layout.paper_number is not None:
        table = paper_table(layout.paper_number)
        what = f", {table.title}" if table else ""
        head += f": paper Table {layout.paper_number}{what}"
    return head


def caption(summary: pd.DataFrame, layout: Layout, ctx: Context) -> list[str]:
    """The caption's sentences, in plain Unicode text (escaped later for LaTeX)."""
    ns = summary["n"]
    out = [ctx.description.rstrip(".") + "."] if ctx.description else []
    setting = f"Setting: {ctx.arch or 'model'} on {ctx.dataset}"
    if ctx.image_size:
        setting += f" at {ctx.image_size}x{ctx.image_size} px"
    if ctx.train_size:
        setting += f" ({ctx.train_size} training images)"
    if ctx.epochs:
        setting += f", {ctx.epochs} epoch{'' if ctx.epochs == 1 else 's'}"
    if ctx.data_sources:
        setting += f"; data: {', '.join(_source_name(s) for s in ctx.data_sources)}"
    if ctx.preset:
        setting += f"; preset: {ctx.preset}"
    out.append(setting + ".")
    out.append("Errors: test error (%) after the last epoch, mean ± sample std over n seeds; bold: lowest mean.")
    if (ns == 1).any():
        out.append("n = 1: no spread, no test (one seed; run more seeds to tell an effect from noise).")
    if (ns == 0).any():
        out.append(f"n = 0 ({DASH}): no finished run yet.")
    if ctx.missing:
        out.append(ctx.missing)
    if layout.gflops:
        out.append("GFLOPs: multiply-adds (G) at the training input size.")
    if layout.params:
        out.append("Params: trainable parameters in millions (the paper's Params also counts BatchNorm statistics).")
    if layout.reference:
        out.append(f"Δ top-1: difference of mean top-1 error from {_reference_name(layout)} (the SE defaults); "
                   "Welch's t-test (two-sided, unequal variances) over seeds: * p < 0.05, ** p < 0.01.")
    if layout.paper:
        missing = " (— : no such row in the paper)" if summary["paper_top1"].isna().any() else ""
        out.append(f"Paper top-1: {SETTING}, Table {layout.paper.number} of {CITATION}{missing}; "
                   "a reference for the ranking, not comparable in absolute terms.")
    elif layout.paper_number is not None:
        out.append(f"The grid's variants are not all rows of paper Table {layout.paper_number}: generic layout, "
                   "no paper column.")
    if ctx.left_out:
        keys = ", ".join(ctx.differing[:4]) or "the config"
        out.append(f"{ctx.left_out} finished run(s) of another setting (differing in {keys}) left out; "
                   "this table uses the setting of the latest run.")
    return out


def to_markdown(summary: pd.DataFrame, layout: Layout, ctx: Context) -> str:
    """The table.md of a grid: a heading, the table (label column left, numbers right) and the caption."""
    cols = _columns(layout, _MD)
    table = markdown_table(cols, _cells(summary, layout, _MD), ["left"] + ["right"] * (len(cols) - 1))
    parts = [f"## {title(layout, ctx)}", "", table, "", " ".join(caption(summary, layout, ctx)), ""]
    if ctx.provenance:
        parts += ["Provenance. " + " ".join(ctx.provenance), ""]
    return "\n".join(parts)


def to_latex(summary: pd.DataFrame, layout: Layout, ctx: Context) -> str:
    """A booktabs table through pandas' Styler; cells are already LaTeX, so Styler escapes nothing."""
    table = pd.DataFrame(_cells(summary, layout, _TEX), columns=_columns(layout, _TEX))
    text = " ".join(tex_escape(s) for s in [title(layout, ctx) + "."] + caption(summary, layout, ctx))
    label = "tab:" + re.sub(r"[^A-Za-z0-9]+", "-", f"{ctx.dataset}-{ctx.grid}")
    latex = table.style.hide(axis="index").to_latex(
        hrules=True, column_format="l" + "r" * (table.shape[1] - 1), caption=text, label=label,
        position="t", position_float="centering")
    return "".join(f"% {line}\n" for line in ctx.provenance) + latex


def _empty_sentence(ctx: Context) -> str:
    which = f" with preset {ctx.preset}" if ctx.preset else " without a preset" if ctx.other_presets else ""
    text = f"No finished runs of this grid{which} yet: nothing to tabulate."
    named = [p for p in ctx.other_presets if p]
    if named:
        text += f" Runs of preset {', '.join(named)} are in the store: report them with --report --preset NAME."
    elif ctx.other_presets:
        text += " Runs without a preset are in the store: report them with --report and no --preset."
    return text


def empty_markdown(ctx: Context) -> str:
    return f"## {ctx.grid} on {ctx.dataset}\n\n{_empty_sentence(ctx)}\n"


def empty_latex(ctx: Context) -> str:
    sentence = _empty_sentence(ctx)
    text = tex_escape(f"{ctx.grid} on {ctx.dataset}: {sentence[0].lower()}{sentence[1:]}")
    return f"% {text}\n\\begin{{table}}[t]\n\\centering\n\\caption{{{text}}}\n\\end{{table}}\n"
