"""Checkpoints, resume into the same MLflow run, preemption signals and --time-limit.

Real processes (run_ablation.py), a real MLflow store, a tiny real model (SE-ResNet-20) on the
synthetic dataset through the real input pipeline (crop and flip included). Every process runs
on one thread: CPU results are then bit-for-bit reproducible, which is what resume promises.
Waits are for events (a checkpoint file, a line on stderr, a process's exit), never for a time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from ablations.train import checkpoint as ckpt
from ablations.config import DatasetConfig, ExperimentConfig, TrainConfig
from ablations.data import load_dataset
from ablations.errors import EXIT_PREEMPTED, EXIT_TIME_LIMIT
from ablations.train import TrainingStopped, seed_everything, train
from ablations.util.device import native_bf16
from conftest import stopped, wait_until
from senet import build_model

ROOT = Path(__file__).resolve().parents[1]
WAIT = 900  # safety timeout (s) of every wait: a loaded 2-core machine is slow, not wrong
PER_EPOCH = ("train_loss", "train_err", "test_top1_err", "test_top5_err", "lr")  # epoch_seconds etc. are timings

GRID_FILE = {
    "defaults": {
        "dataset": {"name": "synthetic", "train_size": 128, "test_size": 32},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 4, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "warmup_epochs": 0.5},
        "seeds": [0],
    },
    "grids": {
        # one cell of 4 epochs x 16 steps: long enough to be stopped between two steps
        "one": {"description": "one cell", "axes": {"model.se.reduction": [4]}},
        # two such cells for two workers
        "pair": {"description": "two cells", "axes": {"model.se.reduction": [4, 8]}},
        # 6 cells under a time limit: more than one invocation's worth even on a quiet machine
        "timed": {"description": "6 cells under a time limit", "axes": {"model.se.reduction": [2, 4, 8]},
                  "train": {"epochs": 4, "batch_size": 16}, "seeds": [0, 1]},
    },
}


def write_store(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    return d


def uri(d: Path) -> str:
    return f"sqlite:///{d / 'mlflow.db'}"


def command(d: Path, grid: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_ablation.py"), "--config", str(d / "experiments.yaml"), "--grid", grid,
            "--tracking-uri", uri(d), "--device", "cpu", *extra]


def env(d: Path) -> dict[str, str]:
    return {**os.environ, "SENET_ABLATIONS_CACHE": str(d / "cache"), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(d: Path, grid: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(command(d, grid, *extra), cwd=d, env=env(d), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(d: Path, grid: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(d, grid, *extra), cwd=d, env=env(d), capture_output=True, text=True, timeout=WAIT)


def cell_runs(d: Path, grid: str) -> list:
    client = MlflowClient(tracking_uri=uri(d))
    exp = client.get_experiment_by_name(grid)
    found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if "cell_id" in r.data.tags]


def history(d: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(tracking_uri=uri(d))
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in PER_EPOCH}


def weights(d: Path, run_id: str) -> dict[str, torch.Tensor]:
    path = MlflowClient(tracking_uri=uri(d)).download_artifacts(run_id, "model/weights.pt", str(d))
    return torch.load(path, weights_only=True)


def checkpoint_meta(d: Path) -> dict | None:
    found = list((d / "checkpoints").glob("*/last.json"))
    return json.loads(found[0].read_text()) if found else None


def wait_for(what: str, ready, proc: subprocess.Popen):
    """Poll `ready()` until it returns something; fail with the process's output if it ends first."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (code {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timeout: waited {WAIT}s for {what}")


def pending_signals(pid: int) -> set[int]:
    """The signals sent to process `pid` and not yet delivered (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def freeze_each_worker_at_its_first_checkpoint(d: Path, launcher: subprocess.Popen, workers: int) -> list[int]:
    """SIGSTOP each worker as soon as its cell has a checkpoint and return their pids: every worker is then
    mid-cell (three epochs left) however fast this machine is, which a signal sent on a timer cannot promise."""
    client = MlflowClient(tracking_uri=uri(d))
    frozen: list[int] = []

    def freeze_new() -> bool:
        for f in (d / "checkpoints").glob("*/last.json"):  # written atomically: complete when there
            pid = int(client.get_run(json.loads(f.read_text())["run_id"]).data.tags["pid"])
            if pid not in frozen:
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
        return len(frozen) == workers

    wait_for(f"a checkpoint of each of {workers} workers' cells", freeze_new, launcher)
    return frozen


def assert_same_as_reference(d: Path, reference: dict) -> object:
    """One FINISHED run, 4 metric steps each logged once, identical metrics and weights; the checkpoint gone."""
    (only,) = cell_runs(d, "one")
    assert only.info.status == "FINISHED", only.data.tags.get("failure_reason")
    got = history(d, only.info.run_id)
    for key in PER_EPOCH:
        assert [s for s, _ in got[key]] == [1, 2, 3, 4], (key, got[key])
        assert got[key] == reference["history"][key], key
    final = weights(d, only.info.run_id)
    diff = max((final[k].double() - v.double()).abs().max().item() for k, v in reference["weights"].items())
    assert diff == 0.0, f"max abs weight difference {diff}"
    assert checkpoint_meta(d) is None and not list((d / "checkpoints").glob("*/*.pt"))
    return only


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted cell: its per-epoch metrics and final weights."""
    d = write_store(tmp_path_factory.mktemp("reference"))
    done = run(d, "one")
    assert done.returncode == 0, done.stderr
    (only,) = cell_runs(d, "one")
    assert only.data.tags.get("resumes") is None
    return {"history": history(d, only.info.run_id), "weights": weights(d, only.info.run_id)}


# ----------------------------------------------------------------------------- in process


