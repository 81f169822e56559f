"""One grid's report on one dataset, built in memory from its runs: tables, per-run CSV and figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from ablations.config import GridConfig
from ablations.report.frames import TOP1, TOP5, column, preset_cells, select_setting, summarize
from ablations.report.layout import Layout, make_layout
from ablations.report.paper import PLAIN
from ablations.report.provenance import missing_cells, provenance
from ablations.report.tables import Context, empty_latex, empty_markdown, preset_label, to_latex, to_markdown

FIGURES = ("errors", "error_vs_r", "learning_curves", "error_vs_cost")  # the figures' file stems, in index order
CSV_COLUMNS = ("grid", "dataset", "variant", "label", "seed", "final_top1_err", "final_top5_err",
               "best_top1_err", "best_top5_err", "params", "caffe_params", "gflops", "epochs",
               "data_source", "cell_id", "run_id")


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
    study: str | None = None  # the preset's study label, when it makes real results

    def csv(self) -> str:
        """One row per run, raw numbers (no timestamps, so it is byte-stable)."""
        runs = self.runs.rename(columns={"top1": TOP1, "top5": TOP5, "best_top1": "best_top1_err",
                                         "best_top5": "best_top5_err", "n_params": "params"})
        if self.layout is not None and not runs.empty:
            rank = {v: i for i, v in enumerate(self.layout.variants)}
            runs = runs.assign(_rank=runs["variant"].map(rank)).sort_values(["_rank", "seed", "study_run_id"])
        runs = runs.assign(run_id=runs["study_run_id"])  # stable across a record's export and restore
        return runs.reindex(columns=list(CSV_COLUMNS)).to_csv(index=False, lineterminator="\n")

    def figures(self, history: pd.DataFrame | None = None) -> dict[str, Any]:
        """name -> matplotlib Figure; `history` from metric_histories adds the learning curves."""
        # matplotlib only when figures are wanted
        from ablations.report.plots import error_vs_cost, error_vs_r, errors_by_variant, learning_curves

        if self.layout is None or self.runs.empty:
            return {}
        layout = self.layout
        order = [layout.label(v) for v in layout.variants if v in set(self.runs["variant"])]
        plain = layout.label(PLAIN) if PLAIN in layout.variants else None
        header = layout.header
        name = preset_label(self.grid, self.preset, self.study)
        figs = {"errors": errors_by_variant(self.runs, order, plain, name, header)}
        if layout.ratios:
            runs = self.runs.assign(r=self.runs["variant"].map(layout.ratios))
            figs["error_vs_r"] = error_vs_r(runs, plain, name)
        if history is not None and not history.empty:
            figs["learning_curves"] = learning_curves(history, order, plain, name, header)
        figs["error_vs_cost"] = error_vs_cost(self.summary.loc[self.summary["n"] > 0], order, plain, name, header)
        return figs


def _paper_number(runs: pd.DataFrame, grid: GridConfig | None) -> int | None:
    if grid is not None:
        return grid.paper_table
    tagged = runs["paper_table"].dropna() if "paper_table" in runs else pd.Series(dtype=float)
    return int(tagged.iloc[-1]) if len(tagged) else None


def _resolution(runs: pd.DataFrame, dataset: str) -> int | None:
    """The input size of the runs: dataset.image_size, else the native 32 px of the CIFAR-size datasets."""
    sizes = pd.to_numeric(column(runs, "params.dataset.image_size"), errors="coerce").dropna()
    if len(sizes):
        return int(sizes.iloc[0])
    return 32 if dataset in ("cifar10", "cifar100", "synthetic") else None


def build_report(frame: pd.DataFrame, grid: str, dataset: str | None = None, *,
                 grid_config: GridConfig | None = None, description: str = "",
                 default_dataset: str = "unknown", default_arch: str | None = None,
                 preset: str | None = None, study: str | None = None,
                 expected: Sequence[tuple[str, int]] | None = None) -> GridReport:
    """The report of one grid on one dataset from runs as `mlflow.search_runs` (or runs_frame) gives them.

    dataset None: the dataset of the grid's latest finished run. Only runs trained with `preset`
    (None: without a preset) count. `expected`: the grid's (variant, seed) cells, to name those
    without a finished run yet.
    """
    cells, others = preset_cells(frame, grid, preset)
    if dataset is None:
        dataset = cells["dataset"].iloc[-1] if len(cells) else default_dataset
    cells = cells.loc[cells["dataset"] == dataset].reset_index(drop=True)
    description = description or (grid_config.description if grid_config else "")
    if cells.empty:
        ctx = Context(grid, dataset, description, preset=preset, study=study, other_presets=others)
        return GridReport(grid, dataset, cells.assign(label=pd.Series(dtype=str)), None, pd.DataFrame(),
                          empty_markdown(ctx), empty_latex(ctx), preset, study)
    axis_keys = set(grid_config.axes) if grid_config else None
    chosen = select_setting(cells, axis_keys)
    runs = chosen.runs
    layout = make_layout(runs, grid_config, _paper_number(runs, grid_config), default_arch)
    runs = runs.assign(label=runs["variant"].map(layout.label))
    summary = summarize(runs, layout)
    epochs = runs["epochs"].dropna()
    train_size = column(runs, "params.dataset.train_size").dropna()
    train_size = train_size[train_size != "None"]
    ctx = Context(
        grid, dataset, description, arch=runs["arch"].dropna().iloc[0] if runs["arch"].notna().any() else default_arch,
        epochs=int(epochs.iloc[0]) if len(epochs) else None,
        train_size=str(train_size.iloc[0]) if len(train_size) else None,
        data_sources=tuple(sorted(set(runs["data_source"].dropna()))),
        left_out=chosen.left_out, differing=chosen.differing, preset=preset, study=study,
        image_size=_resolution(runs, dataset),
        missing=missing_cells(runs, expected or ()),
        provenance=tuple(provenance(runs, grid, preset)))
    return GridReport(grid, dataset, runs, layout, summary, to_markdown(summary, layout, ctx), to_latex(summary, layout, ctx),
                      preset, study)
