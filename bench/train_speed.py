"""Training speed: a plain PyTorch CIFAR-10 loop vs the harness trainer, side by side (issue #6).

    python bench/train_speed.py [--quick] --device cpu|cuda [--data-root ../shared/data]
                                [--epochs N] [--accuracy] [--workers-per-gpu-sweep 1,2,4]
                                [--json-out PATH]

(a) plain:   torchvision CIFAR10 (or, offline, ImageFolder on the JPEG copy extracted once into the
             cache), RandomCrop(32, 4) + flip + ToTensor + Normalize, DataLoader(shuffle=True,
             num_workers=4), fp32, loss.item() every step, torch.optim.SGD with momentum.
(b) harness: ablations.train.train on ablations.data.load_dataset (uint8 data resident on the GPU,
             augmentation on the GPU, bf16 autocast + channels_last on CUDA, fused SGD).

Both run the same models (SE-ResNet-18-CIFAR and SE-ResNet-56, r = 16), batch size and optimizer
settings. Images/s count training only and exclude warm-up: with --epochs (default on a GPU) the
first epoch; in steps mode (--quick, and always on a CPU) the first --warmup-steps steps of one
short epoch, s/epoch then being extrapolated to the full training set and labelled so. Also printed:
the SE overhead of SE-ResNet-50 at 224x224 (forward+backward, synthetic data, timed with
bench/se_overhead.py's step_time) against the paper's +10%, MFU against the GPU's bf16 dense peak,
optionally (--accuracy) test error of both paths after a short run, and (--workers-per-gpu-sweep)
the aggregate images/s of K concurrent harness processes on one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):  # runnable as a script without installing the package
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import benchlib  # noqa: E402  (bench/benchlib.py)
import se_overhead  # noqa: E402  (bench/se_overhead.py: step_time)
from ablations.config import ExperimentConfig, TrainConfig  # noqa: E402
from ablations.data import (CIFAR10_MEAN, CIFAR10_STD, WORKERS_PER_DEVICE_ENV, Dataset, default_cache_dir,  # noqa: E402
                           load_dataset)
from ablations.util.fs import build_once  # noqa: E402
from ablations.train import evaluate, lr_at, seed_everything  # noqa: E402
from ablations.train import train as harness_train  # noqa: E402
from senet import build_model, complexity  # noqa: E402

PAPER_SE_OVERHEAD_PCT = 10.0  # Section 4: 190 -> 209 ms forward+backward, ResNet-50 vs SE-ResNet-50
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
        ModelSpec("se_resnet20", "SE-ResNet-20", "resnet20", 16),  # the --accuracy model, and for tests
    )
}
DEFAULT_MODELS = ("se_resnet18_cifar", "se_resnet56")

# bf16 dense tensor-core peak, TFLOP/s: (substring of the device name, substrings of which one must
# also occur (empty: none needed), peak). First match wins; H100 NVL etc. are deliberately absent.
PEAK_BF16_TFLOPS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("H100", ("PCIE",), 756.0),
    ("H100", ("SXM", "HBM3"), 989.0),
    ("H200", (), 989.0),
    ("A100", (), 312.0),
)


# --------------------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class Timing:
    """How a speed run is timed: whole epochs (first one warm-up) or a fixed number of steps."""

    mode: str  # "epochs" | "steps"
    batch_size: int
    epochs: int = 3  # epochs mode: total, the first excluded
    warmup_steps: int = 2  # steps mode
    timed_steps: int = 4

    @property
    def subset_size(self) -> int | None:
        """Steps mode trains one short epoch over exactly warm-up + timed steps of images."""
        return (self.warmup_steps + self.timed_steps) * self.batch_size if self.mode == "steps" else None


@dataclass
class Speed:
    images_per_s: float
    seconds_per_epoch: float  # training only (no evaluation), for `epoch_images` images
    extrapolated: bool  # True: seconds_per_epoch = epoch_images / images_per_s, not measured
    epoch_images: int
    timed_images: int
    timed_seconds: float
    timed_steps: int


class WindowDone(Exception):
    """Raised from a sync point once the timed window is complete; not a RuntimeError on purpose,
    so that the harness's OOM handling lets it through untouched."""


class _Window:
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


class StepWindow(_Window):
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


