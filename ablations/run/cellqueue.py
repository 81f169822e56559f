"""The queue rule: each cell of a store is a trial of one Optuna study, whichever grids list it; what a
cell's trials (and the store) say about it (`cell_status`), and the few operations on the study
(enqueue what is missing, claim, finish), each through the view of one grid.

    cells -> (enqueued once as WAITING trials) -> claimed (WAITING -> RUNNING, atomic) -> COMPLETE | FAIL

Every process reconciles the queue with the same pure rule, so a crash between any two steps leaves
nothing that the next reconcile cannot repair. docs/distributed.md explains the design.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ablations.config import Cell
from ablations.run.storage import file_lock, open_storage, pg_lock, study_name, view_name


@dataclass(frozen=True)
class CellStatus:
    state: str  # done | failed (for good) | running | waiting | pending (to be enqueued)
    enqueue: int | None = None  # the attempt to enqueue when pending
    reason: str = ""  # why the last attempt failed
    attempts: int = 0  # real failures in the current series of attempts


def cell_status(trials: Sequence[FrozenTrial], retries: int, reset_failed: bool = False,
                in_store: bool | None = None, series: bool = False) -> CellStatus:
    """Where one cell stands, from its trials (oldest first); what to enqueue if anything.

    A trial FAILed by its own worker carries `failure_kind`: 'failed' (the cell failed: counts
    against --retries) or 'interrupted' (Ctrl-C), 'preempted' (SIGTERM/SIGUSR1) or 'time_limit'
    (checkpointed or not started; the next claim resumes it): these do not count. A FAIL without it was failed by
    another worker after its heartbeat stopped (the worker died): it does not count either.
    PRUNED trials are duplicates set aside at claim time and are ignored.

    `in_store`: whether the MLflow store holds a FINISHED run of the cell (None: not known, the
    trials alone decide). A cell is done only when it does: then, outside a --force `series`, it
    is done whatever its trials say (e.g. trained before this queue existed); a COMPLETE trial
    without that run (the queue of another store, a deleted run) is enqueued again as attempt 0.
    """
    trials = [t for t in trials if t.state != TrialState.PRUNED]
    complete = any(t.state == TrialState.COMPLETE for t in trials)
    if in_store or (complete and in_store is None):
        if complete or not series:
            return CellStatus("done")
    if any(t.state == TrialState.RUNNING for t in trials):
        return CellStatus("running")
    if any(t.state == TrialState.WAITING for t in trials):
        return CellStatus("waiting")
    if complete:
        return CellStatus("pending", enqueue=0, reason="its FINISHED run is not in this store")
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
    if reset_failed:  # a new launch gives failed cells a fresh series of attempts
        return CellStatus("pending", enqueue=0, reason=reason)
    return CellStatus("failed", reason=reason, attempts=attempt + 1)


def by_cell(trials: Sequence[FrozenTrial]) -> dict[str, list[FrozenTrial]]:
    out: dict[str, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if "cell_id" in t.user_attrs:
            out.setdefault(t.user_attrs["cell_id"], []).append(t)
    return out


def duplicate_of(trial: FrozenTrial, same_cell: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """An older live trial of the same cell: then `trial` is a duplicate and must not run.

    The oldest live trial of a cell is never anyone's duplicate, so a cell is never set aside twice.
    (A COMPLETE one does not make it a duplicate: the trial may be a new attempt of a cell whose run
    is missing from the store; a cell FINISHED in the store is found before it trains.)
    """
    older = [t for t in same_cell if t.number < trial.number and t.state in (TrialState.WAITING, TrialState.RUNNING)]
    return older[0] if older else None


def stopped_part_way(trials: Sequence[FrozenTrial]) -> set[str]:
    """The cells with a trial that ended FAIL without failing the cell itself (`cell_status`'s free
    retries): those started and stopped before their end, whose checkpoint the next claim resumes."""
    return {str(t.user_attrs.get("cell_id")) for t in trials
            if t.state == TrialState.FAIL and t.user_attrs.get("failure_kind") != "failed"}


def resumes_first(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The WAITING trials in claim order: cells stopped part-way first, then oldest first."""
    resumes = stopped_part_way(trials)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    return sorted(waiting, key=lambda t: (t.user_attrs.get("cell_id") not in resumes, t.number))