def _tiny_config(epochs: int = 2) -> ExperimentConfig:
    return ExperimentConfig(
        dataset=DatasetConfig(name="synthetic", train_size=64, test_size=32),
        model={"arch": "resnet20", "num_classes": 10, "se": {"reduction": 4}},
        train=TrainConfig(epochs=epochs, batch_size=16, lr=0.05, warmup_epochs=0.5), seed=3)


def _fresh_model(cfg: ExperimentConfig) -> torch.nn.Module:
    seed_everything(cfg.seed)
    return build_model(cfg.model)


def test_stop_mid_epoch_then_resume_is_bit_exact(tmp_path):
    """A stop request after step 2 of epoch 2 saves a mid-epoch checkpoint (through the atomic file
    and a weights_only load); training resumed from it equals the uninterrupted run bit for bit."""
    torch.set_num_threads(1)
    cfg = _tiny_config()
    data = load_dataset("synthetic", "unused", train_size=64, test_size=32, cache_dir=tmp_path / "cache")
    cpu = torch.device("cpu")
    whole = train(cfg, _fresh_model(cfg), data, cpu)

    folder, polls = tmp_path / "c", []

    # polled before the first step, then per epoch after each of 4 steps, before its one evaluation
    # batch and at its end: step 2 of epoch 2 is the 9th poll
    def stop_at_step_2_of_epoch_2():
        polls.append(1)
        return ("preempted", "test stop") if len(polls) == 9 else None

    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, _fresh_model(cfg), data, cpu, should_stop=stop_at_step_2_of_epoch_2,
              on_checkpoint=lambda state: ckpt.save(folder, state))
    assert (stopped.value.epoch, stopped.value.step_in_epoch, stopped.value.exit_code) == (1, 2, EXIT_PREEMPTED)
    assert not list(folder.glob(".*.tmp"))  # renamed into place, nothing left behind
    # two saves (end of epoch 1, the stop): one state file is left, the one the manifest names
    assert [p.name for p in folder.glob("*.pt")] == [json.loads((folder / "last.json").read_text())["state_file"]]
    state = ckpt.load(folder)  # weights_only=True
    assert (state["epoch"], state["step_in_epoch"], state["global_step"], len(state["history"])) == (1, 2, 6, 1)
    assert state["partial"]["seen"] == 32

    resumed = train(cfg, _fresh_model(cfg), data, cpu, resume=state)
    assert [(s.train_loss, s.train_err, s.test_top1_err, s.test_top5_err, s.lr) for s in resumed.history] == \
           [(s.train_loss, s.train_err, s.test_top1_err, s.test_top5_err, s.lr) for s in whole.history]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_every_is_not_part_of_the_cell_id():
    from ablations.config import config_id

    cfg = _tiny_config()
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_every": 3})})
    assert config_id(cfg) == config_id(other)
    assert config_id(cfg) != config_id(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})}))


