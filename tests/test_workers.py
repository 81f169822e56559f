"""Parallel and distributed grids: real workers (separate processes) training tiny real models on
synthetic data, queued in a real Optuna journal file or a real PostgreSQL server, tracked in MLflow.

Every cell must end FINISHED exactly once, whatever happens to the workers.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from ablations.run import cellqueue as Q
from ablations.run import heartbeat as H
from ablations.run import storage as S
from ablations.run import options as O
from ablations.cli import main
from ablations.config import load_experiments, resolve_cells
from ablations.run.runner import CellAborted
from ablations.tracking import retry_locked
from conftest import SAFETY_TIMEOUT, freeze_at_checkpoint, stopped, wait_for_exit, wait_until

ROOT = Path(__file__).resolve().parents[1]

TINY = {"name": "synthetic", "train_size": 64, "test_size": 32}
GRID_FILE = {
    "defaults": {
        "dataset": TINY,
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "warmup_epochs": 0},
        "seeds": [0, 1, 2, 3],
    },
    "grids": {
        # 3 variants x 4 seeds = 12 cells, about a second each
        "journal12": {"description": "12 cells, journal queue", "axes": {"model.se.reduction": [4, 8, 16]}},
        # cells of their own (journal12's would be trained once per store, and reused here)
        "pg12": {"description": "12 cells, PostgreSQL queue", "axes": {"model.se.reduction": [4, 8, 16]},
                 "dataset": {"test_size": 16}},
        # longer cells (2 epochs on 256 images), so a worker can be stopped between two epochs
        "killed": {"description": "a worker is SIGKILLed mid-cell", "axes": {"model.se.reduction": [4, 8]},
                   "dataset": {"train_size": 256}, "train": {"epochs": 2}, "seeds": [0, 1]},
        "ctrlc": {"description": "Ctrl-C mid-cell", "axes": {"model.se.reduction": [4, 8]},  # not killed's cells
                  "dataset": {"train_size": 256, "test_size": 16}, "train": {"epochs": 2}, "seeds": [0]},
        "diverge": {"description": "one cell diverges (NaN within 4 steps)", "axes": {"train.lr": [0.05, 1.0e+12]},
                    "dataset": {"train_size": 128}, "seeds": [0]},
        "unit": {"description": "queue tests (nothing trains)", "axes": {"model.se.reduction": [4, 8, 16]}},
        # a SLURM array of 6 tasks on a store of its own (cells of their own all the same)
        "slurm6": {"description": "6 array tasks start together", "axes": {"model.se.reduction": [4, 8, 16]},
                   "dataset": {"test_size": 24}, "seeds": [0, 1]},
    },
}
FAST = ["--heartbeat", "1", "--grace", "4"]  # a dead worker's cell is taken back within seconds
ONE_CORE = ["--threads", "1"]  # several `worker`s on one 2-core machine: don't oversubscribe it


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Experiments file, one MLflow store (created here, once: the launcher's job) and a journal."""
    d = tmp_path_factory.mktemp("workers")
    (d / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    MlflowClient(tracking_uri=uri(d)).search_experiments()  # creates the tables
    return d


def uri(d: Path) -> str:
    return f"sqlite:///{d / 'mlflow.db'}"


def args_for(d: Path, *extra: str) -> list[str]:
    return ["--config", str(d / "experiments.yaml"), "--tracking-uri", uri(d), "--device", "cpu", *extra]


def env(d: Path) -> dict[str, str]:
    return {**os.environ, "SENET_ABLATIONS_CACHE": str(d / "cache"), "PYTHONPATH": str(ROOT)}


def start(d: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run_ablation.py"), *argv], cwd=d, env=env(d),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def runs(d: Path, grid: str) -> list:
    """The cells' runs of a grid (other runs, e.g. a report's, live in the same experiment)."""
    client = MlflowClient(tracking_uri=uri(d))
    exp = client.get_experiment_by_name(grid)
    found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if "cell_id" in r.data.tags]


def cells_of(d: Path, grid: str) -> list:
    return resolve_cells(load_experiments(d / "experiments.yaml"), grid)


def queue(d: Path, grid: str, storage: str | None = None, grace: int = 4) -> Q.GridQueue:
    return Q.GridQueue(grid, cells_of(d, grid), storage or S.default_storage(uri(d)), 1, grace)


def assert_exactly_once(d: Path, grid: str, n: int) -> None:
    finished = [r for r in runs(d, grid) if r.info.status == "FINISHED"]
    ids = [r.data.tags["cell_id"] for r in finished]
    assert len(finished) == n and len(set(ids)) == n, sorted(ids)
    assert set(ids) == {c.cell_id for c in cells_of(d, grid)}
    assert all(r.info.status != "RUNNING" for r in runs(d, grid))


def completed_once(trials: list, n: int) -> list:
    """The COMPLETE trials, one per cell, n of them. Any other trial may only be a claim taken back from a
    worker whose heartbeat came late on a loaded machine (FAIL, no failure_kind, no retry used up): the cell
    still ran to completion once, which is what these tests assert; an exact trial count would not hold."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n and len({t.user_attrs["cell_id"] for t in complete}) == n, complete
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.FAIL and "failure_kind" not in t.user_attrs and t.user_attrs.get("attempt", 0) == 0
               for t in others), [(t.number, t.state, t.user_attrs) for t in others]
    return complete


# ----------------------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    which = shutil.which("initdb")
    return Path(found[-1]).parent if found else Path(which).parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (initdb into a temporary folder, pg_ctl start)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries absent (no /usr/lib/postgresql/*/bin/initdb); .ci/run installs them")
    pytest.importorskip("psycopg2", reason="psycopg2-binary not installed (pip install -e '.[dev]')")
    tmp = Path(tempfile.mkdtemp(prefix="senet-pg-", dir="/tmp"))
    as_postgres = os.geteuid() == 0  # postgres refuses to run as root: run it as the postgres user
    if as_postgres:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    port, data = _free_port(), tmp / "data"

    def pg(*cmd: str) -> None:
        if as_postgres:
            cmd = ("runuser", "-u", "postgres", "--", *cmd) if shutil.which("runuser") else \
                  ("su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd))
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=SAFETY_TIMEOUT)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "log"), "-w", "-t", "60",
       "-o", f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE optuna")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_three_workers_journal_exactly_once(workdir):
    """The launcher: `--workers 3` on one machine, the queue in the journal beside the MLflow store."""
    proc = start(workdir, *args_for(workdir, "--grid", "journal12", "--workers", "3", *FAST))
    out = wait_for_exit(proc)
    assert proc.returncode == 0, out
    assert_exactly_once(workdir, "journal12", 12)
    assert "started 3 workers" in out and "[journal12] 12/12 cells done" in out and "ETA" in out
    assert re.search(r"^\[w\d\] \[journal12\] cell \d+/12", out, re.M)  # workers' own lines, prefixed
    assert "grid journal12: 12 finished, 0 skipped (already done), 0 failed, 0 not done, of 12 cells" in out
    assert (workdir / "mlflow.db.queue.journal").is_file()  # the store's own queue, named after it
    trials = completed_once(queue(workdir, "journal12").trials(), 12)
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # cells ran side by side
    by_run = {r.info.run_id: r for r in runs(workdir, "journal12")}
    for t in trials:  # trial and run point at each other
        run = by_run[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["cell_id"] == t.user_attrs["cell_id"] and run.data.tags["optuna_trial"] == str(t.number)
        assert t.value == pytest.approx(run.data.metrics["final_top1_err"])
        view = S.view_name("journal12", cells_of(workdir, "journal12"))  # params are named after the grid's view
        assert t.params == {f"{view}.variant": t.user_attrs["variant"], f"{view}.seed": t.user_attrs["seed"]}

    again = start(workdir, *args_for(workdir, "--grid", "journal12", "--workers", "3"))
    out = wait_for_exit(again)  # done already: no worker starts, nothing runs twice
    assert again.returncode == 0 and "started 0 workers" in out and "0 finished, 12 skipped (already done)" in out, out
    assert len(runs(workdir, "journal12")) == 12


@pytest.mark.slow
def test_three_workers_postgres_exactly_once(workdir, postgres_url):
    """Three `worker` processes, as on three machines, sharing a PostgreSQL queue."""
    procs = [start(workdir, "worker", *args_for(workdir, "--grid", "pg12", "--storage", postgres_url, *FAST, *ONE_CORE))
             for _ in range(3)]
    outs = [wait_for_exit(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outs)
    assert_exactly_once(workdir, "pg12", 12)
    trials = completed_once(queue(workdir, "pg12", postgres_url).trials(), 12)
    assert len({t.user_attrs["pid"] for t in trials}) >= 2  # cells ran side by side
    for out in outs:
        assert "grid pg12: 12 finished, 0 skipped (already done), 0 failed, 0 not done, of 12 cells" in out


@pytest.mark.slow
def test_sigkilled_worker_cell_is_taken_back_and_finished_once(workdir):
    """SIGKILL one of two workers between two epochs of its cell: the other takes the cell back."""
    worker = ["worker", *args_for(workdir, "--grid", "killed", *FAST, *ONE_CORE)]
    procs = [start(workdir, *worker, "--worker-id", "victim")]
    # the victim holds a cell before the survivor starts
    wait_until(lambda: any(r.data.tags.get("worker") == "victim" for r in runs(workdir, "killed")), "the victim's first cell")
    procs.append(start(workdir, *worker, "--worker-id", "survivor"))
    victim_run = freeze_at_checkpoint(  # a checkpoint of its cell, an epoch short of the last
        procs[0], workdir, "victim", lambda m: m["grid"] == "killed" and m["epoch"] < m["epochs"], procs[0].stdout.read)
    procs[0].send_signal(signal.SIGKILL)  # kills a stopped process too
    procs[0].communicate()  # reaps it and closes its pipe
    out = wait_for_exit(procs[1])
    assert procs[1].returncode == 0, out
    assert "took back" in out and "from victim" in out
    assert_exactly_once(workdir, "killed", 4)
    by_id = {r.info.run_id: r for r in runs(workdir, "killed")}
    dead = by_id[victim_run.info.run_id]
    # the victim had checkpointed epoch 1: the survivor resumed its run (tests/test_checkpoint.py)
    assert dead.info.status == "FINISHED" and dead.data.tags["resumes"] == "1" and dead.data.tags["worker"] == "survivor"
    trials = {t.number: t for t in queue(workdir, "killed").trials()}
    lost = trials[int(victim_run.data.tags["optuna_trial"])]
    assert lost.state == TrialState.FAIL and "failure_kind" not in lost.user_attrs
    redo = [t for t in trials.values() if t.user_attrs["cell_id"] == lost.user_attrs["cell_id"] and t.number != lost.number]
    assert len(redo) == 1 and redo[0].state == TrialState.COMPLETE and redo[0].user_attrs["worker"] == "survivor"
    assert redo[0].user_attrs["attempt"] == 0  # a dead worker does not use up a retry


@pytest.mark.slow
def test_failed_cell_is_retried_then_named(workdir):
    """A diverging cell fails, runs K=2 more times, stays failed; the other cell finishes; exit 1."""
    proc = start(workdir, *args_for(workdir, "--grid", "diverge", "--workers", "2", "--retries", "2", *FAST))
    out = wait_for_exit(proc)
    assert proc.returncode == 1, out
    assert "FAILED diverge/lr=1000000000000.0 seed=0" in out and "after 3 attempts" in out and "loss became" in out
    assert "grid diverge: 1 finished, 0 skipped (already done), 1 failed, 0 not done, of 2 cells" in out
    by_status: dict[str, list] = {}
    for r in runs(workdir, "diverge"):
        by_status.setdefault(r.info.status, []).append(r)
    assert [r.data.tags["variant"] for r in by_status["FINISHED"]] == ["lr=0.05"]
    assert len(by_status["FAILED"]) == 3 and {r.data.tags["variant"] for r in by_status["FAILED"]} == {"lr=1000000000000.0"}
    assert all("loss became" in r.data.tags["failure_reason"] for r in by_status["FAILED"])
    bad = [t for t in queue(workdir, "diverge").trials() if t.user_attrs["variant"] == "lr=1000000000000.0"]
    assert [t.user_attrs["attempt"] for t in bad] == [0, 1, 2]
    assert all(t.state == TrialState.FAIL and t.user_attrs["failure_kind"] == "failed"
               and "loss became" in t.user_attrs["failure_reason"] for t in bad)


@pytest.mark.slow
def test_ctrl_c_marks_killed_and_reruns_next_time(workdir):
    """SIGINT to the launcher: its workers mark their runs KILLED and trials interrupted; exit 130.
    The next launch runs those cells again, and only those."""
    from test_checkpoint import freeze_each_worker_at_its_first_checkpoint, pending_signals

    # grace far above any freeze below: a frozen worker must not look dead to the other one
    launcher = start(workdir, *args_for(workdir, "--grid", "ctrlc", "--workers", "2", "--heartbeat", "1", "--grace", "900"))
    # each worker frozen mid-cell (at its first checkpoint), so a fast machine cannot finish the grid before
    # the signal: under load 9 a cell once finished between its first epoch being seen and the SIGINT landing
    workers = freeze_each_worker_at_its_first_checkpoint(workdir, launcher, 2)
    launcher.send_signal(signal.SIGINT)
    for pid in workers:  # the launcher has passed Ctrl-C on: it waits in each frozen worker
        wait_until(lambda: signal.SIGINT in pending_signals(pid), f"SIGINT pending in worker {pid}")
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    out = wait_for_exit(launcher)
    assert launcher.returncode == 130, out
    killed = [r for r in runs(workdir, "ctrlc") if r.info.status == "KILLED"]
    assert killed and all(r.data.tags["failure_reason"] == "interrupted (Ctrl-C)" for r in killed)
    assert all(r.info.status in ("KILLED", "FINISHED") for r in runs(workdir, "ctrlc"))
    trials = {t.number: t for t in queue(workdir, "ctrlc").trials()}
    for run in killed:  # its trial is FAIL, marked as an interruption (no retry used up)
        trial = trials[int(run.data.tags["optuna_trial"])]
        assert trial.state == TrialState.FAIL and trial.user_attrs["failure_kind"] == "interrupted"

    rerun = start(workdir, *args_for(workdir, "--grid", "ctrlc", "--workers", "2", *FAST))
    out = wait_for_exit(rerun)
    assert rerun.returncode == 0, out
    assert_exactly_once(workdir, "ctrlc", 2)
    # a KILLED run with a checkpoint (epoch 1 was done) is resumed, one without runs afresh
    by_id = {r.info.run_id: r for r in runs(workdir, "ctrlc")}
    for run in killed:
        again = by_id[run.info.run_id]
        assert (again.info.status, again.data.tags.get("resumes")) in (("FINISHED", "1"), ("KILLED", None))


@pytest.mark.slow
def test_slurm_array_starting_together_passes_its_preflights_and_runs_each_cell_once(tmp_path):
    """Six array tasks start at once on one fresh store: each does what a task does on its GPU node,
    the preflight (one step and one store write) and then `run_ablation.py worker`. On a CPU the worker
    skips its preflight, so each task runs `python -m ablations.run.preflight` before it, as its gate
    would. Every task passes (a preflight exit 2 is not requeued by the README's script) and every cell
    runs exactly once."""
    d = tmp_path / "array"
    d.mkdir()
    (d / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    MlflowClient(tracking_uri=uri(d)).search_experiments()  # MLflow's migrations take one creator: tables first
    preflight = shlex.join([sys.executable, "-m", "ablations.run.preflight", "--device", "cpu", "--tracking-uri", uri(d)])
    worker = shlex.join([sys.executable, str(ROOT / "run_ablation.py"), "worker",
                         *args_for(d, "--grid", "slurm6", "--heartbeat", "1", "--grace", "60", *ONE_CORE)])
    task = f"{preflight} || exit $?; exec {worker}"
    tasks = [subprocess.Popen(["sh", "-c", task], cwd=d, env={**env(d), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(6)]
    outs = [wait_for_exit(p) for p in tasks]
    failed = [f"task {i} exit {p.returncode}:\n{out}" for i, (p, out) in enumerate(zip(tasks, outs)) if p.returncode != 0]
    assert not failed, "\n".join(failed)
    assert all("preflight ok on cpu" in out and "MLflow write ok" in out for out in outs)
    assert_exactly_once(d, "slurm6", 6)
    client = MlflowClient(tracking_uri=uri(d))  # the probes leave nothing the report or the UI would list
    assert {e.name for e in client.search_experiments()} == {"Default", "slurm6"}


# ----------------------------------------------------------------------------- the queue itself


def _claim_all(d: str, storage: str, out) -> None:
    q = queue(Path(d), "unit", storage)
    while (t := q.claim()) is not None:
        out.put(t.number)
        time.sleep(0.01)  # let the others in
    out.put(None)


def test_concurrent_claims_hand_each_trial_to_one_process(workdir, tmp_path):
    """Four processes race to claim twelve WAITING trials in one journal: each is claimed once."""
    storage = str(tmp_path / "claims.log")
    statuses = queue(workdir, "unit", storage).reconcile(retries=0)
    assert [s.state for s in statuses.values()] == ["waiting"] * 12
    ctx = multiprocessing.get_context("fork")
    got = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(workdir), storage, got)) for _ in range(4)]
    for p in procs:
        p.start()
    claimed, ended = [], 0
    while ended < 4:
        item = got.get(timeout=SAFETY_TIMEOUT)
        ended += item is None
        claimed += [item] if item is not None else []
    for p in procs:
        p.join()
    assert sorted(claimed) == list(range(12))


def test_a_cell_stopped_part_way_is_claimed_before_cells_never_started(workdir, tmp_path):
    """A preempted cell (and one whose worker died) is re-enqueued behind every waiting cell, yet claimed
    first: its checkpoint is the work most at risk. A failed cell's retry keeps its place."""
    storage = str(tmp_path / "q.log")
    q = queue(workdir, "unit", storage)
    q.reconcile(retries=1)
    first, second, third = q.claim(), q.claim(), q.claim()
    q.finish(first, TrialState.FAIL, attrs={"failure_kind": "failed", "failure_reason": "x"})
    q.finish(second, TrialState.FAIL, attrs={"failure_kind": "preempted", "failure_reason": "SIGTERM"})
    q.finish(third, TrialState.FAIL)  # reaped: its worker's heartbeat stopped
    q.reconcile(retries=1)
    waiting = q.trials((TrialState.WAITING,))
    again = {t.user_attrs["cell_id"]: t.number for t in waiting if t.number >= 12}
    assert set(again) == {t.user_attrs["cell_id"] for t in (first, second, third)}  # enqueued last
    fresh = queue(workdir, "unit", storage)  # another worker, starting now
    order = [fresh.claim().user_attrs["cell_id"] for _ in range(4)]
    stopped = [second.user_attrs["cell_id"], third.user_attrs["cell_id"]]
    assert order[:2] == stopped, order
    never_started = sorted((t for t in waiting if t.number < 12), key=lambda t: t.number)
    assert order[2:] == [t.user_attrs["cell_id"] for t in never_started[:2]], order


def test_reconcile_enqueues_each_missing_cell_once(workdir, tmp_path):
    storage = str(tmp_path / "q.log")
    a, b = queue(workdir, "unit", storage), queue(workdir, "unit", storage)  # two launchers
    a.reconcile(retries=0)
    b.reconcile(retries=0)
    a.reconcile(retries=0)
    assert len(a.trials()) == 12 and len({t.user_attrs["cell_id"] for t in a.trials()}) == 12


def test_cell_status_rule():
    from optuna.trial import create_trial

    def t(state: TrialState, n: int, **attrs) -> object:
        trial = create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None, user_attrs=attrs)
        trial.number = n
        return trial

    fail = lambda n, attempt, kind="failed": t(TrialState.FAIL, n, attempt=attempt, failure_kind=kind, failure_reason="x")
    assert Q.cell_status([], 2) == Q.CellStatus("pending", enqueue=0)
    assert Q.cell_status([fail(0, 0)], 2).enqueue == 1  # a failure uses up a retry
    assert Q.cell_status([fail(0, 0), fail(1, 1), fail(2, 2)], 2).state == "failed"
    assert Q.cell_status([fail(0, 0), fail(1, 1), fail(2, 2)], 2, reset_failed=True).enqueue == 0  # a new launch
    assert Q.cell_status([fail(0, 1, "interrupted")], 2).enqueue == 1  # Ctrl-C: the same attempt again
    assert Q.cell_status([t(TrialState.FAIL, 0, attempt=0)], 0).enqueue == 0  # reaped (worker died): again, free
    assert Q.cell_status([fail(0, 0), t(TrialState.RUNNING, 1, attempt=1)], 2).state == "running"
    assert Q.cell_status([t(TrialState.PRUNED, 0), t(TrialState.COMPLETE, 1)], 2).state == "done"
    # a duplicate (two launchers raced on a database without a lock) is set aside; the oldest never is
    older, newer = t(TrialState.RUNNING, 3), t(TrialState.RUNNING, 5)
    assert Q.duplicate_of(newer, [older, newer]) is older and Q.duplicate_of(older, [older, newer]) is None
    assert Q.duplicate_of(newer, [t(TrialState.FAIL, 3), newer]) is None


@pytest.mark.parametrize("backend", ["journal", "postgres"])
def test_stale_trial_is_taken_back_and_lost_claim_stops_the_cell(workdir, tmp_path, request, backend):
    """Journal: our heartbeat in a user attribute. PostgreSQL: Optuna's own heartbeat and fail_stale_trials."""
    storage = str(tmp_path / "stale.log") if backend == "journal" else request.getfixturevalue("postgres_url")
    q = queue(workdir, "unit", storage, grace=2)
    q.reconcile(retries=0)
    silent = q.claim()
    H.beat(q, silent)  # a worker that dies after its first heartbeat
    hb = H.Heartbeat(q, q.claim())  # a live one: its beats keep its trial
    assert H.reap_stale(q) == []  # a first look: a heartbeat's age is timed from it, on this reader's clock
    time.sleep(3)
    taken = H.reap_stale(q)
    assert [t.number for t in taken] == [silent.number]
    st = q.statuses(0)[silent.user_attrs["cell_id"]]
    assert st.state == "pending" and st.enqueue == 0
    q.reconcile(retries=0)
    assert len(q.trials()) == 13
    # the live worker's claim is taken from it (as if its beats had stopped): it notices and stops
    q.storage.set_trial_state_values(hb.trial._trial_id, TrialState.FAIL)
    with pytest.raises(CellAborted, match="claim lost"):
        hb.guard(final=True)
    assert hb.lost.wait(SAFETY_TIMEOUT), "timeout: the heartbeat thread never noticed the lost claim"
    hb.stop()


def test_worker_slots_pin_one_gpu_each():
    assert O.worker_slots(None, [0, 1], 1) == ["0", "1"]
    assert O.worker_slots(None, [0, 1], 2) == ["0", "1", "0", "1"]  # --workers-per-gpu 2
    assert O.worker_slots(3, [2, 5], 1) == ["2", "5", "2"]
    assert O.worker_slots(3, [], 1) == [None, None, None]  # CPU workers
    assert O.parse_gpus("0,1") == [0, 1]


def test_default_storage_sits_beside_the_mlflow_store(tmp_path):
    assert S.default_storage(f"sqlite:///{tmp_path}/x/mlflow.db") == str(tmp_path / "x" / "mlflow.db.queue.journal")
    assert S.default_storage(f"sqlite:///{tmp_path}/x/other.db") == str(tmp_path / "x" / "other.db.queue.journal")
    assert S.is_rdb("postgresql://u@h/db") and not S.is_rdb("/shared/optuna-journal.log")


def test_sqlite_store_held_locked_past_the_driver_timeout(workdir):
    """Another writer holds the MLflow SQLite file until our write has waited out SQLite's own busy
    timeout and failed with 'database is locked' (an event, not a time): the write is retried, and it
    lands once the lock is gone."""
    import sqlite3
    import threading

    from ablations.tracking import is_locked_error

    client = MlflowClient(tracking_uri=uri(workdir))
    exp_id = client.create_experiment("locktest")
    holder = sqlite3.connect(workdir / "mlflow.db", timeout=30, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    locked, outcome = threading.Event(), []

    def attempt() -> None:  # what RetryingClient does for every call of a sqlite store's client
        try:
            client.set_experiment_tag(exp_id, "written", "after the lock")
        except Exception as exc:
            if is_locked_error(exc):
                locked.set()
            raise

    def write() -> None:
        try:
            outcome.append(retry_locked(attempt))
        except BaseException as exc:  # reported by the assertion below
            outcome.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert locked.wait(SAFETY_TIMEOUT), "timeout: the write never reported 'database is locked'"
    finally:
        holder.commit()
        holder.close()
    writer.join(SAFETY_TIMEOUT)
    assert not writer.is_alive() and outcome == [None], outcome
    assert MlflowClient(tracking_uri=uri(workdir)).get_experiment(exp_id).tags["written"] == "after the lock"


def test_locked_sqlite_writes_are_retried():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert retry_locked(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        retry_locked(lambda: (_ for _ in ()).throw(ValueError("no such table")))  # other errors are not retried


@pytest.mark.parametrize("extra,message", [
    (["--storage", "/dev/null/journal.log"], "--storage /dev/null/journal.log: the folder /dev/null is not a folder"),
    (["--workers", "0"], "--workers: must be at least 1"),
    (["--gpus", "0", "--device", "cpu"], "--gpus"),
    (["--workers", "2", "--heartbeat", "10", "--grace", "5"], "--grace"),
    (["--workers", "2", "--retries", "-1"], "--retries"),
])
def test_bad_parallel_options_exit_2(workdir, capsys, extra, message):
    code = main(args_for(workdir, "--grid", "unit", *extra))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "\n" not in err.strip()


def test_force_is_for_the_run_that_starts_the_grid_not_a_worker(workdir, capsys):
    code = main(["worker", *args_for(workdir, "--grid", "unit", "--force")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --force: ") and "\n" not in err
