"""Writing a grid's report: its files under results/<dataset>/<grid>/ and as artifacts of the grid's parent MLflow run."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from mlflow import MlflowClient

from ablations.config import ConfigError, ExperimentsFile, GridConfig, load_experiments, resolve_cells

from ablations.report.build import FIGURES, GridReport, build_report
from ablations.report.frames import metric_histories, preset_cells, runs_frame
from ablations.report.index import write_index
from ablations.report.paths import check_output_dir, dataset_folder, safe_name
from ablations.tracking import attach_to_parent, ensure_parent

TABLE_FILES = ("table.md", "table.tex", "table.csv")


def _grid_config(experiments: ExperimentsFile | str | Path | None, grid: str) -> tuple[GridConfig | None, ExperimentsFile | None]:
    if experiments is None:
        return None, None
    exps = experiments if isinstance(experiments, ExperimentsFile) else load_experiments(experiments)
    return exps.grids.get(grid), exps


def with_train_seconds(client: MlflowClient, frame: pd.DataFrame, run_ids: Iterable[str]) -> pd.DataFrame:
    """`metrics.train_seconds` for these runs: the sum of their epochs' times (evaluation included)."""
    seconds = {rid: sum(m.value for m in client.get_metric_history(rid, "epoch_seconds")) or math.nan
               for rid in run_ids}
    return frame.assign(**{"metrics.train_seconds": frame["run_id"].map(seconds)})


def _expected_cells(exps: ExperimentsFile | None, grid: str, preset: str | None) -> list[tuple[str, int]] | None:
    """The grid's (variant, seed) cells as the experiments file and `preset` define them; None if unknown."""
    if exps is None or grid not in exps.grids:
        return None
    try:
        return [(c.variant, c.seed) for c in resolve_cells(exps, grid, preset=preset)]
    except ConfigError:  # a preset this file does not have: the report still lists what ran
        return None


def save_report(report: GridReport, directory: Path, history: pd.DataFrame | None = None) -> list[Path]:
    """Write the tables and figures of one report into `directory`; stale files of ours are removed first."""
    from ablations.report.plots import FORMATS, save_figure  # matplotlib only when figures are written

    directory.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        for ext in FORMATS:
            (directory / f"{name}.{ext}").unlink(missing_ok=True)
    written = []
    for name, text in zip(TABLE_FILES, (report.markdown, report.latex, report.csv())):
        (directory / name).write_text(text, encoding="utf-8")
        written.append(directory / name)
    for name, fig in report.figures(history).items():
        written += save_figure(fig, directory / name)
    return written


def _report_run(client: MlflowClient, tracking_uri: str, experiment_id: str, grid: str, description: str = "") -> str:
    """The run that holds a grid's report artifacts: the grid's parent run (created once, found again
    by its tag, so reports do not pile up), with the grid's cell runs nested under it."""
    parent = ensure_parent(client, tracking_uri, experiment_id, grid, description)
    attach_to_parent(client, experiment_id, parent)  # runs of a store made before grids had parents
    return parent


def _nothing_to_report(grid: str, preset: str | None, others: Sequence[str]) -> str:
    which = f"with preset {preset}" if preset else "without a preset"
    text = f"report: grid {grid} has no finished runs {which}; nothing written"
    named = [o for o in others if o]
    if named:
        text += f" (runs of preset {', '.join(named)} are in the store: add --preset {named[0]})"
    elif others:
        text += " (runs without a preset are in the store: leave out --preset)"
    return text


def study_of(exps: ExperimentsFile | None, preset: str | None) -> str | None:
    """The study label of a preset that makes real results (None: no preset, or a pipeline check)."""
    if exps is None or preset is None or preset not in exps.presets:
        return None
    return exps.presets[preset].study


def write_report(tracking_uri: str, grid: str, results_dir: str | Path = "results",
                 experiments: ExperimentsFile | str | Path | None = None, preset: str | None = None) -> Path | None:
    """Tables (md, tex, csv) and figures (png, pdf) of a grid into results/<dataset>/<grid>/.

    Reads only the MLflow store, and only the runs trained with `preset` (None: without one). One
    directory per dataset the grid was run on; returns the one of the latest run. The same files are
    logged as artifacts (under <dataset>/, or presets/<preset>/<dataset>/) of the grid's parent run
    (tracking.ensure_parent). Running it twice gives byte-identical files.

    With no finished run (of `preset`) it writes nothing, neither files nor artifacts, says so on
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
    study = study_of(exps, preset)
    frame = with_train_seconds(client, frame, mine["run_id"])
    expected = _expected_cells(exps, grid, preset)

    first: Path | None = None
    run_id = _report_run(client, tracking_uri, experiment.experiment_id, grid, description)
    for dataset in datasets:
        report = build_report(frame, grid, dataset, grid_config=grid_config, description=description,
                              default_dataset=default_dataset, default_arch=default_arch, preset=preset, study=study,
                              expected=expected)
        history = metric_histories(client, report.runs) if not report.runs.empty else None
        folder = dataset_folder(dataset, preset if study else None)
        directory = Path(results_dir) / folder / safe_name(grid)
        save_report(report, directory, history)
        where = folder if preset is None or study else f"presets/{safe_name(preset)}/{safe_name(dataset)}"
        client.log_artifacts(run_id, str(directory), artifact_path=where)
        first = first or directory
    return first


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
