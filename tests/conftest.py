"""Shared fixtures: the real data in ../shared/data, and small real subsets of it."""

from __future__ import annotations

import json
import os
import re
import signal
import tarfile
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CIFAR_TGZ = SHARED / "cifar10-jpeg.tar.gz"

needs_cifar = pytest.mark.skipif(not CIFAR_TGZ.is_file(), reason=f"real CIFAR-10 JPEGs absent: {CIFAR_TGZ}")


def repack_cifar(dst: Path, train_per_class: int, test_per_class: int) -> Path:
    """Copy the first N real train/test JPEGs per class of the shared archive into a new archive.

    Decoding all 60,000 JPEGs costs 20-35 s on 2 cores; a few hundred real images exercise the
    same code path (the full-split cache included) in a second.
    """
    keep = {"train": train_per_class, "test": test_per_class}
    with tarfile.open(CIFAR_TGZ, "r|gz") as src, tarfile.open(dst, "w:gz") as out:
        for m in src:
            parts = Path(m.name).parts
            if m.isdir():
                out.addfile(m)
            elif m.isfile() and len(parts) == 4 and int(Path(parts[3]).stem) < keep[parts[1]]:
                out.addfile(m, src.extractfile(m))
    return dst


@pytest.fixture(scope="session")
def mini_cifar_root(tmp_path_factory) -> Path:
    """A data root holding cifar10-jpeg.tar.gz with 100 train + 50 test real images per class."""
    if not CIFAR_TGZ.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs absent: {CIFAR_TGZ}")
    root = tmp_path_factory.mktemp("cifar_root")
    repack_cifar(root / "cifar10-jpeg.tar.gz", 100, 50)
    return root


@pytest.fixture(scope="session", autouse=True)
def _scratch_cwd(tmp_path_factory):
    """Run the session in a scratch folder, so that the default relative outputs of the code under
    test (results/, mlflow.db) never land in the repository."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


# Tests wait for events (a process ends, a run appears), never for a wall-clock budget: on a loaded
# 2-core machine the suite must be slow, not red. This limit only stops a hung process, and says so.
SAFETY_TIMEOUT = 1800.0


def wait_for_exit(proc, timeout: float = SAFETY_TIMEOUT) -> str:
    """Wait for a subprocess started with stdout=PIPE (text) to end; its output."""
    import subprocess

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timeout: the process did not end within {timeout:.0f} s (a safety limit, "
                             f"not a speed requirement); its output:\n{out}") from None
    return out or ""


def wait_until(condition, what: str, timeout: float = SAFETY_TIMEOUT, every: float = 0.2):
    """Poll `condition()` until it returns something truthy; return it. Fails only after the safety limit."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout: {what} did not happen within {timeout:.0f} s (a safety limit)")
        time.sleep(every)


def stopped(pid: int) -> bool:
    """Whether process `pid` is stopped by a signal (Linux /proc)."""
    return re.search(r"^State:\s*T", Path(f"/proc/{pid}/status").read_text(), re.M) is not None


def freeze_at_checkpoint(proc, store_dir: Path, who: str, wanted: Callable[[dict], bool], output: Callable[[], str],
                         also: Callable[[], bool] = lambda: True):
    """SIGSTOP worker `proc` (run tag `worker` = `who`) once one of its cells' checkpoints under
    `store_dir/checkpoints` has a manifest that `wanted(meta)` accepts, and return that cell's RUNNING
    run: the worker is then mid-cell with that checkpoint however fast this machine is. Stopped at a
    moment when the checkpoint has moved on, or `also()` is false (e.g. it holds a lock), it is let
    go on and stopped again. `output()`: what the worker wrote, shown if it ends early."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store_dir / 'mlflow.db'}")

    def meta_of(f: Path) -> dict | None:
        try:
            meta = json.loads(f.read_text())  # written atomically, deleted when the cell finishes
        except (OSError, ValueError):
            return None
        return meta if wanted(meta) else None

    def held(meta: dict | None):
        run = None if meta is None else client.get_run(meta["run_id"])
        return run if run is not None and run.data.tags.get("worker") == who else None

    def frozen():
        assert proc.poll() is None, f"worker {who} ended early:\n" + output()
        for f in (store_dir / "checkpoints").glob("*/last.json"):
            if held(meta_of(f)) is None:
                continue
            proc.send_signal(signal.SIGSTOP)
            wait_until(lambda: stopped(proc.pid), f"worker {who} to stop")
            run = held(meta_of(f))  # still so once stopped? (it may have gone on in between)
            if run is not None and run.info.status == "RUNNING" and also():
                return run
            proc.send_signal(signal.SIGCONT)
        return None

    return wait_until(frozen, f"a checkpoint of worker {who} mid-cell", every=0.05)
