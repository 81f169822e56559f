"""A study's record: its FINISHED cell runs, without artifacts, in a small SQLite store of their own.

A record is what a study commits next to its tables (`--export-record`): per run its tags (seed,
cell id, device, precision, compile mode, commit, ...), params and every metric with its steps and
timestamps, start and end times. `--restore-record` copies it into a store, new or not, so that
reports regenerate from it and the study resumes from it on a machine without the original store:
a cell whose FINISHED run is there is never trained again. Weights stay out (a few MB per run),
except those of the runs named at export (`--run-id`, e.g. the model the role-of-SE figures come
from): their `config.json` and `model/weights.pt` go to a folder beside the record,
`<record>.models/<run id>/`, and a restore logs them into the restored run, so `--analyze` works
on it as on the original.

Runs are copied through MLflow's public client, so run ids change; a linked run (a cell trained in
another grid) is pointed at the copy of its source. Copying is idempotent: a grid's cell that
already has a FINISHED run in the target is skipped.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run

from ablations.errors import StoreError
from ablations.tracking import (PARENT_RUN_ID, REUSED_FROM_RUN, client_for, ensure_experiment, ensure_parent,
                                download_artifact, has_weights, is_link, runs_of)

RECORD_OF = "record_of_run"  # the id the run had in the store it was first recorded from


MODEL_FILES = ("config.json", "model/weights.pt")  # what a kept model is: enough for --analyze


@dataclass(frozen=True)
class Copied:
    runs: int  # copied now
    skipped: int  # already there
    grids: tuple[str, ...]
    ids: dict[str, str] = field(default_factory=dict, compare=False)  # first-recorded run id -> its run in the target
    models: int = 0  # kept models written (export) or logged into their runs (restore)

    def describe(self, what: str) -> str:
        grids = ", ".join(self.grids) or "none"
        models = f"; {self.models} model(s) with weights" if self.models else ""
        return f"{what}: {self.runs} finished cell runs copied, {self.skipped} already there{models}; grids: {grids}"


def models_dir(record: Path) -> Path:
    """The folder of a record's kept models: `record.db` -> `record.db.models/`."""
    return record.with_name(record.name + ".models")


