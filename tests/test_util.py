"""The one-of-each helpers in ablations/util: durations and ETA, liveness, the device, paths beside the store,
atomic writes. Real processes and files; nothing mocked."""

from __future__ import annotations

import math
import os
import socket
import time
import subprocess
import sys

import pytest
import torch

from ablations.util.device import resolve_device
from ablations.util.fs import ABANDONED_AFTER_SECONDS, abandoned, atomic_write, writer_of, writer_tag
from ablations.util.paths import beside_store, store_folder
from ablations.util.procs import pid_alive
from ablations.util.timefmt import eta, fmt_duration, fmt_long


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"),
                                           (7620, "2h07m"), (None, "?"), (math.nan, "?"), (math.inf, "?")])
def test_fmt_duration(seconds, text):
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize("seconds, text", [(40, "40 s"), (25 * 60, "25 min"), (5.1 * 3600, "5.1 h"),
                                           (3.8 * 86400, "3.8 days")])
def test_fmt_long(seconds, text):
    assert fmt_long(seconds) == text


def test_eta_is_the_time_left_at_the_same_pace():
    assert eta(30.0, 0.25) == pytest.approx(90.0)
    assert eta(30.0, 1.0) == 0.0 and eta(30.0, 1.5) == 0.0
    assert eta(30.0, 0.0) is None


def test_pid_alive_for_this_process_and_not_for_a_reaped_child():
    assert pid_alive(1) and pid_alive(__import__("os").getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    assert not pid_alive(child.pid)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
            resolve_device("cuda:1")


def test_companions_live_beside_the_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store_folder(f"sqlite:///{tmp_path}/a/mlflow.db") == tmp_path / "a"
    assert beside_store(f"sqlite:///{tmp_path}/a/mlflow.db", "checkpoints") == tmp_path / "a" / "checkpoints"
    assert beside_store(f"file://{tmp_path}/b/mlruns", "j.log") == tmp_path / "b" / "j.log"
    assert beside_store("mlruns", "j.log") == tmp_path / "j.log"  # a relative file store
    assert store_folder("http://tracking.example:5000") is None
    assert beside_store("postgresql://u@h/db", "checkpoints") == tmp_path / "checkpoints"


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "state.bin"
    atomic_write(target, lambda fh: fh.write(b"first"))
    assert target.read_bytes() == b"first"

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"first"  # the old file, intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.bin"]  # no temp file left behind


def test_files_named_after_their_writer_tell_a_dead_writer_from_a_live_one(tmp_path):
    host = socket.gethostname()
    assert writer_of(f".state-1a@{host}@42.pt@{host}@43.tmp") == (host, 43)  # a temp of a state file
    assert writer_of("state-1a@node-7.cluster@42.pt") == ("node-7.cluster", 42)
    assert writer_of(".last.pt.4242.tmp") == (None, 4242)  # a temp of an older version: a pid alone
    assert writer_of("last.pt") is None and writer_of("last.json") is None
    assert writer_tag() == f"@{host}@{os.getpid()}"

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # its process has ended
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        files = {name: tmp_path / name for name in (
            f".a@{host}@{dead_pid}.tmp", f".b.{dead_pid}.tmp", f".c@{host}@{live.pid}.tmp", f".d{writer_tag()}.tmp",
            f".e@another-host@{dead_pid}.tmp", "f.pt")}
        for f in files.values():
            f.write_bytes(b"half")
        assert {name for name, f in files.items() if abandoned(f)} == {
            f".a@{host}@{dead_pid}.tmp", f".b.{dead_pid}.tmp", f".d{writer_tag()}.tmp"}  # dead, older format, this one
        old = time.time() - ABANDONED_AFTER_SECONDS - 60
        for name in (f".e@another-host@{dead_pid}.tmp", "f.pt"):
            os.utime(files[name], (old, old))
        assert abandoned(files[f".e@another-host@{dead_pid}.tmp"])  # another host's: by its age only
        assert not abandoned(files["f.pt"])  # named after no writer: never
        assert not abandoned(tmp_path / f".gone@{host}@{dead_pid}.tmp")
    finally:
        live.communicate(b"")


def test_a_resumed_cell_s_eta_is_paced_by_the_part_trained_in_this_process(monkeypatch):
    """A cell resumed at epoch 6 of 8 that trains one epoch in 100 s has 100 s left, not 14 s (the
    6 checkpointed epochs took no time here); as a finished cell it counts as 800 s for the grid's ETA."""
    import io

    from types import SimpleNamespace

    from ablations.run import progress as P
    from ablations.train import EpochStats

    clock = [1000.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock[0])  # a clock the test moves: no waiting
    out = io.StringIO()
    grid = P.GridProgress("g", 2, stream=out, live=False)
    cell = SimpleNamespace(grid="g", variant="r=16", seed=1, cell_id="c0")  # what the display reads of a Cell
    grid.start_cell(cell, 8, done=6 / 8)
    clock[0] += 100
    grid.on_epoch(EpochStats(7, 0.9, 20.0, 21.0, 1.0, 0.1, 100.0, 300.0))
    assert "cell ETA 1m40s" in out.getvalue().splitlines()[-1]
    assert "grid ETA 15m00s" in out.getvalue().splitlines()[-1]  # 100 s here, then one whole cell of 800 s
    clock[0] += 100
    grid.end_cell(cell, "FINISHED")
    assert grid.trained_seconds == [800.0]
    grid.start_cell(cell, 8)  # a fresh cell: paced from its start, as before
    clock[0] += 100
    grid.on_epoch(EpochStats(1, 2.0, 60.0, 55.0, 10.0, 0.1, 100.0, 300.0))
    assert "cell ETA 11m40s" in out.getvalue().splitlines()[-1]
