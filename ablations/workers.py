"""Parallel and distributed grids: each cell is a trial of an Optuna study, claimed by workers.

    config -> cells -> (enqueued as WAITING trials) -> claimed by workers -> runs -> MLflow

A grid's cells are enqueued once as WAITING trials of a study in a shared storage (a journal
file beside the MLflow store, or PostgreSQL for many machines). Workers, in any number and on
any machine, claim WAITING trials one at a time (WAITING -> RUNNING is atomic in both storages),
train the cell, and tell the trial COMPLETE or FAIL. A claimed trial carries a heartbeat; a
trial whose heartbeat stops (its worker died) is failed by any other worker and its cell is
enqueued again. Every process reconciles the queue with the same rule (`cell_status`), so a
crash between any two steps leaves nothing that the next reconcile cannot repair.
docs/distributed.md explains the design and how to run it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence, TextIO

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from ablations.config import Cell, ConfigError, ExperimentsFile
from ablations.progress import GridProgress, fmt_duration

optuna.logging.set_verbosity(optuna.logging.WARNING)

JOURNAL_NAME = "optuna-journal.log"


# ----------------------------------------------------------------------------- command line


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    """The options of parallel and distributed runs (shared by the launcher and `worker`)."""
    g = p.add_argument_group("parallel and distributed runs (docs/distributed.md)",
                             "`run_ablation.py worker --grid NAME --storage URL ...` joins a grid's workers from any "
                             "machine: it pulls cells until the grid is done.")
    g.add_argument("--workers", type=int, metavar="N",
                   help="run N cells at once, each in its own process (default with --gpus: GPUs x --workers-per-gpu)")
    g.add_argument("--gpus", metavar="LIST", help="GPU indices to spread the workers over, e.g. 0,1 "
                   "(default on CUDA: every visible GPU); each worker sees one GPU")
    g.add_argument("--workers-per-gpu", type=int, default=1, metavar="K", help="workers sharing each GPU (default: 1)")
    g.add_argument("--storage", metavar="URL", help="Optuna storage queueing the cells: postgresql://user@host/db for "
                   f"many machines, or a journal file path (default: {JOURNAL_NAME} beside the MLflow store)")
    g.add_argument("--retries", type=int, metavar="K",
                   help="run a failed cell up to K more times (default: the grid's queue setting, else 0)")
    g.add_argument("--heartbeat", type=int, default=20, metavar="SECONDS",
                   help="how often a worker tells the storage its cell is alive (default: %(default)s)")
    g.add_argument("--grace", type=int, default=90, metavar="SECONDS",
                   help="a cell whose heartbeat is older is taken back and queued again (default: %(default)s)")
    g.add_argument("--worker-id", help=argparse.SUPPRESS)
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads of a `worker` (default: every core; "
                   "--workers N gives each of its workers cores // N)")
    g.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # started by a launcher: it sums up


def wants_workers(args: argparse.Namespace) -> bool:
    """Whether to run through the queue (retries are a queue feature: `--retries` alone means one worker)."""
    return any(v is not None for v in (args.workers, args.storage, args.gpus, args.retries))


def _check_args(args: argparse.Namespace) -> None:
    if args.force:
        raise ConfigError("--force: not supported with workers (the queue already re-runs failed cells); "
                          "run without --workers/--storage to force")
    for name in ("workers", "workers_per_gpu", "heartbeat", "grace"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if args.retries is not None and args.retries < 0:
        raise ConfigError(f"--retries: must be 0 or more, got {args.retries}")
    if args.grace <= args.heartbeat:
        raise ConfigError(f"--grace: must be longer than --heartbeat ({args.heartbeat} s), got {args.grace}")


def parse_gpus(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {text}: expected GPU indices, e.g. 0,1") from None
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {text}: expected distinct GPU indices, e.g. 0,1")
    return gpus


def worker_slots(workers: int | None, gpus: Sequence[int], per_gpu: int,
                 visible: str | None = None) -> list[str | None]:
    """For each worker, the CUDA_VISIBLE_DEVICES that pins it to one GPU, or None on the CPU.

    Round robin over the GPUs, so N workers on G GPUs fill every GPU before doubling up.
    `visible` is the launcher's own CUDA_VISIBLE_DEVICES: GPU indices count within it.
    """
    n = workers or (len(gpus) * per_gpu if gpus else 1)
    names = [v.strip() for v in visible.split(",")] if visible else [str(g) for g in range(max(gpus, default=0) + 1)]
    return [names[gpus[i % len(gpus)]] if gpus else None for i in range(n)]


def _gpus_for(args: argparse.Namespace) -> list[int]:
    """The GPU indices to spread workers over: --gpus, the one of --device cuda:N, or all of them."""
    import torch

    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.gpus is not None and args.device == "cpu":
        raise ConfigError("--gpus: cannot pin workers to GPUs with --device cpu")
    if (on_cuda or args.gpus is not None) and not torch.cuda.is_available():
        raise ConfigError(f"--{'gpus' if args.gpus is not None else 'device'}: CUDA is not available on this machine")
    if not on_cuda and args.gpus is None:
        if args.workers_per_gpu != 1:
            raise ConfigError("--workers-per-gpu: no GPU to pack workers onto (use --workers N on a CPU)")
        return []
    count = torch.cuda.device_count()
    if args.gpus is not None:
        gpus = parse_gpus(args.gpus)
    elif ":" in args.device:  # --device cuda:N: that one GPU
        gpus = [int(args.device.split(":", 1)[1])]
    else:
        gpus = list(range(count))
    if max(gpus) >= count:
        raise ConfigError(f"--gpus {','.join(map(str, gpus))}: this machine has {count} GPUs")
    return gpus


# ----------------------------------------------------------------------------- storage


def default_storage(tracking_uri: str) -> str:
    """The journal file beside the MLflow store (no server needed), or in the current folder."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / JOURNAL_NAME)
    if "://" not in tracking_uri or tracking_uri.startswith("file:"):
        return str(Path(tracking_uri.removeprefix("file://")).resolve().parent / JOURNAL_NAME)
    return str(Path.cwd() / JOURNAL_NAME)


