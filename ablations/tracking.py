"""MLflow tracking: one experiment per grid, one run per cell (per store), linked into the other grids listing it.

Each grid's experiment has one parent run (tag `grid_parent`), created once per store; its cells' runs
(and linked runs) are nested under it (`mlflow.parentRunId`), as sweeps appear in the MLflow UI, and
the grid's report (tables, figures) is logged as its artifacts.

All writes go through an explicit `MlflowClient` (no global active run), so several
workers can log their own runs side by side. Several processes writing one SQLite file
take turns on its lock; a call that still finds it locked is retried with backoff.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence, TypeVar, cast

import torch
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from ablations.config import Cell, ExperimentConfig
from ablations.errors import StoreError
from ablations.util.paths import beside_store
from ablations.util.procs import gone_here, pid_namespace, process_token

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"FINISHED", "FAILED", "KILLED"}


def default_tracking_uri() -> str:
    """The embedded default: a SQLite store in the current project folder."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _artifact_location(tracking_uri: str, name: str) -> str | None:
    # Keep a local store's artifacts beside its database, not wherever the process happened to start.
    if tracking_uri.startswith("sqlite:///"):
        return (beside_store(tracking_uri, "mlartifacts") / name).as_uri()
    return None


# Schemes MLflow opens as a tracking store ('' is a local folder, the file store).
_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks"}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _writable_folder(folder: Path) -> str | None:
    """Why a file cannot be created in `folder` (None: it can)."""
    if not folder.exists():
        above = next((p for p in folder.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            return f"{above} is not a folder"
        return f"folder {folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    return None


def check_tracking_uri(tracking_uri: str) -> None:
    """Raise StoreError, in one line, when a tracking URI cannot be opened; create nothing.

    Checked before anything is trained, logged or written, so a typo leaves no trace.
    """
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme == "" and tracking_uri.startswith("file:"):
        scheme = "file"
    if scheme not in _SCHEMES:
        raise StoreError(f"--tracking-uri {tracking_uri}: unknown scheme {scheme!r} (use sqlite:///PATH, "
                         "postgresql://..., mysql://..., http(s)://... or a folder)")
    if scheme == "sqlite":
        path = tracking_uri.split("://", 1)[1]
        if path in ("", "/", "/:memory:"):
            return  # an in-memory database
        db = Path(path.removeprefix("/"))  # sqlite:///rel.db -> rel.db; sqlite:////abs.db -> /abs.db
        if db.is_dir():
            raise StoreError(f"--tracking-uri {tracking_uri}: {db} is a folder, not a database file")
        if not db.exists():
            problem = _writable_folder(db.parent if str(db.parent) else Path("."))
            if problem:
                raise StoreError(f"--tracking-uri {tracking_uri}: cannot create the database: {problem}")
            return
        _check_sqlite_store(tracking_uri, db)
    elif scheme in ("", "file"):
        folder = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
        if folder.exists() and not folder.is_dir():
            raise StoreError(f"--tracking-uri {tracking_uri}: {folder} is not a folder")
        if not folder.exists():
            problem = _writable_folder(folder.parent)
            if problem:
                raise StoreError(f"--tracking-uri {tracking_uri}: cannot create the store: {problem}")


def _check_sqlite_store(tracking_uri: str, db: Path) -> None:
    """An existing SQLite file: it must be a database (an empty file is one), writable, and MLflow's."""
    if not os.access(db, os.R_OK | os.W_OK):
        raise StoreError(f"--tracking-uri {tracking_uri}: {db} is not readable and writable")
    try:
        with open(db, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"--tracking-uri {tracking_uri}: cannot read {db}: {exc.strerror or exc}") from None
    if head and head != _SQLITE_MAGIC:
        raise StoreError(f"--tracking-uri {tracking_uri}: {db} is not an SQLite database")
    if not head:
        return  # SQLite takes an empty file as a new database
    try:  # read-only: checking must not change the file
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StoreError(f"--tracking-uri {tracking_uri}: {db} is not a usable SQLite database ({exc})") from None
    if tables and "experiments" not in tables:
        raise StoreError(f"--tracking-uri {tracking_uri}: {db} is an SQLite database but not an MLflow store "
                         f"(no experiments table; it has {', '.join(sorted(tables)[:3])})")


T = TypeVar("T")
LOCK_RETRY_SECONDS = 300.0  # how long one call may wait for a busy SQLite store before it gives up


def is_locked_error(exc: BaseException) -> bool:
    """SQLite's 'database is locked' (a writer held the file past the driver's 5 s timeout)."""
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def _backoff(fn: Callable[..., T], args: tuple, kwargs: dict, *, retry_if: Callable[[Exception], bool],
             first: float, cap: float, budget: float, on_retry: Callable[[Exception, float], None] | None = None,
             give_up: Callable[[Exception], Exception] | None = None) -> T:
    """Call `fn`, retrying with jittered exponential backoff (`first` seconds, doubling up to `cap`) while
    `retry_if(error)`, for up to `budget` seconds; then the last error, or `give_up(error)` in its place.
    The jitter spreads out callers that met the same failure together, so they don't collide again."""
    delay, deadline = first, time.monotonic() + budget
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            left = deadline - time.monotonic()
            if not retry_if(exc):
                raise
            if left <= 0:
                if give_up is None:
                    raise
                raise give_up(exc) from exc
            pause = min(delay * random.uniform(0.5, 1.5), left)
            if on_retry is not None:
                on_retry(exc, pause)
        time.sleep(pause)
        delay = min(2 * delay, cap)


def retry_locked(fn: Callable[..., T], *args: Any, budget: float = LOCK_RETRY_SECONDS, **kwargs: Any) -> T:
    """Call `fn`, retrying with backoff (50 ms up to 2 s) while the store reports a lock.

    Safe to repeat: a statement that hit the lock was rolled back, so nothing was written.
    """
    return _backoff(fn, args, kwargs, retry_if=is_locked_error, first=0.05, cap=2.0, budget=budget)


STORE_OUTAGE_SECONDS = 300.0  # how long a call that cannot reach the store is retried before it gives up


class StoreUnreachable(Exception):
    """The tracking store could not be reached through every retry (the message names the last error)."""


# What a store answers (the run is not there, the id is malformed), as opposed to failing to answer.
_ANSWERS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def is_store_answer(exc: BaseException) -> bool:
    """Whether `exc` is the store's answer to a request, rather than the store not answering (a
    locked or missing database file, a server down or overloaded, a network error)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in _ANSWERS


def retry_outage(fn: Callable[..., T], *args: Any, what: str, budget: float | None = None, **kwargs: Any) -> T:
    """Call `fn`, retrying with backoff (1 s up to 30 s) while the store does not answer, for up to
    `budget` seconds (STORE_OUTAGE_SECONDS); then raise StoreUnreachable. The store's answers
    (`is_store_answer`) are raised as they are. Each failure is one line on stderr naming `what`."""
    budget = STORE_OUTAGE_SECONDS if budget is None else budget

    def text(exc: Exception) -> str:
        return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__

    def warn(exc: Exception, pause: float) -> None:
        print(f"warning: tracking store unreachable ({what}): {text(exc)}; retrying in {pause:.1f}s "
              f"(giving up after {budget:.0f}s)", file=sys.stderr, flush=True)

    return _backoff(fn, args, kwargs, retry_if=lambda exc: not is_store_answer(exc), first=1.0, cap=30.0,
                    budget=budget, on_retry=warn,
                    give_up=lambda exc: StoreUnreachable(f"tracking store unreachable for {budget:.0f}s ({what}): "
                                                         f"{text(exc)}"))


class RetryingClient:
    """An MlflowClient whose every call goes through `retry_locked`."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return retry_locked(attr, *args, **kwargs)

        return call


def download_artifact(client: MlflowClient, run_id: str, path: str, dst: str) -> Path:
    """One artifact of the run into `dst`, or StoreError in one line."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: a bar is noise
    try:
        return Path(client.download_artifacts(run_id, path, dst))
    except Exception as exc:  # MLflow raises different types per store; the caller needs one clear message
        raise StoreError(f"run {run_id}: cannot read artifact {path!r}: {str(exc).splitlines()[0]}") from exc


def has_weights(client: MlflowClient, run_id: str) -> bool:
    """Whether a run has its final weights as an artifact (one listing; no download)."""
    return any(a.path == "model/weights.pt" for a in client.list_artifacts(run_id, "model"))


def client_for(tracking_uri: str) -> MlflowClient:
    client = MlflowClient(tracking_uri=tracking_uri)
    return cast(MlflowClient, RetryingClient(client)) if tracking_uri.startswith("sqlite:") else client


def ensure_experiment(client: MlflowClient, tracking_uri: str, grid: str, description: str = "") -> str:
    """The experiment of a grid, created once before any run starts (concurrent creation races)."""
    found = client.get_experiment_by_name(grid)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    tags = {"mlflow.note.content": description} if description else None
    try:
        return client.create_experiment(grid, artifact_location=_artifact_location(tracking_uri, grid), tags=tags)
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(grid)
        if found is None:
            raise
        return found.experiment_id


# A grid's parent run: its tag, and the MLflow tag that nests a run under it (what the UI reads).
GRID_PARENT, PARENT_RUN_ID = "grid_parent", "mlflow.parentRunId"
LEGACY_REPORT = "report"  # before parents, a run tagged report=true held a grid's report: it becomes the parent


def parent_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """The experiment's parent runs, oldest first (one, unless a store without locks raced)."""
    found = runs_of(client, experiment_id, f"tags.{GRID_PARENT} = 'true'")
    return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _parent_lock(tracking_uri: str, lock: ContextManager[None] | None) -> ContextManager[None]:
    """Processes creating a grid's parent take turns: a lock file beside a SQLite store, else the
    caller's (the queue's: a journal file or PostgreSQL lock shared by every worker of the grid)."""
    if tracking_uri.startswith("sqlite:///"):
        return FileLock(tracking_uri.removeprefix("sqlite:///") + ".parent.lock")
    return lock or contextlib.nullcontext()


def ensure_parent(client: MlflowClient, tracking_uri: str, experiment_id: str, grid: str, description: str = "",
                  lock: ContextManager[None] | None = None) -> str:
    """The id of the grid's parent run in its experiment, created once per store: found by its tag
    (the oldest, should there ever be two), else the former report run promoted, else a new one.

    The parent is a container: FINISHED from the start (nothing trains in it), no cell_id tag (so
    nothing counts it as a cell), its description the grid's."""
    with _parent_lock(tracking_uri, lock):
        found = parent_runs(client, experiment_id)
        if found:
            return found[0].info.run_id
        legacy = runs_of(client, experiment_id, f"tags.{LEGACY_REPORT} = 'true'")
        if legacy:
            run_id = min(legacy, key=lambda r: (r.info.start_time or 0, r.info.run_id)).info.run_id
            client.log_batch(run_id, tags=[RunTag(GRID_PARENT, "true"), RunTag("mlflow.runName", grid)])
            client.delete_tag(run_id, LEGACY_REPORT)
            return run_id
        tags = {GRID_PARENT: "true", "grid": grid, **({"mlflow.note.content": description} if description else {})}
        run_id = client.create_run(experiment_id, tags=tags, run_name=grid).info.run_id
        client.set_terminated(run_id, status="FINISHED")
        return run_id


def attach_to_parent(client: MlflowClient, experiment_id: str, parent_id: str) -> int:
    """Nest under `parent_id` the experiment's cell runs (linked ones too) that have no parent yet,
    e.g. those of a store made before grids had parents; how many."""
    attached = 0
    for run in runs_of(client, experiment_id):
        if "cell_id" in run.data.tags and PARENT_RUN_ID not in run.data.tags:
            client.set_tag(run.info.run_id, PARENT_RUN_ID, parent_id)
            attached += 1
    return attached


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'se': {'reduction': 16}}} -> {'model.se.reduction': 16}."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name as the OS reports it (Linux /proc/cpuinfo; else `platform`), for provenance."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def runs_of(client: MlflowClient, experiment_id: str | Sequence[str], filter_string: str = "") -> list:
    ids = [experiment_id] if isinstance(experiment_id, str) else list(experiment_id)
    if not ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def finished_cell_ids(client: MlflowClient, experiment_id: str) -> set[str]:
    runs = runs_of(client, experiment_id, "attributes.status = 'FINISHED'")
    return {r.data.tags["cell_id"] for r in runs if "cell_id" in r.data.tags}


