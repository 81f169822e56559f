"""How long grids take on this device, before they start: the end of `--dry-run`, and the one warning
line that a grid sized for a GPU gets when it is started on a CPU.

Each cell's epoch time comes from the first of these that has it, and the estimate says which:

1. the store: the median `epoch_seconds` of this cell's runs, else of runs of the same backbone
   (architecture, batch size, training set) on the same kind of device (timelimit.EpochTimes);
2. a calibration, when asked for (`--dry-run --calibrate`): a few real training steps and one
   evaluation through `train()`, on random images of the cell's size, on this device, once per
   backbone, scaled to each variant by its multiply-adds;
3. multiply-adds at an assumed throughput (ASSUMED_*, below): an assumption, labelled as one.

A cell's time is its epochs x (its training images + its test images, at their costs). What is not
counted: start-up, decoding a dataset into the cache the first time, compilation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ablations.config import (Cell, ExperimentConfig, ExperimentsFile, expected_image_size, expected_num_classes,
                               with_num_classes)
from ablations.util.timefmt import fmt_long

# Images per split of the datasets whose size is known without reading them (imagenette2, imagewoof2).
DATASET_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "imagenette": (9_469, 3_925),
                 "imagewoof": (9_025, 3_929), "imagenet": (1_281_167, 50_000)}
IMAGENET_PER_CLASS = (1_281_167 / 1000, 50)  # a class subset of ImageNet (e.g. ImageNet-100)

# ASSUMPTIONS, not measurements of the machine at hand; each says what it rests on.
# CPU, per torch thread, in fp32: SE-ResNet-18-CIFAR (0.556 GMACs) trained at 43.8 images/s on 2 threads
# of a 2-core CPU (bench/RESULTS.md, 2026-11-26): 43.8 x 0.556e9 x 6 FLOPs / 2 = 73 GFLOP/s per thread.
ASSUMED_CPU_FLOPS_PER_THREAD = 73e9
# CPU with native bf16 (AVX512-BF16 / AMX) under bf16 autocast: the plain loop's bf16 ran 2.12x its fp32
# on such a CPU (bench/RESULTS.md, 2026-12-03).
ASSUMED_CPU_BF16_SPEEDUP = 2.12
# One GPU, bf16: the README's assumption for the ImageNet grids, SE-ResNet-50 (3.87 GMACs at 224 px) at
# 2,500 images/s on an A100-class GPU: 58 TFLOP/s. Small CIFAR models reach less of it (overheads).
ASSUMED_GPU_FLOPS = 2_500 * 3.87e9 * 6
TRAIN_FLOPS_PER_MAC, EVAL_FLOPS_PER_MAC = 6, 2  # forward + backward (2 + 4), forward only

WARN_ABOVE_SECONDS = 12 * 3600  # a grid estimated longer than this on a CPU gets the warning line


@dataclass(frozen=True)
class Calibration:
    """Measured here: seconds per training step and per evaluated image, for one backbone."""

    step_seconds: float
    eval_seconds_per_image: float
    macs: float  # of the model it ran (others of the backbone are scaled by their own)
    steps: int
    what: str


@dataclass
class CellEstimate:
    cell: Cell
    seconds: float | None  # None: the dataset's size is not known
    source: str  # "store: this cell" | "store: this backbone" | "calibration" | "assumption" | "unknown"


@dataclass
class GridEstimate:
    """The estimate for the cells to run, and where it comes from."""

    device: torch.device
    cells: list[CellEstimate] = field(default_factory=list)
    done: int = 0  # cells already FINISHED in the store (not counted: a run skips them)
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    threads: int = 1

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.cells if c.seconds is not None)

    @property
    def unknown(self) -> int:
        return sum(c.seconds is None for c in self.cells)

    def where(self) -> str:
        """Where the figures come from, one clause per source."""
        counts: dict[str, int] = {}
        for c in self.cells:
            counts[c.source] = counts.get(c.source, 0) + 1
        parts = []
        for source, n in counts.items():
            cells = f"{n} cell{'s' if n != 1 else ''}"
            if source.startswith("store"):
                parts.append(f"{cells}: epoch times measured in this store ({source.removeprefix('store: ')})")
            elif source == "calibration":
                runs = "; ".join(c.what for c in self.calibrations.values())
                parts.append(f"{cells}: a calibration on this device ({runs}), scaled by each variant's multiply-adds")
            elif source == "assumption":
                parts.append(f"{cells}: multiply-adds at an ASSUMED throughput of {self.assumed_flops() / 1e9:,.0f} "
                             f"GFLOP/s ({self.assumption_basis()}); an assumption, not a measurement"
                             + ("" if self.device.type != "cpu" else ": --dry-run --calibrate measures a few steps here"))
            else:
                parts.append(f"{cells}: unknown (the dataset's size is not known without reading it: "
                             "set dataset.train_size and dataset.test_size)")
        return "; ".join(parts)

    def assumed_flops(self, bf16: bool | None = None) -> float:
        if self.device.type == "cuda":
            return ASSUMED_GPU_FLOPS
        bf16 = _bf16_here(self.device) if bf16 is None else bf16
        return ASSUMED_CPU_FLOPS_PER_THREAD * self.threads * (ASSUMED_CPU_BF16_SPEEDUP if bf16 else 1.0)

    def assumption_basis(self) -> str:
        if self.device.type == "cuda":
            return "SE-ResNet-50 at 2,500 images/s at 224 px on an A100-class GPU in bf16"
        precision = "bf16" if _bf16_here(self.device) else "fp32"
        return (f"{ASSUMED_CPU_FLOPS_PER_THREAD / 1e9:.0f} GFLOP/s per thread x {self.threads} threads in fp32, "
                f"from SE-ResNet-18-CIFAR's 43.8 images/s on a 2-core CPU; {precision} here"
                + (f" at {ASSUMED_CPU_BF16_SPEEDUP}x fp32" if precision == "bf16" else ""))

    def describe(self) -> str:
        """'about 3.8 days for 18 cells on this CPU (2 threads)'."""
        n = len(self.cells)
        head = f"about {fmt_long(self.seconds)}" if not self.unknown else (
            f"more than {fmt_long(self.seconds)} ({self.unknown} cells unknown)" if self.seconds else "unknown")
        done = f", {self.done} more already FINISHED in this store" if self.done else ""
        return f"{head} for {n} cell{'s' if n != 1 else ''} on {self.device_words()}{done}"

    def device_words(self) -> str:
        if self.device.type == "cuda":
            if not torch.cuda.is_available():  # planning a GPU run from a machine without one
                return "one GPU (none on this machine: store figures or the assumption)"
            return f"this GPU ({torch.cuda.get_device_name(self.device)})"
        return f"this CPU ({self.threads} threads)"


def _bf16_here(device: torch.device) -> bool:
    from ablations.util.device import native_bf16

    return native_bf16(device)


def split_sizes(config: ExperimentConfig) -> tuple[int, int] | None:
    """(training images, test images) of a cell's dataset, without reading it; None if not known."""
    ds = config.dataset
    if ds.name == "synthetic":
        return ds.train_size or 512, ds.test_size or 256
    full: tuple[float, float] | None = DATASET_SIZES.get(ds.name)
    if ds.name == "imagenet" and ds.classes:
        k = expected_num_classes(ds, 0)
        full = (IMAGENET_PER_CLASS[0] * k, IMAGENET_PER_CLASS[1] * k) if k else None
    if full is None:
        full = _count_tree(Path(ds.root))
    if full is None:
        return (ds.train_size, ds.test_size) if ds.train_size and ds.test_size else None
    return int(min(ds.train_size or full[0], full[0])), int(min(ds.test_size or full[1], full[1]))


