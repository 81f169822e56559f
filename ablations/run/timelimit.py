"""--time-limit: plan a grid around a deadline from the epoch times measured in the MLflow store.

A cell is not started (or resumed) when the time left before the stop point (the limit less its
margin) cannot take it to its next checkpoint, judged from the `epoch_seconds` of earlier runs: of
the same cell if there are any, else of runs with the same architecture, batch size and training
set. A cell with nothing measured yet is started: its first epoch measures it, and the stop point
checkpoints it mid-epoch if need be. When the grid stops, `stop_summary` says what is done, what is
partly done (with epochs) and how much time is estimated to be left.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from typing import Sequence, TextIO

from mlflow import MlflowClient

from ablations.train.checkpoint import STOP, Checkpoints
from ablations.config import Cell, ConfigError, ExperimentConfig
from ablations.util.timefmt import fmt_duration

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str = "--time-limit") -> float:
    """'90s', '9m', '2h', '1h30m', '1.5h' or plain seconds -> seconds."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise ConfigError(f"{flag} {text}: expected a duration such as 90s, 9m, 2h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{flag} {text}: must be more than 0")
    return seconds


def process_age() -> float:
    """Seconds since this process started (the interpreter's start-up counts against a time limit too)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux: count from now
        return 0.0


def arm(time_limit: str | None, margin: float | None) -> None:
    """Set the process's deadline from --time-limit (counted from the process's start)."""
    if margin is not None and margin < 0:
        raise ConfigError(f"--time-margin {margin}: must be 0 or more")
    if time_limit is None:
        if margin is not None:
            raise ConfigError("--time-margin: only with --time-limit")
        return
    limit = parse_duration(time_limit)
    if margin is not None and margin >= limit:
        raise ConfigError(f"--time-margin {margin}: must be less than the time limit ({limit:.0f}s)")
    STOP.set_time_limit(limit, margin, started=time.monotonic() - process_age())


# ----------------------------------------------------------------------------- estimates


class EpochTimes:
    """The measured epoch times of a store, read once: each run's latest `epoch_seconds`."""

    def __init__(self, client: MlflowClient) -> None:
        from ablations.tracking import runs_of

        # (cell id, params, seconds, device type: 'cpu' | 'cuda' | '' when the run does not say)
        self.rows: list[tuple[str, dict[str, str], float, str]] = []
        for exp in client.search_experiments():
            for r in runs_of(client, exp.experiment_id, "metrics.epoch_seconds > 0"):
                self.rows.append((r.data.tags.get("cell_id", ""), r.data.params, r.data.metrics["epoch_seconds"],
                                  r.data.tags.get("device", "").split(":")[0]))

    def lookup(self, cell: Cell, config: ExperimentConfig, device_type: str | None = None) -> tuple[float, str, int] | None:
        """(median epoch seconds, 'cell' or 'backbone', runs) of this cell's runs, else of runs with the
        same arch, batch size and training set (name and size), in any experiment of the store; with
        `device_type`, only runs on that kind of device. None if none is measured."""
        rows = [r for r in self.rows if device_type is None or r[3] == device_type]
        values = [s for cid, _, s, _ in rows if cid in cell.ids]
        if values:
            return statistics.median(values), "cell", len(values)
        want = {"model.arch": config.model.arch, "train.batch_size": str(config.train.batch_size),
                "dataset.name": config.dataset.name, "dataset.train_size": str(config.dataset.train_size)}
        values = [s for _, params, s, _ in rows if all(params.get(k) == v for k, v in want.items())]
        return (statistics.median(values), "backbone", len(values)) if values else None

    def estimate(self, cell: Cell, config: ExperimentConfig) -> float | None:
        """The median epoch time of this cell's runs, else of runs with the same arch, batch size and
        training set (name and size), in any experiment of the store; None if none is measured."""
        found = self.lookup(cell, config)
        return found[0] if found else None


