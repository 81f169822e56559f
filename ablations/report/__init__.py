"""Paper-style tables and figures of a grid, read from the MLflow store (nothing is trained).

Data flows one way:

    MLflow store -> runs_frame (one row per run, `mlflow.search_runs` columns)
                 -> cell_runs (tidy: the FINISHED cell runs) -> build_report (layout, summary,
                    Markdown/LaTeX/CSV, figures) -> write_report (files + one `report=true` run)
                 -> write_index (results/README.md)

The notebook `notebooks/ablation_results.ipynb` goes through the same functions, starting from
`mlflow.search_runs`, so tables and figures are made by one piece of code.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from scipy import stats

from ablations.report import paper
from ablations.config import ExperimentsFile, GridConfig, load_experiments, variant_name
from ablations.errors import OutputError
from ablations.tracking import runs_of
from senet.config import SEConfig

# Which final metric the tables report: the last epoch's error (the paper reports its final models;
# the best epoch would be selected on the test set, an optimistic figure).
TOP1, TOP5 = "final_top1_err", "final_top5_err"
SE_KEYS = ("reduction", "squeeze", "excitation", "stages", "integration", "position")  # the ablated options
NOT_RECIPE = {"seed", "dataset.root", "dataset.download", "train.checkpoint_every"}  # no part of what was run
SIGNIFICANCE = ((0.01, "**"), (0.05, "*"))  # Welch's t-test thresholds, strictest first
DASH = "—"
TABLE_FILES = ("table.md", "table.tex", "table.csv")
FIGURES = ("errors", "error_vs_r", "learning_curves", "error_vs_cost")
CSV_COLUMNS = ("grid", "dataset", "variant", "label", "seed", "final_top1_err", "final_top5_err",
               "best_top1_err", "best_top5_err", "params", "caffe_params", "gflops", "epochs",
               "data_source", "cell_id", "run_id")


# ----------------------------------------------------------------------------- MLflow -> DataFrame


def runs_frame(client: MlflowClient, experiment_id: str) -> pd.DataFrame:
    """Every run of an experiment, with the columns `mlflow.search_runs` gives (`tags.x`, `params.x`, ...)."""
    rows = []
    for run in runs_of(client, experiment_id):
        row: dict[str, Any] = {
            "run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "status": run.info.status,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
        }
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-missing when no run has it (mlflow.search_runs leaves such columns out)."""
    if name in frame.columns:
        return frame[name]
    return pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _number(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(_column(frame, name), errors="coerce").astype(float)


def cell_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that count as cells (FINISHED, with a cell_id tag), one tidy row each.

    Keeps the `params.*` columns (the resolved config) for telling settings and defaults apart.
    """
    keep = (_column(frame, "status") == "FINISHED") & _column(frame, "tags.cell_id").notna()
    f = frame.loc[keep.fillna(False).astype(bool)]
    seed = pd.to_numeric(_column(f, "tags.seed"), errors="coerce")
    tidy = pd.DataFrame({
        "run_id": _column(f, "run_id"),
        "grid": _column(f, "tags.grid"),
        "variant": _column(f, "tags.variant").fillna("?"),
        "seed": seed.fillna(-1).astype(int),
        "dataset": _column(f, "tags.dataset").fillna(_column(f, "params.dataset.name")).fillna("unknown"),
        "data_source": _column(f, "tags.data_source"),
        "paper_table": pd.to_numeric(_column(f, "tags.paper_table"), errors="coerce"),
        "cell_id": _column(f, "tags.cell_id"),
        "preset": _column(f, "tags.preset").fillna(""),  # "" = trained without a preset
        "start_time": _column(f, "start_time"),
        "arch": _column(f, "params.model.arch"),
        "plain": (_column(f, "params.model.se") == "None").astype(bool),  # the flattened `se: null`
        "epochs": _number(f, "params.train.epochs"),
        "top1": _number(f, f"metrics.{TOP1}"),
        "top5": _number(f, f"metrics.{TOP5}"),
        "best_top1": _number(f, "metrics.best_top1_err"),
        "best_top5": _number(f, "metrics.best_top5_err"),
        "n_params": _number(f, "metrics.params"),
        "caffe_params": _number(f, "metrics.caffe_params"),
        "gflops": _number(f, "metrics.gflops"),
    }, index=f.index)
    params = f[[c for c in f.columns if c.startswith("params.")]]
    out = pd.concat([tidy, params], axis=1)
    return out.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)


def metric_histories(client: MlflowClient, runs: pd.DataFrame, metric: str = "test_top1_err") -> pd.DataFrame:
    """Per-epoch values of one metric for these runs: columns run_id, variant, label, seed, step, value."""
    rows = []
    for run in runs.itertuples(index=False):
        for m in client.get_metric_history(run.run_id, metric):
            rows.append({"run_id": run.run_id, "variant": run.variant, "label": getattr(run, "label", run.variant),
                         "seed": run.seed, "step": int(m.step), "value": float(m.value)})
    columns = ["run_id", "variant", "label", "seed", "step", "value"]
    return pd.DataFrame(rows, columns=columns).sort_values(["label", "seed", "step"], kind="stable")


# ----------------------------------------------------------------------------- which runs belong together


@dataclass(frozen=True)
class Selection:
    runs: pd.DataFrame  # the runs of one setting (recipe), the one of the latest run
    left_out: int = 0  # finished runs of other settings (e.g. an earlier smoke run into the same store)
    differing: tuple[str, ...] = ()  # the config keys that tell the settings apart


def _axis_like(runs: pd.DataFrame, column: str, axis_keys: set[str] | None) -> bool:
    """A key that is fixed within each variant but varies across them is what the grid sweeps."""
    key = column.removeprefix("params.")
    if axis_keys is not None and key not in axis_keys and not key.startswith("model.se"):
        return False
    values = runs[column].astype(object).fillna("")
    fixed = (values.groupby(runs["variant"]).nunique() <= 1).all()
    return bool(fixed and values.nunique() > 1)


def select_setting(runs: pd.DataFrame, axis_keys: set[str] | None = None) -> Selection:
    """Keep the runs trained with the same setting as the latest run; mixing settings would mix recipes."""
    if runs.empty:
        return Selection(runs)
    columns = [c for c in runs.columns if c.startswith("params.") and c.removeprefix("params.") not in NOT_RECIPE]
    recipe = [c for c in columns if not _axis_like(runs, c, axis_keys)]
    if not recipe:
        return Selection(runs)
    keys = runs[recipe].astype(object).fillna("").astype(str)
    latest = keys.iloc[runs["start_time"].argmax()]
    same = (keys == latest).all(axis=1)
    other = keys.loc[~same]
    differing = tuple(c.removeprefix("params.") for c in recipe if (other[c] != latest[c]).any())
    return Selection(runs.loc[same].reset_index(drop=True), int((~same).sum()), differing)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """How a grid's table reads: rows, their names, columns, and the row Δ compares with."""

    header: str  # heading of the first column
    variants: tuple[str, ...]  # row order
    labels: dict[str, str]  # variant tag -> row name
    reference: str | None  # the variant whose SE options are the defaults (r=16, avg, sigmoid, ...)
    paper: paper.PaperTable | None  # set when every variant is a row of the grid's paper table
    paper_number: int | None  # the grid's paper table, matched or not
    params: bool
    gflops: bool
    ratios: dict[str, int] = field(default_factory=dict)  # variant -> r, when the grid sweeps r alone

    def label(self, variant: str) -> str:
        return self.labels.get(variant, variant)


def backbone_name(arch: str | None) -> str:
    """'resnet18_cifar' -> 'ResNet-18', 'resnext50_32x4d' -> 'ResNeXt-50 (32x4d)'."""
    m = re.fullmatch(r"(resnext|resnet)(\d+)(?:_(\d+x\d+d))?(?:_cifar)?", arch or "")
    if m is None:
        return arch or "plain backbone"
    name = f"{'ResNeXt' if m[1] == 'resnext' else 'ResNet'}-{m[2]}"
    return f"{name} ({m[3]})" if m[3] else name


def expected_variants(grid: GridConfig | None) -> list[str]:
    """The variant tags the runner gives this grid, in its order."""
    if grid is None:
        return []
    combos = itertools.product(*grid.axes.values())
    named = [variant_name(dict(zip(grid.axes, combo))) for combo in combos]
    return ([paper.PLAIN] if grid.baseline else []) + named


def _observed_order(runs: pd.DataFrame) -> list[str]:
    """Variants by their first run (the runner runs variants in axis order), the plain one first."""
    first = runs.groupby("variant")["start_time"].min().sort_values(kind="stable")
    order = list(first.index)
    return sorted(order, key=lambda v: v != paper.PLAIN)


def default_variant(runs: pd.DataFrame) -> str | None:
    """The variant whose swept SE options all equal the SE block's defaults (the Δ column's reference)."""
    se = runs.loc[~runs["plain"]]
    columns = [f"params.model.se.{k}" for k in SE_KEYS if f"params.model.se.{k}" in se.columns]
    per_variant = se.groupby("variant")[columns].first().astype(object).fillna("").astype(str)
    swept = [c for c in columns if per_variant[c].nunique() > 1]
    if not swept:
        return None
    defaults = SEConfig()
    want = {c: str(getattr(defaults, c.rsplit(".", 1)[-1])) for c in swept}
    matches = [v for v, row in per_variant.iterrows() if all(row[c] == want[c] for c in swept)]
    return matches[0] if len(matches) == 1 else None


def _ratios(variants: Sequence[str]) -> dict[str, int]:
    found = {v: int(m[1]) for v in variants if (m := re.fullmatch(r"r=(\d+)", v))}
    swept_alone = len(found) >= 2 and all(v in found or v == paper.PLAIN for v in variants)
    return found if swept_alone else {}


def make_layout(runs: pd.DataFrame, grid: GridConfig | None = None, paper_number: int | None = None,
                arch: str | None = None) -> Layout:
    expected = expected_variants(grid)
    variants = expected + [v for v in _observed_order(runs) if v not in expected]
    plain_arch = runs.loc[runs["plain"], "arch"].dropna()
    any_arch = runs["arch"].dropna()
    arch = plain_arch.iloc[0] if len(plain_arch) else any_arch.iloc[0] if len(any_arch) else arch
    plain_label = f"{backbone_name(arch)} (no SE)"
    table = paper.paper_table(paper_number)
    reference = default_variant(runs) if not runs.empty else None
    if table is not None and variants and table.covers(variants):
        rows = [r for r in table.rows if r.variant in variants]
        labels = {r.variant: plain_label if r.variant == paper.PLAIN else r.name for r in rows}
        return Layout(table.header, tuple(r.variant for r in rows), labels, reference, table, paper_number,
                      table.params, table.gflops, _ratios(variants))
    labels = {v: plain_label if v == paper.PLAIN else v for v in variants}
    return Layout("Variant", tuple(variants), labels, reference, None, paper_number, True, True, _ratios(variants))


# ----------------------------------------------------------------------------- summary


def _welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Welch's t-test; NaN where it cannot be run (n < 2, or no spread in either group)."""
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return math.nan
    with warnings.catch_warnings():  # scipy warns on near-identical seeds; the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarize(runs: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """One row per variant in table order: n, mean and std of each error, cost, Δ vs the reference, p."""
    ref = runs.loc[runs["variant"] == layout.reference, "top1"].to_numpy() if layout.reference else np.array([])
    rows = []
    for v in layout.variants:
        sub = runs.loc[runs["variant"] == v]
        top1, n = sub["top1"].to_numpy(), len(sub)
        ref_row = layout.paper.row(v) if layout.paper else None
        rows.append({
            "variant": v, "label": layout.label(v), "n": n,
            "top1_mean": sub["top1"].mean(), "top1_std": sub["top1"].std(),
            "top5_mean": sub["top5"].mean(), "top5_std": sub["top5"].std(),
            "params_m": sub["n_params"].mean() / 1e6, "gflops": sub["gflops"].mean(),
            "delta": top1.mean() - ref.mean() if n and len(ref) and v != layout.reference else math.nan,
            "p_value": _welch_p(top1, ref) if v != layout.reference else math.nan,
            "paper_top1": ref_row.top1 if ref_row is not None and ref_row.top1 is not None else math.nan,
        })
    return pd.DataFrame(rows).set_index("variant")


# ----------------------------------------------------------------------------- rendering


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
    image_size: int | None = None  # the resolution the model saw (px), when known
    other_presets: tuple[str, ...] = ()  # presets (or "" for none) with finished runs not shown here


def _source_name(source: str) -> str:
    """'jpeg-archive:/abs/path/cifar10-jpeg.tar.gz' -> 'cifar10-jpeg.tar.gz (jpeg-archive)': no machine paths."""
    kind, sep, where = source.partition(":")
    return f"{Path(where).name or where} ({kind})" if sep else source


def preset_label(grid: str, preset: str | None) -> str:
    """A grid's name as titles show it: preset runs (e.g. smoke) are pipeline checks, and say so."""
    return f"{grid} ({preset} preset)" if preset else grid


def title(layout: Layout | None, ctx: Context) -> str:
    head = f"{preset_label(ctx.grid, ctx.preset)} on {ctx.dataset}"
    if layout is not None and layout.paper_number is not None:
        table = paper.paper_table(layout.paper_number)
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
    if layout.gflops:
        out.append("GFLOPs: multiply-adds (G) at the training input size.")
    if layout.params:
        out.append("Params: trainable parameters in millions (the paper's Params also counts BatchNorm statistics).")
    if layout.reference:
        out.append(f"Δ top-1: difference of mean top-1 error from {_reference_name(layout)} (the SE defaults); "
                   "Welch's t-test (two-sided, unequal variances) over seeds: * p < 0.05, ** p < 0.01.")
    if layout.paper:
        missing = " (— : no such row in the paper)" if summary["paper_top1"].isna().any() else ""
        out.append(f"Paper top-1: {paper.SETTING}, Table {layout.paper.number} of {paper.CITATION}{missing}; "
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
    cols = _columns(layout, _MD)
    lines = [f"## {title(layout, ctx)}", "", "| " + " | ".join(cols) + " |",
             "| " + " | ".join([":---"] + ["---:"] * (len(cols) - 1)) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(summary, layout, _MD)]
    lines += ["", " ".join(caption(summary, layout, ctx)), ""]
    return "\n".join(lines)


def to_latex(summary: pd.DataFrame, layout: Layout, ctx: Context) -> str:
    """A booktabs table through pandas' Styler; cells are already LaTeX, so Styler escapes nothing."""
    table = pd.DataFrame(_cells(summary, layout, _TEX), columns=_columns(layout, _TEX))
    text = " ".join(tex_escape(s) for s in [title(layout, ctx) + "."] + caption(summary, layout, ctx))
    label = "tab:" + re.sub(r"[^A-Za-z0-9]+", "-", f"{ctx.dataset}-{ctx.grid}")
    return table.style.hide(axis="index").to_latex(
        hrules=True, column_format="l" + "r" * (table.shape[1] - 1), caption=text, label=label,
        position="t", position_float="centering")


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


# ----------------------------------------------------------------------------- one grid, one dataset


@dataclass
class GridReport:
    """A grid's table in every format, for one dataset; figures are drawn on request."""

    grid: str
    dataset: str
    runs: pd.DataFrame  # the cell runs tabulated, with a `label` column
    layout: Layout | None  # None when there are no runs
    summary: pd.DataFrame
    markdown: str
    latex: str
    preset: str | None = None  # the runs' --preset: figure titles carry it

    def csv(self) -> str:
        """One row per run, raw numbers (no timestamps, so it is byte-stable)."""
        runs = self.runs.rename(columns={"top1": TOP1, "top5": TOP5, "best_top1": "best_top1_err",
                                         "best_top5": "best_top5_err", "n_params": "params"})
        if self.layout is not None and not runs.empty:
            rank = {v: i for i, v in enumerate(self.layout.variants)}
            runs = runs.assign(_rank=runs["variant"].map(rank)).sort_values(["_rank", "seed", "run_id"])
        return runs.reindex(columns=list(CSV_COLUMNS)).to_csv(index=False, lineterminator="\n")

    def figures(self, history: pd.DataFrame | None = None) -> dict[str, Any]:
        """name -> matplotlib Figure; `history` from metric_histories adds the learning curves."""
        from ablations.report import plots  # matplotlib only when figures are wanted

        if self.layout is None or self.runs.empty:
            return {}
        layout = self.layout
        order = [layout.label(v) for v in layout.variants if v in set(self.runs["variant"])]
        plain = layout.label(paper.PLAIN) if paper.PLAIN in layout.variants else None
        header = layout.header
        name = preset_label(self.grid, self.preset)
        figs = {"errors": plots.errors_by_variant(self.runs, order, plain, name, header)}
        if layout.ratios:
            runs = self.runs.assign(r=self.runs["variant"].map(layout.ratios))
            figs["error_vs_r"] = plots.error_vs_r(runs, plain, name)
        if history is not None and not history.empty:
            figs["learning_curves"] = plots.learning_curves(history, order, plain, name, header)
        figs["error_vs_cost"] = plots.error_vs_cost(self.summary.loc[self.summary["n"] > 0], order, plain,
                                                    name, header)
        return figs


def _grid_config(experiments: ExperimentsFile | str | Path | None, grid: str) -> tuple[GridConfig | None, ExperimentsFile | None]:
    if experiments is None:
        return None, None
    exps = experiments if isinstance(experiments, ExperimentsFile) else load_experiments(experiments)
    return exps.grids.get(grid), exps


def _paper_number(runs: pd.DataFrame, grid: GridConfig | None) -> int | None:
    if grid is not None:
        return grid.paper_table
    tagged = runs["paper_table"].dropna() if "paper_table" in runs else pd.Series(dtype=float)
    return int(tagged.iloc[-1]) if len(tagged) else None


def preset_cells(frame: pd.DataFrame, grid: str, preset: str | None) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The cell runs of `grid` trained with `preset` (None: without one), and the other presets
    ("" for none) that have finished runs of the grid. A smoke check never mixes into real results."""
    cells = cell_runs(frame)
    cells = cells.loc[cells["grid"].fillna(grid) == grid]
    mine = cells["preset"] == (preset or "")
    return cells.loc[mine], tuple(sorted(set(cells.loc[~mine, "preset"])))


def _resolution(runs: pd.DataFrame, dataset: str) -> int | None:
    """The input size of the runs: dataset.image_size, else the native 32 px of the CIFAR-size datasets."""
    sizes = pd.to_numeric(_column(runs, "params.dataset.image_size"), errors="coerce").dropna()
    if len(sizes):
        return int(sizes.iloc[0])
    return 32 if dataset in ("cifar10", "cifar100", "synthetic") else None


def build_report(frame: pd.DataFrame, grid: str, dataset: str | None = None, *,
                 grid_config: GridConfig | None = None, description: str = "",
                 default_dataset: str = "unknown", default_arch: str | None = None,
                 preset: str | None = None) -> GridReport:
    """The report of one grid on one dataset from runs as `mlflow.search_runs` (or runs_frame) gives them.

    dataset None: the dataset of the grid's latest finished run. Only runs trained with `preset`
    (None: without a preset) count.
    """
    cells, others = preset_cells(frame, grid, preset)
    if dataset is None:
        dataset = cells["dataset"].iloc[-1] if len(cells) else default_dataset
    cells = cells.loc[cells["dataset"] == dataset].reset_index(drop=True)
    description = description or (grid_config.description if grid_config else "")
    if cells.empty:
        ctx = Context(grid, dataset, description, preset=preset, other_presets=others)
        return GridReport(grid, dataset, cells.assign(label=pd.Series(dtype=str)), None, pd.DataFrame(),
                          empty_markdown(ctx), empty_latex(ctx), preset)
    axis_keys = set(grid_config.axes) if grid_config else None
    chosen = select_setting(cells, axis_keys)
    runs = chosen.runs
    layout = make_layout(runs, grid_config, _paper_number(runs, grid_config), default_arch)
    runs = runs.assign(label=runs["variant"].map(layout.label))
    summary = summarize(runs, layout)
    epochs = runs["epochs"].dropna()
    train_size = _column(runs, "params.dataset.train_size").dropna()
    train_size = train_size[train_size != "None"]
    ctx = Context(
        grid, dataset, description, arch=runs["arch"].dropna().iloc[0] if runs["arch"].notna().any() else default_arch,
        epochs=int(epochs.iloc[0]) if len(epochs) else None,
        train_size=str(train_size.iloc[0]) if len(train_size) else None,
        data_sources=tuple(sorted(set(runs["data_source"].dropna()))),
        left_out=chosen.left_out, differing=chosen.differing, preset=preset, image_size=_resolution(runs, dataset))
    return GridReport(grid, dataset, runs, layout, summary, to_markdown(summary, layout, ctx), to_latex(summary, layout, ctx),
                      preset)


# ----------------------------------------------------------------------------- files and the report run


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name) or "_"


def save_report(report: GridReport, directory: Path, history: pd.DataFrame | None = None) -> list[Path]:
    """Write the tables and figures of one report into `directory`; stale files of ours are removed first."""
    from ablations.report import plots

    directory.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        for ext in plots.FORMATS:
            (directory / f"{name}.{ext}").unlink(missing_ok=True)
    written = []
    for name, text in zip(TABLE_FILES, (report.markdown, report.latex, report.csv())):
        (directory / name).write_text(text, encoding="utf-8")
        written.append(directory / name)
    for name, fig in report.figures(history).items():
        written += plots.save_figure(fig, directory / name)
    return written


def _report_run(client: MlflowClient, experiment_id: str, grid: str) -> str:
    """The one run that holds a grid's report artifacts: found again by its tag, so reports do not pile up."""
    found = runs_of(client, experiment_id, "tags.report = 'true'")
    if found:
        return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))[0].info.run_id
    # No cell_id tag: the harness never counts this run as a cell.
    return client.create_run(experiment_id, tags={"report": "true", "grid": grid}, run_name="report").info.run_id