def _finished_cell_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs = runs_of(client, experiment_id, "attributes.status = 'FINISHED'")
    return sorted((r for r in runs if "cell_id" in r.data.tags), key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _copy_run(src: MlflowClient, dst: MlflowClient, experiment_id: str, run: Run, tags: dict[str, str],
              parent: str | None = None) -> str:
    """One run into `experiment_id` of `dst`: tags, params, metric histories, start and end time;
    nested under `parent` (the source's parent is another store's run)."""
    tags = {k: v for k, v in tags.items() if k != PARENT_RUN_ID} | ({PARENT_RUN_ID: parent} if parent else {})
    created = dst.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
    run_id = created.info.run_id
    params = [Param(k, v) for k, v in sorted(run.data.params.items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        dst.log_batch(run_id, params=params[i:i + 100])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in sorted(run.data.metrics) for m in src.get_metric_history(run.info.run_id, key)]
    for i in range(0, len(metrics), 1000):
        dst.log_batch(run_id, metrics=metrics[i:i + 1000])
    dst.set_terminated(run_id, status="FINISHED", end_time=run.info.end_time)
    return run_id


def copy_finished(src_uri: str, dst_uri: str, grids: list[str] | None = None, nest: bool = True) -> Copied:
    """Copy the FINISHED cell runs of `grids` (every experiment if None) from one store into another.

    `nest`: the copies are nested under their grid's parent run in the target (created once), as a
    grid's runs are; else (a record: cell runs only) they have no parent."""
    src, dst = client_for(src_uri), client_for(dst_uri)
    experiments = [e for e in src.search_experiments() if grids is None or e.name in grids]
    if grids is not None:
        missing = sorted(set(grids) - {e.name for e in experiments})
        if missing:
            raise StoreError(f"{src_uri}: no experiment for grid {', '.join(missing)}")
    new_ids: dict[str, str] = {}  # source run id -> its copy (or the run already there)
    first: dict[str, str] = {}  # first-recorded run id -> its copy (or the run already there)
    pending: list[tuple[str, Run]] = []
    copied = skipped = 0
    parents: dict[str, str] = {}  # target experiment -> its grid's parent run, which the copies are nested under
    for exp in experiments:
        description = exp.tags.get("mlflow.note.content", "")
        dst_exp = ensure_experiment(dst, dst_uri, exp.name, description)
        have = {r.data.tags["cell_id"]: r for r in _finished_cell_runs(dst, dst_exp)}
        for run in _finished_cell_runs(src, exp.experiment_id):
            there = have.get(run.data.tags["cell_id"])
            if there is not None:
                new_ids[run.info.run_id] = there.info.run_id
                first[run.data.tags.get(RECORD_OF, run.info.run_id)] = there.info.run_id
                skipped += 1
                continue
            if nest and dst_exp not in parents:
                parents[dst_exp] = ensure_parent(dst, dst_uri, dst_exp, exp.name, description)
            if is_link(run):
                pending.append((dst_exp, run))  # after its source has a copy
            else:
                tags = {**run.data.tags, RECORD_OF: run.data.tags.get(RECORD_OF, run.info.run_id)}
                new_ids[run.info.run_id] = _copy_run(src, dst, dst_exp, run, tags, parents.get(dst_exp))
                first[tags[RECORD_OF]] = new_ids[run.info.run_id]
                copied += 1
    for dst_exp, run in pending:
        source = run.data.tags[REUSED_FROM_RUN]
        if source not in new_ids:
            raise StoreError(f"{src_uri}: run {run.info.run_id} links run {source}, which is not a FINISHED cell run")
        tags = {**run.data.tags, REUSED_FROM_RUN: new_ids[source],
                RECORD_OF: run.data.tags.get(RECORD_OF, run.info.run_id)}
        new_ids[run.info.run_id] = _copy_run(src, dst, dst_exp, run, tags, parents.get(dst_exp))
        copied += 1
    grids_with_runs = tuple(e.name for e in experiments if _finished_cell_runs(src, e.experiment_id))
    return Copied(copied, skipped, grids_with_runs, first)


def export_record(store_uri: str, path: Path, grids: list[str] | None = None,
                  models: list[str] | None = None) -> Copied:
    """Write the record of `store_uri` to the SQLite file `path`, anew (an existing file is replaced).

    `models`: run ids whose config and weights are kept beside the record (`models_dir`). Models kept
    by an earlier export stay while their run is still in the record (a later export need not name
    them again); those of runs no longer in it are removed."""
    path = path.resolve()
    src = client_for(store_uri)
    keep = {run_id: _recorded_id(src, run_id, grids) for run_id in models or []}  # checked before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name never used before: MLflow keeps one engine per store URI for the life of the process.
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        copied = copy_finished(store_uri, f"sqlite:///{tmp}", grids, nest=False)  # cell runs only
        _keep_models(src, keep, set(copied.ids), models_dir(path))
        tmp.replace(path)  # a reader never sees half a record
    finally:
        tmp.unlink(missing_ok=True)
    return replace(copied, models=len(keep))


def _recorded_id(src: MlflowClient, run_id: str, grids: list[str] | None) -> str:
    """The id a run to keep the model of is recorded under, or StoreError when it is not a FINISHED cell
    run with weights of the grids exported."""
    refused = f"--run-id {run_id}: not a FINISHED cell run of the record's grids, so its model is not kept"
    try:
        run = src.get_run(run_id)
    except Exception:  # MLflow's own error for an unknown id, per store kind
        raise StoreError(refused) from None
    grid = src.get_experiment(run.info.experiment_id).name
    if run.info.status != "FINISHED" or "cell_id" not in run.data.tags or (grids is not None and grid not in grids):
        raise StoreError(refused)
    if not has_weights(src, run_id):
        raise StoreError(f"--run-id {run_id}: the run has no model/weights.pt in this store (a link to a cell "
                         f"trained in another grid, or a restored run): name the run that trained it")
    return run.data.tags.get(RECORD_OF, run_id)


def _keep_models(src: MlflowClient, keep: dict[str, str], recorded: set[str], folder: Path) -> None:
    """Each kept run's model files into `folder/<recorded run id>/`; prune the folders of runs not recorded."""
    for stale in (d for d in folder.glob("*") if d.is_dir() and d.name not in recorded):
        shutil.rmtree(stale)
    for run_id, first in keep.items():
        with tempfile.TemporaryDirectory(prefix="senet-model-") as tmp:
            for name in MODEL_FILES:
                target = folder / first / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(download_artifact(src, run_id, name, tmp), target)


def restore_record(path: Path, store_uri: str, grids: list[str] | None = None) -> Copied:
    """Copy the record at `path` into the store `store_uri` (created if new); idempotent.

    Read from a private copy: opening the record itself as a store could migrate its schema in place,
    and MLflow would keep serving a record replaced later in this process from its cached engine."""
    if not path.is_file():
        raise StoreError(f"--restore-record {path}: no such file")
    with path.open("rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise StoreError(f"--restore-record {path}: not a record (a record is an SQLite file from --export-record)")
    with tempfile.TemporaryDirectory(prefix="senet-record-") as tmp:
        copy = Path(tmp) / f"record-{uuid.uuid4().hex[:12]}.db"
        shutil.copyfile(path, copy)
        copied = copy_finished(f"sqlite:///{copy}", store_uri, grids)
    return replace(copied, models=_log_models(client_for(store_uri), copied, models_dir(path)))


def _log_models(dst: MlflowClient, copied: Copied, folder: Path) -> int:
    """Log each kept model into its run in the target, unless that run has weights already."""
    logged = 0
    for model in sorted(d for d in folder.glob("*") if d.is_dir()):
        run_id = copied.ids.get(model.name)
        if run_id is None:  # a grid not restored this time
            continue
        if has_weights(dst, run_id):
            continue
        missing = [name for name in MODEL_FILES if not (model / name).is_file()]
        if missing:  # e.g. a clone where git left the weights out
            raise StoreError(f"--restore-record: the kept model {model} lacks {', '.join(missing)}")
        for name in MODEL_FILES:
            dst.log_artifact(run_id, str(model / name), str(Path(name).parent) if "/" in name else None)
        logged += 1
    return logged
