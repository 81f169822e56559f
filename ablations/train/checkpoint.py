"""Per-epoch checkpoints of one cell, resume into the same MLflow run, and stop requests.

A checkpoint holds what a cell needs to continue from exactly where it stopped: model and optimizer
state, the optimizer step (the LR schedule `lr_at` is a pure function of it), every RNG state (torch
CPU and CUDA, numpy, python), the epoch, the step within it and the partial-epoch accumulators when
it was taken mid-epoch (or mid-evaluation: then as the epoch's end), the history of finished
epochs, and which data splits the cell keeps on the device (`data_resident`, decided once per cell).
The augmentation draws need no state of their own: `iterate_batches` derives them from
(seed, epoch), so the epoch and the step within it pin them down. The trainer has no grad scaler
(fp32, or bf16 autocast which needs none).

Where the resumed run is bit for bit the uninterrupted one: on a CPU, with the same machine, torch
and thread count (tests/test_checkpoint.py). On a GPU the restored state and the batches that follow
are exact, but the arithmetic is not bit-reproducible between processes: cudnn.benchmark picks
convolution algorithms by timing them in each process, and some CUDA backward kernels accumulate
with atomics in no fixed order. Two uninterrupted GPU runs of a cell differ in the last bits too;
a resumed one agrees with them to within float tolerance (checked on a GPU host by
test_resume_on_cuda_starts_from_the_exact_state_and_agrees_within_float_tolerance).

Everything in it is a tensor, dict, list, str, int, float, bool or None, so it loads with
`torch.load(weights_only=True)`. It is written to a temporary file, synced, then renamed over
`<checkpoint dir>/<cell_id>/last.pt`: a kill at any moment leaves the previous or the new one.

`STOP` is the process's stop request: SIGTERM and SIGUSR1 (what SLURM and cloud preemption send)
set it, and so does the --time-limit deadline; training polls it at every step boundary.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ablations.errors import EXIT_PREEMPTED, EXIT_TIME_LIMIT
from ablations.util.fs import atomic_write
from ablations.util.paths import beside_store
from ablations.util.timefmt import fmt_duration

FORMAT = 1
CHECKPOINT_NAME = "last.pt"


# ----------------------------------------------------------------------------- RNG states as tensors


def rng_state() -> dict[str, Any]:
    """Every RNG the process uses, in a form `torch.load(weights_only=True)` accepts."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never executed on the CPU-only test machine
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():  # CUDA only: never run here
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- the training state


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int, step_in_epoch: int,
                   global_step: int, history: list[Mapping[str, float]],
                   partial: Mapping[str, Any] | None = None,
                   data_resident: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """The state to continue training from: `epoch` epochs are complete, plus `step_in_epoch` steps
    of the next one (then `partial` holds its accumulators: loss_sum, wrong, seen, seconds).
    `data_resident`: which splits ('train', 'test') the cell decided to keep on the device; a resume
    reuses it rather than deciding again against a peak memory that restarts at zero."""
    return {
        "format": FORMAT,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "history": [dict(h) for h in history],
        "partial": dict(partial) if partial else None,
        "data_resident": dict(data_resident or {}),
    }


def save(path: Path, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> float:
    """Write `state` atomically (temporary file, fsync, rename); beside it `last.json` with `meta`
    (what planning and summaries read without loading tensors). Returns the seconds it took."""
    start = time.perf_counter()
    atomic_write(path, lambda fh: torch.save(dict(state), fh))
    if meta is not None:
        atomic_write(path.with_suffix(".json"), lambda fh: fh.write(json.dumps(dict(meta), sort_keys=True).encode()))
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash of the machine
    finally:
        os.close(dir_fd)
    return time.perf_counter() - start


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- where checkpoints live


def default_checkpoint_dir(tracking_uri: str) -> Path:
    """Beside the MLflow store: <folder of mlflow.db>/checkpoints, else ./checkpoints."""
    return beside_store(tracking_uri, "checkpoints")


@dataclass(frozen=True)
class Checkpoints:
    """Where a store's checkpoints go (one per cell, whichever grids list it), and whether they
    outlive the runs that FINISHED."""

    root: Path
    keep: bool = False

    def path(self, cell_id: str) -> Path:
        return self.root / cell_id / CHECKPOINT_NAME

    def meta(self, cell_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(cell_id).with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None

    def discard(self, cell_id: str) -> None:
        folder = self.root / cell_id
        for f in (self.path(cell_id), self.path(cell_id).with_suffix(".json")):
            f.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:  # not empty (a temporary file of a live writer) or already gone
            pass


# ----------------------------------------------------------------------------- stop requests


class TrainingStopped(Exception):
    """Training stopped on request after saving a checkpoint (or before starting: nothing to save)."""

    def __init__(self, reason: str, kind: str, epoch: int = 0, step_in_epoch: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.epoch, self.step_in_epoch = reason, kind, epoch, step_in_epoch

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.kind)


def exit_code_for(kind: str) -> int:
    return EXIT_TIME_LIMIT if kind == "time_limit" else EXIT_PREEMPTED


class StopControl:
    """The process's stop request: a preemption signal, or the time limit's stop point."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self) -> None:
        self.reason: str | None = None  # set by a signal
        self.signalled_at: float | None = None  # when (monotonic), to report how promptly the cell stopped
        self.started = time.monotonic()
        self.limit: float | None = None  # seconds from `started`
        self.margin = 0.0

    # -- preemption
    def _on_signal(self, signum: int, frame: object) -> None:
        if self.reason is None:  # a second signal while saving changes nothing
            self.reason = f"preempted ({signal.Signals(signum).name})"
            self.signalled_at = time.monotonic()

    def install(self) -> dict[int, Any]:
        """Catch SIGTERM and SIGUSR1 (main thread only); return the previous handlers."""
        return {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    @staticmethod
    def restore(previous: Mapping[int, Any]) -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    # -- time limit
    def set_time_limit(self, seconds: float, margin: float | None = None, started: float | None = None) -> None:
        self.started = time.monotonic() if started is None else started
        self.limit = seconds
        self.margin = default_margin(seconds) if margin is None else margin

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float | None:
        """Seconds until the stop point (the limit less the margin); None without a limit."""
        return None if self.limit is None else self.limit - self.margin - self.elapsed()

    # -- polled at step boundaries
    def check(self) -> tuple[str, str] | None:
        """(kind, reason) once the process should stop: kind 'preempted' or 'time_limit'."""
        if self.reason is not None:
            return "preempted", self.reason
        left = self.time_left()
        if left is not None and left <= 0:
            return "time_limit", f"time limit {fmt_duration(self.limit)} (stopping {fmt_duration(self.margin)} before it)"
        return None

    def reset(self) -> None:
        self.__init__()


def default_margin(limit: float) -> float:
    return max(5.0, min(120.0, 0.05 * limit))


STOP = StopControl()


def stop_hook(control: StopControl = STOP) -> Callable[[], tuple[str, str] | None]:
    return control.check
