"""MLflow runs -> tidy pandas frames: the finished cell runs of one setting, and their per-variant summary.

Data flows one way: runs_frame (one row per run, `mlflow.search_runs` columns) -> cell_runs (tidy:
the FINISHED cell runs) -> preset_cells / select_setting (the runs that belong together) -> summarize
(mean, std, Δ and Welch's p per variant, in a Layout's row order).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from scipy import stats

from ablations.report.layout import Layout
from ablations.tracking import runs_of

# Which final metric the tables report: the last epoch's error (the paper reports its final models;
# the best epoch would be selected on the test set, an optimistic figure).
TOP1, TOP5 = "final_top1_err", "final_top5_err"
PROVENANCE_TAGS = ("git_commit", "torch_version", "cpu_model", "device_name", "precision", "compile")
NOT_RECIPE = {"seed", "dataset.root", "dataset.download", "train.checkpoint_every"}  # no part of what was run


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


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-missing when no run has it (mlflow.search_runs leaves such columns out)."""
    if name in frame.columns:
        return frame[name]
    return pd.Series([None] * len(frame), index=frame.index, dtype=object)


def number(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as floats (NaN where missing or not a number)."""
    return pd.to_numeric(column(frame, name), errors="coerce").astype(float)


def cell_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that count as cells (FINISHED, with a cell_id tag), one tidy row each.

    Keeps the `params.*` columns (the resolved config) for telling settings and defaults apart.
    """
    keep = (column(frame, "status") == "FINISHED") & column(frame, "tags.cell_id").notna()
    f = frame.loc[keep.fillna(False).astype(bool)]
    # A cell trained in another grid shows here as a linked run: count it once, and not beside its own run.
    link = column(f, "tags.reused_from_run").notna()
    cid = column(f, "tags.cell_id")
    f = f.loc[~(link & (cid.isin(set(cid[~link])) | cid.where(link).duplicated()))]
    seed = pd.to_numeric(column(f, "tags.seed"), errors="coerce")
    tidy = pd.DataFrame({
        "run_id": column(f, "run_id"),
        # the run's id in the study that trained it: the same in a store restored from its record
        "study_run_id": column(f, "tags.record_of_run").fillna(column(f, "run_id")),
        "grid": column(f, "tags.grid"),
        "variant": column(f, "tags.variant").fillna("?"),
        "seed": seed.fillna(-1).astype(int),
        "dataset": column(f, "tags.dataset").fillna(column(f, "params.dataset.name")).fillna("unknown"),
        "data_source": column(f, "tags.data_source"),
        "paper_table": pd.to_numeric(column(f, "tags.paper_table"), errors="coerce"),
        "cell_id": column(f, "tags.cell_id"),
        "preset": column(f, "tags.preset").fillna(""),  # "" = trained without a preset
        "start_time": column(f, "start_time"),
        "arch": column(f, "params.model.arch"),
        "plain": (column(f, "params.model.se") == "None").astype(bool),  # the flattened `se: null`
        "epochs": number(f, "params.train.epochs"),
        "top1": number(f, f"metrics.{TOP1}"),
        "top5": number(f, f"metrics.{TOP5}"),
        "best_top1": number(f, "metrics.best_top1_err"),
        "best_top5": number(f, "metrics.best_top5_err"),
        "n_params": number(f, "metrics.params"),
        "caffe_params": number(f, "metrics.caffe_params"),
        "gflops": number(f, "metrics.gflops"),
        "reused": link.loc[f.index].astype(bool),  # a linked run: trained once, for another grid
        "train_seconds": number(f, "metrics.train_seconds"),  # write_report adds it from the epochs' times
        **{k: column(f, f"tags.{k}") for k in PROVENANCE_TAGS},
    }, index=f.index)
    params = f[[c for c in f.columns if c.startswith("params.")]]
    out = pd.concat([tidy, params], axis=1)
    return out.sort_values(["start_time", "study_run_id"], kind="stable").reset_index(drop=True)


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


def preset_cells(frame: pd.DataFrame, grid: str, preset: str | None) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The cell runs of `grid` trained with `preset` (None: without one), and the other presets
    ("" for none) that have finished runs of the grid. A smoke check never mixes into real results."""
    cells = cell_runs(frame)
    cells = cells.loc[cells["grid"].fillna(grid) == grid]
    mine = cells["preset"] == (preset or "")
    return cells.loc[mine], tuple(sorted(set(cells.loc[~mine, "preset"])))


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