def finished_run_of(client: MlflowClient, experiment_id: str, cell_id: str) -> Run | None:
    """The FINISHED run of one cell, if there is one (a worker checks before it trains)."""
    runs = runs_of(client, experiment_id, f"tags.cell_id = '{cell_id}' and attributes.status = 'FINISHED'")
    return runs[0] if runs else None


# A linked run shows a cell trained in another grid's experiment in this grid's one: these tags name its source.
REUSED_FROM_RUN, REUSED_FROM_GRID = "reused_from_run", "reused_from_grid"


def is_link(run: Run) -> bool:
    return REUSED_FROM_RUN in run.data.tags


def store_experiment_ids(client: MlflowClient) -> list[str]:
    """Every (active) experiment of the store: one per grid."""
    return [e.experiment_id for e in client.search_experiments()]


def store_finished_runs(client: MlflowClient, cell_ids: Iterable[str] | None = None) -> dict[str, list[Run]]:
    """The FINISHED cell runs of the whole store by the cell id they carry; originals before linked
    runs, oldest first. `cell_ids`: only these (one query each), else every cell run."""
    exps = store_experiment_ids(client)
    if cell_ids is None:
        found = runs_of(client, exps, "attributes.status = 'FINISHED'")
    else:
        found = [r for cid in dict.fromkeys(cell_ids)
                 for r in runs_of(client, exps, f"tags.cell_id = '{cid}' and attributes.status = 'FINISHED'")]
    out: dict[str, list[Run]] = {}
    for run in sorted(found, key=lambda r: (is_link(r), r.info.start_time or 0, r.info.run_id)):
        if "cell_id" in run.data.tags:
            out.setdefault(run.data.tags["cell_id"], []).append(run)
    return out