def _count_tree(root: Path) -> tuple[int, int] | None:
    """Files under an unpacked image tree's train/ and val/ (or test/)."""
    train = root / "train"
    test = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train.is_dir() or test is None:
        return None
    count = lambda d: sum(1 for p in d.rglob("*") if p.is_file())  # noqa: E731
    return count(train), count(test)


def _macs(config: ExperimentConfig, cache: dict) -> float:
    from senet import build_model, complexity

    size = expected_image_size(config.dataset)
    key = (config.model.model_dump_json(), size)
    if key not in cache:
        with torch.device("meta"):
            cache[key] = complexity(build_model(config.model), size).macs
    return cache[key]


def backbone_key(config: ExperimentConfig) -> str:
    """What a calibration is shared by: the backbone, its input, its batch and how it is trained."""
    t = config.train
    return (f"{config.model.arch} {expected_image_size(config.dataset)}px batch {t.batch_size} "
            f"{t.precision}/{t.channels_last}/compile={t.compile}")


def calibrate(config: ExperimentConfig, device: torch.device, steps: int = 3, warmup: int = 1) -> Calibration:
    """Time `steps` training steps (after `warmup` untimed ones) and one evaluation of `config`'s model
    on random images of its size, through `train()` on `device`, a host sync after every step."""
    from ablations.data import noise_dataset
    from ablations.train import train
    from senet import build_model

    bs = config.train.batch_size
    classes = config.model.num_classes
    eval_bs = config.train.eval_batch_size or 2 * bs
    cfg = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1, "warmup_epochs": 0.0})})
    data = noise_dataset(expected_image_size(config.dataset), (warmup + steps) * bs, eval_bs, classes,
                         source="calibration")
    stamps: list[float] = []

    class Clock:
        def on_step(self, epoch: int, step: int, n: int, loss: float | None) -> None:
            stamps.append(time.perf_counter())

        def on_epoch(self, stats) -> None:
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    result = train(cfg, build_model(cfg.model), data, device, observer=Clock(), sync_every=1)
    stats = result.final
    # stamps: one per step (after its host sync), then the epoch's end; the first `warmup` steps are untimed
    step_seconds = statistics.median(b - a for a, b in zip(stamps[warmup - 1:warmup + steps - 1],
                                                            stamps[warmup:warmup + steps]))
    eval_seconds = max(0.0, stats.seconds - (warmup + steps) * bs / stats.images_per_s)  # the epoch less its training
    return Calibration(step_seconds, eval_seconds / len(data.test.labels), _macs(cfg, {}), steps,
                       f"{steps} steps of {config.model.arch}, batch {bs}, {step_seconds:.2f} s each")


