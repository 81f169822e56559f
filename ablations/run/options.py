"""The command-line options of parallel and distributed runs (shared by a plain run, the launcher
and `run_ablation.py worker`), their checks, and where each worker runs (which GPU)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ablations.config import ConfigError
from ablations.run.storage import JOURNAL_NAME


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    """The options of parallel and distributed runs (shared by the launcher and `worker`)."""
    g = p.add_argument_group("parallel and distributed runs (docs/distributed.md)",
                             "Every run claims its cells from a queue, so any number of runs of one grid, started "
                             "in any way, run each cell once. `run_ablation.py worker --grid NAME --storage URL ...` "
                             "joins a grid's workers from any machine: it pulls cells until the grid is done.")
    g.add_argument("--workers", type=int, metavar="N",
                   help="run N cells at once, each in its own process (default: 1, in this process; "
                   "with --gpus: GPUs x --workers-per-gpu)")
    g.add_argument("--gpus", metavar="LIST", help="GPU indices to spread the workers over, e.g. 0,1 "
                   "(default on CUDA: every visible GPU); each worker sees one GPU")
    g.add_argument("--workers-per-gpu", type=int, default=1, metavar="K", help="workers sharing each GPU (default: 1)")
    g.add_argument("--storage", metavar="URL", help="Optuna storage queueing the cells: postgresql://user@host/db for "
                   f"many machines, or a journal file path (default: {JOURNAL_NAME} beside the MLflow store)")
    g.add_argument("--retries", type=int, metavar="K",
                   help="run a failed cell up to K more times (default: the grid's queue setting, else 0)")
    g.add_argument("--heartbeat", type=int, default=20, metavar="SECONDS",
                   help="how often a worker tells the storage its cell is alive (default: %(default)s)")
    g.add_argument("--grace", type=int, default=90, metavar="SECONDS",
                   help="a cell whose heartbeat is older is taken back and queued again (default: %(default)s)")
    g.add_argument("--worker-id", help=argparse.SUPPRESS)
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads of a `worker` (default: every core; "
                   "--workers N gives each of its workers cores // N)")
    g.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # started by a launcher: it sums up
    g.add_argument("--series", help=argparse.SUPPRESS)  # the launcher's --force study, passed to its workers


def wants_workers(args: argparse.Namespace) -> bool:
    """Whether to start worker processes; without them this process is the one worker."""
    return args.workers is not None or args.gpus is not None or args.workers_per_gpu != 1


def check_args(args: argparse.Namespace, worker: bool = False) -> None:
    """The parallel options' values; `worker`: for `run_ablation.py worker`."""
    if worker and args.force:
        raise ConfigError("--force: give it to the run that starts the grid (a plain run or --workers N), "
                          "not to a `worker`, which joins the grid as it is queued")
    for name in ("workers", "workers_per_gpu", "heartbeat", "grace"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if args.retries is not None and args.retries < 0:
        raise ConfigError(f"--retries: must be 0 or more, got {args.retries}")
    if args.grace <= args.heartbeat:
        raise ConfigError(f"--grace: must be longer than --heartbeat ({args.heartbeat} s), got {args.grace}")


def parse_gpus(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {text}: expected GPU indices, e.g. 0,1") from None
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {text}: expected distinct GPU indices, e.g. 0,1")
    return gpus


def worker_slots(workers: int | None, gpus: Sequence[int], per_gpu: int,
                 visible: str | None = None) -> list[str | None]:
    """For each worker, the CUDA_VISIBLE_DEVICES that pins it to one GPU, or None on the CPU.

    Round robin over the GPUs, so N workers on G GPUs fill every GPU before doubling up.
    `visible` is the launcher's own CUDA_VISIBLE_DEVICES: GPU indices count within it.
    """
    n = workers or (len(gpus) * per_gpu if gpus else 1)
    names = [v.strip() for v in visible.split(",")] if visible else [str(g) for g in range(max(gpus, default=0) + 1)]
    return [names[gpus[i % len(gpus)]] if gpus else None for i in range(n)]


def gpus_for(args: argparse.Namespace) -> list[int]:
    """The GPU indices to spread workers over: --gpus, the one of --device cuda:N, or all of them."""
    import torch

    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.gpus is not None and args.device == "cpu":
        raise ConfigError("--gpus: cannot pin workers to GPUs with --device cpu")
    if (on_cuda or args.gpus is not None) and not torch.cuda.is_available():
        raise ConfigError(f"--{'gpus' if args.gpus is not None else 'device'}: CUDA is not available on this machine")
    if not on_cuda and args.gpus is None:
        if args.workers_per_gpu != 1:
            raise ConfigError("--workers-per-gpu: no GPU to pack workers onto (use --workers N on a CPU)")
        return []
    count = torch.cuda.device_count()
    if args.gpus is not None:
        gpus = parse_gpus(args.gpus)
    elif ":" in args.device:  # --device cuda:N: that one GPU
        gpus = [int(args.device.split(":", 1)[1])]
    else:
        gpus = list(range(count))
    if max(gpus) >= count:
        raise ConfigError(f"--gpus {','.join(map(str, gpus))}: this machine has {count} GPUs")
    return gpus