class WallWindow(_Window):
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

    def __init__(self, window: _Window, batch_size: int) -> None:
        self.window, self.batch_size = window, batch_size

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        self.window.step(self.batch_size)  # the harness drops the last partial batch
        if loss is not None:
            self.window.synced()

    def on_epoch(self, stats: Any) -> None:
        self.window.synced()  # evaluate() has just read its counts with .item()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_model(spec: ModelSpec, num_classes: int = 10) -> nn.Module:
    return build_model({"arch": spec.arch, "num_classes": num_classes, "se": {"reduction": spec.reduction}})


def speed_train_config(timing: Timing, compile_: bool = False) -> TrainConfig:
    """The optimizer settings both paths use in speed runs (the plain path reads lr, momentum,
    nesterov and weight decay from it; precision/channels_last/compile are the harness's)."""
    return TrainConfig(epochs=timing.epochs if timing.mode == "epochs" else 1, batch_size=timing.batch_size,
                       lr=SPEED_LR, momentum=0.9, nesterov=True, weight_decay=5e-4, label_smoothing=0.0,
                       schedule="cosine", warmup_epochs=0.0, compile=compile_)


# --------------------------------------------------------------------------- (a) the plain loop


def extract_once(archive: Path, cache: Path) -> Path:
    """Unpack the CIFAR JPEG archive into the cache once (keyed by its path, size and mtime), as a
    user without the torchvision files would; returns the `cifar10-jpeg` tree. Never writes next to
    the archive; concurrent runs (the sweep's processes) extract it once, under a lock."""
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache / f"bench-imagefolder-{key}"
    tree = final / "cifar10-jpeg"
    if (tree / "train").is_dir():
        return tree

    def unpack(tmp: Path) -> None:
        with tarfile.open(archive, "r:*") as tar:
            benchlib.extract_all(tar, tmp)
        if not (tmp / "cifar10-jpeg" / "train").is_dir():
            raise FileNotFoundError(f"{archive}: no cifar10-jpeg/train/ inside")

    build_once(final, lambda f: (f / "cifar10-jpeg" / "train").is_dir(), unpack)  # a half-extracted tree is never visible
    return tree


def plain_transform() -> Any:
    import torchvision.transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def plain_train_set(root: Path, cache: Path | None = None) -> tuple[torch.utils.data.Dataset, str]:
    """CIFAR-10's training set as a typical user loads it, and a line saying which copy was used."""
    import torchvision

    root = root.expanduser().resolve()
    if (root / "cifar-10-batches-py").is_dir():
        ds = torchvision.datasets.CIFAR10(str(root), train=True, download=False, transform=plain_transform())
        return ds, f"torchvision.datasets.CIFAR10({root})"
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


def stratified_indices(targets: Sequence[int], size: int, seed: int) -> list[int]:
    """`size` indices spread evenly over the classes, seeded (the plain path's subsets)."""
    targets_np = np.asarray(targets)
    rng = np.random.default_rng(seed)
    classes = np.unique(targets_np)
    per_class = [rng.permutation(np.flatnonzero(targets_np == c)) for c in classes]
    quota = [size // len(classes) + (i < size % len(classes)) for i in range(len(classes))]
    if any(q > len(p) for q, p in zip(quota, per_class)):
        raise ValueError(f"subset of {size} is larger than the data")
    return sorted(int(i) for p, q in zip(per_class, quota) for i in p[:q])


def plain_loader(ds: torch.utils.data.Dataset, batch_size: int, workers: int, seed: int,
                 subset: int | None = None) -> torch.utils.data.DataLoader:
    if subset is not None:
        ds = torch.utils.data.Subset(ds, stratified_indices(ds.targets, subset, seed))  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, generator=gen)


def plain_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov,
                           weight_decay=tc.weight_decay)


def plain_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, opt: torch.optim.Optimizer,
                device: torch.device, label_smoothing: float = 0.0, sched: Any = None,
                window: _Window | None = None) -> tuple[int, float]:
    """One epoch of the textbook loop; returns (images, mean loss)."""
    model.train()
    seen, loss_sum = 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
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


