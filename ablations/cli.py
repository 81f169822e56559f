"""run_ablation: train the cells of declarative SE ablation grids and track them in MLflow.

`run_ablation.py worker --grid NAME --storage URL ...` joins a grid's workers (docs/distributed.md).
Exit codes (ablations/errors.py): 0 every cell done; 1 some cell failed (each is named); 2 bad input;
75 preempted (SIGTERM/SIGUSR1: the running cell was checkpointed); 124 --time-limit reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from ablations.config import Cell, ConfigError, ExperimentsFile, load_experiments, parse_seeds
from ablations.data import DataError
from ablations.errors import BadInput
from ablations.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, EXIT_TIME_LIMIT
from ablations.run import RunOptions, dispatch, prepare, stop_requests
from ablations.run.storage import JOURNAL_SUFFIX


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_ablation.py",
        description="Run SENet ablation grids from experiments.yaml: every cell (variant x seed) is trained, "
                    "evaluated and logged to MLflow; cells already FINISHED are skipped.",
        epilog="Exit codes: 0 all cells done, 1 some cell failed, 2 bad input, 75 preempted (SIGTERM/SIGUSR1; "
               "run again to resume), 124 --time-limit reached (run again to continue), 130 interrupted.",
    )
    p.add_argument("--config", default=RunOptions.config, metavar="PATH", help="experiments file (default: %(default)s)")
    p.add_argument("--grid", action="append", default=[], metavar="NAME", help="grid to run; repeat for several")
    p.add_argument("--preset", metavar="NAME",
                   help="named override set from the file's presets, e.g. smoke; with --report/--analyze: "
                        "use the runs made with that preset (they are always reported apart)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, typed by the schema (e.g. train.epochs=5); repeatable")
    p.add_argument("--seeds", metavar="LIST", help="comma-separated seeds, e.g. 0,1,2 (overrides the file)")
    p.add_argument("--list", action="store_true", help="list the grids with their descriptions")
    p.add_argument("--dry-run", action="store_true", help="print every cell with variant, seed, Params and GFLOPs; train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="with --dry-run: time a few real training steps of each backbone on this device for the "
                        "estimate, where the store has no epoch times yet (default: an assumed throughput)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--data-root", metavar="PATH", help="where datasets are found or downloaded (overrides dataset.root)")
    p.add_argument("--device", default=RunOptions.device, help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="run every cell, even those already FINISHED")
    p.add_argument("--report", action="store_true",
                   help="write the paper-style tables and plots of --grid (all grids if none) from the MLflow store; trains nothing")
    p.add_argument("--analyze", action="store_true",
                   help="role of SE: excitation statistics per class and depth for the finished SE runs of --grid")
    p.add_argument("--run-id", metavar="ID", action="append", default=[],
                   help="with --analyze: only this MLflow run; with --export-record: also keep this run's model "
                        "(config and weights, a few MB) beside the record, for --analyze after a restore; repeatable")
    p.add_argument("--export-record", metavar="PATH",
                   help="write the FINISHED cell runs of --grid (all grids if none) of --tracking-uri, without "
                        "artifacts, to a new SQLite file: the study's record to commit; trains nothing")
    p.add_argument("--restore-record", metavar="PATH",
                   help="copy a record's runs into --tracking-uri (new or not; runs already there are skipped): "
                        "reports regenerate from it and the study resumes without retraining them; trains nothing")
    p.add_argument("--results-dir", metavar="PATH",
                   help="where reports go (default: results, or results/presets/NAME with --preset NAME)")
    add_parallel_options(p)
    add_checkpoint_options(p)
    return p


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    """The options of parallel and distributed runs (shared by a plain run, the launcher and `worker`)."""
    g = p.add_argument_group("parallel and distributed runs (docs/distributed.md)",
                             "Every run claims its cells from a queue, so any number of runs of one grid, started "
                             "in any way, run each cell once. `run_ablation.py worker --grid NAME --storage URL ...` "
                             "joins a grid's workers from any machine: it pulls cells until the grid is done.")
    g.add_argument("--workers", type=int, metavar="N",
                   help="run N cells at once, each in its own process (default: 1, in this process; "
                   "with --gpus: GPUs x --workers-per-gpu)")
    g.add_argument("--gpus", metavar="LIST", help="GPU indices to spread the workers over, e.g. 0,1 "
                   "(default on CUDA: every visible GPU); each worker sees one GPU")
    g.add_argument("--workers-per-gpu", type=int, default=RunOptions.workers_per_gpu, metavar="K",
                   help="workers sharing each GPU (default: 1)")
    g.add_argument("--storage", metavar="URL", help="Optuna storage queueing the cells: postgresql://user@host/db for "
                   f"many machines, or a journal file path (default: the store's own, e.g. mlflow.db{JOURNAL_SUFFIX} beside mlflow.db)")
    g.add_argument("--retries", type=int, metavar="K",
                   help="run a failed cell up to K more times (default: the grid's queue setting, else 0)")
    g.add_argument("--heartbeat", type=int, default=RunOptions.heartbeat, metavar="SECONDS",
                   help="how often a worker tells the storage its cell is alive (default: %(default)s)")
    g.add_argument("--grace", type=int, default=RunOptions.grace, metavar="SECONDS",
                   help="a cell whose heartbeat is older is taken back and queued again (default: %(default)s)")
    g.add_argument("--worker-id", help=argparse.SUPPRESS)
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads of a `worker` (default: every core; "
                   "--workers N gives each of its workers cores // N)")
    g.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # started by a launcher: it sums up
    g.add_argument("--series", help=argparse.SUPPRESS)  # the launcher's --force study, passed to its workers


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """--checkpoint-dir, --keep-checkpoints, --time-limit (shared by the serial run, workers and the launcher)."""
    g = p.add_argument_group("checkpoints, preemption and time limits")
    g.add_argument("--checkpoint-dir", metavar="PATH",
                   help="where each running cell keeps its last checkpoint (default: checkpoints/ beside the MLflow store)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep a cell's last checkpoint after its run FINISHED (default: delete it)")
    g.add_argument("--time-limit", metavar="DURATION",
                   help="stop cleanly before this much time has passed (e.g. 90s, 9m, 2h, 1h30m): cells that cannot "
                        "reach a checkpoint in time are not started; exit 124; the same command continues")
    g.add_argument("--time-margin", type=float, metavar="SECONDS",
                   help="with --time-limit: checkpoint and stop this long before the limit "
                        "(default: 5%% of the limit, at least 5 s and at most 2 min)")


def run_options(args: argparse.Namespace) -> RunOptions:
    """The parsed command line as the options object everything below the CLI takes (parses --seeds)."""
    return RunOptions(
        config=args.config, grids=tuple(dict.fromkeys(args.grid)), preset=args.preset, sets=tuple(args.sets),
        seeds=tuple(parse_seeds(args.seeds)) if args.seeds is not None else None, data_root=args.data_root,
        tracking_uri=args.tracking_uri, device=args.device, force=args.force,
        workers=args.workers, gpus=args.gpus, workers_per_gpu=args.workers_per_gpu, storage=args.storage,
        retries=args.retries, heartbeat=args.heartbeat, grace=args.grace, worker_id=args.worker_id,
        threads=args.threads, launched=args.launched, series=args.series,
        checkpoint_dir=args.checkpoint_dir, keep_checkpoints=args.keep_checkpoints,
        time_limit=args.time_limit, time_margin=args.time_margin)


def _cells(args: argparse.Namespace) -> tuple[ExperimentsFile, RunOptions | None, list[tuple[str, list[Cell]]]]:
    """The experiments file, the run's options and each grid's cells (no options with --list)."""
    exps = load_experiments(args.config)
    if args.list:
        return exps, None, []
    if not args.grid and not args.report:
        raise ConfigError(f"--grid: name at least one grid (have: {', '.join(exps.grids)}); --list describes them")
    options = run_options(args)
    return exps, options, options.resolve(exps)


def _dry_run(grids: list[tuple[str, list[Cell]]], as_json: bool, options: RunOptions, calibrate: bool = False) -> None:
    from ablations.config import expected_image_size, expected_num_classes, with_num_classes
    from ablations.run.estimate import estimate_grids, planning_device
    from senet import build_model, complexity

    threads = torch.get_num_threads()
    if options.threads and calibrate:  # the calibration runs as a worker with --threads would
        torch.set_num_threads(options.threads)
    try:
        estimate = estimate_grids(grids, planning_device(options.device), tracking_uri=options.store,
                                  calibrate_here=calibrate, threads=options.threads)
    finally:
        torch.set_num_threads(threads)
    per_cell = {e.cell.cell_id: e for e in estimate.cells}

    rows, measured = [], {}
    for grid, cells in grids:
        for cell in cells:
            ds = cell.config.dataset
            config = with_num_classes(cell.config, expected_num_classes(ds, cell.config.model.num_classes))
            size = expected_image_size(ds)
            key = (config.model.model_dump_json(), size)  # the seeds of a variant share one model: build it once
            if key not in measured:
                with torch.device("meta"):
                    measured[key] = complexity(build_model(config.model), size)
            c = measured[key]
            est = per_cell.get(cell.cell_id)
            rows.append(dict(grid=grid, variant=cell.variant, seed=cell.seed, cell_id=cell.cell_id, params=c.params,
                             caffe_params=c.caffe_params, gflops=round(c.gflops, 5), input_size=size,
                             config=config.model_dump(mode="json"),
                             # None: FINISHED in the store already (a run skips it), or its dataset's size is unknown
                             estimated_seconds=None if est is None or est.seconds is None else round(est.seconds, 1),
                             estimate_source="finished" if est is None else est.source))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    w = max([12, *(len(r["grid"]) for r in rows)])
    print(f"{'grid':{w}s} {'variant':24s} {'seed':>4s}  {'cell_id':16s} {'Params':>9s} {'+BN':>9s} {'GFLOPs':>8s} {'px':>4s}")
    for r in rows:
        print(f"{r['grid']:{w}s} {r['variant']:24s} {r['seed']:>4d}  {r['cell_id']:16s} "
              f"{r['params'] / 1e6:8.3f}M {r['caffe_params'] / 1e6:8.3f}M {r['gflops']:8.4f} {r['input_size']:>4d}")
    print(f"{len(rows)} cells. Params: trainable; +BN: also BatchNorm statistics, as the paper's Params column "
          "counts them; GFLOPs: multiply-adds (G) at px x px input")
    print(f"estimated wall time: {estimate.describe()}, one cell after another (training and evaluation epochs; "
          "start-up, first decoding of the data and compilation not counted)")
    print(f"  from: {estimate.where() or 'nothing to run'}")


def _report_or_analyze(args: argparse.Namespace, exps: ExperimentsFile) -> int:
    from ablations.tracking import default_tracking_uri

    tracking_uri = args.tracking_uri or default_tracking_uri()
    if args.analyze:
        from ablations.report.analysis import analyze_grid
        from ablations.report.write import study_of

        if not args.grid:
            raise ConfigError("--analyze: name the grid with --grid")
        analysed = []
        for name in args.grid:
            for path in analyze_grid(tracking_uri, name, results_dir=args.results_dir, data_root=args.data_root,
                                     device=args.device, run_id=args.run_id, preset=args.preset,
                                     study=study_of(exps, args.preset)):
                print(path)
                analysed.append(path)
        if not args.report and analysed:  # nothing analysed: the results README stays as it is
            from ablations.report import write_index

            write_index(args.results_dir)  # the results README carries each analysis's findings
    if args.report:
        from ablations.report import report_all

        index = report_all(tracking_uri, grids=args.grid or None, results_dir=args.results_dir, experiments=exps,
                           preset=args.preset)
        if index is not None:  # None: no grid had runs to report, and nothing was written
            print(index)
    return EXIT_OK


def _report_quietly(tracking_uri: str, grid: str, exps: ExperimentsFile, results_dir: str,
                    preset: str | None) -> None:
    """Refresh a grid's tables and plots after it ran; a failing report must not fail the runs."""
    from ablations.report import write_index, write_report

    try:
        path = write_report(tracking_uri, grid, results_dir=results_dir, experiments=exps, preset=preset)
        if path is not None:  # None: no finished run to report (write_report said so)
            write_index(results_dir)
            print(f"report: {path}", file=sys.stderr)
    except Exception as exc:  # the runs are safe in the store; `--report` can retry
        print(f"warning: report for {grid} not written ({type(exc).__name__}: {exc})", file=sys.stderr)


