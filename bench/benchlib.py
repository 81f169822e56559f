"""What the benchmarks share: device, machine, JSON output, the models, timed windows, and the plain PyTorch path.

- the device a benchmark was told to use, a sync for honest timings, the machine it ran on;
- standard JSON (no NaN) and number formatting;
- the CIFAR models the training benchmarks compare (MODELS) and the harness config around one;
- timed windows over training steps (StepWindow: a fixed number of steps; WallWindow: a wall-clock
  window shared by several processes) fed by the harness trainer's observer or the plain loop;
- the plain path: CIFAR-10 as a typical user loads it (torchvision dataset, or ImageFolder on the
  JPEG copy extracted once into the cache), DataLoader, fp32 model, loss.item() every step.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ablations.config import ExperimentConfig, TrainConfig
from ablations.data import CIFAR10_MEAN, CIFAR10_STD, Dataset, default_cache_dir, stratified_indices
from ablations.util.fs import build_once
from senet import build_model


DEVICE_HELP = "cpu | cuda | cuda:N, required: a GPU run must say so, and never falls back to the CPU"


def bench_device(spec: str) -> torch.device:
    """The device a benchmark was told to use. No 'auto': a GPU benchmark that quietly ran on the
    CPU would publish CPU figures as GPU figures. Exits 2 (one line) when CUDA is asked for and absent."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SystemExit(f"error: --device {spec}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {spec}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {spec}: CUDA is not available here (torch {torch.__version__}); "
                         "refusing to run on the CPU instead")
    return device


def preflight_cuda(device: torch.device, compile: bool = False) -> None:
    """Before a GPU benchmark: one real training step with the harness's GPU settings; exit 2 with the cause."""
    if device.type != "cuda":
        return
    from ablations.run.preflight import PreflightFailed, preflight

    from ablations.config import ExperimentConfig

    config = ExperimentConfig.model_validate({"model": {"arch": "resnet20", "num_classes": 10, "se": {"reduction": 4}},
                                              "train": {"batch_size": 128, "compile": compile}, "seed": 0})
    try:
        print(preflight(str(device), config), flush=True)
    except PreflightFailed as exc:
        raise SystemExit(f"preflight failed: {exc}") from None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Date, versions and machine, for the JSON and RESULTS.md."""
    import torchvision

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "host": platform.node(),
    }
    if device.type == "cuda":
        env.update(cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        env.update(loadavg_1_5_15=list(os.getloadavg()))
    return env


def extract_all(tar: tarfile.TarFile, dst: Path) -> None:
    try:
        tar.extractall(dst, filter="data")  # refuses absolute paths and links out of dst
    except TypeError:  # Python without extraction filters
        tar.extractall(dst)


def free_memory(device: torch.device) -> None:
    """Hand cached GPU memory back between measurements, so one model's leftovers do not crowd the next."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- JSON and numbers


