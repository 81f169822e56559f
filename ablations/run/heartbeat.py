"""Heartbeats: a claimed cell is kept alive from a thread of its worker, and a cell whose worker
went silent (died) is taken back by any other process.

PostgreSQL (and any RDB storage) uses Optuna's own heartbeat, measured on the database's clock. The
journal storage has none, so the time is written into the trial's `heartbeat` user attribute. A
RUNNING trial of a process on this machine that no longer exists is taken back at once, without
waiting out the grace period (a killed serial run is resumed right away).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ablations.run.cellqueue import GridQueue
from ablations.run.runner import CellAborted
from ablations.util.procs import pid_alive


def beat(queue: GridQueue, trial: FrozenTrial) -> bool:
    """Record that `trial` is alive; False once it is no longer RUNNING (the claim was lost)."""
    try:
        if queue.rdb is not None:
            queue.storage.record_heartbeat(trial._trial_id)  # Optuna's own, on the database clock
        else:  # the journal has no heartbeat: a user attr with the time serves as one
            queue.storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())
    except UpdateFinishedTrialError:
        return False
    return queue.storage.get_trial(trial._trial_id).state == TrialState.RUNNING


def _died_here(t: FrozenTrial, host: str) -> bool:
    """A trial claimed by a process of this machine that is gone."""
    pid = t.user_attrs.get("pid")
    return t.user_attrs.get("host") == host and isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid)


def reap_stale(queue: GridQueue) -> list[FrozenTrial]:
    """FAIL every RUNNING trial whose worker is gone (silent past the grace period, or a dead
    process of this machine); return the trials taken back."""
    running = {t._trial_id: t for t in queue.trials((TrialState.RUNNING,))}
    if not running:
        return []
    host, now = socket.gethostname(), time.time()
    for t in running.values():
        dead = _died_here(t, host)
        if queue.rdb is not None and not dead:
            continue  # Optuna's heartbeat check, below
        start = t.datetime_start.timestamp() if t.datetime_start else now
        if dead or now - float(t.user_attrs.get("heartbeat", start)) > queue.grace:
            with contextlib.suppress(UpdateFinishedTrialError):  # another worker got there first
                queue.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    if queue.rdb is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(queue.study)
    return [t for t in queue.trials((TrialState.FAIL,))
            if t._trial_id in running and "failure_kind" not in t.user_attrs]


class Heartbeat:
    """Keeps a claimed trial alive from a thread; `guard` stops the cell once the claim is lost."""

    def __init__(self, queue: GridQueue, trial: FrozenTrial) -> None:
        self.queue, self.trial = queue, trial
        self.lost, self._stop = threading.Event(), threading.Event()
        beat(queue, trial)  # the first beat before any work: a claimed trial is never without one
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{trial.number}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.queue.heartbeat):
            try:
                alive = beat(self.queue, self.trial)
            except Exception:  # a storage hiccup: the grace period covers a few missed beats
                continue
            if not alive:
                self.lost.set()
                return

    def record(self, run_id: str) -> None:
        """Note the MLflow run on the trial (for the dashboard and whoever takes the cell back)."""
        try:
            self.queue.set_attrs(self.trial, {"mlflow_run_id": run_id})
        except UpdateFinishedTrialError:
            raise CellAborted("claim lost before training started") from None

    def guard(self, final: bool = False) -> None:
        # Between steps the thread's verdict will do; before FINISHED ask the storage itself.
        if self.lost.is_set() or (final and not beat(self.queue, self.trial)):
            raise CellAborted("claim lost: the trial's heartbeat was too old and another worker took the cell")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
