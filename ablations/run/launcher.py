"""The launcher: `--workers N` (or --gpus) queues the grids, starts N worker processes on this
machine (each pinned to its GPU), shows the grid's progress as they end cells, and sums up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

from optuna.trial import TrialState

from ablations.run.cellqueue import CellStatus, GridQueue, count
from ablations.config import Cell, ExperimentsFile
from ablations.data import WORKERS_PER_DEVICE_ENV
from ablations.run.storage import default_storage, new_series
from ablations.train.checkpoint import STOP
from ablations.run.worker import open_grids
from ablations.run.options import RunOptions, gpus_for, worker_slots
from ablations.run.output import summary
from ablations.run.runner import STORE_UNREACHABLE
from ablations.util.timefmt import eta, fmt_duration


class GridMonitor:
    """The launcher's view: cells done of total, and an ETA, each time a worker ends a cell."""

    def __init__(self, queue: GridQueue, retries: int, stream: TextIO) -> None:
        self.queue, self.retries, self.stream = queue, retries, stream
        self.start = time.perf_counter()
        self.seen = {t.number: t.state for t in queue.trials()}
        self.done0 = count(queue.statuses(retries), "done", "failed")

    def poll(self) -> None:
        trials = self.queue.trials()
        ended = [t for t in trials if t.state.is_finished() and self.seen.get(t.number) != t.state
                 and t.state != TrialState.PRUNED]
        self.seen = {t.number: t.state for t in trials}
        if not ended:
            return
        statuses = self.queue.statuses(self.retries)
        done, total, running = count(statuses, "done", "failed"), len(statuses), count(statuses, "running")
        left = eta(time.perf_counter() - self.start, (done - self.done0) / max(1, total - self.done0))
        for t in ended:
            what = "FINISHED" if t.state == TrialState.COMPLETE else (
                "STOPPED" if t.user_attrs.get("failure_kind") in ("preempted", "time_limit", STORE_UNREACHABLE) else "FAILED")
            detail = (f"top-1 err {t.value:.2f}%" if t.state == TrialState.COMPLETE and t.value == t.value
                      else t.user_attrs.get("failure_reason", "worker stopped (heartbeat lost)"))
            if t.state == TrialState.FAIL and statuses.get(t.user_attrs.get("cell_id", ""), CellStatus("x")).state != "failed":
                detail += "; queued again"
            print(f"[{self.queue.grid}] {done}/{total} cells done, {running} running: {what} "
                  f"{t.user_attrs.get('variant')} seed={t.user_attrs.get('seed')} on {t.user_attrs.get('worker', '?')} "
                  f"- {detail}; ETA {fmt_duration(left if done < total else 0.0)}", file=self.stream, flush=True)


