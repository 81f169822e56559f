"""The Python entry point to running grids: a RunOptions in, an exit code out (run_ablation.py goes through it too).

    from ablations.run import RunOptions, run_grids
    code = run_grids(RunOptions(config="experiments.yaml", grids=("reduction",), device="cpu"))

The exit codes are run_ablation.py's (ablations/errors.py). Bad input raises ConfigError, DataError
or BadInput, as it does inside the CLI (which turns them into exit code 2).
"""

from __future__ import annotations

from typing import Sequence

from ablations.config import Cell, ExperimentsFile, load_experiments
from ablations.errors import EXIT_OK
from ablations.run.options import RunOptions

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
    return gate(grids, device=options.device, gpus=options.gpus, tracking_uri=options.tracking_uri)


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
    start worker processes (--workers/--gpus), or be their one worker in this process."""
    if worker:
        from ablations.run.worker import work

        return work(options, exps, grids)
    if options.wants_workers:
        from ablations.run.launcher import launch

        return launch(options, exps, grids)
    from ablations.run.worker import run_here

    return run_here(options, exps, grids)


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
    if (code := prepare(options, grids, exps)) != EXIT_OK:
        return code
    return dispatch(options, exps, grids, worker=worker)
