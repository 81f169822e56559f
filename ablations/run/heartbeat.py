"""Heartbeats: a claimed cell is kept alive from a thread of its worker, and a cell whose worker
went silent (died) is taken back by any other process.

A heartbeat's age is always measured on one clock. PostgreSQL (and any RDB storage) uses Optuna's
own heartbeat, written and compared on the database's clock. The journal storage has none, so a
worker writes the time into the trial's `heartbeat` user attribute, and a reader never compares
that time with its own clock (another machine's may be hours off): it times, on its own monotonic
clock, how long the value has gone unchanged since it last saw it change.

A RUNNING trial whose process is gone is taken back at once, without waiting out the grace period
(a killed serial run is resumed right away), but only when the claim was made in this process's
own PID namespace: elsewhere (another machine, a container with the same host name) a pid means
nothing here. Who holds a claim is its random `owner` token; host and pid are for people.

A worker whose heartbeats have not gone through for the grace period may have lost its cell to
another worker by now: it stops the cell (`Heartbeat.guard`), and what it may still write is fenced
by its claim (ablations/run/runner.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ablations.run.cellqueue import GridQueue
from ablations.run.runner import CellAborted
from ablations.util.procs import gone_here, pid_namespace, process_token


def owner_attrs() -> dict[str, object]:
    """What a claim records of its owner, beside the worker's name, host and pid (for people): this
    process's token (who owns it) and PID namespace (where its pid means something)."""
    return {"owner": process_token(), "pidns": pid_namespace() or ""}


def beat(queue: GridQueue, trial: FrozenTrial) -> bool:
    """Record that `trial` is alive; False once it is no longer RUNNING (the claim was lost)."""
    try:
        if queue.rdb is not None:
            queue.storage.record_heartbeat(trial._trial_id)  # Optuna's own, on the database clock
        else:  # the journal has no heartbeat: a user attr that changes at every beat serves as one
            queue.storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())
    except UpdateFinishedTrialError:
        return False
    return queue.storage.get_trial(trial._trial_id).state == TrialState.RUNNING


def _silent(queue: GridQueue, t: FrozenTrial, now: float) -> bool:
    """Whether a journal trial's heartbeat has not changed for the grace period, on this reader's clock.
    The first sight of a value starts the count: a trial is never judged by the time written in it."""
    value = t.user_attrs.get("heartbeat")
    seen = queue.heartbeats_seen.get(t._trial_id)
    if seen is None or seen[0] != value:
        queue.heartbeats_seen[t._trial_id] = (value, now)
        return False
    return now - seen[1] > queue.grace


def reap_stale(queue: GridQueue) -> list[FrozenTrial]:
    """FAIL every RUNNING trial whose worker is gone (its heartbeat unchanged through the grace period,
    or a dead process of this PID namespace); return the trials taken back."""
    running = {t._trial_id: t for t in queue.trials((TrialState.RUNNING,))}
    for gone in set(queue.heartbeats_seen) - set(running):
        del queue.heartbeats_seen[gone]
    if not running:
        return []
    now = time.monotonic()
    for t in running.values():
        dead = gone_here(t.user_attrs.get("pidns"), t.user_attrs.get("pid"))
        if queue.rdb is not None and not dead:
            continue  # Optuna's heartbeat check, below
        if dead or _silent(queue, t, now):
            with contextlib.suppress(UpdateFinishedTrialError):  # another worker got there first
                queue.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    if queue.rdb is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(queue.study)
    return [t for t in queue.trials((TrialState.FAIL,))
            if t._trial_id in running and "failure_kind" not in t.user_attrs]


class Heartbeat:
    """Keeps a claimed trial alive from a thread; `guard` stops the cell once the claim is lost, or may
    have been: no heartbeat has gone through for the grace period (the storage is out of reach)."""

    def __init__(self, queue: GridQueue, trial: FrozenTrial) -> None:
        self.queue, self.trial = queue, trial
        self.lost, self._stop = threading.Event(), threading.Event()
        self.why = "the trial's heartbeat was too old and another worker took the cell"
        self.last_ok = time.monotonic()
        self._beat()  # the first beat before any work: a claimed trial is never without one
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{trial.number}", daemon=True)
        self._thread.start()

    def _beat(self) -> bool:
        # A beat counts from when it was sent: a reader that saw the value before it cannot have
        # judged it stale earlier than `grace` after this moment, so stopping by then is in time.
        sent = time.monotonic()
        alive = beat(self.queue, self.trial)
        if alive:
            self.last_ok = max(self.last_ok, sent)
        else:
            self.lost.set()
        return alive

    def _loop(self) -> None:
        while not self._stop.wait(self.queue.heartbeat):
            try:
                alive = self._beat()
            except Exception:  # a storage hiccup: the grace period covers a few missed beats (see guard)
                continue
            if not alive:
                return

    def silent_for(self) -> float:
        """Seconds since the last heartbeat that went through was sent."""
        return time.monotonic() - self.last_ok

    def _confirm(self, retry: bool) -> None:
        """Ask the storage itself whether the claim still holds: one beat, retried while a storage
        error leaves some of the grace period (`retry`); past it, the claim counts as lost."""
        while not self.lost.is_set():
            try:
                self._beat()
                return
            except Exception as exc:
                silent = self.silent_for()
                if not retry or silent > self.queue.grace:
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    self.why = f"no heartbeat reached the queue for {silent:.0f}s ({error}); whoever takes the cell back resumes it"
                    self.lost.set()
                    return
            time.sleep(min(1.0, self.queue.heartbeat))

    def record(self, run_id: str) -> None:
        """Note the MLflow run on the trial (for the dashboard); a storage error leaves it out."""
        try:
            self.queue.set_attrs(self.trial, {"mlflow_run_id": run_id})
        except UpdateFinishedTrialError:
            raise CellAborted("claim lost before training started") from None
        except Exception:  # only a note: the heartbeat's grace period judges the storage
            pass

    def guard(self, final: bool = False) -> None:
        """Raise CellAborted once the claim is lost. Between steps (final=False) the thread's verdict
        will do, unless no beat went through for the grace period: then the storage is asked once. Before
        FINISHED (final=True) it is always asked, and storage errors are retried within the grace period."""
        if not self.lost.is_set() and (final or self.silent_for() > self.queue.grace):
            self._confirm(retry=final)
        if self.lost.is_set():
            raise CellAborted(f"claim lost: {self.why}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