def finite(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is standard (a one-seed std is NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def fmt_num(v: float | None, fmt: str = ".0f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    """Write `report` as standard JSON (NaN -> null) if a path was given, and say so."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(report), indent=2, allow_nan=False, default=str) + "\n")
    print(f"wrote {path}")


def end_report(report: dict[str, Any], t0: float, device: torch.device, json_out: Path | None) -> None:
    """The closing fields every training benchmark's JSON has (wall time; CPU load at the end), then the file."""
    report["wall_seconds"] = time.perf_counter() - t0
    if device.type != "cuda":
        report["environment"]["loadavg_end_1_5_15"] = list(os.getloadavg())
    print(f"\nwall time {report['wall_seconds']:.0f} s")
    write_json(json_out, report)


# --------------------------------------------------------------------------- the models compared

SPEED_LR = 0.02  # small and constant-ish: speed runs must not diverge, and lr does not change speed


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    arch: str
    reduction: int


MODELS = {
    m.key: m
    for m in (
        ModelSpec("se_resnet18_cifar", "SE-ResNet-18-CIFAR", "resnet18_cifar", 16),
        ModelSpec("se_resnet56", "SE-ResNet-56", "resnet56", 16),  # hidden widths 16/32/64 // 16 = 1/2/4
        ModelSpec("se_resnet20", "SE-ResNet-20", "resnet20", 16),  # the accuracy-parity model, and for tests
        ModelSpec("se_resnet10_cifar_w32", "SE-ResNet-10-w32", "resnet10_cifar_w32", 16),  # the cpu preset's backbone
    )
}


def make_model(spec: ModelSpec, num_classes: int = 10) -> nn.Module:
    return build_model({"arch": spec.arch, "num_classes": num_classes, "se": {"reduction": spec.reduction}})


def harness_config(spec: ModelSpec, tc: TrainConfig, root: Path, data: Dataset, seed: int) -> ExperimentConfig:
    """The cell config the harness trainer gets for `spec` on already loaded CIFAR-10 `data`."""
    return ExperimentConfig.model_validate({
        "dataset": {"name": "cifar10", "root": str(root), "train_size": len(data.train),
                    "test_size": len(data.test)},
        "model": {"arch": spec.arch, "num_classes": len(data.classes), "se": {"reduction": spec.reduction}},
        "train": tc.model_dump(),
        "seed": seed,
    })


# --------------------------------------------------------------------------- timed windows


class WindowDone(Exception):
    """Raised from a sync point once the timed window is complete; not a RuntimeError on purpose,
    so that the harness's OOM handling lets it through untouched."""


class Window:
    """Counts steps and images; `synced()` is called only right after a host sync (loss.item()),
    so that perf_counter there is a true timestamp on CUDA too."""

    def __init__(self) -> None:
        self.steps = 0
        self.images = 0
        self.start: tuple[int, int, float] | None = None  # (steps, images, time)
        self.stop: tuple[int, int, float] | None = None

    def step(self, n_images: int) -> None:
        self.steps += 1
        self.images += n_images

    def synced(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def measured(self) -> tuple[int, int, float]:
        """(steps, images, seconds) between the first and the last timestamp."""
        if self.start is None or self.stop is None or self.stop[2] <= self.start[2]:
            raise RuntimeError("the timed window saw fewer than two sync points; time more steps")
        return self.stop[0] - self.start[0], self.stop[1] - self.start[1], self.stop[2] - self.start[2]


class StepWindow(Window):
    """Times `timed` steps after `warmup` steps, then stops the run (WindowDone)."""

    def __init__(self, warmup: int, timed: int) -> None:
        super().__init__()
        self.warmup, self.timed = warmup, timed

    def synced(self) -> None:
        now = time.perf_counter()
        if self.start is None:
            if self.steps >= self.warmup:
                self.start = (self.steps, self.images, now)
        elif self.steps - self.start[0] >= self.timed:
            self.stop = (self.steps, self.images, now)
            raise WindowDone


class WallWindow(Window):
    """Times the sync points inside a wall-clock window [t_start, t_end] shared by several
    processes (time.time(), which all processes on one machine agree on). With `get_window`, the
    window is asked for at the first sync point, i.e. once this process is warmed up."""

    def __init__(self, t_start: float = math.inf, t_end: float = math.inf,
                 get_window: Callable[[], tuple[float, float]] | None = None) -> None:
        super().__init__()
        self.t_start, self.t_end = t_start, t_end
        self.get_window = get_window

    def synced(self) -> None:
        if self.get_window is not None:
            self.t_start, self.t_end = self.get_window()
            self.get_window = None
        now = time.time()
        if now < self.t_start:
            return
        point = (self.steps, self.images, now)
        if self.start is None:  # the first sync point at or after t_start
            self.start = point
            return
        if now <= self.t_end:
            self.stop = point
            return
        # Past the window. On a loaded machine a window may hold fewer than two sync points:
        # stretch it to this one rather than fail, so the measurement is slow, never missing.
        if self.stop is None:
            self.stop = point
        raise WindowDone  # keep the last point inside the window as `stop`


class HarnessObserver:
    """ablations.train Observer: on_step gets a loss only right after the trainer's host sync."""

    def __init__(self, window: Window, batch_size: int) -> None:
        self.window, self.batch_size = window, batch_size

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        self.window.step(self.batch_size)  # the harness drops the last partial batch
        if loss is not None:
            self.window.synced()

    def on_epoch(self, stats: Any) -> None:
        self.window.synced()  # evaluate() has just read its counts with .item()


# --------------------------------------------------------------------------- the plain PyTorch path


def extract_once(archive: Path, cache: Path) -> Path:
    """Unpack the CIFAR JPEG archive into the cache once (keyed by its path, size and mtime), as a
    user without the torchvision files would; returns the `cifar10-jpeg` tree. Never writes next to
    the archive; concurrent runs (the packing sweep's processes) extract it once, under a lock."""
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache / f"bench-imagefolder-{key}"
    tree = final / "cifar10-jpeg"
    if (tree / "train").is_dir():
        return tree

    def unpack(tmp: Path) -> None:
        with tarfile.open(archive, "r:*") as tar:
            extract_all(tar, tmp)
        if not (tmp / "cifar10-jpeg" / "train").is_dir():
            raise FileNotFoundError(f"{archive}: no cifar10-jpeg/train/ inside")

    build_once(final, lambda f: (f / "cifar10-jpeg" / "train").is_dir(), unpack)  # a half-extracted tree is never visible
    return tree


def plain_transform() -> Any:
    import torchvision.transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


class CIFAR10Style(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 is once loaded: uint8 (N, 32, 32, 3) in memory, one PIL image per
    item through the transforms. Offline, the plain loop reads the decoded JPEG copy through it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        self.data, self.targets, self.transform = np.asarray(images), [int(t) for t in labels], transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def plain_train_set(root: Path, cache: Path | None = None,
                    cifar_style: bool = False) -> tuple[torch.utils.data.Dataset, str]:
    """CIFAR-10's training set as a typical user loads it, and a line saying which copy was used.
    Offline, `cifar_style` serves the JPEG copy the way torchvision's CIFAR10 serves its own (else ImageFolder)."""
    import torchvision

    root = root.expanduser().resolve()
    if (root / "cifar-10-batches-py").is_dir():
        ds = torchvision.datasets.CIFAR10(str(root), train=True, download=False, transform=plain_transform())
        return ds, f"torchvision.datasets.CIFAR10({root})"
    if cifar_style:  # offline: the same in-memory uint8 Dataset as torchvision's CIFAR10, from the decoded copy
        from ablations.data import load_dataset

        data = load_dataset("cifar10", root, download=False)
        return (CIFAR10Style(data.train.images, data.train.labels, plain_transform()),
                f"a torchvision.datasets.CIFAR10-style Dataset (uint8 arrays in memory, PIL per item) on {data.source}")
    tree = root / "cifar10-jpeg"
    how = "JPEG tree"
    if not (tree / "train").is_dir():
        archive = root / "cifar10-jpeg.tar.gz"
        if not archive.is_file():
            raise FileNotFoundError(f"{root}: neither cifar-10-batches-py/, cifar10-jpeg/ nor cifar10-jpeg.tar.gz")
        start = time.perf_counter()
        tree = extract_once(archive, cache or default_cache_dir())
        how = f"{archive.name} extracted once into the cache ({time.perf_counter() - start:.1f} s this run)"
    ds = torchvision.datasets.ImageFolder(str(tree / "train"), transform=plain_transform())
    return ds, f"torchvision.datasets.ImageFolder({tree / 'train'}) [{how}]"


PLAIN_RECIPE = ("RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, "
                "DataLoader(shuffle=True, num_workers={workers}), fp32, loss.item() every step, SGD momentum 0.9")


def plain_loader(ds: torch.utils.data.Dataset, batch_size: int, workers: int, seed: int,
                 subset: int | None = None) -> torch.utils.data.DataLoader:
    if subset is not None:
        ds = torch.utils.data.Subset(ds, stratified_indices(ds.targets, subset, seed).tolist())  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, generator=gen)


def plain_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov,
                           weight_decay=tc.weight_decay)


def plain_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, opt: torch.optim.Optimizer,
                device: torch.device, label_smoothing: float = 0.0, sched: Any = None,
                window: Window | None = None, bf16: bool = False) -> tuple[int, float]:
    """One epoch of the textbook loop; returns (images, mean loss). `bf16`: the same loop with bf16 autocast
    and channels_last (the model must already be channels_last), as a user adds them to a plain loop."""
    model.train()
    seen, loss_sum = 0, 0.0
    layout = torch.channels_last if bf16 else torch.contiguous_format
    for x, y in loader:
        x, y = x.to(device, memory_format=layout), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += loss.item() * len(y)  # the host sync every step that a typical loop has
        seen += len(y)
        if window is not None:
            window.step(len(y))
            window.synced()
    return seen, loss_sum / max(1, seen)