def is_rdb(url: str) -> bool:
    return "://" in url


def open_storage(url: str, heartbeat: int, grace: int) -> tuple[BaseStorage, RDBStorage | None]:
    """The Optuna storage at `url` (and its RDBStorage, for locks), heartbeats on for databases."""
    if not is_rdb(url):
        path = Path(url).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), None
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are 'experimental' in Optuna; relied on here on purpose
                warnings.simplefilter("ignore", ExperimentalWarning)
                rdb = RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                 engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True})
            break
        except ModuleNotFoundError as exc:
            raise ConfigError(f"--storage {url}: needs the {exc.name} package (pip install psycopg2-binary)") from None
        except Exception as exc:
            # Workers starting together on an empty database race to create Optuna's tables; the
            # loser's next try finds them. Anything still failing (no server, bad credentials) is bad input.
            if attempt == 3:
                raise ConfigError(f"--storage {url}: cannot open: {str(exc).splitlines()[0]}") from None
            time.sleep(0.5 * (attempt + 1))
    return optuna.storages.get_storage(rdb), rdb


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_lock(rdb: RDBStorage, name: str) -> Iterator[None]:
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with rdb.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


@contextlib.contextmanager
def _store_init_lock(tracking_uri: str) -> Iterator[None]:
    """Workers starting together on a new SQLite store take turns creating its tables."""
    if tracking_uri.startswith("sqlite:///"):
        with _file_lock(Path(tracking_uri.removeprefix("sqlite:///") + ".init.lock")):
            yield
    else:
        yield


def study_name(grid: str, cells: Sequence[Cell]) -> str:
    """One study per grid *as resolved*: the same flags on any machine give the same study, and a
    worker never sees a cell it cannot build (a different --preset or --seeds is another study)."""
    digest = hashlib.sha256(",".join(sorted(c.cell_id for c in cells)).encode()).hexdigest()[:10]
    return f"{grid}-{digest}"


# ----------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class CellStatus:
    state: str  # done | failed (for good) | running | waiting | pending (to be enqueued)
    enqueue: int | None = None  # the attempt to enqueue when pending
    reason: str = ""  # why the last attempt failed
    attempts: int = 0  # real failures in the current series of attempts