def check_output_dir(results_dir: str | Path) -> None:
    """Raise OutputError, in one line, when `results_dir` cannot be created or written; create nothing."""
    folder = Path(results_dir)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"--results-dir {results_dir}: {existing} is not a folder")
    try:  # a real write, then gone: access() says yes to root even on a read-only file system
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputError(f"--results-dir {results_dir}: cannot write in {existing}: {exc.strerror or exc}") from None


def _nothing_to_report(grid: str, preset: str | None, others: Sequence[str]) -> str:
    which = f"with preset {preset}" if preset else "without a preset"
    text = f"report: grid {grid} has no finished runs {which}; nothing written"
    named = [o for o in others if o]
    if named:
        text += f" (runs of preset {', '.join(named)} are in the store: add --preset {named[0]})"
    elif others:
        text += " (runs without a preset are in the store: leave out --preset)"
    return text


def write_report(tracking_uri: str, grid: str, results_dir: str | Path = "results",
                 experiments: ExperimentsFile | str | Path | None = None, preset: str | None = None) -> Path | None:
    """Tables (md, tex, csv) and figures (png, pdf) of a grid into results/<dataset>/<grid>/.

    Reads only the MLflow store, and only the runs trained with `preset` (None: without one). One
    directory per dataset the grid was run on; returns the one of the latest run. The same files are
    logged as artifacts (under <dataset>/, or presets/<preset>/<dataset>/) of the experiment's single
    `report=true` run. Running it twice gives byte-identical files.

    With no finished run (of `preset`) it writes nothing, neither files nor a report run, says so on
    stderr and returns None: a check run never leaves placeholder tables beside the real results.
    """
    grid_config, exps = _grid_config(experiments, grid)
    default_dataset = "unknown"
    default_arch = None
    if exps is not None:
        default_dataset = (grid_config.dataset.get("name") if grid_config else None) or exps.defaults.dataset.name
        default_arch = (grid_config.model.get("arch") if grid_config else None) or exps.defaults.model.arch
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(grid)
    frame = runs_frame(client, experiment.experiment_id) if experiment is not None else pd.DataFrame()
    description = (experiment.tags.get("mlflow.note.content", "") if experiment is not None else "")
    mine, others = preset_cells(frame, grid, preset) if not frame.empty else (frame, ())
    if mine.empty:
        print(_nothing_to_report(grid, preset, others), file=sys.stderr, flush=True)
        return None
    check_output_dir(results_dir)
    datasets = list(dict.fromkeys(reversed(mine["dataset"].tolist())))

    first: Path | None = None
    run_id = _report_run(client, experiment.experiment_id, grid)
    for dataset in datasets:
        report = build_report(frame, grid, dataset, grid_config=grid_config, description=description,
                              default_dataset=default_dataset, default_arch=default_arch, preset=preset)
        history = metric_histories(client, report.runs) if not report.runs.empty else None
        directory = Path(results_dir) / _safe(dataset) / _safe(grid)
        save_report(report, directory, history)
        where = _safe(dataset) if preset is None else f"presets/{_safe(preset)}/{_safe(dataset)}"
        client.log_artifacts(run_id, str(directory), artifact_path=where)
        first = first or directory
    client.set_terminated(run_id, "FINISHED")
    return first