def estimate_grids(grids: Sequence[tuple[str, Sequence[Cell]]], device: torch.device, *,
                   tracking_uri: str | None = None, calibrate_here: bool = False,
                   threads: int | None = None) -> GridEstimate:
    """The estimated wall time of the cells of `grids` not yet FINISHED in the store, run one after
    another on `device`. The store is only read, and only if it exists."""
    from ablations.run.timelimit import EpochTimes
    from ablations.tracking import runs_of_cell, store_finished_runs

    est = GridEstimate(device, threads=threads or torch.get_num_threads())
    client = _existing_store(tracking_uri)
    times = EpochTimes(client) if client is not None else None
    finished = store_finished_runs(client) if client is not None else {}
    macs_cache: dict = {}
    seen: set[str] = set()
    for _, cells in grids:
        for cell in cells:
            if cell.cell_id in seen:
                continue  # a cell that several grids list trains once
            seen.add(cell.cell_id)
            if runs_of_cell(finished, cell):
                est.done += 1
                continue
            config = with_num_classes(cell.config, expected_num_classes(cell.config.dataset,
                                                                        cell.config.model.num_classes))
            est.cells.append(_cell_estimate(est, cell, config, times, calibrate_here, macs_cache))
    return est


def _cell_estimate(est: GridEstimate, cell: Cell, config: ExperimentConfig, times, calibrate_here: bool,
                   macs_cache: dict) -> CellEstimate:
    epochs = config.train.epochs
    found = times.lookup(cell, config, est.device.type) if times is not None else None
    if found is not None:
        seconds, kind, _ = found
        return CellEstimate(cell, seconds * epochs, f"store: this {kind}")
    sizes = split_sizes(config)
    if sizes is None:
        return CellEstimate(cell, None, "unknown")
    n_train, n_test = sizes
    macs = _macs(config, macs_cache)
    flips = 2 if config.train.eval_flip else 1
    if calibrate_here:
        key = backbone_key(config)
        if key not in est.calibrations:
            est.calibrations[key] = calibrate(config, est.device)
        cal = est.calibrations[key]
        scale = macs / cal.macs if cal.macs else 1.0
        steps = max(1, n_train // config.train.batch_size)
        epoch = scale * (steps * cal.step_seconds + n_test * cal.eval_seconds_per_image * flips)
        return CellEstimate(cell, epoch * epochs, "calibration")
    cpu = est.device.type == "cpu"
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and cpu and _bf16_here(est.device))
    flops = est.assumed_flops(bf16 if cpu else None)
    epoch = macs * (n_train * TRAIN_FLOPS_PER_MAC + n_test * EVAL_FLOPS_PER_MAC * flips) / flops
    return CellEstimate(cell, epoch * epochs, "assumption")