def cell_status(trials: Sequence[FrozenTrial], retries: int, reset_failed: bool = False) -> CellStatus:
    """Where one cell stands, from its trials (oldest first); what to enqueue if anything.

    A trial FAILed by its own worker carries `failure_kind`: 'failed' (the cell failed: counts
    against --retries) or 'interrupted' (Ctrl-C: does not count). A FAIL without it was failed by
    another worker after its heartbeat stopped (the worker died): it does not count either.
    PRUNED trials are duplicates set aside at claim time and are ignored.
    """
    trials = [t for t in trials if t.state != TrialState.PRUNED]
    if any(t.state == TrialState.COMPLETE for t in trials):
        return CellStatus("done")
    if any(t.state == TrialState.RUNNING for t in trials):
        return CellStatus("running")
    if any(t.state == TrialState.WAITING for t in trials):
        return CellStatus("waiting")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if not failed:
        return CellStatus("pending", enqueue=0)
    last = failed[-1]
    attempt = int(last.user_attrs.get("attempt", 0))
    reason = str(last.user_attrs.get("failure_reason", "worker stopped (heartbeat lost)"))
    if last.user_attrs.get("failure_kind") != "failed":
        return CellStatus("pending", enqueue=attempt, reason=reason)
    if attempt < retries:
        return CellStatus("pending", enqueue=attempt + 1, reason=reason, attempts=attempt + 1)
    if reset_failed:  # a new launch gives failed cells a fresh series, as a serial re-run does
        return CellStatus("pending", enqueue=0, reason=reason)
    return CellStatus("failed", reason=reason, attempts=attempt + 1)


