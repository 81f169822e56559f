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
`torch.load(weights_only=True)`. It goes to `<checkpoint dir>/<cell_id>/`: a state file, then the
manifest `last.json` naming it (below); a kill at any moment leaves the previous checkpoint or the new one.

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
from ablations.util.fs import abandoned, atomic_write, writer_tag
from ablations.util.paths import beside_store
from ablations.util.timefmt import fmt_duration

FORMAT = 1
CHECKPOINT_NAME = "last.pt"  # the state file of a checkpoint written before manifests


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


# ----------------------------------------------------------------------------- one cell's checkpoint on disk
#
# A cell's folder holds its checkpoint as two files: the state, `state-<time>@<host>@<pid>.pt` (a new name
# at every save), and the manifest `last.json`, written last, which names that state file and carries the
# metadata planning and summaries read without loading tensors. Each is written whole (temp file, fsync,
# rename) and the state's rename is synced before the manifest names it, so a process killed at any moment
# leaves a manifest and the state it names: the old pair or the new one, never a mix. What a killed save
# left (a temp file, a state no manifest names) is removed by the next save of the cell, unless its writer
# may be alive (`ablations.util.fs.abandoned`). Checkpoints written before manifests (`last.pt` and a
# `last.json` without `state_file`) still load; the next save replaces them.

MANIFEST = "last.json"
STATE_FILE = "state_file"  # the manifest's key naming the state file


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # a rename in it survives a crash of the machine
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a cell folder (or the metadata of a checkpoint written before manifests), or None."""
    try:
        found = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def state_path(folder: Path, manifest: Mapping[str, Any] | None) -> Path | None:
    """The state file of the checkpoint in `folder` that `manifest` (read_manifest) describes, if it is there."""
    if manifest is not None and isinstance(manifest.get(STATE_FILE), str):
        named = folder / Path(manifest[STATE_FILE]).name  # a name in the folder, never a path out of it
        return named if named.is_file() else None
    legacy = folder / CHECKPOINT_NAME
    return legacy if legacy.is_file() else None


def save(folder: Path, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> float:
    """Save `state` as the checkpoint of the cell folder `folder`, with `meta` in its manifest; then
    remove what this save superseded and what killed saves left. Returns the seconds it took."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"state-{time.time_ns():x}{writer_tag()}.pt"
    atomic_write(folder / name, lambda fh: torch.save(dict(state), fh))
    _fsync_dir(folder)  # the state is in place for good before a manifest names it
    previous = read_manifest(folder)
    manifest = json.dumps({**dict(meta or {}), STATE_FILE: name}, sort_keys=True).encode()
    atomic_write(folder / MANIFEST, lambda fh: fh.write(manifest))
    _fsync_dir(folder)
    _tidy(folder, keep=name, superseded=state_path(folder, previous))
    return time.perf_counter() - start


def _tidy(folder: Path, keep: str, superseded: Path | None) -> None:
    """Remove the state the manifest named before (`superseded`), a pre-manifest `last.pt`, and temp files
    and unnamed states of writers that are gone. A live writer's files stay: it may be another process's
    save of this cell that is still running (e.g. a worker that lost its claim and has not noticed yet)."""
    for f in folder.iterdir():
        if f.name in (keep, MANIFEST):
            continue
        old = f == superseded or f.name == CHECKPOINT_NAME
        if old or ((f.name.endswith(".tmp") or f.suffix == ".pt") and abandoned(f)):
            f.unlink(missing_ok=True)


def load(folder: Path) -> dict[str, Any]:
    """The state of the checkpoint in the cell folder `folder` (FileNotFoundError: none).

    The manifest is read first, then the state it names; a save that replaced both in between has
    removed that state, and the new manifest is read again."""
    for _ in range(5):
        manifest = read_manifest(folder)
        path = state_path(folder, manifest)
        try:
            if path is not None:
                return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            pass
        if read_manifest(folder) == manifest:  # nothing was replaced meanwhile: there is no checkpoint
            break
    raise FileNotFoundError(f"no checkpoint in {folder}")


# ----------------------------------------------------------------------------- where checkpoints live


def default_checkpoint_dir(tracking_uri: str) -> Path:
    """Beside the MLflow store: <folder of mlflow.db>/checkpoints, else ./checkpoints."""
    return beside_store(tracking_uri, "checkpoints")


@dataclass(frozen=True)
class Checkpoints:
    """Where a store's checkpoints go (one folder per cell, whichever grids list it), and whether they
    outlive the runs that FINISHED."""

    root: Path
    keep: bool = False

    def folder(self, cell_id: str) -> Path:
        return self.root / cell_id

    def exists(self, cell_id: str) -> bool:
        folder = self.folder(cell_id)
        return state_path(folder, read_manifest(folder)) is not None

    def meta(self, cell_id: str) -> dict[str, Any] | None:
        """What the cell's checkpoint holds (run, epoch, step...), without loading it; None: no checkpoint."""
        folder = self.folder(cell_id)
        manifest = read_manifest(folder)
        return manifest if state_path(folder, manifest) is not None else None

    def discard(self, cell_id: str) -> None:
        """Remove the cell's checkpoint: the manifest first (no reader ever sees it name a missing state),
        then every state file and the temp files of writers that are gone; the folder if that empties it."""
        folder = self.folder(cell_id)
        (folder / MANIFEST).unlink(missing_ok=True)
        if not folder.is_dir():
            return
        for f in folder.iterdir():
            if f.suffix == ".pt" or (f.name.endswith(".tmp") and abandoned(f)):
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
