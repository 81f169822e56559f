"""Paper-style tables and figures of a grid, read from the MLflow store (nothing is trained): the public API.

Data flows one way:

    MLflow store -> runs_frame (one row per run, `mlflow.search_runs` columns)      frames
                 -> cell_runs (tidy: the FINISHED cell runs)                        frames
                 -> build_report (layout, summary, Markdown/LaTeX/CSV, figures)     layout, tables, build
                 -> write_report (files + the grid's parent run)                    write
                 -> write_index (results/README.md)                                 index

The notebook `notebooks/ablation_results.ipynb` goes through the same functions, starting from
`mlflow.search_runs`, so tables and figures are made by one piece of code. The role-of-SE analysis
(it needs torch) is imported on its own: `ablations.report.analysis`.
"""

from __future__ import annotations

from ablations.report.build import GridReport, build_report
from ablations.report.frames import (
    Selection, cell_runs, metric_histories, preset_cells, runs_frame, select_setting, summarize,
)
from ablations.report.index import write_index
from ablations.report.layout import Layout, backbone_name, default_variant, expected_variants, make_layout
from ablations.report.paths import check_output_dir
from ablations.report.tables import Context, to_latex, to_markdown
from ablations.report.write import report_all, save_report, write_report

__all__ = [
    "Context", "GridReport", "Layout", "Selection", "backbone_name", "build_report", "cell_runs",
    "check_output_dir", "default_variant", "expected_variants", "make_layout", "metric_histories", "preset_cells",
    "report_all", "runs_frame",
    "save_report", "select_setting", "summarize", "to_latex", "to_markdown", "write_index", "write_report",
]
