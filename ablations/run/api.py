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


def prepare(options: RunOptions, grids: Grids) -> int:
    """Arm the time limit, then, on a GPU, preflight the first cell's settings before any cell is
    claimed. Returns EXIT_OK to go on, else the exit code to stop with (the cause was printed)."""
    from ablations.run.preflight import gate
    from ablations.run.timelimit import arm

    arm(options.time_limit, options.time_margin)  # a bad duration is bad input before anything runs
    return gate(grids, device=options.device, gpus=options.gpus, tracking_uri=options.tracking_uri)


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
    if (code := prepare(options, grids)) != EXIT_OK:
        return code
    return dispatch(options, exps, grids, worker=worker)