# ----------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_sigkill_after_epoch_2_resumes_bit_exact(tmp_path, reference):
    """SIGKILL once the epoch-2 checkpoint exists; the next run resumes the same MLflow run from it."""
    d = write_store(tmp_path / "killed")
    proc = start(d, "one")
    meta = wait_for("the epoch-2 checkpoint", lambda: (m := checkpoint_meta(d)) and m["epoch"] >= 2 and m, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 2 <= meta["epoch"] < 4 and meta["step_in_epoch"] == 0
    (killed,) = cell_runs(d, "one")
    assert killed.info.status == "RUNNING"  # no chance to clean up

    resumed = run(d, "one")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from its checkpoint at epoch {meta['epoch']} (run {killed.info.run_id}, resume #1)" in resumed.stderr
    only = assert_same_as_reference(d, reference)
    assert only.info.run_id == killed.info.run_id and only.data.tags["resumes"] == "1"
    assert "failure_reason" not in only.data.tags


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_and_exits_75(tmp_path, reference):
    """SIGTERM during epoch 2: a mid-epoch checkpoint and exit 75 at the next step; resume is bit-exact."""
    d = write_store(tmp_path / "term")
    proc = start(d, "one")
    # frozen the moment the epoch-1 checkpoint is seen, so a fast machine cannot finish epoch 2 before the signal
    wait_for("the epoch-1 checkpoint", lambda: checkpoint_meta(d) and os.kill(proc.pid, signal.SIGSTOP) is None, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=WAIT)
    exited = time.monotonic() - sent
    assert proc.returncode == EXIT_PREEMPTED, out
    meta = checkpoint_meta(d)
    assert meta["epoch"] == 1 and 1 <= meta["step_in_epoch"] <= meta["steps_per_epoch"] == 16, meta
    saved_after = (d / "checkpoints" / meta["cell_id"] / meta["state_file"]).stat().st_mtime - meta["saved_at"]
    assert abs(saved_after) < 5  # the metadata describes this very file
    latency = float(re.search(r"checkpoint at epoch 1 \+ \d+ steps ([\d.]+)s after the signal", out).group(1))
    print(f"SIGTERM -> checkpoint {latency:.2f}s later (the process's own clock), exit {proc.returncode} "
          f"{exited:.2f}s later (the test's clock, interpreter exit included), at epoch {meta['epoch']} + "
          f"{meta['step_in_epoch']} steps")
    # Prompt, judged by events rather than seconds (a loaded machine makes any step slow): the signal came
    # during epoch 2 and the checkpoint was taken there, mid-epoch, not at the epoch's end.
    assert meta["step_in_epoch"] < meta["steps_per_epoch"], meta
    assert "preempted (SIGTERM)" in out and "partly done: r=4 seed=0 (epoch 1/4 +" in out
    (stopped,) = cell_runs(d, "one")
    assert stopped.info.status == "KILLED" and stopped.data.tags["stopped"] == "preempted"

    resumed = run(d, "one")
    assert resumed.returncode == 0, resumed.stderr
    only = assert_same_as_reference(d, reference)
    assert only.info.run_id == stopped.info.run_id and only.data.tags["resumes"] == "1"


def _steps_trained(d: Path) -> int:
    """Training steps done over every cell of the grid (logged epochs, or a checkpoint mid-epoch): grows
    whenever an invocation trained at all."""
    client = MlflowClient(tracking_uri=uri(d))
    spe = GRID_FILE["defaults"]["dataset"]["train_size"] // GRID_FILE["grids"]["timed"]["train"]["batch_size"]
    done = {r.data.tags["cell_id"]: spe * len(client.get_metric_history(r.info.run_id, "test_top1_err"))
            for r in cell_runs(d, "timed")}
    for f in (d / "checkpoints").glob("*/last.json"):
        meta = json.loads(f.read_text())
        at = meta["epoch"] * meta["steps_per_epoch"] + meta["step_in_epoch"]
        done[meta["cell_id"]] = max(done.get(meta["cell_id"], 0), at)
    return sum(done.values())


def _seconds_per_step(batch: int) -> float:
    """This machine's time for one training step of the timed grid's model, on one thread, as now loaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the grid's processes run (OMP_NUM_THREADS=1)
    bf16 = native_bf16(torch.device("cpu"))  # what `precision: auto` trains in here
    layout = torch.channels_last if bf16 else torch.contiguous_format
    model = build_model({**GRID_FILE["defaults"]["model"], "num_classes": 10}).to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32).contiguous(memory_format=layout), torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    try:
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        return (time.perf_counter() - t0) / 10
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_time_limit_stops_before_it_and_repeated_runs_finish_each_cell_once(tmp_path):
    """A grid needing several times the limit: each invocation exits 124 (one that trained stopped before
    its limit, by its own clock) until one exits 0; then every cell has exactly one FINISHED run.

    The grid's work is sized from a step time measured here, so that its training steps alone take
    about two windows on this machine (quiet or loaded, slow or fast): no first invocation can
    finish it, and a faster machine simply trains more epochs per window."""
    limit, progress = 40, 0
    timed = GRID_FILE["grids"]["timed"]
    cells = len(timed["axes"]["model.se.reduction"]) * len(timed["seeds"])
    steps_per_epoch = GRID_FILE["defaults"]["dataset"]["train_size"] // timed["train"]["batch_size"]
    epochs = max(4, math.ceil(2 * limit / (cells * steps_per_epoch * _seconds_per_step(timed["train"]["batch_size"]))))
    grid_file = copy.deepcopy(GRID_FILE)
    grid_file["grids"]["timed"]["train"]["epochs"] = epochs
    d = tmp_path / "timed"
    d.mkdir()
    (d / "experiments.yaml").write_text(yaml.safe_dump(grid_file, sort_keys=False))
    codes, stops, idle = [], [], []
    # Each invocation either trains or doubles the window, so this many always suffice: bounded by
    # events, never by a deadline (a loaded machine takes more invocations, not a failure).
    for _ in range(cells * epochs * steps_per_epoch + 10):
        done = run(d, "timed", "--time-limit", f"{limit}s", "--time-margin", str(limit // 5))
        codes.append(done.returncode)
        assert done.returncode in (0, EXIT_TIME_LIMIT), done.stderr
        if done.returncode == 0:
            break
        m = re.search(r"stopped: .*, after ([\d.]+)s of the ", done.stderr)
        assert m, done.stderr
        assert "estimated time left:" in done.stderr and "run the same command again" in done.stderr
        trained = _steps_trained(d)
        if trained == progress:
            # Start-up (imports, store, data) ate the whole window on a loaded machine: the process stopped at
            # its first check, having trained nothing, which may come after the limit. Give the next run more time.
            idle.append((float(m.group(1)), limit))
            limit *= 2
        else:
            stops.append((float(m.group(1)), limit, done.stderr))
        progress = trained
    print(f"{epochs} epochs per cell; invocations: {codes}; stopped after (s, limit): {[s[:2] for s in stops]}; "
          f"start-up ate the window: {idle}")
    assert codes[-1] == 0, f"{len(codes)} invocations and the grid is not finished: {codes}"
    assert codes[0] == EXIT_TIME_LIMIT and codes[-1] == 0
    late = [(s, lim, err) for s, lim, err in stops if s >= lim]  # an invocation that trained stops before its limit
    assert not late, late
    finished = [r for r in cell_runs(d, "timed") if r.info.status == "FINISHED"]
    assert len(finished) == 6 and len({r.data.tags["cell_id"] for r in finished}) == 6
    assert all(r.info.status != "RUNNING" for r in cell_runs(d, "timed"))
    client = MlflowClient(tracking_uri=uri(d))
    for r in finished:  # a cell stopped and resumed still has each epoch once
        assert [m.step for m in client.get_metric_history(r.info.run_id, "test_top1_err")] == list(range(1, epochs + 1))
    assert not list((d / "checkpoints").glob("*/*.pt"))
    # Cells started, resumed or added by any of the invocations are nested under the grid's one parent run.
    parents = client.search_runs([client.get_experiment_by_name("timed").experiment_id], "tags.grid_parent = 'true'")
    assert len(parents) == 1 and {r.data.tags.get("mlflow.parentRunId") for r in cell_runs(d, "timed")} == \
        {parents[0].info.run_id}


@pytest.mark.slow
def test_launcher_passes_sigusr1_to_its_workers_as_a_preemption(tmp_path):
    """SIGUSR1 to `--workers 2`: both workers checkpoint their cells and exit 75, their trials end
    'preempted' (no retry used up), the launcher exits 75; the next launch resumes both runs."""
    from optuna.trial import TrialState

    from ablations.run.cellqueue import GridQueue
    from ablations.config import load_experiments, resolve_cells
    from ablations.run.storage import default_storage

    d = write_store(tmp_path / "pair")
    MlflowClient(tracking_uri=uri(d)).search_experiments()  # the store exists first: no two creators (see below)
    # grace far above any freeze below: a frozen worker must not look dead to the other one
    launcher = start(d, "pair", "--workers", "2", "--heartbeat", "1", "--grace", "900")
    workers = freeze_each_worker_at_its_first_checkpoint(d, launcher, 2)
    launcher.send_signal(signal.SIGUSR1)
    for pid in workers:  # the launcher has passed the signal on: it waits in each frozen worker
        wait_for(f"SIGTERM pending in worker {pid}", lambda: signal.SIGTERM in pending_signals(pid), launcher)
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    out, _ = launcher.communicate(timeout=WAIT)
    assert launcher.returncode == EXIT_PREEMPTED, out
    assert "preempted (SIGUSR1): passing it on to the workers" in out
    assert out.count("preempted (SIGTERM): checkpoint at epoch") == 2  # each worker's own line
    stopped = cell_runs(d, "pair")
    assert len(stopped) == 2 and all(r.info.status == "KILLED" and r.data.tags["stopped"] == "preempted" for r in stopped)
    q = GridQueue("pair", resolve_cells(load_experiments(d / "experiments.yaml"), "pair"), default_storage(uri(d)), 1, 30)
    assert [t.user_attrs.get("failure_kind") for t in q.trials()] == ["preempted", "preempted"]

    again = start(d, "pair", "--workers", "2", "--heartbeat", "1", "--grace", "30")
    out, _ = again.communicate(timeout=WAIT)
    assert again.returncode == 0, out
    finished = cell_runs(d, "pair")
    assert {r.info.run_id for r in finished} == {r.info.run_id for r in stopped}  # the same two runs, resumed
    assert all(r.info.status == "FINISHED" and r.data.tags["resumes"] == "1" for r in finished)
    client = MlflowClient(tracking_uri=uri(d))
    for r in finished:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")] == [1, 2, 3, 4]
    redo = [t for t in q.trials() if t.state == TrialState.COMPLETE]
    assert len(redo) == 2 and all(t.user_attrs["attempt"] == 0 for t in redo)


def test_bad_time_limit_is_bad_input(tmp_path, capsys):
    from ablations.cli import main

    d = write_store(tmp_path / "bad")
    assert main(command(d, "one", "--time-limit", "9x")[2:]) == 2  # in this process: nothing is armed
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --time-limit 9x: expected a duration such as 90s, 9m, 2h or 1h30m"
    assert not (d / "mlflow.db").exists()


@pytest.mark.slow
def test_checkpoint_cost_bench_reports_well_formed_numbers(tmp_path):
    """bench/checkpoint_cost.py runs (here on a tiny model) and reports size, times and the share."""
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint_cost.py"), "--arch", "resnet20",
                           "--device", "cpu", "--batch", "8", "--images", "16", "--repeats", "2",
                           "--dir", str(tmp_path), "--json-out", str(out)],
                          cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r["checkpoint_bytes"] > 4 * 270_000  # fp32 weights and as many momentum values, at least
    assert 0 < r["save_seconds_median"] and 0 < r["load_seconds_median"] and len(r["save_seconds_all"]) == 2
    assert r["save_share_of_epoch"] == pytest.approx(r["save_seconds_median"] / r["cifar10_epoch_seconds_extrapolated"])
    assert "checkpoint" in done.stdout and "of it" in done.stdout


# ----------------------------------------------------------------------------- the store goes away at resume


class _Watch(io.TextIOBase):
    """A stderr that sets `seen` once a line containing `needle` is written (and keeps every line)."""

    def __init__(self, needle: str, seen: threading.Event) -> None:
        self.needle, self.seen, self.lines = needle, seen, []

    def write(self, text: str) -> int:
        self.lines.append(text)
        if self.needle in text:
            self.seen.set()
        return len(text)


@contextlib.contextmanager
def _store_held(db: Path, release: threading.Event):
    """Another connection holds the SQLite store in an exclusive transaction (nobody reads or writes
    it) from the start of the block until `release` is set or the block ends: a store that is down."""
    held = threading.Event()

    def hold() -> None:
        con = sqlite3.connect(db, timeout=60)
        con.execute("BEGIN EXCLUSIVE")
        held.set()
        release.wait(WAIT)
        con.commit()
        con.close()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(WAIT)
    try:
        yield
    finally:
        release.set()
        holder.join()


class _InProcessCell:
    """The one cell of grid `one` run in this process by `execute_cell`, the worker's own call, on a real
    store (a plain MlflowClient: a locked store fails once SQLite's busy timeout is out, not 5 minutes later)."""

    def __init__(self, d: Path) -> None:
        from ablations.config import load_experiments, resolve_cells
        from ablations.run.runner import dataset_key, load_data
        from ablations.tracking import ensure_experiment

        write_store(d)
        self.d, self.db = d, d / "mlflow.db"
        self.client = MlflowClient(tracking_uri=uri(d))
        (self.cell,) = resolve_cells(load_experiments(d / "experiments.yaml"), "one")
        self.data = load_data([self.cell], cache_dir=d / "cache")[dataset_key(self.cell.config.dataset)]
        self.experiment_id = ensure_experiment(self.client, uri(d), "one")
        self.checkpoints = ckpt.Checkpoints(d / "checkpoints")
        self.folder = d / "checkpoints" / self.cell.cell_id

    def execute(self, guard=None):
        from ablations.run.progress import GridProgress
        from ablations.run.runner import execute_cell

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as a `--threads 1` worker: a loaded 2-core machine is not oversubscribed
        try:
            return execute_cell(self.cell, self.data, self.client, self.experiment_id, torch.device("cpu"),
                                GridProgress("one", 1, stream=io.StringIO(), live=False), guard=guard,
                                checkpoints=self.checkpoints)
        finally:
            torch.set_num_threads(threads)

    def preempted_after_first_checkpoint(self) -> str:
        """Run the cell until its epoch-1 checkpoint exists, then SIGTERM this process (what a preemption
        sends): it checkpoints mid-epoch 2 and stops, its run KILLED. The run's id."""
        previous = ckpt.STOP.install()
        try:
            def preempt_once_checkpointed(final: bool) -> None:
                if ckpt.STOP.reason is None and self.checkpoints.meta(self.cell.cell_id):
                    os.kill(os.getpid(), signal.SIGTERM)

            result = self.execute(guard=preempt_once_checkpointed)
        finally:
            ckpt.STOP.restore(previous)
            ckpt.STOP.reset()
        assert result.status == "STOPPED" and result.kind == "preempted", result
        (run,) = cell_runs(self.d, "one")
        assert run.info.status == "KILLED" and run.info.run_id == result.run_id
        return result.run_id

    def files(self) -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in sorted(self.folder.iterdir())}


@pytest.mark.slow
def test_a_store_outage_at_resume_is_waited_out_and_the_cell_resumes_its_run(tmp_path):
    """The store is down (locked by another connection) when a preempted cell is taken up again: the
    worker waits it out and resumes the cell in its run from its checkpoint; it never starts afresh."""
    cell = _InProcessCell(tmp_path / "outage")
    stopped_run = cell.preempted_after_first_checkpoint()
    failed_once = threading.Event()  # the store is back once the cell has met it down
    watch = _Watch("database is locked", failed_once)
    with _store_held(cell.db, failed_once), contextlib.redirect_stderr(watch):
        result = cell.execute()
    assert failed_once.is_set(), "".join(watch.lines)  # the outage was met
    assert result.status == "FINISHED", (result, "".join(watch.lines))
    assert result.run_id == stopped_run, f"the cell started afresh in a new run:\n{''.join(watch.lines)}"
    (only,) = cell_runs(cell.d, "one")
    assert only.data.tags["resumes"] == "1"
    steps = [m.step for m in cell.client.get_metric_history(stopped_run, "train_loss")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_store_down_past_the_retries_stops_the_cell_and_keeps_its_checkpoint(tmp_path, monkeypatch):
    """The store stays down through every retry: the cell stops (exit 75, as a preemption: the README's
    SLURM script requeues it) with its checkpoint untouched and no new run; once the store is back
    the next run resumes the cell in its run."""
    from ablations import tracking

    cell = _InProcessCell(tmp_path / "down")
    stopped_run = cell.preempted_after_first_checkpoint()
    before = cell.files()
    monkeypatch.setattr(tracking, "STORE_OUTAGE_SECONDS", 0.0)  # one attempt: down for good
    watch = _Watch("database is locked", threading.Event())
    with _store_held(cell.db, threading.Event()), contextlib.redirect_stderr(watch):
        result = cell.execute()
    assert (result.status, result.kind, result.exit_code) == ("STOPPED", "store_unreachable", EXIT_PREEMPTED), result
    assert "database is locked" in result.reason
    assert cell.files() == before  # neither deleted nor overwritten
    (run,) = cell_runs(cell.d, "one")
    assert run.info.run_id == stopped_run and run.info.status == "KILLED"

    monkeypatch.undo()
    again = cell.execute()
    assert again.status == "FINISHED" and again.run_id == stopped_run, again
    assert cell_runs(cell.d, "one")[0].data.tags["resumes"] == "1"


# ----------------------------------------------------------------------------- checkpoint files


# A process that saves one checkpoint of a cell folder: `whole`; `pause`: it stops itself (SIGSTOP) in the
# middle of writing the state, its temporary file open; `die_in_meta`: the kernel kills it (SIGXFSZ, a file
# size limit) while it writes the metadata, the state already written.
SAVER = """
import collections, os, resource, signal, sys
from pathlib import Path

import torch

from ablations.train import checkpoint as ckpt


class PauseHere:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGSTOP)
        return (collections.OrderedDict, ())  # what a weights_only load accepts


folder, epoch, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
state = {"epoch": epoch, "weights": torch.full((1 << 18,), float(epoch))}  # 1 MiB
meta = {"epoch": epoch}
if how == "pause":
    state["pause"] = PauseHere()
elif how == "die_in_meta":
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: the write would just fail
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.RLIM_INFINITY))
    meta["note"] = "x" * (4 << 20)
ckpt.save(folder, state, meta)
"""


def _saver(folder: Path, epoch: int, how: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SAVER, str(folder), str(epoch), how], env=env(folder),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _paused_saver(folder: Path, epoch: int) -> subprocess.Popen:
    """A live writer of `folder`, stopped in the middle of its save."""
    proc = _saver(folder, epoch, "pause")
    wait_until(lambda: stopped(proc.pid) or proc.poll() is not None, f"a writer of {folder.name} pausing mid-save")
    assert proc.poll() is None, proc.stdout.read()
    return proc


def _temps(folder: Path) -> set[str]:
    return {f.name for f in folder.glob(".*tmp")}


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "weights": torch.full((1 << 18,), float(epoch))}


@pytest.mark.slow
def test_the_next_save_removes_what_a_killed_save_left_and_keeps_live_writers_files(tmp_path):
    """A save SIGKILLed midway leaves its temporary file behind; the next save of that cell
    removes it. The temporary files of live writers (of this cell, of another cell) stay."""
    root = tmp_path / "checkpoints"
    mine, other = root / "cell_a", root / "cell_b"
    ckpt.save(mine, _state(1), {"epoch": 1})
    dead = _paused_saver(mine, 2)
    dead.kill()
    dead.communicate()
    leaked = _temps(mine)
    assert len(leaked) == 1  # what a save killed midway leaves
    live_mine, live_other = _paused_saver(mine, 3), _paused_saver(other, 1)
    live = _temps(mine) - leaked
    assert len(live) == 1 and len(_temps(other)) == 1
    other_before = _temps(other)

    ckpt.save(mine, _state(4), {"epoch": 4})  # the next save of this cell
    assert _temps(mine) == live, "the dead writer's temporary file is still there, or a live writer's is gone"
    assert _temps(other) == other_before  # another cell's folder is not this save's to tidy

    for proc in (live_mine, live_other):  # the live writers finish their saves
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, out
    for folder, epoch in ((mine, 3), (other, 1)):
        assert not _temps(folder)
        assert ckpt.load(folder)["epoch"] == epoch == json.loads((folder / "last.json").read_text())["epoch"]


@pytest.mark.slow
def test_a_save_killed_between_state_and_metadata_leaves_one_consistent_checkpoint(tmp_path):
    """A save killed by the kernel after its state is written but while its metadata is: the metadata
    and the state that loads still describe one checkpoint (the previous one), and the next save leaves
    one checkpoint and no temporary file."""
    folder = tmp_path / "checkpoints" / "cell"
    first = _saver(folder, 1, "whole")
    out, _ = first.communicate(timeout=WAIT)
    assert first.returncode == 0, out
    killed = _saver(folder, 2, "die_in_meta")
    out, _ = killed.communicate(timeout=WAIT)
    assert killed.returncode == -signal.SIGXFSZ, out
    meta = json.loads((folder / "last.json").read_text())
    state = ckpt.load(folder)
    assert state["epoch"] == meta["epoch"], f"the state is of epoch {state['epoch']}, its metadata says {meta['epoch']}"

    ckpt.save(folder, _state(3), {"epoch": 3})
    assert not _temps(folder) and len(list(folder.glob("*.pt"))) == 1
    assert ckpt.load(folder)["epoch"] == 3 == json.loads((folder / "last.json").read_text())["epoch"]


def _as_before_manifests(folder: Path) -> None:
    """Rewrite the checkpoint in `folder` as checkpoints were written before manifests (a study started
    on an older version, up to f9b81bc): its state in `last.pt`, its metadata in `last.json` beside it."""
    meta = json.loads((folder / "last.json").read_text())
    (folder / meta.pop("state_file")).rename(folder / "last.pt")
    (folder / "last.json").write_text(json.dumps(meta, sort_keys=True))


def test_a_checkpoint_written_before_manifests_loads_and_the_next_save_replaces_it(tmp_path):
    checkpoints = ckpt.Checkpoints(tmp_path / "checkpoints")
    folder = checkpoints.folder("cell")
    ckpt.save(folder, _state(1), {"epoch": 1, "run_id": "r1"})
    _as_before_manifests(folder)
    assert sorted(f.name for f in folder.iterdir()) == ["last.json", "last.pt"]
    assert checkpoints.exists("cell") and checkpoints.meta("cell") == {"epoch": 1, "run_id": "r1"}
    assert ckpt.load(folder)["epoch"] == 1
    (folder / "last.json").unlink()  # a kill between the two files of the old format: the state alone still loads
    assert checkpoints.exists("cell") and checkpoints.meta("cell") is None and ckpt.load(folder)["epoch"] == 1

    ckpt.save(folder, _state(2), {"epoch": 2, "run_id": "r1"})
    (state,) = folder.glob("*.pt")
    assert state.name != "last.pt" and checkpoints.meta("cell") == {"epoch": 2, "run_id": "r1", "state_file": state.name}
    assert sorted(f.name for f in folder.iterdir()) == sorted(["last.json", state.name])
    checkpoints.discard("cell")
    assert not folder.exists() and not checkpoints.exists("cell") and checkpoints.meta("cell") is None


@pytest.mark.slow
def test_a_cell_checkpointed_before_manifests_resumes_in_its_run(tmp_path):
    """A study's checkpoint in the older format (`last.pt` + `last.json`) is resumed in its run; its
    first new checkpoint replaces the old files."""
    cell = _InProcessCell(tmp_path / "legacy")
    stopped_run = cell.preempted_after_first_checkpoint()
    _as_before_manifests(cell.folder)
    meta = cell.checkpoints.meta(cell.cell.cell_id)
    assert meta["run_id"] == stopped_run and meta["epoch"] == 1 and meta["step_in_epoch"] > 0
    at_the_end: list[list[str]] = []

    def look_at_the_end(final: bool) -> None:
        if final:  # the cell trained to the end: its checkpoint is still there, it goes once the run is FINISHED
            at_the_end.append(sorted(f.name for f in cell.folder.iterdir()))

    result = cell.execute(guard=look_at_the_end)
    assert result.status == "FINISHED" and result.run_id == stopped_run, result
    (only,) = cell_runs(cell.d, "one")
    assert only.data.tags["resumes"] == "1"
    assert [m.step for m in cell.client.get_metric_history(stopped_run, "train_loss")] == [1, 2, 3, 4]
    ((manifest, state),) = at_the_end
    assert manifest == "last.json" and state.startswith("state-") and state.endswith(".pt")
    assert not cell.folder.exists()


# ----------------------------------------------------------------------------- stops inside the long phases
#
# A stop request (SIGTERM/SIGUSR1, the time limit) must not wait for a whole evaluation, the weights
# upload or the decoding of a dataset: SLURM kills a job KillWait (30 s by default) after its signal.

QUICK = {
    "defaults": {"dataset": {"name": "synthetic", "train_size": 64, "test_size": 32},
                 "model": {"arch": "resnet20", "se": {"reduction": 4}},
                 # 4 steps per epoch, 4 evaluation batches
                 "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 8, "lr": 0.05, "warmup_epochs": 0},
                 "seeds": [0]},
    "grids": {"one": {"description": "one cell", "axes": {"model.se.reduction": [4]}}},
}


@pytest.fixture
def quick_cell(tmp_path):
    """(cell, client, experiment id, data, checkpoints): the cell of QUICK in a real MLflow store."""
    from ablations.config import load_experiments, resolve_cells
    from ablations.run.runner import dataset_key, load_data
    from ablations.tracking import ensure_experiment

    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(QUICK))
    cell = resolve_cells(load_experiments(tmp_path / "experiments.yaml"), "one")[0]
    client = MlflowClient(tracking_uri=uri(tmp_path))
    exp = ensure_experiment(client, uri(tmp_path), "one")
    data = load_data([cell], cache_dir=tmp_path / "cache")[dataset_key(cell.config.dataset)]
    return cell, client, exp, data, ckpt.Checkpoints(tmp_path / "checkpoints")


@pytest.fixture
def stop_requests():
    """STOP as a worker has it: SIGTERM/SIGUSR1 set the stop request. Undone after the test."""
    previous = ckpt.STOP.install()
    yield ckpt.STOP
    ckpt.STOP.restore(previous)
    ckpt.STOP.reset()


def preempt_me() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends; the handler has run when this returns


class _Progress:
    """The runner's progress display, quiet, calling `after_epoch(stats)` after each epoch."""

    def __init__(self, after_epoch=None) -> None:
        import io

        from ablations.run.progress import GridProgress

        self.inner, self.after_epoch = GridProgress("one", 1, io.StringIO(), live=False), after_epoch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def on_epoch(self, stats) -> None:
        self.inner.on_epoch(stats)
        if self.after_epoch:
            self.after_epoch(stats)


class _EvalBatches:
    """Counts the model's evaluation batches (forward passes of the whole model in eval mode, more than
    one image: not the single-image complexity count); `on_first` runs at the first one."""

    def __init__(self, on_first=None) -> None:
        from senet.resnet import ResNet

        self.seen, self.on_first, self.kind = 0, on_first, ResNet
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self)

    def __call__(self, module, args):
        if isinstance(module, self.kind) and not module.training and args[0].shape[0] > 1:
            self.seen += 1
            if self.seen == 1 and self.on_first:
                self.on_first()


