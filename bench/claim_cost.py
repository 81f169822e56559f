"""What claiming a cell costs as a grid grows: a synthetic queue of N cells in a journal file,
drained by one worker loop that trains nothing (claim, record, finish).

    python bench/claim_cost.py --cells 600 --cells 5000 [--json-out PATH]

Reports, per grid size, the process CPU seconds and wall seconds to drain the queue and the CPU
milliseconds per cell. With `--legacy`, the loop replays the queue calls that the worker loop made
per cell before the claim path was rewritten (a full read and reconcile of every trial several
times per cell), for comparison; it needs that older code on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import _path  # noqa: F401  (first: this checkout on sys.path)

from ablations.config import Cell, DatasetConfig, ExperimentConfig, ModelConfig, TrainConfig


def synthetic_cells(n: int, variants: int = 10) -> list[Cell]:
    """n distinct cells (variant x seed) of a synthetic-data grid; nothing is built or trained."""
    base = ExperimentConfig(dataset=DatasetConfig(name="synthetic"), model=ModelConfig(), train=TrainConfig(), seed=0)
    return [Cell("bench", f"v{i % variants}", i // variants, base.model_copy(update={"seed": i}), {})
            for i in range(n)]


def drain_legacy(cells: list[Cell], storage: str) -> int:
    """The per-cell queue calls of the old worker loop (ablations/workers.py before the rewrite)."""
    from optuna.trial import TrialState

    from ablations import workers as W

    q = W.GridQueue("bench", cells, storage, heartbeat=20, grace=90)
    ran = 0
    while True:
        q.reap_stale()                                      # Worker.sync
        statuses = q.reconcile(0)
        q.trials((TrialState.FAIL,))
        if all(s.state in ("done", "failed") for s in statuses.values()):
            return ran
        t = q.claim()
        if t is None:
            continue
        W.duplicate_of(t, W.by_cell(q.trials()).get(t.user_attrs["cell_id"], []))  # Worker.run_trial
        q.set_attrs(t, {"worker": "bench", "host": "bench", "pid": os.getpid()})
        q.set_params(t, q.cells[t.user_attrs["cell_id"]])
        q.beat(t)                                           # Heartbeat's first beat
        q.statuses(0)                                       # WorkerProgress.start_cell
        q.statuses(0)                                       # WorkerProgress.end_cell
        q.finish(t, TrialState.COMPLETE, 1.0)
        ran += 1


def drain(cells: list[Cell], storage: str) -> int:
    """The worker loop as it is now (ablations.run.worker.drain_queues), with a cell runner that trains nothing."""
    from optuna.trial import TrialState

    from ablations.run.cellqueue import GridQueue
    from ablations.run.heartbeat import beat
    from ablations.run.worker import drain_queues

    q = GridQueue("bench", cells, storage, heartbeat=20, grace=90)
    ran = []

    def run_one(queue: GridQueue, trial) -> None:
        queue.set_attrs(trial, {"worker": "bench", "host": "bench", "pid": os.getpid()})
        queue.set_params(trial, queue.cells[trial.user_attrs["cell_id"]])
        beat(queue, trial)
        queue.progress_counts()  # what the progress display reads at the start and the end of a cell
        queue.progress_counts()
        queue.finish(trial, TrialState.COMPLETE, 1.0)
        ran.append(trial.number)

    drain_queues([q], run_one, retries=None, fresh_launch=True, poll=0.01)
    return len(ran)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, action="append", help="grid sizes (default: 600 and 5000)")
    p.add_argument("--legacy", action="store_true", help="replay the old worker loop's queue calls")
    p.add_argument("--json-out", metavar="PATH")
    args = p.parse_args()
    if not args.legacy:  # imported before the clock starts (MLflow and torch take seconds to import)
        import ablations.run.worker  # noqa: F401
    rows = []
    for n in args.cells or [600, 5000]:
        cells = synthetic_cells(n)
        with tempfile.TemporaryDirectory() as tmp:
            storage = str(Path(tmp) / "optuna-journal.log")
            cpu0, wall0 = time.process_time(), time.perf_counter()
            ran = (drain_legacy if args.legacy else drain)(cells, storage)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        assert ran == n, (ran, n)
        row = {"cells": n, "loop": "legacy" if args.legacy else "current", "cpu_s": round(cpu, 2),
               "wall_s": round(wall, 2), "cpu_ms_per_cell": round(1000 * cpu / n, 3),
               "loadavg_1_5_15": list(os.getloadavg())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