def plain_speed(spec: ModelSpec, ds: torch.utils.data.Dataset, device: torch.device, timing: Timing,
                workers: int, seed: int = 0) -> Speed:
    """Images/s of the plain loop (fp32, contiguous) on `spec`."""
    seed_everything(seed)
    model = make_model(spec).to(device)
    tc = speed_train_config(timing)
    opt = plain_optimizer(model, tc)
    full = len(ds)  # type: ignore[arg-type]
    if timing.mode == "steps":
        loader = plain_loader(ds, timing.batch_size, workers, seed, subset=timing.subset_size)
        window = StepWindow(timing.warmup_steps, timing.timed_steps)
        with contextlib.suppress(WindowDone):
            plain_epoch(model, loader, opt, device, window=window)
        steps, images, seconds = window.measured()
        del loader  # shuts its workers down
        return Speed(images / seconds, full * seconds / images, True, full, images, seconds, steps)
    loader = plain_loader(ds, timing.batch_size, workers, seed)
    times, counts = [], []
    for _ in range(timing.epochs):
        benchlib.sync(device)
        start = time.perf_counter()  # worker start-up included: it is part of every epoch here
        seen, _ = plain_epoch(model, loader, opt, device)
        benchlib.sync(device)
        times.append(time.perf_counter() - start)
        counts.append(seen)
    images, seconds = sum(counts[1:]), sum(times[1:])
    del model, opt
    _free(device)
    return Speed(images / seconds, seconds / len(times[1:]), False, counts[-1], images, seconds,
                 len(times[1:]) * len(loader))


# --------------------------------------------------------------------------- (b) the harness


def harness_data(root: Path, timing: Timing, test_size: int | None = None) -> Dataset:
    return load_dataset("cifar10", root, train_size=timing.subset_size, test_size=test_size)


def harness_config(spec: ModelSpec, tc: TrainConfig, root: Path, data: Dataset, seed: int) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "dataset": {"name": "cifar10", "root": str(root), "train_size": len(data.train),
                    "test_size": len(data.test)},
        "model": {"arch": spec.arch, "num_classes": len(data.classes), "se": {"reduction": spec.reduction}},
        "train": tc.model_dump(),
        "seed": seed,
    })