def test_a_stop_during_evaluation_ends_it_at_the_next_batch_and_the_cell_resumes(quick_cell, stop_requests):
    """A preemption at epoch 1's first evaluation batch stops the cell before the second (it used to
    evaluate the whole test set first): STOPPED, its run KILLED, checkpointed at the end of epoch 1's
    training; the next run evaluates epoch 1 and finishes, every epoch logged once."""
    from ablations.run.runner import execute_cell

    cell, client, exp, data, checkpoints = quick_cell
    evals = _EvalBatches(on_first=preempt_me)
    try:
        stopped = execute_cell(cell, data, client, exp, torch.device("cpu"), _Progress(), checkpoints=checkpoints)
    finally:
        evals.handle.remove()
    assert stopped.status == "STOPPED" and stopped.exit_code == EXIT_PREEMPTED
    assert evals.seen == 1, f"the stop waited for {evals.seen} evaluation batches"
    meta = checkpoints.meta(cell.cell_id)
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 4)  # epoch 1 trained, not yet evaluated
    assert client.get_run(stopped.run_id).info.status == "KILLED"
    stop_requests.reset()

    done = execute_cell(cell, data, client, exp, torch.device("cpu"), _Progress(), checkpoints=checkpoints)
    assert done.status == "FINISHED" and done.run_id == stopped.run_id
    assert [m.step for m in client.get_metric_history(done.run_id, "test_top1_err")] == [1, 2]