def by_cell(trials: Sequence[FrozenTrial]) -> dict[str, list[FrozenTrial]]:
    out: dict[str, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if "cell_id" in t.user_attrs:
            out.setdefault(t.user_attrs["cell_id"], []).append(t)
    return out


def duplicate_of(trial: FrozenTrial, same_cell: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """An older live or finished trial of the same cell: then `trial` is a duplicate and must not run.

    The oldest live trial of a cell is never anyone's duplicate, so a cell is never set aside twice.
    """
    older = [t for t in same_cell if t.number < trial.number
             and t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)]
    return older[0] if older else None


# ----------------------------------------------------------------------------- one grid's queue


class GridQueue:
    """The cells of one grid as trials of one Optuna study."""

    def __init__(self, grid: str, cells: Sequence[Cell], storage_url: str, heartbeat: int, grace: int,
                 description: str = "") -> None:
        self.grid, self.cells = grid, {c.cell_id: c for c in cells}
        self.url, self.heartbeat, self.grace = storage_url, heartbeat, grace
        self.storage, self._rdb = open_storage(storage_url, heartbeat, grace)
        self.name = study_name(grid, cells)
        self.study = optuna.create_study(storage=self.storage, study_name=self.name, direction="minimize",
                                         load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(self.name)
        if "cells" not in self.study.user_attrs:  # for the dashboard: what the study is
            self.study.set_user_attr("grid", grid)
            self.study.set_user_attr("description", description)
            self.study.set_user_attr("cells", len(cells))
        self._variants = CategoricalDistribution(sorted({c.variant for c in cells}))
        self._seeds = CategoricalDistribution(sorted({c.seed for c in cells}))

    # -- reading
    def trials(self, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)

    def retries(self, override: int | None = None) -> int:
        return override if override is not None else int(self.study.user_attrs.get("retries", 0))

    def set_retries(self, retries: int) -> None:
        self.study.set_user_attr("retries", retries)

    def statuses(self, retries: int, reset_failed: bool = False) -> dict[str, CellStatus]:
        grouped = by_cell(self.trials())
        return {cid: cell_status(grouped.get(cid, []), retries, reset_failed) for cid in self.cells}

    # -- enqueueing
    @contextlib.contextmanager
    def _enqueue_lock(self) -> Iterator[None]:
        """Serialize read-then-enqueue so two launchers don't both enqueue a missing cell."""
        if self._rdb is None:
            with _file_lock(Path(self.url).resolve().with_suffix(".enqueue.lock")):
                yield
        elif self.url.startswith("postgresql"):
            with _pg_lock(self._rdb, self.name):
                yield
        elif self.url.startswith("sqlite:///"):
            with _file_lock(Path(self.url.removeprefix("sqlite:///") + ".enqueue.lock")):
                yield
        else:  # other databases: a rare double enqueue is set aside at claim time (duplicate_of)
            yield

    def reconcile(self, retries: int, reset_failed: bool = False) -> dict[str, CellStatus]:
        """Enqueue every cell that needs a (new) trial, once; return where every cell stands."""
        with self._enqueue_lock():
            statuses = self.statuses(retries, reset_failed)
            for cid, st in statuses.items():
                if st.enqueue is not None:
                    cell = self.cells[cid]
                    self.study.enqueue_trial(
                        {"variant": cell.variant, "seed": cell.seed},
                        user_attrs={"cell_id": cid, "grid": self.grid, "variant": cell.variant, "seed": cell.seed,
                                    "attempt": st.enqueue})
                    statuses[cid] = CellStatus("waiting")
        return statuses

    # -- claiming
    def claim(self) -> FrozenTrial | None:
        """Move one WAITING trial to RUNNING, atomically: exactly one caller wins each trial."""
        for t in self.trials((TrialState.WAITING,)):
            try:
                if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    return self.storage.get_trial(t._trial_id)
            except UpdateFinishedTrialError:
                continue
        return None

    def set_attrs(self, trial: FrozenTrial, attrs: Mapping[str, object]) -> None:
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(trial._trial_id, k, v)

    def set_params(self, trial: FrozenTrial, cell: Cell) -> None:
        """variant and seed as trial params, so the dashboard can plot error against them."""
        for name, dist, value in (("variant", self._variants, cell.variant), ("seed", self._seeds, cell.seed)):
            self.storage.set_trial_param(trial._trial_id, name, dist.to_internal_repr(value), dist)

    def finish(self, trial: FrozenTrial, state: TrialState, value: float | None = None,
               attrs: Mapping[str, object] | None = None) -> bool:
        """Tell a claimed trial's end; False if it was already ended (taken back after a lost heartbeat)."""
        try:
            self.set_attrs(trial, attrs or {})
            self.storage.set_trial_state_values(trial._trial_id, state, None if value is None else [value])
        except UpdateFinishedTrialError:
            return False
        return True

    # -- heartbeats
    def beat(self, trial: FrozenTrial) -> bool:
        """Record that `trial` is alive; False once it is no longer RUNNING (the claim was lost)."""
        try:
            if self._rdb is not None:
                self.storage.record_heartbeat(trial._trial_id)  # Optuna's own, on the database clock
            else:  # the journal has no heartbeat: a user attr with the time serves as one
                self.storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())
        except UpdateFinishedTrialError:
            return False
        return self.storage.get_trial(trial._trial_id).state == TrialState.RUNNING

    def reap_stale(self) -> list[FrozenTrial]:
        """FAIL every RUNNING trial whose heartbeat is older than the grace period; return them."""
        running = {t._trial_id: t for t in self.trials((TrialState.RUNNING,))}
        if not running:
            return []
        if self._rdb is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)  # Optuna's heartbeat check
        else:
            now = time.time()
            for t in running.values():
                last = float(t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now))
                if now - last > self.grace:
                    with contextlib.suppress(UpdateFinishedTrialError):  # another worker got there first
                        self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        return [t for t in self.trials((TrialState.FAIL,))
                if t._trial_id in running and "failure_kind" not in t.user_attrs]


class Heartbeat:
    """Keeps a claimed trial alive from a thread; `guard` stops the cell once the claim is lost."""

    def __init__(self, queue: GridQueue, trial: FrozenTrial) -> None:
        self.queue, self.trial = queue, trial
        self.lost, self._stop = threading.Event(), threading.Event()
        queue.beat(trial)  # the first beat before any work: a claimed trial is never without one
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{trial.number}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.queue.heartbeat):
            try:
                alive = self.queue.beat(self.trial)
            except Exception:  # a storage hiccup: the grace period covers a few missed beats
                continue
            if not alive:
                self.lost.set()
                return

    def record(self, run_id: str) -> None:
        """Note the MLflow run on the trial (for the dashboard and whoever takes the cell back)."""
        from ablations.runner import CellAborted

        try:
            self.queue.set_attrs(self.trial, {"mlflow_run_id": run_id})
        except UpdateFinishedTrialError:
            raise CellAborted("claim lost before training started") from None

    def guard(self, final: bool = False) -> None:
        from ablations.runner import CellAborted

        # Between steps the thread's verdict will do; before FINISHED ask the storage itself.
        if self.lost.is_set() or (final and not self.queue.beat(self.trial)):
            raise CellAborted("claim lost: the trial's heartbeat was too old and another worker took the cell")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- output