def planning_device(spec: str) -> torch.device:
    """The device an estimate is for: `auto` as a run resolves it; a CUDA device also on a machine
    without one (a GPU run planned from a laptop); ValueError for a name torch does not know."""
    from ablations.util.device import resolve_device

    if spec.startswith("cuda"):
        try:
            return torch.device(spec)
        except RuntimeError as exc:
            raise ValueError(str(exc).splitlines()[0]) from None
    return resolve_device(spec)


def _existing_store(tracking_uri: str | None):
    """A client on the store, if it exists (an estimate never creates one); None otherwise."""
    if not tracking_uri:
        return None
    if tracking_uri.startswith("sqlite:///"):
        if not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
            return None
    elif "://" not in tracking_uri or tracking_uri.startswith("file:"):
        if not Path(tracking_uri.removeprefix("file://").removeprefix("file:")).is_dir():
            return None
    from ablations.tracking import client_for

    return client_for(tracking_uri)


# ----------------------------------------------------------------------------- the CPU warning


def cpu_warning(exps: ExperimentsFile, grids: Sequence[tuple[str, Sequence[Cell]]], device: torch.device, *,
                preset: str | None, tracking_uri: str | None, threads: int | None = None,
                resolve=None) -> str | None:
    """One line for a grid started on a CPU that will take longer than WARN_ABOVE_SECONDS, with the
    estimate and the preset that fits; None when it fits (or runs on a GPU). It never refuses.

    `resolve(preset)`: the grids' cells under another preset (to size the suggestion), None if they have none."""
    if device.type != "cpu":
        return None
    est = estimate_grids(grids, device, tracking_uri=tracking_uri, threads=threads)
    if est.seconds <= WARN_ABOVE_SECONDS:
        return None
    basis = "from epoch times in this store" if all(c.source.startswith("store") for c in est.cells) else \
        "an estimate from multiply-adds at an assumed CPU throughput; --dry-run says more"
    names = [name for name, _ in grids]
    which = f"grid {names[0]} is" if len(names) == 1 else f"grids {', '.join(names)} are"
    line = f"warning: {which} sized for a GPU: {est.describe()} ({basis})"
    cifar = all(c.config.dataset.name in ("cifar10", "cifar100") for _, cells in grids for c in cells)
    if preset != "cpu" and "cpu" in exps.presets and cifar:
        smaller = resolve("cpu") if resolve is not None else None
        small = estimate_grids(smaller, device, tracking_uri=tracking_uri, threads=threads) if smaller else None
        size = f": about {fmt_long(small.seconds / len(small.cells))} per cell" if small and small.cells else ""
        line += f"; --preset cpu fits this CPU{size}"
    elif preset != "smoke" and "smoke" in exps.presets:
        line += "; --preset smoke checks the pipeline in minutes (no preset trains these grids at CPU scale)"
    return line + "; going on"


__all__ = ["Calibration", "CellEstimate", "GridEstimate", "calibrate", "cpu_warning", "estimate_grids",
           "split_sizes"]