def test_a_stop_during_evaluation_resumes_bit_exact(tmp_path):
    """The checkpoint a stop inside evaluation leaves (the epoch trained, its accumulators) continues
    the run bit for bit: the same history and final weights as the uninterrupted run."""
    torch.set_num_threads(1)
    cfg = _tiny_config()
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_batch_size": 8})})  # 4 batches
    data = load_dataset("synthetic", "unused", train_size=64, test_size=32, cache_dir=tmp_path / "cache")
    cpu = torch.device("cpu")
    whole = train(cfg, _fresh_model(cfg), data, cpu)

    model, evals = _fresh_model(cfg), []
    model.register_forward_pre_hook(lambda m, args: None if m.training else evals.append(1))
    path = tmp_path / "c"  # the checkpoint folder
    with pytest.raises(TrainingStopped) as stopped:  # at epoch 2's first evaluation batch
        train(cfg, model, data, cpu, on_checkpoint=lambda state: ckpt.save(path, state),
              should_stop=lambda: ("preempted", "test stop") if len(evals) > 4 else None)
    assert (stopped.value.epoch, stopped.value.step_in_epoch) == (1, 4) and len(evals) == 5
    resumed = train(cfg, _fresh_model(cfg), data, cpu, resume=ckpt.load(path))
    assert [(s.train_loss, s.train_err, s.test_top1_err, s.test_top5_err, s.lr) for s in resumed.history] == \
           [(s.train_loss, s.train_err, s.test_top1_err, s.test_top5_err, s.lr) for s in whole.history]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_stop_before_the_weights_upload_leaves_the_cell_resumable_and_logs_nothing_twice(quick_cell, stop_requests):
    """A preemption after the last epoch (its checkpoint written) used to wait for the final metrics
    and the weights upload (minutes to a remote store). Now the cell stops before them, resumable;
    the next run trains nothing, logs the final metrics and the weights once and finishes."""
    from ablations.run.runner import execute_cell

    cell, client, exp, data, checkpoints = quick_cell
    progress = _Progress(after_epoch=lambda s: s.epoch == 2 and preempt_me())
    stopped = execute_cell(cell, data, client, exp, torch.device("cpu"), progress, checkpoints=checkpoints)
    assert stopped.status == "STOPPED", "the stop waited for the upload: the cell finished"
    assert client.get_run(stopped.run_id).info.status == "KILLED"
    assert not client.get_metric_history(stopped.run_id, "final_top1_err")
    assert not client.list_artifacts(stopped.run_id, "model")
    assert checkpoints.meta(cell.cell_id)["epoch"] == 2
    stop_requests.reset()

    done = execute_cell(cell, data, client, exp, torch.device("cpu"), _Progress(), checkpoints=checkpoints)
    assert done.status == "FINISHED" and done.run_id == stopped.run_id
    assert len(client.get_metric_history(done.run_id, "final_top1_err")) == 1
    assert [m.step for m in client.get_metric_history(done.run_id, "train_loss")] == [1, 2]
    assert [a.path for a in client.list_artifacts(done.run_id, "model")] == ["model/weights.pt"]