def _demote(markdown: str) -> str:
    """Headings one level down, so a table.md sits under the index's own heading."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


def write_index(results_dir: str | Path = "results") -> Path:
    """results/README.md: every results/<dataset>/<grid>/table.md inlined, with links to its figures."""
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    tables = sorted(root.glob("*/*/table.md"))
    lines = ["# Ablation results", "",
             "Generated from the MLflow store by `ablations.report` (`write_report` per grid, then "
             "`write_index`); do not edit by hand.", ""]
    if not tables:
        lines += ["No reports yet.", ""]
    for dataset, group in itertools.groupby(tables, key=lambda p: p.parent.parent.name):
        lines += [f"## {dataset}", ""]
        for table in group:
            folder = table.parent
            rel = folder.relative_to(root).as_posix()
            lines += [_demote(table.read_text(encoding="utf-8")).rstrip(), ""]
            links = [f"[{p.stem.replace('_', ' ')}]({rel}/{p.name}) ([PDF]({rel}/{p.stem}.pdf))"
                     for p in sorted(folder.glob("*.png"), key=lambda p: _figure_rank(p.stem))]
            files = f"[Markdown]({rel}/table.md), [LaTeX]({rel}/table.tex), [CSV]({rel}/table.csv)"
            lines += [f"Figures: {', '.join(links)}." if links else "No figures (no finished runs).", "",
                      f"Files: {files}.", ""]
            lines += _role_of_se_section(folder, root)
    index = root / "README.md"
    index.write_text("\n".join(lines), encoding="utf-8")
    return index


def _role_of_se_section(folder: Path, root: Path) -> list[str]:
    """The findings paragraph and figure links of each analysed run (ablations.report.analysis writes them)."""
    lines: list[str] = []
    for findings in sorted(folder.glob("role_of_se/*/findings.md")):
        run_dir = findings.parent
        rel = run_dir.relative_to(root).as_posix()
        figures = ", ".join(f"[{p.stem.replace('_', ' ')}]({rel}/{p.name})" for p in sorted(run_dir.glob("*.png")))
        lines += [f"#### Role of SE: {run_dir.name}", "", findings.read_text(encoding="utf-8").strip(), "",
                  f"Figures: {figures}; statistics: [Markdown]({rel}/block_stats.md), [CSV]({rel}/block_stats.csv).", ""]
    return lines


def _figure_rank(stem: str) -> tuple[int, str]:
    return (FIGURES.index(stem) if stem in FIGURES else len(FIGURES), stem)


def report_all(tracking_uri: str, grids: Iterable[str] | None = None, results_dir: str | Path = "results",
               experiments: ExperimentsFile | str | Path | None = None, preset: str | None = None) -> Path | None:
    """write_report for each grid (None: every experiment in the store), then write_index.

    This is what `run_ablation.py --report` does. When no grid has a finished run (of `preset`) it
    writes nothing, not even the index, and returns None: the committed results stay as they are.
    """
    check_output_dir(results_dir)  # before any report run is logged
    if grids is None:
        client = MlflowClient(tracking_uri=tracking_uri)
        grids = sorted(e.name for e in client.search_experiments() if e.name != "Default")
    written = [write_report(tracking_uri, grid, results_dir, experiments, preset) for grid in grids]
    if not any(written):
        return None
    return write_index(results_dir)


__all__ = [
    "Context", "GridReport", "Layout", "Selection", "backbone_name", "build_report", "cell_runs",
    "check_output_dir", "default_variant", "expected_variants", "make_layout", "metric_histories", "preset_cells", "report_all", "runs_frame",
    "save_report", "select_setting", "summarize", "to_latex", "to_markdown", "write_index", "write_report",
]