class Prefixed(io.TextIOBase):
    """A text stream that starts every line with a prefix (a worker's id).

    Whole lines only, one write each: lines of workers sharing a terminal or pipe never mix.
    """

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self.stream, self.prefix, self._partial = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


class WorkerProgress(GridProgress):
    """A worker's view of a grid: cells done counted over all workers, the ETA shared between them."""

    def __init__(self, grid: str, total: int, stream: TextIO, queue: GridQueue, retries: int | None) -> None:
        super().__init__(grid, total, stream=stream, live=False)
        self.queue, self.retries, self.parallel = queue, retries, 1

    def _sync(self) -> None:
        statuses = self.queue.statuses(self.queue.retries(self.retries))
        self.done = sum(s.state in ("done", "failed") for s in statuses.values())
        self.parallel = max(1, sum(s.state == "running" for s in statuses.values()))

    def _grid_eta(self) -> float | None:
        eta = super()._grid_eta()
        return eta / self.parallel if eta else eta

    def start_cell(self, cell: Cell, epochs: int) -> None:
        self._sync()
        super().start_cell(cell, epochs)

    def end_cell(self, cell: Cell, status: str, summary: str = "") -> None:
        self._sync()  # the trial is told after this line, so `done` counts it once when it goes up by one
        super().end_cell(cell, status, summary)

    def skip(self, cell: Cell, why: str = "already FINISHED") -> None:
        self._sync()
        super().skip(cell, why)


def _failed_line(grid: str, cell: Cell, st: CellStatus) -> str:
    tries = f" after {st.attempts} attempts" if st.attempts > 1 else ""
    return f"FAILED {grid}/{cell.variant} seed={cell.seed} (cell_id {cell.cell_id}){tries}: {st.reason}"


def _summary(queues: Sequence[GridQueue], retries: int | None, tracking_uri: str, stream: TextIO,
             already: Mapping[str, int] | None = None) -> int:
    """Print each grid's tally and every failed cell; the exit code."""
    from ablations.exit_codes import EXIT_FAILED, EXIT_OK

    failed_lines, unsettled = [], 0
    for q in queues:
        st = q.statuses(q.retries(retries))
        done = sum(s.state == "done" for s in st.values())
        failed = [(q.cells[cid], s) for cid, s in st.items() if s.state == "failed"]
        left = len(st) - done - len(failed)
        unsettled += left
        skipped = f" ({already[q.grid]} already done)" if already and already.get(q.grid) else ""
        print(f"grid {q.grid}: {done} finished{skipped}, {len(failed)} failed, {left} not done, of {len(st)} cells; "
              f"tracking {tracking_uri}; queue {q.url} (study {q.name})", file=stream)
        failed_lines += [_failed_line(q.grid, cell, s) for cell, s in failed]
    for line in failed_lines:
        print(line, file=stream)
    if unsettled:
        print(f"{unsettled} cells not done: no worker is left to run them; run the grid again", file=stream)
    return EXIT_FAILED if failed_lines or unsettled else EXIT_OK


# ----------------------------------------------------------------------------- the worker


@dataclass
class _WorkerGrid:
    queue: GridQueue
    experiment_id: str
    tags: dict[str, str]
    progress: WorkerProgress
    reaped: set[int] = field(default_factory=set)  # reclaimed trials whose MLflow runs were cleaned up


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a worker as cleanly as Ctrl-C


