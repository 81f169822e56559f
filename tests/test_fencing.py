"""Safe on a real cluster: who owns a claimed cell, and what a worker that lost it may still touch.

- Liveness: a claim is judged by its heartbeat as this reader sees it change on its own monotonic
  clock, never by another machine's wall clock, and a pid is a sign of death only inside the PID
  namespace it belongs to (containers may share a host name, not pids).
- Fencing: a worker taken for dead (frozen, cut off from the queue) may come back while another
  worker holds its cell, resumed in the same MLflow run from the same checkpoint. The claim (the
  queue trial) is recorded in the run and in the checkpoint; a worker whose claim is no longer
  there ends nothing, deletes nothing, writes nothing. A worker that has had no heartbeat through
  for the grace period stops by itself.

Real journal and PostgreSQL queues, real worker processes, a real MLflow store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from ablations.config import load_experiments, resolve_cells
from ablations.run import cellqueue as Q
from ablations.run import heartbeat as H
from ablations.run.runner import CellAborted
from conftest import freeze_at_checkpoint, stopped, wait_for_exit, wait_until
from test_workers import postgres_url  # noqa: F401 (a fixture, shared with test_workers)

ROOT = Path(__file__).resolve().parents[1]

GRID_FILE = {
    "defaults": {
        "dataset": {"name": "synthetic", "train_size": 256, "test_size": 32},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        # three epochs: a cell can be frozen after epoch 1 and again after epoch 2, still mid-cell
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "warmup_epochs": 0},
        "seeds": [0],
    },
    "grids": {
        "unit": {"description": "queue tests (nothing trains)", "axes": {"model.se.reduction": [4, 8, 16]}},
        "cutoff": {"description": "a worker loses the queue's storage mid-cell", "axes": {"model.se.reduction": [2]}},
        "stale": {"description": "a frozen worker comes back after its cell was taken over",
                  "axes": {"model.se.reduction": [8]}},
    },
}
FAST = ["--heartbeat", "1", "--grace", "4"]
ONE_CORE = ["--threads", "1"]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_worker_left():
    """A failed test leaves no worker behind (some are frozen with SIGSTOP when an assertion fails)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.send_signal(signal.SIGCONT)
            proc.wait()


@pytest.fixture
def d(tmp_path) -> Path:
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    MlflowClient(tracking_uri=uri(tmp_path)).search_experiments()  # creates the tables before any worker starts
    return tmp_path


def uri(d: Path) -> str:
    return f"sqlite:///{d / 'mlflow.db'}"


def cells(d: Path, grid: str) -> list:
    return resolve_cells(load_experiments(d / "experiments.yaml"), grid)


def queue(d: Path, storage: str, grace: int, grid: str = "unit") -> Q.GridQueue:
    return Q.GridQueue(grid, cells(d, grid), storage, 1, grace)


def worker(d: Path, log: Path, grid: str, storage: Path, name: str, *extra: str) -> subprocess.Popen:
    """A `worker` process whose output goes to `log` (read while it runs), unbuffered."""
    argv = [sys.executable, str(ROOT / "run_ablation.py"), "worker", "--config", str(d / "experiments.yaml"),
            "--tracking-uri", uri(d), "--device", "cpu", "--grid", grid, "--storage", str(storage),
            "--worker-id", name, *ONE_CORE, *extra]
    env = {**os.environ, "SENET_ABLATIONS_CACHE": str(d / "cache"), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        _started.append(subprocess.Popen(argv, cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
    return _started[-1]


def cell_runs(d: Path, grid: str) -> list:
    client = MlflowClient(tracking_uri=uri(d))
    exp = client.get_experiment_by_name(grid)
    found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if "cell_id" in r.data.tags]


def checkpoint_files(d: Path) -> dict[str, str]:
    """Every checkpoint file under the store's checkpoint folder and a digest of its bytes."""
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((d / "checkpoints").glob("*/last.*"))}


def holds_no_lock(pid: int, journal: Path) -> bool:
    """Whether a stopped process holds none of the locks the other processes wait for: the journal's
    (a symlink: none exists, and a stopped process cannot take it) and any file lock of its own
    (the enqueue lock, SQLite's: /proc/locks names their holders). A worker frozen holding one would
    stall the others, and Optuna breaks a journal lock held past 30 s."""
    if os.path.lexists(f"{journal}.lock"):
        return False
    holders = {line.split()[4] for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 4}
    return str(pid) not in holders


def freeze_quiet(proc: subprocess.Popen, journal: Path, who: str) -> None:
    """SIGSTOP `proc` at a moment it holds no lock (stopped holding one, it is let go on and stopped again)."""
    def frozen() -> bool:
        assert proc.poll() is None, f"worker {who} ended early"
        proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: stopped(proc.pid), f"worker {who} to stop")
        if holds_no_lock(proc.pid, journal):
            return True
        proc.send_signal(signal.SIGCONT)
        return False

    wait_until(frozen, f"worker {who} stopped holding no lock", every=0.05)