def runs_of_cell(finished: Mapping[str, list[Run]], cell: Cell) -> list[Run]:
    """A cell's runs among `finished` (store_finished_runs): under its id, then its legacy id."""
    return [r for cid in cell.ids for r in finished.get(cid, [])]


def link_run(client: MlflowClient, experiment_id: str, cell: Cell, source: Run,
             extra_tags: Mapping[str, str] | None = None) -> str:
    """A FINISHED run in `experiment_id` (another grid's) that shows `cell`, trained in `source`:
    the source's tags, params and metrics (per epoch too), with this grid's cell naming it, and
    the source named by REUSED_FROM_RUN / REUSED_FROM_GRID. No weights: the source has them."""
    if is_link(source):  # point at the run that was trained, not at another link
        source = client.get_run(source.data.tags[REUSED_FROM_RUN])
    skip = {"grid", "variant", "seed", "cell_id", "preset", "paper_table", "host", "pid", "resumes", "stopped",
            "failure_reason", CLAIM, "owner", "pidns", REUSED_FROM_RUN, REUSED_FROM_GRID}
    tags = {k: v for k, v in source.data.tags.items() if not k.startswith("mlflow.") and k not in skip}
    tags.update({"grid": cell.grid, "variant": cell.variant, "seed": str(cell.seed), "cell_id": cell.cell_id,
                 **owner_tags(),  # a link cut short is reaped as any run
                 REUSED_FROM_RUN: source.info.run_id, REUSED_FROM_GRID: source.data.tags.get("grid", "")})
    if cell.preset:
        tags["preset"] = cell.preset
    tags.update(extra_tags or {})
    run = client.create_run(experiment_id, tags=tags, run_name=f"{cell.variant} seed={cell.seed}")
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in source.data.params.items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in source.data.metrics for m in client.get_metric_history(source.info.run_id, key)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def kill_running(client: MlflowClient, experiment_id: str | Sequence[str], tags: Mapping[str, str], reason: str) -> int:
    """Mark the RUNNING runs carrying all of `tags` KILLED, with `reason`; how many there were."""
    filters = " and ".join([f"tags.{k} = '{v}'" for k, v in tags.items()] + ["attributes.status = 'RUNNING'"])
    runs = runs_of(client, experiment_id, filters)
    for run in runs:
        client.set_tag(run.info.run_id, "failure_reason", reason)
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(runs)