class Worker:
    """Claims cells from the queues of its grids until every cell is done or failed for good."""

    def __init__(self, args: argparse.Namespace, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]],
                 stream: TextIO | None = None) -> None:
        from ablations.runner import load_data
        from ablations.tracking import client_for, default_tracking_uri, ensure_experiment
        from ablations.train import resolve_device

        self.id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.out = Prefixed(stream or sys.stderr, f"[{self.id}] ")
        self.device = resolve_device(args.device)
        self.tracking_uri = args.tracking_uri or default_tracking_uri()
        self.storage_url = args.storage or default_storage(self.tracking_uri)
        self.retries_flag, self.poll = args.retries, min(args.heartbeat, 2.0)
        self.launched = args.launched
        all_cells = [c for _, cells in grids for c in cells]
        self.datasets = load_data(all_cells)  # a missing dataset is bad input before anything is claimed
        self.client = client_for(self.tracking_uri)
        self.grids: list[_WorkerGrid] = []
        for name, cells in grids:
            grid = exps.grids[name]
            queue = GridQueue(name, cells, self.storage_url, args.heartbeat, args.grace, grid.description)
            if args.retries is not None:
                queue.set_retries(args.retries)
            tags = {"paper_table": str(grid.paper_table)} if grid.paper_table else {}
            with _store_init_lock(self.tracking_uri):
                exp_id = ensure_experiment(self.client, self.tracking_uri, name, grid.description)
            progress = WorkerProgress(name, len(cells), self.out, queue, args.retries)
            self.grids.append(_WorkerGrid(queue, exp_id, tags, progress))

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def sync(self, g: _WorkerGrid) -> dict[str, CellStatus]:
        """Take back dead workers' cells, enqueue what is missing, and clean up the dead workers' runs."""
        from ablations.tracking import kill_running

        for t in g.queue.reap_stale():
            self.say(f"[{g.queue.grid}] took back {t.user_attrs.get('variant')} seed={t.user_attrs.get('seed')} "
                     f"(trial {t.number}) from {t.user_attrs.get('worker', '?')}: heartbeat older than {g.queue.grace}s")
        statuses = g.queue.reconcile(g.queue.retries(self.retries_flag))
        for t in g.queue.trials((TrialState.FAIL,)):
            if "failure_kind" not in t.user_attrs and t.number not in g.reaped:
                g.reaped.add(t.number)  # its worker died mid-cell: its MLflow run must not stay RUNNING
                kill_running(self.client, g.experiment_id, {"optuna_study": g.queue.name, "optuna_trial": str(t.number)},
                             "worker died (heartbeat lost); the cell was queued again")
        return statuses

    def run(self) -> int:
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _interrupt)
            if self.launched:  # the launcher stops its workers with SIGINT, even if it was started with SIGINT ignored
                signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            failing_since: float | None = None
            while True:
                try:
                    statuses = {g.queue.grid: self.sync(g) for g in self.grids}
                    settled = all(s.state in ("done", "failed") for st in statuses.values() for s in st.values())
                    claimed = None if settled else next(
                        ((g, t) for g in self.grids if (t := g.queue.claim()) is not None), None)
                    failing_since = None
                except Exception as exc:  # storage or store unreachable for a moment: wait it out, up to the grace period
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.grids[0].queue.grace:
                        raise
                    self.say(f"storage error, retrying: {str(exc).splitlines()[0][:200]}")
                    time.sleep(self.poll)
                    continue
                if settled:
                    break
                if claimed is None:  # others hold the rest: wait, in case one of them dies
                    time.sleep(self.poll)
                    continue
                self.run_trial(*claimed)
        finally:
            for g in self.grids:
                g.progress.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        queues = [g.queue for g in self.grids]
        return _summary(queues, self.retries_flag, self.tracking_uri, io.StringIO() if self.launched else self.out)

    def run_trial(self, g: _WorkerGrid, trial: FrozenTrial) -> None:
        """Run one claimed trial's cell, unless it is a duplicate or already FINISHED in MLflow."""
        from ablations.runner import dataset_key, execute_cell
        from ablations.tracking import finished_run_of

        q, cell = g.queue, g.queue.cells[trial.user_attrs["cell_id"]]
        hb = Heartbeat(q, trial)
        try:
            dup = duplicate_of(trial, by_cell(q.trials()).get(cell.cell_id, []))
            if dup is not None:
                q.finish(trial, TrialState.PRUNED, attrs={"duplicate_of": dup.number})
                return
            q.set_attrs(trial, {"worker": self.id, "host": socket.gethostname(), "pid": os.getpid()})
            q.set_params(trial, cell)
            done_run = finished_run_of(self.client, g.experiment_id, cell.cell_id)
            if done_run is not None:  # e.g. by a serial run, or by a worker that lost its claim at the very end
                value = done_run.data.metrics.get("final_top1_err", float("nan"))
                g.progress.skip(cell, "already FINISHED in MLflow")
                q.finish(trial, TrialState.COMPLETE, value, {"mlflow_run_id": done_run.info.run_id, "reused": True})
                return
            tags = {**g.tags, "optuna_study": q.name, "optuna_trial": str(trial.number), "worker": self.id}
            result = execute_cell(cell, self.datasets[dataset_key(cell.config.dataset)], self.client, g.experiment_id,
                                  self.device, g.progress, tags=tags, guard=hb.guard,
                                  on_run=lambda run: hb.record(run.run_id))
        except KeyboardInterrupt:
            q.finish(trial, TrialState.FAIL, attrs={"failure_kind": "interrupted", "failure_reason": "interrupted (Ctrl-C)"})
            raise
        finally:
            hb.stop()
        if result.status == "FINISHED":
            if not q.finish(trial, TrialState.COMPLETE, result.final["final_top1_err"]):
                self.say(f"[{q.grid}] trial {trial.number} was taken back while it finished; "
                         "its FINISHED run will be found by the next claim")
        elif result.status == "FAILED":
            q.finish(trial, TrialState.FAIL, attrs={"failure_kind": "failed", "failure_reason": result.reason[:2000]})
        # KILLED: the claim was lost, the trial already FAILed by whoever took it back