def _worker_argv(options: RunOptions, tracking_uri: str, storage: str, worker_id: str, device: str,
                 threads: int, series: str | None) -> list[str]:
    """The `run_ablation.py worker` command line that joins this launch: the same cells, options and store."""
    argv = [sys.executable, "-m", "ablations.cli", "worker", "--launched", "--config", options.config,
            "--tracking-uri", tracking_uri,
            "--storage", storage, "--device", device, "--worker-id", worker_id, "--threads", str(threads),
            "--heartbeat", str(options.heartbeat), "--grace", str(options.grace)]
    for grid in dict.fromkeys(options.grids):
        argv += ["--grid", grid]
    for item in options.sets:
        argv += ["--set", item]
    seeds = None if options.seeds is None else ",".join(map(str, options.seeds))
    for flag, value in (("--preset", options.preset), ("--seeds", seeds), ("--data-root", options.data_root),
                        ("--retries", options.retries), ("--series", series)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--checkpoint-dir", str(options.checkpoints(tracking_uri).root)]
    if options.keep_checkpoints:
        argv.append("--keep-checkpoints")
    if STOP.limit is not None:  # what is left of the launcher's limit, less a margin for the launcher's own summing up
        left = max(1.0, STOP.limit - STOP.margin - STOP.elapsed())
        argv += ["--time-limit", f"{left:.1f}s", "--time-margin", f"{min(STOP.margin, left / 2):.1f}"]
    return argv


def _stop(procs: Sequence[subprocess.Popen], timeout: float = 60.0) -> None:
    """Ask every worker to stop as on Ctrl-C (each marks its cell KILLED), then make sure they did."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # its trial is taken back after the grace period
            p.wait()


def _queue_grids(options: RunOptions, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]],
                 tracking_uri: str, storage: str, series: str | None) -> tuple[list[GridQueue], dict[str, int], tuple]:
    """Create each grid's MLflow experiment and queue before any worker starts; enqueue what is
    missing, failed cells included (a new launch); link the cells other grids trained; return the
    queues, how many cells were done (not counting those just linked) and the grids' runs."""
    client, runs = open_grids(options, exps, grids, tracking_uri, storage, series)
    queues, already = [], {}
    for r in runs:
        statuses = r.queue.reconcile(r.queue.retries(options.retries), reset_failed=True)
        linked = r.link_done(client, tracking_uri, statuses)
        already[r.queue.grid] = count(statuses, "done") - len(linked)
        queues.append(r.queue)
    return queues, already, (client, runs)


def _spawn(options: RunOptions, slots: Sequence[str | None], tracking_uri: str, storage: str,
           series: str | None, procs: list[subprocess.Popen]) -> str:
    """Start one `worker` process per slot (appended to `procs` as they start); describe where they run."""
    import ablations

    threads = options.threads or max(1, (os.cpu_count() or 1) // max(1, len(slots)))  # don't oversubscribe the cores
    src = str(Path(ablations.__file__).resolve().parents[1])
    for i, gpu in enumerate(slots):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        device = options.device
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"], device = gpu, "cuda"  # the worker sees its one GPU as cuda:0
            env[WORKERS_PER_DEVICE_ENV] = str(options.workers_per_gpu)  # resident data takes 1/K of the GPU
        # Its own session: a terminal's Ctrl-C reaches the launcher only, which passes it on once.
        procs.append(subprocess.Popen(_worker_argv(options, tracking_uri, storage, f"w{i}", device, threads, series),
                                      env=env, start_new_session=True))
    return ", ".join(f"w{i}: GPU {g}" for i, g in enumerate(slots) if g is not None) or f"CPU, {threads} threads each"


def launch(options: RunOptions, exps: ExperimentsFile, grids: Sequence[tuple[str, list[Cell]]]) -> int:
    """`--workers N` (and/or --gpus): queue the grids, start N local workers, show progress."""
    from ablations.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, EXIT_TIME_LIMIT
    from ablations.run.runner import load_data, raise_if_stopped

    options.check()
    gpus = gpus_for(options)
    tracking_uri = options.store
    storage = options.storage or default_storage(tracking_uri)
    # Bad input ends here; workers then read the cache. A stop request ends a long decode between chunks.
    load_data([c for _, cells in grids for c in cells], stop_check=raise_if_stopped)
    series = new_series() if options.force else None  # --force: every cell again, in a study of its own
    started_ms = int(time.time() * 1000)
    queues, already, (client, grid_runs) = _queue_grids(options, exps, grids, tracking_uri, storage, series)
    todo = sum(len(q.cells) - count(q.statuses(q.retries(options.retries)), "done") for q in queues)
    slots = worker_slots(options.workers, gpus, options.workers_per_gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))[:todo]

    procs: list[subprocess.Popen] = []
    previous = STOP.install()  # SIGTERM/SIGUSR1 reach the workers as a preemption: each checkpoints its cell
    forwarded = False
    try:
        where = _spawn(options, slots, tracking_uri, storage, series, procs)
        print(f"started {len(procs)} workers ({where}); queue {storage}", file=sys.stderr, flush=True)
        monitors = [GridMonitor(q, q.retries(options.retries), sys.stderr) for q in queues]
        while any(p.poll() is None for p in procs):
            why = STOP.check()  # a signal, or the launcher's own stop point (the workers' comes a margin earlier)
            if why is not None and not forwarded:
                print(f"{why[1]}: passing it on to the workers", file=sys.stderr, flush=True)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                forwarded = True
            for m in monitors:
                m.poll()
            time.sleep(0.2 if forwarded else 1.0)
        for m in monitors:
            m.poll()
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        STOP.restore(previous)
    codes = [p.returncode for p in procs]
    if any(c not in (0, 1) for c in codes):
        print(f"workers exited with codes {codes}", file=sys.stderr)
    stop_code = EXIT_PREEMPTED if STOP.reason is not None else EXIT_TIME_LIMIT if STOP.check() is not None or \
        EXIT_TIME_LIMIT in codes else EXIT_PREEMPTED if EXIT_PREEMPTED in codes else None
    unsettled = any(s.state not in ("done", "failed") for q in queues for s in q.statuses(q.retries(options.retries)).values())
    if stop_code is not None and unsettled:
        from ablations.run.timelimit import stop_summary
        from ablations.tracking import client_for

        why = STOP.reason or ("a worker was preempted" if stop_code == EXIT_PREEMPTED else "time limit reached")
        stop_summary(client_for(tracking_uri), grids, options.checkpoints(tracking_uri), why, sys.stderr,
                     estimate=stop_code == EXIT_TIME_LIMIT)
        return stop_code
    from ablations.run.reuse import reused_since

    reused = {r.queue.grid: reused_since(client, r.experiment_id, r.queue.cells.values(), started_ms) for r in grid_runs}
    code = summary(queues, options.retries, tracking_uri, sys.stderr, already, reused)
    return EXIT_BAD_INPUT if codes and all(c == EXIT_BAD_INPUT for c in codes) else code