def _record(args: argparse.Namespace) -> int:
    from ablations.record import export_record, restore_record
    from ablations.tracking import check_tracking_uri, default_tracking_uri

    if args.export_record and args.restore_record:
        raise ConfigError("--export-record and --restore-record: give one of them")
    store = args.tracking_uri or default_tracking_uri()
    check_tracking_uri(store)
    grids = list(dict.fromkeys(args.grid)) or None
    if args.export_record:
        print(export_record(store, Path(args.export_record), grids, args.run_id).describe(f"record {args.export_record}"))
    else:
        print(restore_record(Path(args.restore_record), store, grids).describe(f"store {store}"))
    return EXIT_OK


def _check_device(spec: str) -> None:
    """A --device this machine does not have is bad input (resolve_device says why in a ValueError)."""
    from ablations.util.device import resolve_device

    try:
        resolve_device(spec)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: torch.device() of an unknown name
        cause = str(exc).splitlines()[0].removeprefix(f"--device {spec}: ")
        if spec.startswith("cuda"):  # the preflight's diagnosis says why: a CPU-only torch, no driver, no device
            from ablations.run.preflight import cuda_problem

            cause = cuda_problem(spec) or cause
        raise ConfigError(f"--device {spec}: {cause}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    worker = argv[:1] == ["worker"]  # `run_ablation.py worker ...`: pull cells from the grids' queues
    args = build_parser().parse_args(argv[1:] if worker else argv)
    try:
        if args.export_record or args.restore_record:
            return _record(args)
        exps, options, grids = _cells(args)
        if args.results_dir is None:  # a smoke check must never overwrite the real results; a study's are real
            check = args.preset and not (args.preset in exps.presets and exps.presets[args.preset].study)
            args.results_dir = str(Path("results") / "presets" / args.preset) if check else "results"
        if args.list:
            w = max(12, *map(len, exps.grids))
            for name, grid in exps.grids.items():
                table = f" [Table {grid.paper_table}]" if grid.paper_table else ""
                print(f"{name:{w}s}{table:11s} {grid.description}")
            return EXIT_OK
        if args.calibrate and not args.dry_run:
            raise ConfigError("--calibrate: only with --dry-run (it times a few training steps for the estimate)")
        if args.dry_run:
            assert options is not None
            if args.calibrate or not args.device.startswith("cuda"):  # a GPU run may be planned without a GPU
                _check_device(args.device)
            _dry_run(grids, args.json, options, args.calibrate)
            return EXIT_OK
        from ablations.tracking import check_tracking_uri

        assert options is not None  # only --list has none
        check_tracking_uri(options.store)  # before anything is written
        if not args.report or args.analyze:
            _check_device(args.device)
        if args.report or args.analyze:
            return _report_or_analyze(args, exps)
        # The time limit is armed (a bad duration is bad input before anything runs), then on a GPU
        # one real step and one MLflow write, before any cell is claimed. From here on a SIGTERM or
        # SIGUSR1 is a stop request, the preflight and the decoding of the data included.
        with stop_requests():
            if code := prepare(options, grids, exps):
                return code
            code = dispatch(options, exps, grids, worker=worker)  # a worker, a launcher, or this process as the one worker
        if worker or code in (EXIT_PREEMPTED, EXIT_TIME_LIMIT):  # the report waits for a run that finishes the grids
            return code
        for name, _ in grids:
            _report_quietly(options.store, name, exps, args.results_dir, args.preset)
        return code
    except (ConfigError, DataError, BadInput) as exc:  # only bad input; any other exception is a bug: traceback, 1
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: the running cell is marked KILLED; the next run resumes it from its last checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