def owner_tags() -> dict[str, str]:
    """Who writes a run: host and pid for people; the PID namespace, so that only a process of the same
    one reads the pid as a sign of death (ablations.util.procs); the process's random token."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "pidns": pid_namespace() or "",
            "owner": process_token()}


def process_gone(run: Run) -> bool:
    """Whether the process that last owned `run` is known to be gone (only from its own PID namespace)."""
    return gone_here(run.data.tags.get("pidns"), run.data.tags.get("pid"))


def reap_dead_runs(client: MlflowClient, experiment_id: str) -> int:
    """Mark RUNNING runs whose process is known to be gone (it ran in this PID namespace) as KILLED;
    they will run again."""
    reaped = 0
    for run in runs_of(client, experiment_id, "attributes.status = 'RUNNING'"):
        if process_gone(run):
            client.set_tag(run.info.run_id, "failure_reason", "process died (found RUNNING at a later start)")
            client.set_terminated(run.info.run_id, status="KILLED")
            reaped += 1
    return reaped


CLAIM = "claim"  # the run's tag naming the queue claim that holds it (its fencing token)


class CellRun:
    """The MLflow run of one cell: tags and params at the start, metrics as they come.

    With `resume_run_id`, the existing run of a stopped cell is reopened instead (status RUNNING
    again, this process as its owner, the `resumes` tag counting up) and nothing is logged twice.
    It stays the run of the grid it was started in (its experiment and tags), whichever grid's
    worker resumes it: a cell has one run per store.

    `claim`: the queue claim this worker holds on the cell, written as the run's CLAIM tag; a worker
    that resumes the run later writes its own, and `holder()` tells the old one it is no longer its run.
    """

    def __init__(self, client: MlflowClient, experiment_id: str, cell: Cell, device: torch.device,
                 data_source: str, config: ExperimentConfig | None = None,
                 extra_tags: Mapping[str, str] | None = None, resume_run_id: str | None = None,
                 claim: str | None = None) -> None:
        self.client, self.claim = client, claim
        self.resumes = 0
        tags = {
            "grid": cell.grid,
            "variant": cell.variant,
            "seed": str(cell.seed),
            "cell_id": cell.cell_id,
            "dataset": cell.config.dataset.name,
            "data_source": data_source,
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "cuda_version": str(torch.version.cuda),
            "device": str(device),
            "device_name": device_name(device),
            "cpu_model": cpu_model(),
            **owner_tags(),
            **({CLAIM: claim} if claim is not None else {}),
            **({"preset": cell.preset} if cell.preset else {}),
            **(extra_tags or {}),
        }
        if resume_run_id is not None:
            self.run_id = resume_run_id
            found = client.get_run(resume_run_id)
            old = found.data.tags
            self.resumes = int(old.get("resumes", "0")) + 1
            own = {k: old[k] for k in ("grid", "variant", "seed", "preset", "paper_table", PARENT_RUN_ID) if k in old}
            if found.info.experiment_id != experiment_id:  # another grid's run: only its own grid's parent adopts it
                tags.pop(PARENT_RUN_ID, None)
            self.set_tags({**tags, **own, "resumes": str(self.resumes)})
            # why it stopped last time (it is running again), and an old claim when this one has none
            for stale in ("failure_reason", "stopped") + ((CLAIM,) if claim is None else ()):
                if stale in old:
                    client.delete_tag(resume_run_id, stale)
            client.update_run(resume_run_id, status="RUNNING")
            return
        run = client.create_run(experiment_id, tags=tags, run_name=f"{cell.variant} seed={cell.seed}")
        self.run_id = run.info.run_id
        resolved = (config or cell.config).model_dump(mode="json")
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flatten(resolved).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=params[i:i + 100])

    def holder(self) -> str | None:
        """The claim that holds the run now, as the store says (one read)."""
        return self.client.get_run(self.run_id).data.tags.get(CLAIM)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_state_dict(self, state: Mapping[str, torch.Tensor], path: str = "model") -> None:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "weights.pt"
            torch.save({k: v.detach().cpu() for k, v in state.items()}, file)
            self.client.log_artifact(self.run_id, str(file), path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str, reason: str | None = None) -> None:
        assert status in TERMINAL
        if reason:
            self.set_tags({"failure_reason": reason[:5000]})
        self.client.set_terminated(self.run_id, status=status)

