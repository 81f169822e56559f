"""RunOptions: the typed, frozen options of a run of some grids, their checks, and which GPU each worker gets.

They say what to run, where, with how many workers, and where checkpoints go. run_ablation.py
builds one from its command line (ablations/cli.py); a Python caller builds one directly and hands
it to `ablations.run.run_grids`. Nothing below the CLI sees argparse.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ablations.config import Cell, ConfigError, ExperimentsFile, resolve_cells

if TYPE_CHECKING:
    from ablations.train.checkpoint import Checkpoints


@dataclass(frozen=True)
class RunOptions:
    """How to run the cells of some grids. Each field is run_ablation.py's option of the same name
    (workers_per_gpu is --workers-per-gpu), with the same default and meaning (--help)."""

    # What to run. A launcher's workers resolve the same cells from these, so they travel with it.
    config: str = "experiments.yaml"
    grids: tuple[str, ...] = ()
    preset: str | None = None
    sets: tuple[str, ...] = ()  # KEY=VALUE items, as --set takes them
    seeds: tuple[int, ...] | None = None  # None: the file's seeds
    data_root: str | None = None  # overrides dataset.root
    # Where, and how.
    tracking_uri: str | None = None  # None: sqlite:///./mlflow.db
    device: str = "auto"
    force: bool = False
    # Parallel and distributed runs.
    workers: int | None = None
    gpus: str | None = None  # GPU indices as written, e.g. "0,1"; checked where they are used
    workers_per_gpu: int = 1
    storage: str | None = None
    retries: int | None = None
    heartbeat: int = 20
    grace: int = 90
    worker_id: str | None = None
    threads: int | None = None
    launched: bool = False  # started by a launcher, which sums up for its workers
    series: str | None = None  # the launcher's --force study, passed to its workers
    # Checkpoints and time limits.
    checkpoint_dir: str | None = None
    keep_checkpoints: bool = False
    time_limit: str | None = None  # e.g. 90s, 9m, 2h, 1h30m
    time_margin: float | None = None

    @property
    def store(self) -> str:
        """The MLflow tracking URI the run writes to."""
        from ablations.tracking import default_tracking_uri

        return self.tracking_uri or default_tracking_uri()

    @property
    def wants_workers(self) -> bool:
        """Whether to start worker processes; without them this process is the one worker."""
        return self.workers is not None or self.gpus is not None or self.workers_per_gpu != 1

    def check(self, worker: bool = False) -> None:
        """The parallel options' values; `worker`: for `run_ablation.py worker`."""
        if worker and self.force:
            raise ConfigError("--force: give it to the run that starts the grid (a plain run or --workers N), "
                              "not to a `worker`, which joins the grid as it is queued")
        for name in ("workers", "workers_per_gpu", "heartbeat", "grace"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
        if self.retries is not None and self.retries < 0:
            raise ConfigError(f"--retries: must be 0 or more, got {self.retries}")
        if self.grace <= self.heartbeat:
            raise ConfigError(f"--grace: must be longer than --heartbeat ({self.heartbeat} s), got {self.grace}")

    def checkpoints(self, tracking_uri: str) -> Checkpoints:
        """Where the cells' checkpoints go: checkpoint_dir, else beside the MLflow store."""
        from ablations.train.checkpoint import Checkpoints, default_checkpoint_dir

        root = Path(self.checkpoint_dir).resolve() if self.checkpoint_dir else default_checkpoint_dir(tracking_uri)
        return Checkpoints(root, self.keep_checkpoints)

    def resolve(self, exps: ExperimentsFile) -> list[tuple[str, list[Cell]]]:
        """Each grid's cells, with the preset, --set items, seeds and data root applied."""
        out = []
        for name in dict.fromkeys(self.grids):
            cells = resolve_cells(exps, name, preset=self.preset, sets=self.sets, seeds=self.seeds)
            if self.data_root:
                cells = [replace(c, config=c.config.model_copy(update={
                    "dataset": c.config.dataset.model_copy(update={"root": self.data_root})})) for c in cells]
            out.append((name, cells))
        return out


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


def gpus_for(options: RunOptions) -> list[int]:
    """The GPU indices to spread workers over: --gpus, the one of --device cuda:N, or all of them."""
    import torch

    device, gpus_text = options.device, options.gpus
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if gpus_text is not None and device == "cpu":
        raise ConfigError("--gpus: cannot pin workers to GPUs with --device cpu")
    if (on_cuda or gpus_text is not None) and not torch.cuda.is_available():
        raise ConfigError(f"--{'gpus' if gpus_text is not None else 'device'}: CUDA is not available on this machine")
    if not on_cuda and gpus_text is None:
        if options.workers_per_gpu != 1:
            raise ConfigError("--workers-per-gpu: no GPU to pack workers onto (use --workers N on a CPU)")
        return []
    count = torch.cuda.device_count()
    if gpus_text is not None:
        gpus = parse_gpus(gpus_text)
    elif ":" in device:  # --device cuda:N: that one GPU
        gpus = [int(device.split(":", 1)[1])]
    else:
        gpus = list(range(count))
    if max(gpus) >= count:
        raise ConfigError(f"--gpus {','.join(map(str, gpus))}: this machine has {count} GPUs")
    return gpus
