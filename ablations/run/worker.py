"""The worker loop: claim a cell from the queue, run it, tell the queue, until the grids are done.

    config -> cells -> (enqueued as WAITING trials) -> claimed by workers -> runs -> MLflow

There is one way to run a cell. A plain `run_ablation.py --grid X` is this loop in its own
process (one worker); `--workers N` starts N processes that each run it (ablations/run/launcher.py);
`run_ablation.py worker` joins a grid from any machine. All of them claim cells from the same
Optuna study (one per store, whatever grids list the cell), so a cell runs once per store however
many processes and grids work on it and however they were started. docs/distributed.md explains the design.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, TextIO

from optuna.trial import FrozenTrial, TrialState

from ablations.run.cellqueue import CellStatus, GridQueue, count, settled
from ablations.train.checkpoint import STOP, exit_code_for
from ablations.errors import EXIT_TIME_LIMIT
from ablations.config import Cell, ExperimentsFile
from ablations.run.heartbeat import Heartbeat, owner_attrs, reap_stale
from ablations.run.storage import check_storage, default_storage, is_rdb, new_series, open_storage, store_init_lock
from ablations.run.options import RunOptions
from ablations.run.output import Prefixed, WorkerProgress, summary

Statuses = dict[str, CellStatus]


# ----------------------------------------------------------------------------- the loop


def drain_queues(queues: Sequence[GridQueue], run_one: Callable[[GridQueue, FrozenTrial], bool | None], *,
                 retries: int | None, fresh_launch: bool, poll: float,
                 say: Callable[[str], None] = lambda line: None,
                 after_sync: Callable[[GridQueue, Statuses], None] | None = None) -> dict[str, Statuses]:
    """Claim and run cells until every cell of `queues` is done or has failed for good.

    The queue is reconciled (dead workers' cells taken back, missing cells enqueued) when this
    process starts, when it finds nothing to claim, after a cell that asked for it (`run_one`
    returned True: a failure may need a retry), and otherwise every grace period. In between, a
    cell costs a claim and nothing that grows with the grid. `fresh_launch`: the first reconcile
    gives failed cells a fresh series of attempts. Returns the first reconcile's statuses.
    """
    grace = max(q.grace for q in queues)
    first: dict[str, Statuses] = {}
    last_sync, failing_since = float("-inf"), None

    def sync_all() -> bool:
        """Reconcile every queue; whether all their cells are settled."""
        nonlocal last_sync
        done, reset = True, fresh_launch and not first  # only this process's first reconcile resets
        for q in queues:
            for t in reap_stale(q):
                say(f"[{q.grid}] took back {t.user_attrs.get('variant')} seed={t.user_attrs.get('seed')} "
                    f"(trial {t.number}) from {t.user_attrs.get('worker', '?')}: its worker stopped")
            statuses = q.reconcile(q.retries(retries), reset_failed=reset)
            first.setdefault(q.grid, statuses)
            if after_sync:
                after_sync(q, statuses)
            done = done and settled(statuses)
        last_sync = time.monotonic()
        return done

    def claim() -> tuple[GridQueue, FrozenTrial] | None:
        return next(((q, t) for q in queues if (t := q.claim()) is not None), None)

    while True:
        try:
            if time.monotonic() - last_sync >= grace:
                sync_all()
            claimed = claim()
            if claimed is None:  # nothing seen waiting: a reconcile says whether the grids are done
                if sync_all():
                    return first
                claimed = claim()  # it may have enqueued a retry or a dead worker's cell
            failing_since = None
        except Exception as exc:  # storage or store unreachable for a moment: wait it out, up to the grace period
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > grace:
                raise
            say(f"storage error, retrying: {str(exc).splitlines()[0][:200]}")
            time.sleep(poll)
            continue
        if claimed is None:  # others hold the rest: wait, in case one of them dies
            time.sleep(poll)
            continue
        if run_one(*claimed):
            last_sync = float("-inf")


# ----------------------------------------------------------------------------- one process's grids


@dataclass
class GridRun:
    """One grid as a process works on it: its queue, its MLflow experiment, its progress."""

    queue: GridQueue
    experiment_id: str
    tags: dict[str, str]
    progress: WorkerProgress | None = None
    reaped: set[int] = field(default_factory=set)  # taken-back trials whose MLflow runs were cleaned up
    announced: bool = False
    present: set[str] = field(default_factory=set)  # done cells known to have a run in this experiment
    linked_first: int = 0  # cells linked from other grids at this process's first reconcile

    def link_done(self, client: object, tracking_uri: str, statuses: Statuses) -> list[Cell]:
        """Link into this grid's experiment the done cells trained in another grid's (once per cell)."""
        from ablations.run.reuse import link_missing

        new = [cid for cid, st in statuses.items() if st.state == "done" and cid not in self.present]
        linked = link_missing(client, tracking_uri, self.experiment_id, [self.queue.cells[c] for c in new], self.tags)
        self.present.update(new)
        return linked


def open_grids(options: RunOptions, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]],
               tracking_uri: str, storage: str, series: str | None) -> tuple[object, list[GridRun]]:
    """Each grid's MLflow experiment and queue (created once, under a lock: creating them races).

    The storage is checked before the MLflow store is touched, so bad input writes nothing."""
    from ablations.run.reuse import attach_store
    from ablations.tracking import (PARENT_RUN_ID, attach_to_parent, client_for, ensure_experiment, ensure_parent,
                                    reap_dead_runs)

    if is_rdb(storage):
        open_storage(storage, options.heartbeat, options.grace)  # a database that cannot be reached is bad input, first
    else:
        check_storage(storage)
    out = []
    with store_init_lock(tracking_uri):  # the first process on a new store creates its tables (MlflowClient does)
        client = client_for(tracking_uri)
        experiments = {name: ensure_experiment(client, tracking_uri, name, exps.grids[name].description)
                       for name, _ in grids}
    for name, cells in grids:
        grid, exp_id = exps.grids[name], experiments[name]
        reap_dead_runs(client, exp_id)
        queue = GridQueue(name, cells, storage, options.heartbeat, options.grace, grid.description, series=series)
        attach_store(queue, client)
        if options.retries is not None:
            queue.set_retries(options.retries)
        # The grid's parent run, once per store however many workers start together; every run of
        # this process's cells (and links) is nested under it, and so are runs made before parents.
        parent = ensure_parent(client, tracking_uri, exp_id, name, grid.description, lock=queue.lock())
        attach_to_parent(client, exp_id, parent)
        tags = {"paper_table": str(grid.paper_table)} if grid.paper_table else {}
        out.append(GridRun(queue, exp_id, {**tags, PARENT_RUN_ID: parent}))
    return client, out


class _Stopped(BaseException):
    """Leaves the claim loop once a cell was stopped (preempted, out of time): nothing more is claimed.
    A BaseException, so the loop's retry of storage errors does not take it for one."""


class Worker:
    """Claims cells from the queues of its grids until every cell is done or failed for good.

    `prefix`: start every line with the worker's id (workers sharing a terminal); `live`: a live
    progress display on a terminal (None: when the stream is one); `fresh_launch`: failed cells
    get a fresh series of attempts, as when a grid is started again."""

    def __init__(self, options: RunOptions, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]],
                 stream: TextIO | None = None, *, prefix: bool = True, live: bool | None = False,
                 fresh_launch: bool = False) -> None:
        from ablations.run.runner import load_data, raise_if_stopped
        from ablations.util.device import resolve_device

        self.id = options.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        stream = stream or sys.stderr
        self.out: TextIO = Prefixed(stream, f"[{self.id}] ") if prefix else stream
        self.device = resolve_device(options.device)
        self.tracking_uri = options.store
        self.storage_url = options.storage or default_storage(self.tracking_uri)
        self.retries_flag, self.poll = options.retries, min(options.heartbeat, 2.0)
        self.launched, self.fresh_launch = options.launched, fresh_launch
        self.series = options.series
        # Bad input before anything is claimed; a stop request ends a long decode between its chunks.
        self.datasets = load_data([c for _, cells in grids for c in cells], stop_check=raise_if_stopped)
        self.client, self.grids = open_grids(options, exps, grids, self.tracking_uri, self.storage_url, self.series)
        live = live if len(self.grids) == 1 else False  # a terminal holds one live display at a time
        for g in self.grids:
            g.progress = WorkerProgress(g.queue.grid, len(g.queue.cells), self.out, g.queue, live=live)
        self._by_queue = {id(g.queue): g for g in self.grids}
        self.checkpoints = options.checkpoints(self.tracking_uri)
        self.started_ms = int(time.time() * 1000)  # links made since then are this launch's reuse
        self.stopped: tuple[int, str] | None = None  # (exit code, reason) once preempted or out of time

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _after_sync(self, q: GridQueue, statuses: Statuses) -> None:
        """Say where the grid stands when this process starts on it; clean up dead workers' runs."""
        from ablations.tracking import kill_running, store_experiment_ids

        if (why := STOP.check()) is not None:  # e.g. a signal while waiting for others' cells
            self.stopped = (exit_code_for(why[0]), why[1])
            raise _Stopped
        g = self._by_queue[id(q)]
        linked = g.link_done(self.client, self.tracking_uri, statuses)
        for cell in linked:
            self.say(f"[{q.grid}] {cell.variant} seed={cell.seed}: reused from another grid (cell_id {cell.cell_id})")
        if not g.announced:
            g.announced, g.linked_first = True, len(linked)
            done, failed = count(statuses, "done"), count(statuses, "failed")
            failed_txt = f", {failed} failed for good" if failed else ""
            reused_txt = f" ({len(linked)} reused from other grids)" if linked else ""
            self.say(f"[{q.grid}] {len(statuses)} cells: {done} already done{reused_txt}{failed_txt}, "
                     f"{len(statuses) - done - failed} to run; queue {q.url} (study {q.name})")
        # A trial taken back from a dead worker: its MLflow run must not stay RUNNING.
        for t in q.snapshot:
            if t.state == TrialState.FAIL and "failure_kind" not in t.user_attrs and t.number not in g.reaped:
                g.reaped.add(t.number)
                kill_running(self.client, store_experiment_ids(self.client), {"optuna_study": q.name, "optuna_trial": str(t.number)},
                             "worker died (heartbeat lost); the cell was queued again")

    def run(self) -> int:
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = STOP.install()  # SIGTERM/SIGUSR1: checkpoint the running cell, leave it claimable, exit 75
            if self.launched:  # the launcher stops its workers with SIGINT, even if it was started with SIGINT ignored
                signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            first = drain_queues([g.queue for g in self.grids], self.run_trial, retries=self.retries_flag,
                                 fresh_launch=self.fresh_launch, poll=self.poll, say=self.say,
                                 after_sync=self._after_sync)
        except _Stopped:
            first = {}
        finally:
            for g in self.grids:
                if g.progress is not None:
                    g.progress.close()
            if previous is not None:
                STOP.restore(previous)
        if self.stopped is not None:
            code, reason = self.stopped
            if self.launched:  # the launcher sums up for all its workers
                self.say(f"stopped: {reason}; its cells stay claimable, run again to continue")
            else:
                from ablations.run.timelimit import stop_summary

                stop_summary(self.client, [(g.queue.grid, list(g.queue.cells.values())) for g in self.grids],
                             self.checkpoints, reason, self.out, estimate=code == EXIT_TIME_LIMIT)
            return code
        from ablations.run.reuse import reused_since

        linked_first = {g.queue.grid: g.linked_first for g in self.grids}
        already = {grid: count(st, "done") - linked_first.get(grid, 0) for grid, st in first.items()}
        reused = {g.queue.grid: reused_since(self.client, g.experiment_id, g.queue.cells.values(), self.started_ms)
                  for g in self.grids}
        return summary([g.queue for g in self.grids], self.retries_flag, self.tracking_uri,
                       io.StringIO() if self.launched else self.out, already, reused)

    def link_everywhere(self, cell_id: str) -> None:
        """Right after a cell FINISHED: every grid of this process that lists it shows it in its own
        experiment (the run itself lives in one; the others get a linked run)."""
        from ablations.run.reuse import link_missing

        for g in self.grids:
            if cell_id in g.queue.cells:
                link_missing(self.client, self.tracking_uri, g.experiment_id, [g.queue.cells[cell_id]], g.tags)
                g.present.add(cell_id)

    def run_trial(self, q: GridQueue, trial: FrozenTrial) -> bool:
        """Run one claimed trial's cell, unless it is a duplicate or already FINISHED in the store
        (in any grid's experiment: then linked into this grid's). Returns True when the queue should
        be reconciled now (the cell failed: a retry may be due)."""
        from ablations.run.runner import dataset_key, execute_cell
        from ablations.tracking import runs_of_cell, store_finished_runs

        g, cell = self._by_queue[id(q)], q.cells[trial.user_attrs["cell_id"]]
        progress = g.progress
        assert progress is not None
        # Who holds the trial, before its first beat: its token, and where its pid means something (a
        # process of this PID namespace that dies is seen at once); worker, host and pid for people.
        q.set_attrs(trial, {"worker": self.id, "host": socket.gethostname(), "pid": os.getpid(), **owner_attrs()})
        hb = Heartbeat(q, trial)
        try:
            if not q.locked and (dup := duplicate_in(q, trial)) is not None:
                q.finish(trial, TrialState.PRUNED, attrs={"duplicate_of": dup.number})
                return False
            q.set_params(trial, cell)
            done = [] if self.series else runs_of_cell(store_finished_runs(self.client, cell.ids), cell)
            if done:  # e.g. by an older version, another grid, or a worker that lost its claim at the very end
                value = done[0].data.metrics.get("final_top1_err", float("nan"))
                mine = any(r.info.experiment_id == g.experiment_id for r in done)
                progress.skip(cell, "already FINISHED in MLflow" if mine else
                              f"reused from grid {done[0].data.tags.get('grid', '?')}")
                self.link_everywhere(cell.cell_id)
                q.finish(trial, TrialState.COMPLETE, value, {"mlflow_run_id": done[0].info.run_id, "reused": True})
                return False
            tags = {**g.tags, "optuna_study": q.name, "optuna_trial": str(trial.number), "worker": self.id}
            result = execute_cell(cell, self.datasets[dataset_key(cell.config.dataset)], self.client, g.experiment_id,
                                  self.device, progress, tags=tags, guard=hb.guard,
                                  on_run=lambda run: hb.record(run.run_id), checkpoints=self.checkpoints,
                                  claim=q.claim_token(trial))
        except KeyboardInterrupt:
            q.finish(trial, TrialState.FAIL, attrs={"failure_kind": "interrupted", "failure_reason": "interrupted (Ctrl-C)"})
            raise
        finally:
            hb.stop()
        if result.status == "FINISHED":
            self.link_everywhere(cell.cell_id)  # before the trial ends: the queue says done once every grid shows it
            if not q.finish(trial, TrialState.COMPLETE, result.final["final_top1_err"]):
                self.say(f"[{q.grid}] trial {trial.number} was taken back while it finished; "
                         "its FINISHED run will be found by the next claim")
            return False
        if result.status == "FAILED":
            q.finish(trial, TrialState.FAIL, attrs={"failure_kind": "failed", "failure_reason": result.reason[:2000]})
        if result.status == "STOPPED":  # checkpointed (or not started): queued again without using up a retry
            q.finish(trial, TrialState.FAIL, attrs={"failure_kind": result.kind, "failure_reason": result.reason[:2000]})
            self.stopped = (result.exit_code, result.reason)
            raise _Stopped
        # KILLED: the claim was lost (the trial already FAILed by whoever took it back), or may have been (no
        # heartbeat went through for the grace period): give the trial up, if the storage can be reached, so
        # the cell is queued again now. Like a dead worker's, this attempt does not count against --retries.
        with contextlib.suppress(Exception):
            q.finish(trial, TrialState.FAIL, attrs={"failure_reason": result.reason[:2000]})
        return True


def duplicate_in(q: GridQueue, trial: FrozenTrial) -> FrozenTrial | None:
    """An older live trial of the same cell (a storage without an enqueue lock can enqueue a cell twice)."""
    from ablations.run.cellqueue import duplicate_of

    return duplicate_of(trial, q.same_cell(trial))


# ----------------------------------------------------------------------------- entry points


def run_here(options: RunOptions, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]]) -> int:
    """A plain run: this process is the grid's one worker, with the console a serial run had
    (no prefix, a live display on a terminal). Other runs of the grid may work beside it."""
    import torch

    options.check()
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.force:
        options = replace(options, series=new_series())  # every cell again, in a study of its own
    return Worker(options, exps, grids, prefix=False, live=None, fresh_launch=True).run()


def work(options: RunOptions, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]]) -> int:
    """`run_ablation.py worker ...`: pull cells until the grids are done."""
    import torch

    options.check(worker=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    return Worker(options, exps, grids).run()