def harness_speed(spec: ModelSpec, data: Dataset, root: Path, device: torch.device, timing: Timing,
                  full_train_size: int, compile_: bool = False, seed: int = 0) -> Speed:
    """Images/s of ablations.train.train on `spec`: the harness's own per-epoch figure (epochs
    mode) or a StepWindow fed by its observer (steps mode)."""
    tc = speed_train_config(timing, compile_)
    cfg = harness_config(spec, tc, root, data, seed)
    seed_everything(seed)
    model = make_model(spec, len(data.classes))
    if timing.mode == "steps":
        window = StepWindow(timing.warmup_steps, timing.timed_steps)
        # sync points fall exactly on the warm-up's last step and the window's last step
        every = math.gcd(timing.warmup_steps, timing.timed_steps)
        with contextlib.suppress(WindowDone):
            harness_train(cfg, model, data, device, observer=HarnessObserver(window, tc.batch_size), sync_every=every)
        steps, images, seconds = window.measured()
        del model
        _free(device)
        return Speed(images / seconds, full_train_size * seconds / images, True, full_train_size,
                     images, seconds, steps)
    result = harness_train(cfg, model, data, device)
    timed = result.history[1:]
    epoch_images = (len(data.train) // tc.batch_size) * tc.batch_size
    seconds = sum(epoch_images / s.images_per_s for s in timed)
    images = epoch_images * len(timed)
    del model, result
    _free(device)
    return Speed(images / seconds, seconds / len(timed), False, epoch_images, images, seconds,
                 len(timed) * (len(data.train) // tc.batch_size))


# --------------------------------------------------------------------------- MFU, SE overhead


def peak_for_name(name: str) -> float | None:
    """bf16 dense peak FLOP/s of a GPU from its torch.cuda.get_device_name, or None if unknown."""
    upper = name.upper()
    for family, variants, tflops in PEAK_BF16_TFLOPS:
        if family in upper and (not variants or any(v in upper for v in variants)):
            return tflops * 1e12
    return None


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, description), or (None, why MFU is n/a)."""
    if device.type != "cuda":
        return None, "n/a: no GPU (MFU is measured against a GPU's bf16 tensor-core peak)"
    name = torch.cuda.get_device_name(device)
    peak = peak_for_name(name)
    if peak is None:
        return None, f"n/a: {name} is not in the bf16 peak table"
    return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s bf16 dense"


def training_flops_per_image(spec: ModelSpec) -> float:
    """3 x forward multiply-adds x 2 FLOPs (forward + backward ~ 2x forward), counted on meta."""
    with torch.device("meta"):
        model = make_model(spec)
    return 3 * 2 * complexity(model, (3, 32, 32)).macs


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    return None if peak is None else images_per_s * flops_per_image / peak


def se_overhead_timing(device: torch.device, batch: int, repeats: int, size: int = 224,
                       bf16: bool = False) -> dict[str, Any]:
    """Median forward+backward ms of ResNet-50 vs SE-ResNet-50 (r=16) on synthetic data, alternating
    the two models so drift hits both alike (se_overhead.step_time does the synced timing)."""
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    torch.manual_seed(0)
    models = {
        "resnet50": build_model({"arch": "resnet50"}).to(device, memory_format=fmt),
        "se_resnet50": build_model({"arch": "resnet50", "se": {"reduction": 16}}).to(device, memory_format=fmt),
    }
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)

    def timed(m: nn.Module) -> float:
        m.zero_grad(set_to_none=True)  # outside the timed region, as in a training step
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            return se_overhead.step_time(m, x, True)

    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
        timed(m)  # warm-up: allocator, cuDNN algorithm choice
    for _ in range(repeats):
        for k, m in models.items():
            times[k].append(timed(m))
    base, se = (statistics.median(times[k]) for k in models)
    macs = {k: complexity(m, (3, size, size)).macs for k, m in models.items()}
    del models, x
    _free(device)
    return {
        "precision": "bf16 autocast + channels_last" if bf16 else "fp32",
        "batch": batch, "size": size, "repeats": repeats,
        "resnet50_ms": 1e3 * base, "se_resnet50_ms": 1e3 * se,
        "overhead_pct": 100 * (se / base - 1), "paper_pct": PAPER_SE_OVERHEAD_PCT,
        "macs_overhead_pct": 100 * (macs["se_resnet50"] / macs["resnet50"] - 1),
    }


# --------------------------------------------------------------------------- correctness: accuracy


def plain_fit(model: nn.Module, loader: torch.utils.data.DataLoader, tc: TrainConfig, device: torch.device) -> None:
    """The plain loop with the harness's recipe (same per-step LR schedule), for a like-for-like error."""
    opt = plain_optimizer(model, tc)
    steps = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps * tc.epochs, tc, steps) / tc.lr)
    for _ in range(tc.epochs):
        plain_epoch(model, loader, opt, device, tc.label_smoothing, sched)


def top1_error(model: nn.Module, data: Dataset, device: torch.device, batch: int) -> float:
    """Top-1 % on the harness's test split, fp32: the same images and evaluator for both paths."""
    top1, _ = evaluate(model, data, device, batch, torch.float32, False, contextlib.nullcontext)
    return top1


def accuracy_check(root: Path, plain_ds: torch.utils.data.Dataset, device: torch.device, tc: TrainConfig,
                   seeds: Sequence[int], workers: int, train_size: int | None, test_size: int | None,
                   spec: ModelSpec = MODELS["se_resnet20"], log: Any = print) -> dict[str, Any]:
    """Train `spec` with each path and seed; compare mean test errors against the seed spread."""
    data = load_dataset("cifar10", root, train_size=train_size, test_size=test_size)
    errors: dict[str, list[float]] = {"plain": [], "harness": []}
    for seed in seeds:
        start = time.perf_counter()
        seed_everything(seed)
        model = make_model(spec).to(device)
        plain_fit(model, plain_loader(plain_ds, tc.batch_size, workers, seed, subset=train_size), tc, device)
        errors["plain"].append(top1_error(model, data, device, 2 * tc.batch_size))
        mid = time.perf_counter()
        seed_everything(seed)
        cfg = harness_config(spec, tc, root, data, seed)
        result = harness_train(cfg, make_model(spec), data, device)
        errors["harness"].append(top1_error(result.model, data, device, 2 * tc.batch_size))
        log(f"  seed {seed}: plain {errors['plain'][-1]:.2f}% ({mid - start:.0f} s), "
            f"harness {errors['harness'][-1]:.2f}% ({time.perf_counter() - mid:.0f} s)")
        del model, result
        _free(device)
    mean = {k: statistics.mean(v) for k, v in errors.items()}
    std = {k: statistics.stdev(v) if len(v) > 1 else float("nan") for k, v in errors.items()}
    pooled = math.sqrt((std["plain"] ** 2 + std["harness"] ** 2) / 2)
    diff = mean["harness"] - mean["plain"]
    return {
        "model": spec.label, "epochs": tc.epochs, "batch_size": tc.batch_size, "lr": tc.lr,
        "train_images": len(data.train), "test_images": len(data.test), "seeds": list(seeds),
        "errors_pct": errors, "mean_pct": mean, "std_pct": std, "diff_pct": diff, "pooled_std_pct": pooled,
        "within_2std": bool(abs(diff) <= 2 * pooled) if math.isfinite(pooled) else None,
    }