def work(args: argparse.Namespace, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]]) -> int:
    """`run_ablation.py worker ...`: pull cells until the grids are done."""
    import torch

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    return Worker(args, exps, grids).run()


# ----------------------------------------------------------------------------- the launcher


class GridMonitor:
    """The launcher's view: cells done of total, and an ETA, each time a worker ends a cell."""

    def __init__(self, queue: GridQueue, retries: int, stream: TextIO) -> None:
        self.queue, self.retries, self.stream = queue, retries, stream
        self.start = time.perf_counter()
        self.seen = {t.number: t.state for t in queue.trials()}
        self.done0 = self._done(queue.statuses(retries))

    @staticmethod
    def _done(statuses: Mapping[str, CellStatus]) -> int:
        return sum(s.state in ("done", "failed") for s in statuses.values())

    def poll(self) -> None:
        trials = self.queue.trials()
        ended = [t for t in trials if t.state.is_finished() and self.seen.get(t.number) != t.state
                 and t.state != TrialState.PRUNED]
        self.seen = {t.number: t.state for t in trials}
        if not ended:
            return
        statuses = self.queue.statuses(self.retries)
        done, total = self._done(statuses), len(statuses)
        running = sum(s.state == "running" for s in statuses.values())
        rate = (done - self.done0) / (time.perf_counter() - self.start)
        eta = (total - done) / rate if rate > 0 else None
        for t in ended:
            what = "FINISHED" if t.state == TrialState.COMPLETE else "FAILED"
            detail = (f"top-1 err {t.value:.2f}%" if t.state == TrialState.COMPLETE and t.value == t.value
                      else t.user_attrs.get("failure_reason", "worker stopped (heartbeat lost)"))
            if t.state == TrialState.FAIL and statuses.get(t.user_attrs.get("cell_id", ""), CellStatus("x")).state != "failed":
                detail += "; queued again"
            print(f"[{self.queue.grid}] {done}/{total} cells done, {running} running: {what} "
                  f"{t.user_attrs.get('variant')} seed={t.user_attrs.get('seed')} on {t.user_attrs.get('worker', '?')} "
                  f"- {detail}; ETA {fmt_duration(eta if done < total else 0.0)}", file=self.stream, flush=True)