def freeze_at(d: Path, proc: subprocess.Popen, log: Path, who: str, epoch: int) -> object:
    """SIGSTOP `proc` once its cell has checkpointed `epoch` (of 3), holding no lock (see holds_no_lock);
    return that RUNNING run."""
    return freeze_at_checkpoint(proc, d, who, lambda meta: meta["epoch"] == epoch, log.read_text,
                                also=lambda: holds_no_lock(proc.pid, d / "q.journal"))


def metric_steps(d: Path, run_id: str, key: str = "test_top1_err") -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri=uri(d)).get_metric_history(run_id, key))


def metric_history(d: Path, run_id: str) -> list[tuple[str, int, float, int]]:
    """Every per-epoch metric entry of a run: (key, step, value, timestamp)."""
    client = MlflowClient(tracking_uri=uri(d))
    return sorted((m.key, m.step, m.value, m.timestamp) for key in ("train_loss", "test_top1_err")
                  for m in client.get_metric_history(run_id, key))


def gone_pid() -> int:
    """A pid that no process of this PID namespace has (a child that was started and reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ----------------------------------------------------------------------------- liveness: one clock, no pids


def test_a_pid_is_a_sign_of_death_only_in_its_own_pid_namespace():
    """The same dead pid: gone when the claim was made in this namespace; unknown (the heartbeat decides)
    when made in another one, or where the namespace was not recorded."""
    from ablations.util.procs import gone_here, pid_namespace

    here, ghost = pid_namespace(), gone_pid()
    assert here is not None and here.endswith(os.readlink("/proc/self/ns/pid"))
    assert gone_here(here, ghost) and gone_here(here, str(ghost))  # as a trial (int) and a run tag (str) hold it
    assert not gone_here(here, os.getpid())
    assert not gone_here("another-machine/" + here.split("/", 1)[1], ghost)  # same namespace inode, other kernel
    assert not gone_here("", ghost) and not gone_here(None, ghost)


@pytest.mark.parametrize("backend", ["journal", "postgres"])
def test_live_claims_from_other_pid_namespaces_of_this_host_are_not_reaped(d, request, backend):
    """Two workers in containers that share this machine's host name but not its PID namespace: the pids
    in their claims exist nowhere here, yet their heartbeats advance, so neither cell is taken back."""
    storage = str(d / "q.journal") if backend == "journal" else request.getfixturevalue("postgres_url")
    q = queue(d, storage, grace=2)
    q.reconcile(retries=0)
    ghost = gone_pid()
    claims = [q.claim(), q.claim()]
    for n, t in enumerate(claims):  # what a worker of another container writes into its claim
        q.set_attrs(t, {"worker": f"container-{n}", "host": socket.gethostname(), "pid": ghost,
                        "pidns": f"another-container-{n}/pid:[4026532{n}00]", "owner": f"token-{n}"})
    first = time.monotonic()
    while time.monotonic() - first <= 2 * q.grace:  # past the grace period on this reader's clock
        for t in claims:
            H.beat(q, t)
        assert H.reap_stale(q) == [], "a live claim was taken back: its pid was judged in the wrong namespace"
    assert {t.number for t in q.trials((TrialState.RUNNING,))} == {t.number for t in claims}


def test_heartbeat_from_a_skewed_clock_is_alive_while_it_advances(d):
    """A worker whose clock is an hour behind: the times it writes look an hour old, but they keep
    changing, which is all a reader can trust from another machine."""
    q = queue(d, str(d / "q.journal"), grace=2)
    q.reconcile(retries=0)
    behind = q.claim()
    first = time.monotonic()
    while time.monotonic() - first <= 2 * q.grace:
        q.storage.set_trial_user_attr(behind._trial_id, "heartbeat", time.time() - 3600)
        assert H.reap_stale(q) == [], "a live claim was taken back: its heartbeat was compared with this clock"
    assert q.storage.get_trial(behind._trial_id).state == TrialState.RUNNING


def test_heartbeat_that_stops_is_reaped_after_grace_on_the_readers_clock(d):
    """A worker whose clock is an hour ahead writes one heartbeat, then nothing: by its own times it
    looks alive for an hour, but the reader sees it unchanged for the grace period and takes it back;
    a heartbeat that keeps changing beside it stays."""
    q = queue(d, str(d / "q.journal"), grace=2)
    q.reconcile(retries=0)
    ahead, live = q.claim(), q.claim()
    q.storage.set_trial_user_attr(ahead._trial_id, "heartbeat", time.time() + 3600)
    H.beat(q, live)
    first = time.monotonic()
    taken: list = []
    while not taken and time.monotonic() - first <= 2 * q.grace:
        H.beat(q, live)
        taken = H.reap_stale(q)
        if taken:  # never before the grace period has passed on this reader's clock
            assert time.monotonic() - first > q.grace
    H.beat(q, live)
    taken += H.reap_stale(q)
    assert [t.number for t in taken] == [ahead.number]
    assert q.storage.get_trial(live._trial_id).state == TrialState.RUNNING


# ----------------------------------------------------------------------------- a worker cut off from the queue


def test_claim_without_a_heartbeat_through_for_grace_stops_the_cell(d):
    """The queue's journal disappears under a worker (a lost mount): its heartbeats fail, and once none
    has gone through for the grace period the cell is stopped at its next step (it may have been
    taken back by now), instead of training on unnoticed."""
    journal = d / "q.journal"
    q = queue(d, str(journal), grace=2)
    q.reconcile(retries=0)
    hb = H.Heartbeat(q, q.claim())
    try:
        hb.guard(False)
        journal.rename(d / "q.journal.away")
        journal.mkdir()  # every read and write of the journal fails from now on
        cut = time.monotonic()
        wait_until(lambda: time.monotonic() - cut > q.grace, "the grace period to pass", every=0.05)
        with pytest.raises(CellAborted, match="claim lost"):
            hb.guard(False)
    finally:
        hb.stop()


@pytest.mark.slow
def test_worker_cut_off_from_the_queue_neither_fails_nor_deletes_its_resumable_cell(d):
    """A worker loses the queue's storage mid-cell (its journal is replaced by a folder while it is
    frozen at its epoch-1 checkpoint, then it goes on). It must not go on to end the run FAILED and
    delete its checkpoint: it stops, leaving both to whoever takes the cell back, who resumes the run."""
    journal = d / "q.journal"
    cut = worker(d, d / "cutoff.log", "cutoff", journal, "cutoff", *FAST)
    run = freeze_at(d, cut, d / "cutoff.log", "cutoff", epoch=1)
    journal.rename(d / "q.journal.away")
    journal.mkdir()  # the storage is gone for it
    cut.send_signal(signal.SIGCONT)
    wait_for_exit(cut)
    out = (d / "cutoff.log").read_text()
    left = MlflowClient(tracking_uri=uri(d)).get_run(run.info.run_id)
    assert left.info.status != "FAILED", f"the cut-off worker failed the run: {left.data.tags.get('failure_reason')}\n{out}"
    meta = json.loads((d / "checkpoints" / run.data.tags["cell_id"] / "last.json").read_text())
    assert meta["run_id"] == run.info.run_id, out

    journal.rmdir()
    (d / "q.journal.away").rename(journal)  # the storage is back: another worker takes the cell over
    rescuer = worker(d, d / "rescuer.log", "cutoff", journal, "rescuer", *FAST)
    wait_for_exit(rescuer)
    out = (d / "rescuer.log").read_text()
    assert rescuer.returncode == 0, out
    (only,) = cell_runs(d, "cutoff")
    assert only.info.run_id == run.info.run_id and only.info.status == "FINISHED", out
    assert only.data.tags["resumes"] == "1" and only.data.tags["worker"] == "rescuer"
    assert metric_steps(d, only.info.run_id) == [1, 2, 3]
    assert checkpoint_files(d) == {}


@pytest.mark.slow
def test_stale_worker_leaves_the_new_owners_run_and_checkpoint_alone(d):
    """Worker `stale` is frozen past the grace period mid-cell; `fresh` takes the cell back and resumes
    the same MLflow run from its checkpoint, then checkpoints epoch 2 and is frozen too. `stale` comes
    back: it finds its claim gone and stops, ending no run, deleting and writing no checkpoint, logging
    nothing. Then both go on, and the cell is FINISHED once, in that run."""
    journal = d / "q.journal"
    # A long grace for `stale` alone: the cell it comes back to is held by a frozen worker, which it
    # must not take back before this test has looked (it is stopped again right after it reacts).
    stale = worker(d, d / "stale.log", "stale", journal, "stale", "--heartbeat", "1", "--grace", "600")
    run = freeze_at(d, stale, d / "stale.log", "stale", epoch=1)
    fresh = worker(d, d / "fresh.log", "stale", journal, "fresh", *FAST)
    resumed = freeze_at(d, fresh, d / "fresh.log", "fresh", epoch=2)
    assert resumed.info.run_id == run.info.run_id and resumed.data.tags["resumes"] == "1"
    held, logged = checkpoint_files(d), metric_history(d, run.info.run_id)
    assert held, "fresh has a checkpoint"

    stale.send_signal(signal.SIGCONT)
    wait_until(lambda: "claim lost" in (d / "stale.log").read_text() or stale.poll() is not None,
               "the stale worker to notice its lost claim")
    freeze_quiet(stale, journal, "stale")
    out = (d / "stale.log").read_text()
    now = MlflowClient(tracking_uri=uri(d)).get_run(run.info.run_id)
    assert now.info.status == "RUNNING", f"the stale worker ended fresh's run {now.info.status}:\n{out}"
    assert "failure_reason" not in now.data.tags, now.data.tags["failure_reason"]
    assert now.data.tags["worker"] == "fresh"
    assert checkpoint_files(d) == held, f"the stale worker touched fresh's checkpoint:\n{out}"
    assert metric_history(d, run.info.run_id) == logged, f"the stale worker logged into fresh's run:\n{out}"

    fresh.send_signal(signal.SIGCONT)
    wait_for_exit(fresh)
    assert fresh.returncode == 0, (d / "fresh.log").read_text()
    stale.send_signal(signal.SIGCONT)
    wait_for_exit(stale)
    assert stale.returncode == 0, (d / "stale.log").read_text()
    (only,) = cell_runs(d, "stale")
    assert only.info.run_id == run.info.run_id and only.info.status == "FINISHED"
    assert only.data.tags["worker"] == "fresh" and "failure_reason" not in only.data.tags
    assert metric_steps(d, only.info.run_id) == [1, 2, 3]
    assert checkpoint_files(d) == {}
    trials = Q.by_cell(queue(d, str(journal), 4, "stale").trials())
    (attempts,) = trials.values()
    assert [t.state for t in attempts] == [TrialState.FAIL, TrialState.COMPLETE]
    assert attempts[1].user_attrs["worker"] == "fresh"