# --------------------------------------------------------------------------- several cells per GPU


def _window_from_parent() -> tuple[float, float]:
    """The sweep protocol, child side: say READY (warmed up), read 't_start t_end' from stdin."""
    print("READY", flush=True)
    t_start, t_end = (float(v) for v in sys.stdin.readline().split())
    return t_start, t_end


def single_main(args: argparse.Namespace) -> int:
    """--single: one harness process of the sweep. Trains until its first host sync (data upload,
    cuDNN algorithm choice and compilation are behind it then), prints READY, reads the common
    window 't_start t_end' (epoch seconds) from stdin, trains through it, prints 'RESULT <json>'."""
    device = benchlib.bench_device(args.device)
    root = Path(args.data_root)
    spec = MODELS[args.single_model]
    data = load_dataset("cifar10", root, test_size=args.single_test_size, train_size=args.single_train_size)
    tc = TrainConfig(epochs=10_000, batch_size=args.batch_size or 512, lr=SPEED_LR, nesterov=True,
                     label_smoothing=0.0, compile=args.compile)
    cfg = harness_config(spec, tc, root, data, seed=os.getpid() % 1000)
    window = WallWindow(get_window=_window_from_parent)
    out: dict[str, Any]
    try:
        with contextlib.suppress(WindowDone):  # on a CPU every step is synchronous: stamp each one
            harness_train(cfg, make_model(spec, len(data.classes)), data, device,
                          observer=HarnessObserver(window, tc.batch_size),
                          sync_every=50 if device.type == "cuda" else 1)
        steps, images, seconds = window.measured()
        out = {"images_per_s": images / seconds, "images": images, "seconds": seconds, "steps": steps}
    except Exception as exc:  # reported to the parent, which carries on with the next K
        if window.get_window is not None:
            print("READY", flush=True)  # failed before warming up: keep the parent's protocol going
        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _read_tagged(proc: subprocess.Popen, tag: str) -> str | None:
    """The rest of the first stdout line starting with `tag`, or None if the process ended first."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(tag):
            return line[len(tag):].strip()
    return None


def workers_sweep(ks: Sequence[int], device: torch.device, root: Path, batch_size: int, warmup_s: float,
                  window_s: float, compile_: bool = False, spec_key: str = "se_resnet18_cifar",
                  train_size: int | None = None, test_size: int = 1000, log: Any = print) -> list[dict[str, Any]]:
    """For each K: K `--single` processes started together; once all have warmed up (READY),
    all are timed over the same wall-clock window; images/s per process and their sum."""
    rows = []
    for k in ks:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--single", "--device", str(device),
               "--data-root", str(root), "--batch-size", str(batch_size), "--single-model", spec_key,
               "--single-test-size", str(test_size)]
        cmd += ["--single-train-size", str(train_size)] if train_size else []
        cmd += ["--compile"] if compile_ else []
        env = {**os.environ, WORKERS_PER_DEVICE_ENV: str(k)}  # as --workers-per-gpu K: data sized to 1/K of the GPU
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(k)]
        results: list[dict[str, Any]] = []
        try:
            ready = [_read_tagged(p, "READY") is not None for p in procs]
            t_start = time.time() + warmup_s  # all are warmed up; let the last one reach steady state
            t_end = t_start + window_s
            for p, ok in zip(procs, ready):
                if ok:
                    assert p.stdin is not None
                    with contextlib.suppress(OSError):  # a child that failed early has gone already
                        p.stdin.write(f"{t_start} {t_end}\n")
                        p.stdin.flush()
            for p, ok in zip(procs, ready):
                text = _read_tagged(p, "RESULT ") if ok else None
                results.append(json.loads(text) if text else {"error": f"process exited with {p.wait()}"})
        finally:
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=60)
                if p.poll() is None:
                    p.kill()  # only the processes started here
                    p.wait()
                for pipe in (p.stdin, p.stdout):
                    with contextlib.suppress(OSError):
                        pipe.close()
        rates = [r["images_per_s"] for r in results if "images_per_s" in r]
        row = {"k": k, "per_process_images_per_s": rates,
               "aggregate_images_per_s": sum(rates) if len(rates) == k else None,
               "errors": [r["error"] for r in results if "error" in r]}
        log(f"  K={k}: aggregate {_num(row['aggregate_images_per_s'])} images/s "
            f"(per process: {', '.join(f'{r:.0f}' for r in rates) or '-'})"
            + (f"  errors: {row['errors']}" if row["errors"] else ""))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the report


def _num(v: float | None, fmt: str = ".0f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)


def finite(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is standard (a one-seed std is NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def print_model(label: str, gmacs: float, timing: Timing, row: dict[str, Any], peak_note: str) -> None:
    print(f"\n{label}  ({gmacs:.3f} GMAC/image forward, batch {timing.batch_size})")
    print(f"  {'path':8s} {'images/s':>10s} {'s/epoch (train)':>26s} {'timed':>18s} {'MFU':>8s}")
    for path in ("plain", "harness"):
        s = row[path]
        per_epoch = f"{s['seconds_per_epoch']:.1f}" + (" (extrapolated)" if s["extrapolated"] else "")
        what = f"{s['timed_steps']} steps {s['timed_seconds']:.1f}s"
        m = row["mfu"][path]
        print(f"  {path:8s} {s['images_per_s']:10.1f} {per_epoch:>26s} {what:>18s} "
              f"{(f'{100 * m:.1f}%' if m is not None else 'n/a'):>8s}")
    print(f"  harness/plain images/s: {row['ratio']:.2f}x" + ("" if row["mfu"]["plain"] is not None else
                                                               f"   (MFU {peak_note})"))


def parse_ks(text: str) -> list[int]:
    ks = [int(v) for v in text.split(",") if v.strip()]
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 1,2,4")
    return ks


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="steps mode on a subset; minutes on a 2-core CPU")
    ap.add_argument("--device", required=True, help=benchlib.DEVICE_HELP)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--epochs", type=int, help="epochs mode with N epochs (first one warm-up); default 3 on a GPU")
    ap.add_argument("--steps", type=int, help="steps mode: timed steps (default: 4 CPU quick, 10 CPU, 50 GPU)")
    ap.add_argument("--warmup-steps", type=int, help="steps mode: untimed steps first (default 2 CPU, 20 GPU)")
    ap.add_argument("--batch-size", type=int, help="both paths (default 512 on a GPU, 16 on a CPU)")
    ap.add_argument("--plain-workers", type=int, help="DataLoader workers (default 4; min(4, cores) with --quick on CPU)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--compile", action="store_true", help="harness with torch.compile (train.compile=true)")
    ap.add_argument("--se-batch", type=int, help="SE overhead batch (default 64 GPU, 2 CPU)")
    ap.add_argument("--se-repeats", type=int, help="SE overhead repeats (default 10 GPU, 3 CPU)")
    ap.add_argument("--se-size", type=int, default=224)
    ap.add_argument("--no-se-overhead", action="store_true")
    ap.add_argument("--accuracy", action="store_true", help="short training of SE-ResNet-20 with both paths")
    ap.add_argument("--acc-seeds", type=int, default=2)
    ap.add_argument("--acc-epochs", type=int, help="default 10 GPU, 4 CPU")
    ap.add_argument("--acc-train-size", type=int, help="default all on a GPU, 2000 on a CPU")
    ap.add_argument("--acc-test-size", type=int, help="default all on a GPU, 1000 on a CPU")
    ap.add_argument("--workers-per-gpu-sweep", type=parse_ks, metavar="K,K,...",
                    help="CUDA only: K concurrent harness processes of SE-ResNet-18-CIFAR on one GPU")
    ap.add_argument("--sweep-warmup", type=float, default=5.0,
                    help="seconds between all processes being warmed up and the common window (default 5)")
    ap.add_argument("--sweep-window", type=float, help="seconds of the common timed window (default 20; 10 --quick)")
    ap.add_argument("--sweep-on-cpu", action="store_true", help=argparse.SUPPRESS)  # tests of the machinery only
    ap.add_argument("--json-out", type=Path, help="also write the numbers as JSON")
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one process of the sweep
    ap.add_argument("--single-model", default="se_resnet18_cifar", help=argparse.SUPPRESS)
    ap.add_argument("--single-test-size", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--single-train-size", type=int, help=argparse.SUPPRESS)
    return ap


def choose_timing(args: argparse.Namespace, cuda: bool) -> Timing:
    batch = args.batch_size or (512 if cuda else 16)
    if args.epochs is not None or (cuda and not args.quick and args.steps is None):
        epochs = args.epochs or 3
        if epochs < 2:
            raise SystemExit("--epochs must be >= 2: the first epoch is warm-up and not timed")
        return Timing("epochs", batch, epochs=epochs)
    timed = args.steps or (50 if cuda else 4 if args.quick else 10)
    warmup = args.warmup_steps or (20 if cuda else 2)
    return Timing("steps", batch, warmup_steps=warmup, timed_steps=timed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.single:
        return single_main(args)
    t0 = time.perf_counter()
    device = benchlib.bench_device(args.device)
    cuda = device.type == "cuda"
    benchlib.preflight_cuda(device, args.compile)
    root = Path(args.data_root).expanduser().resolve()
    timing = choose_timing(args, cuda)
    workers = args.plain_workers if args.plain_workers is not None else (
        min(4, os.cpu_count() or 1) if args.quick and not cuda else 4)
    specs = [MODELS[k.strip()] for k in args.models.split(",") if k.strip()]
    env = benchlib.environment(device)
    peak, peak_note = bf16_peak(device)
    print(f"device {device} ({env['device_name']}), torch {env['torch']}, CUDA {env['cuda']}, "
          f"threads {env['cpu_threads']}, {env['date']}"
          + (f", load average {env['loadavg_1_5_15'][0]:.2f}" if not cuda else ""))
    if timing.mode == "epochs":
        print(f"timing: {timing.epochs} full epochs per path and model, the first excluded as warm-up")
    else:
        print(f"timing: steps mode - one epoch over a {timing.subset_size}-image subset: {timing.warmup_steps} "
              f"warm-up steps, then {timing.timed_steps} timed steps; s/epoch extrapolated to the full train set")

    start = time.perf_counter()
    plain_ds, plain_source = plain_train_set(root)
    print(f"plain:   {plain_source}, {len(plain_ds)} train images ({time.perf_counter() - start:.1f} s)")  # type: ignore[arg-type]
    print(f"         RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, "
          f"DataLoader(shuffle=True, num_workers={workers}), fp32, loss.item() every step, SGD momentum 0.9")
    start = time.perf_counter()
    data = harness_data(root, timing, test_size=None if timing.mode == "epochs" else 10)
    full_train = len(plain_ds)  # type: ignore[arg-type]
    tc = speed_train_config(timing, args.compile)
    print(f"harness: ablations.data.load_dataset -> {data.source} ({time.perf_counter() - start:.1f} s); "
          f"ablations.train.train: {'bf16 autocast + channels_last' if cuda else 'fp32 (CPU)'}, "
          f"{'fused' if cuda else 'foreach'} SGD, compile={tc.compile}")

    report: dict[str, Any] = {"environment": env, "timing": asdict(timing) | {"subset_size": timing.subset_size},
                              "plain_source": plain_source, "plain_workers": workers,
                              "harness_source": data.source, "peak_bf16": {"flops": peak, "note": peak_note},
                              "models": []}
    for spec in specs:
        flops = training_flops_per_image(spec)
        plain = plain_speed(spec, plain_ds, device, timing, workers)
        harness = harness_speed(spec, data, root, device, timing, full_train, args.compile)
        row = {"key": spec.key, "label": spec.label, "arch": spec.arch, "se_reduction": spec.reduction,
               "gmacs_forward": flops / 6e9, "training_flops_per_image": flops,
               "plain": asdict(plain), "harness": asdict(harness),
               "ratio": harness.images_per_s / plain.images_per_s,
               "mfu": {"plain": mfu(plain.images_per_s, flops, peak), "harness": mfu(harness.images_per_s, flops, peak)}}
        report["models"].append(row)
        print_model(spec.label, flops / 6e9, timing, row, peak_note)
    print(f"\nMFU = images/s x 3 x 2 x forward multiply-adds / bf16 dense peak; {peak_note}")

    if not args.no_se_overhead:
        batch, repeats = args.se_batch or (64 if cuda else 2), args.se_repeats or (10 if cuda else 3)
        print(f"\nSE overhead, SE-ResNet-50 vs ResNet-50, forward+backward, {args.se_size}x{args.se_size} "
              f"synthetic, batch {batch}, median of {repeats}:")
        report["se_overhead"] = []
        for bf16 in ((False, True) if cuda else (False,)):
            r = se_overhead_timing(device, batch, repeats, args.se_size, bf16)
            report["se_overhead"].append(r)
            print(f"  {r['precision']:30s} ResNet-50 {r['resnet50_ms']:8.1f} ms  SE-ResNet-50 {r['se_resnet50_ms']:8.1f} ms"
                  f"  overhead {r['overhead_pct']:+5.1f}%  (paper: +{PAPER_SE_OVERHEAD_PCT:.0f}% GPU; "
                  f"multiply-adds {r['macs_overhead_pct']:+.2f}%)")
        if not cuda:
            print("  (CPU timing; the paper's +10% is for GPUs, its CPU figure is +1.8% for inference)")

    if args.workers_per_gpu_sweep:
        if cuda or args.sweep_on_cpu:
            warm = args.sweep_warmup
            window = args.sweep_window or (10.0 if args.quick else 20.0)
            print(f"\nSeveral cells per GPU: K concurrent harness processes of SE-ResNet-18-CIFAR, batch "
                  f"{timing.batch_size}; each warms up to its first host sync (50 steps), then {warm:.0f} s, "
                  f"then all are timed over the same {window:.0f} s window "
                  f"(train images/s; evaluation of a 1000-image test subset per epoch included)")
            report["workers_per_gpu"] = workers_sweep(args.workers_per_gpu_sweep, device, root, timing.batch_size,
                                                      warm, window, args.compile)
        else:
            msg = "skipped: needs CUDA (K processes sharing one GPU; on a CPU they would only split the same cores)"
            print(f"\nSeveral cells per GPU: {msg}")
            report["workers_per_gpu"] = {"skipped": msg}

    if args.accuracy:
        atc = TrainConfig(epochs=args.acc_epochs or (10 if cuda else 4), batch_size=512 if cuda else 64,
                          lr=0.4 if cuda else 0.1, nesterov=True, weight_decay=5e-4, label_smoothing=0.0,
                          schedule="cosine", warmup_epochs=1.0 if cuda else 0.0)
        train_size = args.acc_train_size or (None if cuda else 2000)
        test_size = args.acc_test_size or (None if cuda else 1000)
        seeds = list(range(args.acc_seeds))
        print(f"\nAccuracy check: SE-ResNet-20, {atc.epochs} epochs, batch {atc.batch_size}, lr {atc.lr} cosine, "
              f"{train_size or 'all'} train images, seeds {seeds}; test error of both on the same "
              f"{test_size or 'all'} test images (fp32 evaluation)")
        acc = accuracy_check(root, plain_ds, device, atc, seeds, workers, train_size, test_size)
        report["accuracy"] = acc
        m, s = acc["mean_pct"], acc["std_pct"]
        verdict = {True: "within", False: "NOT within", None: "undetermined (one seed)"}[acc["within_2std"]]
        print(f"  plain   {m['plain']:.2f} ± {_num(s['plain'], '.2f')}%   harness {m['harness']:.2f} ± "
              f"{_num(s['harness'], '.2f')}%   difference {acc['diff_pct']:+.2f} points: {verdict} "
              f"2 x pooled seed std ({_num(2 * acc['pooled_std_pct'], '.2f')})")

    report["wall_seconds"] = time.perf_counter() - t0
    if not cuda:
        report["environment"]["loadavg_end_1_5_15"] = list(os.getloadavg())
    print(f"\nwall time {report['wall_seconds']:.0f} s")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(finite(report), indent=2, allow_nan=False, default=str) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