def _jpeg_tree(root: Path, train_per_class: int, side: int = 72) -> Path:
    """train/ and val/ of two classes of random `side`-px JPEGs (above 64 px: decoded in chunks of 32)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", 4)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def test_a_stop_request_ends_decoding_between_chunks(tmp_path):
    """Decoding an image tree polls the stop request between chunks: it ends there, publishes nothing
    (the next run decodes again) and the request's exception reaches the caller."""
    tree = _jpeg_tree(tmp_path / "tree", 48)  # 104 images: 4 chunks
    calls: list[int] = []

    def stop_check() -> None:
        calls.append(1)
        raise TrainingStopped("test stop", "preempted")

    with pytest.raises(TrainingStopped):
        load_dataset("imagefolder", tree, cache_dir=tmp_path / "cache", stop_check=stop_check)
    assert calls == [1]
    assert not list((tmp_path / "cache").glob("*/meta.json")), "the decode ran to the end"


def test_a_worker_preempted_while_decoding_stops_before_the_decode_ends_and_exits_75(tmp_path, monkeypatch,
                                                                                     stop_requests, capsys):
    """A preemption while the data is decoded (before any cell is claimed: hours for a big tree) ends
    the worker between decode chunks with exit code 75, nothing decoded kept and nothing claimed."""
    from ablations.cli import main

    tree = _jpeg_tree(tmp_path / "tree", 48)
    grid = {"defaults": {"dataset": {"name": "imagefolder", "root": str(tree)}, "model": {"arch": "resnet20"},
                         "train": {"epochs": 1, "batch_size": 16}, "seeds": [0]},
            "grids": {"trees": {"description": "one cell", "axes": {"model.se.reduction": [4]}}}}
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.setenv("SENET_ABLATIONS_CACHE", str(tmp_path / "cache"))
    preempt_me()  # the signal arrives as the worker starts: it is seen at the first decode chunk
    code = main(["--config", str(tmp_path / "experiments.yaml"), "--grid", "trees", "--device", "cpu",
                 "--tracking-uri", uri(tmp_path), "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == EXIT_PREEMPTED, err
    assert not list((tmp_path / "cache").glob("*/meta.json")), "the worker decoded the whole tree first"
    assert "stopped: preempted (SIGUSR1)" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_resume_on_cuda_starts_from_the_exact_state_and_agrees_within_float_tolerance(tmp_path):
    """What the README states for a GPU: a resumed run starts from exactly the saved state and sees
    exactly the uninterrupted run's batches; its arithmetic is not bit-reproducible (cudnn.benchmark
    picks kernels by timing them in each process, some backward kernels use atomics), so it agrees
    with the uninterrupted run within float tolerance, not bit for bit."""
    cfg = _tiny_config()
    data = load_dataset("synthetic", "unused", train_size=64, test_size=32, cache_dir=tmp_path / "cache")
    cuda = torch.device("cuda")

    def at_training_forward(model, number: int) -> dict:
        """What the model saw at its `number`-th training forward: the batch and its own weights then."""
        seen: dict = {}
        calls = [0]

        def hook(m, args):
            if m.training:
                calls[0] += 1
                if calls[0] == number:
                    seen["batch"] = args[0].detach().float().cpu().clone()
                    seen["state"] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
        model.register_forward_pre_hook(hook)
        return seen

    model = _fresh_model(cfg)
    whole_at = at_training_forward(model, 5)  # 64 images / 16: 4 steps per epoch, the 5th opens epoch 2
    whole = train(cfg, model, data, cuda)

    path, evaluated = tmp_path / "c", []  # the checkpoint folder
    model = _fresh_model(cfg)
    model.register_forward_pre_hook(lambda m, args: None if m.training else evaluated.append(1))
    with pytest.raises(TrainingStopped):  # stopped once epoch 1 is trained
        train(cfg, model, data, cuda, on_checkpoint=lambda state: ckpt.save(path, state),
              should_stop=lambda: ("preempted", "test stop") if evaluated else None)
    state = ckpt.load(path)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # its one evaluation batch ran: the epoch's end
    model = _fresh_model(cfg)
    resumed_at = at_training_forward(model, 1)
    resumed = train(cfg, model, data, cuda, resume=state)
    # exact: the state it starts from, the batch it sees, the schedule
    for name, saved in state["model"].items():
        assert torch.equal(resumed_at["state"][name], saved), name
    assert torch.equal(whole_at["batch"], resumed_at["batch"]), "the resumed run does not see the same batch"
    assert resumed.history[1].lr == whole.history[1].lr
    # within float tolerance: what the GPU computes from there
    assert resumed.history[1].train_loss == pytest.approx(whole.history[1].train_loss, rel=1e-2)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-3, msg=name)