def settled(statuses: Mapping[str, CellStatus]) -> bool:
    return all(s.state in ("done", "failed") for s in statuses.values())


def count(statuses: Mapping[str, CellStatus], *states: str) -> int:
    return sum(s.state in states for s in statuses.values())


class GridQueue:
    """One grid's view of the store's queue: the study holds the trials of every grid's cells, each
    distinct cell id at most one live trial; this view enqueues, claims and counts the trials of its
    own cells only, whichever grid enqueued them.

    Claiming reads the storage once per pass over the waiting trials, not once per cell: a claim
    walks a local list of the trials seen WAITING and moves the first one still WAITING to RUNNING
    (a trial that another process took meanwhile is refused by the storage, and skipped). So
    claiming a cell costs the same in a grid of 50 cells or of 5,000.
    """

    def __init__(self, grid: str, cells: Sequence[Cell], storage_url: str, heartbeat: int, grace: int,
                 description: str = "", series: str | None = None) -> None:
        self.grid, self.cells = grid, {c.cell_id: c for c in cells}
        self.url, self.heartbeat, self.grace, self.series = storage_url, heartbeat, grace, series
        self.storage, self.rdb = open_storage(storage_url, heartbeat, grace)
        self.name, self.view = study_name(series), view_name(grid, cells)
        self.study = optuna.create_study(storage=self.storage, study_name=self.name, direction="minimize",
                                         load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(self.name)
        if f"grid:{grid}" not in self.study.user_attrs:  # for the dashboard: the grids whose cells it holds
            self.study.set_user_attr(f"grid:{grid}", description)
        # Which of its cells the MLflow store holds FINISHED (set by whoever opened the store); None: unknown.
        self.in_store: Callable[[], set[str]] | None = None
        self._variants = CategoricalDistribution(sorted({c.variant for c in cells}))
        self._seeds = CategoricalDistribution(sorted({c.seed for c in cells}))
        self._waiting: deque[FrozenTrial] = deque()
        self.snapshot: list[FrozenTrial] = []  # every trial, as the last reconcile read them
        self._failed_for_good = 0
        self._done: set[str] = set()  # cells done at the last reconcile (some with no trial: done in the store)
        self._counts: tuple[int, int] | None = None
        self._counts_at = 0.0
        # The journal's heartbeats as this process last saw them change: trial id -> (value, when, on
        # this process's monotonic clock). Another machine's clock is never compared with this one.
        self.heartbeats_seen: dict[int, tuple[object, float]] = {}

    # -- reading
    def trials(self, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        """The trials of this grid's cells (enqueued by any grid)."""
        return [t for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)
                if t.user_attrs.get("cell_id") in self.cells]

    def retries(self, override: int | None = None) -> int:
        return override if override is not None else int(self.study.user_attrs.get("retries", 0))

    def set_retries(self, retries: int) -> None:
        self.study.set_user_attr("retries", retries)

    def statuses(self, retries: int, reset_failed: bool = False,
                 trials: Sequence[FrozenTrial] | None = None) -> dict[str, CellStatus]:
        grouped = by_cell(self.trials() if trials is None else trials)
        stored = self.in_store() if self.in_store is not None else None
        return {cid: cell_status(grouped.get(cid, []), retries, reset_failed,
                                 None if stored is None else cid in stored, self.series is not None)
                for cid in self.cells}

    def progress_counts(self, max_age: float = 5.0) -> tuple[int, int] | None:
        """(cells done or failed for good, trials running), read at most every `max_age` seconds;
        None when the last reading is still fresh (the caller keeps its own count meanwhile)."""
        if self._counts is not None and time.monotonic() - self._counts_at < max_age:
            return None
        trials = self.trials((TrialState.COMPLETE, TrialState.RUNNING))
        done = len({t.user_attrs.get("cell_id") for t in trials if t.state == TrialState.COMPLETE} | self._done)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        self._counts, self._counts_at = (done + self._failed_for_good, running), time.monotonic()
        return self._counts

    # -- enqueueing
    @property
    def locked(self) -> bool:
        """Whether enqueueing runs under a lock (then no cell can get two live trials)."""
        return self.rdb is None or self.url.startswith(("postgresql", "sqlite:///"))

    @contextlib.contextmanager
    def _enqueue_lock(self) -> Iterator[None]:
        """Serialize read-then-enqueue so two processes (of any grid) don't both enqueue a missing cell."""
        if self.rdb is None:
            with file_lock(Path(self.url).resolve().with_suffix(".enqueue.lock")):
                yield
        elif self.url.startswith("postgresql"):
            with pg_lock(self.rdb, self.name):
                yield
        elif self.url.startswith("sqlite:///"):
            with file_lock(self.url.removeprefix("sqlite:///") + ".enqueue.lock"):
                yield
        else:  # other databases: a rare double enqueue is set aside at claim time (duplicate_of)
            yield

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The queue's lock, for other once-per-grid steps of every worker (creating the grid's MLflow parent run)."""
        return self._enqueue_lock()

    def reconcile(self, retries: int, reset_failed: bool = False) -> dict[str, CellStatus]:
        """Enqueue every cell that needs a (new) trial, once; return where every cell stands."""
        with self._enqueue_lock():
            self.snapshot = self.trials()
            statuses = self.statuses(retries, reset_failed, self.snapshot)
            for cid, st in statuses.items():
                if st.enqueue is not None:
                    cell = self.cells[cid]
                    self.study.enqueue_trial(
                        {"variant": cell.variant, "seed": cell.seed},
                        user_attrs={"cell_id": cid, "grid": self.grid, "variant": cell.variant, "seed": cell.seed,
                                    "attempt": st.enqueue})
                    statuses[cid] = CellStatus("waiting")
        self._failed_for_good = count(statuses, "failed")
        self._done = {cid for cid, st in statuses.items() if st.state == "done"}
        self._counts = None
        return statuses

    # -- claiming
    def claim(self) -> FrozenTrial | None:
        """Move one WAITING trial of this grid's cells to RUNNING, atomically: exactly one caller wins each trial.

        Cells that were stopped part-way (interrupted, preempted, out of time, or their worker died)
        come first, then the rest oldest first: a stopped cell's checkpoint is the work most at risk
        (scratch disks, a new machine) and finishing it first completes grids sooner. The storage is
        read again only when the local list runs out."""
        for refreshed in (False, True):
            while self._waiting:
                t = self._waiting.popleft()
                try:
                    if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                        return self.storage.get_trial(t._trial_id)
                except UpdateFinishedTrialError:
                    continue
            if refreshed:
                break
            self._waiting = deque(resumes_first(self.trials()))
        return None

    def claim_token(self, trial: FrozenTrial) -> str:
        """A claim's name, unique in the store (a trial is claimed once, and a --force series has a study
        of its own): the fencing token a worker writes on the cell's run and checkpoints."""
        return f"{self.name}/{trial.number}"

    def same_cell(self, trial: FrozenTrial) -> list[FrozenTrial]:
        """Every trial of `trial`'s cell, oldest first (a full read: for duplicate checks only)."""
        return by_cell(self.trials()).get(trial.user_attrs["cell_id"], [])

    def set_attrs(self, trial: FrozenTrial, attrs: Mapping[str, object]) -> None:
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(trial._trial_id, k, v)

    def set_params(self, trial: FrozenTrial, cell: Cell) -> None:
        """variant and seed as trial params, so the dashboard can plot error against them; named
        after the view (a study's categorical param keeps one set of choices, and each view has its own)."""
        for name, dist, value in ((f"{self.view}.variant", self._variants, cell.variant),
                                  (f"{self.view}.seed", self._seeds, cell.seed)):
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
