"""The Python entry point to running grids: a RunOptions in, an exit code out (run_ablation.py goes through it too).

    from ablations.run import RunOptions, run_grids
    code = run_grids(RunOptions(config="experiments.yaml", grids=("reduction",), device="cpu"))

The exit codes are run_ablation.py's (ablations/errors.py). Bad input raises ConfigError, DataError
or BadInput, as it does inside the CLI (which turns them into exit code 2).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator, Sequence

from ablations.config import Cell, ExperimentsFile, load_experiments
from ablations.errors import EXIT_OK
from ablations.run.options import RunOptions
from ablations.train.checkpoint import STOP, TrainingStopped

Grids = Sequence[tuple[str, list[Cell]]]


def prepare(options: RunOptions, grids: Grids, exps: ExperimentsFile | None = None) -> int:
    """Arm the time limit; on a CPU, warn in one line if the grids will take long here (with `exps`);
    then, on a GPU, preflight the first cell's settings before any cell is claimed. Returns EXIT_OK
    to go on, else the exit code to stop with (the cause was printed)."""
    from ablations.run.preflight import gate
    from ablations.run.timelimit import arm

    arm(options.time_limit, options.time_margin)  # a bad duration is bad input before anything runs
    if exps is not None and not options.launched and not options.gpus:  # a launcher's workers: it warned
        warn_if_slow_here(options, exps, grids)
    return gate(grids, device=options.device, gpus=options.gpus, tracking_uri=options.tracking_uri,
                launcher=options.wants_workers)


@contextlib.contextmanager
def stop_requests() -> Iterator[None]:
    """SIGTERM and SIGUSR1 are stop requests (STOP) from here on instead of killing the process, so
    that the phases before a cell runs (the preflight, decoding the data) end with the stop's exit
    code too, which a SLURM script requeues on. Undone on leaving; in the main thread only (where
    Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = STOP.install()
    try:
        yield
    finally:
        STOP.restore(previous)


def warn_if_slow_here(options: RunOptions, exps: ExperimentsFile, grids: Grids) -> None:
    """The one warning line of a grid sized for a GPU started on a CPU (ablations/run/estimate.py)."""
    import sys
    from dataclasses import replace

    from ablations.config import ConfigError
    from ablations.run.estimate import cpu_warning
    from ablations.util.device import resolve_device

    def under(preset: str) -> Grids | None:
        try:
            return replace(options, preset=preset).resolve(exps)
        except ConfigError:  # e.g. a --set that the preset's cells do not use: no size for the suggestion
            return None

    try:
        device = resolve_device(options.device)
    except ValueError:  # a GPU asked for where there is none: the preflight says so, not this
        return
    try:
        line = cpu_warning(exps, grids, device, preset=options.preset, tracking_uri=options.store,
                           threads=options.threads, resolve=under)
    except Exception as exc:  # advice only: e.g. a store another process is creating right now
        line = f"note: no time estimate ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
    if line:
        print(line, file=sys.stderr, flush=True)


def dispatch(options: RunOptions, exps: ExperimentsFile, grids: Grids, *, worker: bool = False) -> int:
    """Run the grids' cells once prepared: join their workers (`worker`, as `run_ablation.py worker`),
    start worker processes (--workers/--gpus), or be their one worker in this process. A stop request
    while the data is decoded, before any cell is claimed, ends it with the stop's exit code."""
    try:
        if worker:
            from ablations.run.worker import work

            return work(options, exps, grids)
        if options.wants_workers:
            from ablations.run.launcher import launch

            return launch(options, exps, grids)
        from ablations.run.worker import run_here

        return run_here(options, exps, grids)
    except TrainingStopped as exc:  # from ablations.run.runner.raise_if_stopped, between decode chunks
        print(f"stopped: {exc.reason} while loading the data; no cell was claimed, run again to continue",
              file=sys.stderr, flush=True)
        return exc.exit_code


def run_grids(options: RunOptions, exps: ExperimentsFile | None = None, grids: Grids | None = None, *,
              worker: bool = False) -> int:
    """Run every cell of `options.grids` not yet FINISHED in the store; the exit code.

    `exps`, `grids`: the experiments file and its cells when the caller has them already; they
    must be what `options` names (`options.resolve(exps)`), since a launcher's workers resolve
    their cells again from `options`. By default they are loaded from `options.config`.
    """
    if exps is None:
        exps = load_experiments(options.config)
    if grids is None:
        grids = options.resolve(exps)
    with stop_requests():
        if (code := prepare(options, grids, exps)) != EXIT_OK:
            return code
        return dispatch(options, exps, grids, worker=worker)