def _worker_argv(args: argparse.Namespace, tracking_uri: str, storage: str, worker_id: str, device: str,
                 threads: int) -> list[str]:
    argv = [sys.executable, "-m", "ablations.cli", "worker", "--launched", "--config", args.config,
            "--tracking-uri", tracking_uri,
            "--storage", storage, "--device", device, "--worker-id", worker_id, "--threads", str(threads),
            "--heartbeat", str(args.heartbeat), "--grace", str(args.grace)]
    for grid in dict.fromkeys(args.grid):
        argv += ["--grid", grid]
    for item in args.sets:
        argv += ["--set", item]
    for flag, value in (("--preset", args.preset), ("--seeds", args.seeds), ("--data-root", args.data_root),
                        ("--retries", args.retries)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _stop(procs: Sequence[subprocess.Popen], timeout: float = 60.0) -> None:
    """Ask every worker to stop as on Ctrl-C (each marks its cell KILLED), then make sure they did."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # its trial is taken back after the grace period
            p.wait()


def _queue_grids(args: argparse.Namespace, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]], tracking_uri: str,
                 storage: str) -> tuple[list[GridQueue], dict[str, int]]:
    """Create each grid's MLflow experiment and queue before any worker starts (creating them races);
    enqueue what is missing, failed cells included; return the queues and how many cells were done."""
    from ablations.tracking import client_for, ensure_experiment, reap_dead_runs

    client = client_for(tracking_uri)
    queues, already = [], {}
    for name, cells in grids:
        grid = exps.grids[name]
        with _store_init_lock(tracking_uri):
            reap_dead_runs(client, ensure_experiment(client, tracking_uri, name, grid.description))
        q = GridQueue(name, cells, storage, args.heartbeat, args.grace, grid.description)
        if args.retries is not None:
            q.set_retries(args.retries)
        statuses = q.reconcile(q.retries(args.retries), reset_failed=True)
        already[name] = sum(s.state == "done" for s in statuses.values())
        queues.append(q)
    return queues, already


def _spawn(args: argparse.Namespace, slots: Sequence[str | None], tracking_uri: str, storage: str,
           procs: list[subprocess.Popen]) -> str:
    """Start one `worker` process per slot (appended to `procs` as they start); describe where they run."""
    import ablations

    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, len(slots)))  # don't oversubscribe the cores
    src = str(Path(ablations.__file__).resolve().parents[1])
    for i, gpu in enumerate(slots):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        device = args.device
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"], device = gpu, "cuda"  # the worker sees its one GPU as cuda:0
        # Its own session: a terminal's Ctrl-C reaches the launcher only, which passes it on once.
        procs.append(subprocess.Popen(_worker_argv(args, tracking_uri, storage, f"w{i}", device, threads),
                                      env=env, start_new_session=True))
    return ", ".join(f"w{i}: GPU {g}" for i, g in enumerate(slots) if g is not None) or f"CPU, {threads} threads each"


def launch(args: argparse.Namespace, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]]) -> int:
    """`--workers N` (and/or --gpus, --storage): queue the grids, start N local workers, show progress."""
    from ablations.exit_codes import EXIT_BAD_INPUT
    from ablations.runner import load_data
    from ablations.tracking import default_tracking_uri

    _check_args(args)
    gpus = _gpus_for(args)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    storage = args.storage or default_storage(tracking_uri)
    load_data([c for _, cells in grids for c in cells])  # bad input ends here; workers then read the cache
    queues, already = _queue_grids(args, exps, grids, tracking_uri, storage)
    todo = sum(len(q.cells) for q in queues) - sum(already.values())
    slots = worker_slots(args.workers, gpus, args.workers_per_gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))[:todo]

    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        where = _spawn(args, slots, tracking_uri, storage, procs)
        print(f"started {len(procs)} workers ({where}); queue {storage}", file=sys.stderr, flush=True)
        monitors = [GridMonitor(q, q.retries(args.retries), sys.stderr) for q in queues]
        while any(p.poll() is None for p in procs):
            for m in monitors:
                m.poll()
            time.sleep(1.0)
        for m in monitors:
            m.poll()
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    codes = [p.returncode for p in procs]
    if any(c not in (0, 1) for c in codes):
        print(f"workers exited with codes {codes}", file=sys.stderr)
    code = _summary(queues, args.retries, tracking_uri, sys.stderr, already)
    return EXIT_BAD_INPUT if codes and all(c == EXIT_BAD_INPUT for c in codes) else code