def epochs_left(config: ExperimentConfig, resume_meta: dict | None) -> float:
    if not resume_meta:
        return float(config.train.epochs)
    steps = max(1, int(resume_meta.get("steps_per_epoch", 1)))
    return config.train.epochs - resume_meta["epoch"] - resume_meta.get("step_in_epoch", 0) / steps


def refuse_to_start(client: MlflowClient, cell: Cell, config: ExperimentConfig, resume: dict | None,
                    n_train: int) -> str | None:
    """Why `cell` must not start under the time limit (it cannot reach its next checkpoint), or None."""
    left = STOP.time_left()
    if left is None:
        return None
    estimate = EpochTimes(client).estimate(cell, config)
    if estimate is None:
        return None
    tc = config.train
    done = resume["epoch"] if resume else 0
    fraction = resume["step_in_epoch"] / max(1, n_train // tc.batch_size or 1) if resume else 0.0
    next_checkpoint = min(tc.epochs, (done // tc.checkpoint_every + 1) * tc.checkpoint_every)
    need = estimate * (next_checkpoint - done - fraction)
    if need <= left:
        return None
    return (f"it needs about {fmt_duration(need)} to reach its next checkpoint (epoch {next_checkpoint}), "
            f"{fmt_duration(max(0.0, left))} are left before the time limit's stop")


# ----------------------------------------------------------------------------- the summary


def stop_summary(client: MlflowClient, grids: Sequence[tuple[str, Sequence[Cell]]], checkpoints: Checkpoints,
                 reason: str, stream: TextIO, estimate: bool = True) -> None:
    """What is done, what is partly done (with epochs), what is not started, and (with `estimate`;
    a preempted process leaves it out, its grace period is short) the time estimated to be left."""
    try:
        lines = _where_grids_stand(client, grids, checkpoints, estimate)
    except Exception as exc:  # e.g. the store whose outage stopped the run: the stop itself is still told
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        lines = [f"  where the grids stand is unknown: the tracking store cannot be read ({text})",
                 "  run the same command again to continue"]
    limit = f" of the {fmt_duration(STOP.limit)} limit" if STOP.limit is not None else ""
    # The time is taken last: only the interpreter's exit follows.
    print(f"stopped: {reason}, after {STOP.elapsed():.1f}s{limit}", file=stream)
    print("\n".join(lines), file=stream, flush=True)


def _where_grids_stand(client: MlflowClient, grids: Sequence[tuple[str, Sequence[Cell]]], checkpoints: Checkpoints,
                       estimate: bool) -> list[str]:
    from ablations.tracking import finished_cell_ids

    times, lines = EpochTimes(client) if estimate else None, []
    left, unknown = 0.0, 0
    for name, cells in grids:
        exp = client.get_experiment_by_name(name)
        done = finished_cell_ids(client, exp.experiment_id) if exp is not None else set()
        partly, waiting = [], 0
        for cell in cells:
            if any(i in done for i in cell.ids):
                continue
            meta = checkpoints.meta(cell.cell_id)
            if meta:
                extra = f" + {meta['step_in_epoch']}/{meta['steps_per_epoch']} steps" if meta.get("step_in_epoch") else ""
                partly.append(f"{cell.variant} seed={cell.seed} (epoch {meta['epoch']}/{meta['epochs']}{extra})")
            else:
                waiting += 1
            per_epoch = times.estimate(cell, cell.config) if times is not None else None
            if per_epoch is None:
                unknown += 1
            else:
                left += per_epoch * epochs_left(cell.config, meta)
        finished = sum(any(i in done for i in c.ids) for c in cells)
        lines.append(f"  grid {name}: {finished} of {len(cells)} cells done; partly done: {', '.join(partly) or 'none'}; "
                     f"{waiting} not started")
    guess = fmt_duration(left) if not unknown else (
        f"more than {fmt_duration(left)} ({unknown} cells not measured yet)" if left else "unknown (nothing measured yet)")
    if times is not None:
        lines.append(f"  estimated time left: {guess}, from the epoch times measured in this store; "
                     "run the same command again to continue")
    else:
        lines.append("  run the same command again to continue")
    return lines
