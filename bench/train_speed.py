"""Training speed: a plain PyTorch CIFAR-10 loop vs the harness trainer, side by side (issue #6).

    python bench/train_speed.py --device cpu|cuda [--quick] [--data-root ../shared/data]
                                [--epochs N | --steps N --warmup-steps N] [--batch-size N]
                                [--plain-workers N] [--models K,K] [--compile] [--json-out PATH]

(a) plain:   torchvision CIFAR10 (or, offline, the decoded JPEG copy through a Dataset that works as
             torchvision's CIFAR10 does: uint8 arrays in memory, one PIL image per item; --plain-dataset
             imagefolder decodes the JPEGs every epoch instead), RandomCrop(32, 4) + flip + ToTensor +
             Normalize, DataLoader(shuffle=True, num_workers=4), fp32, loss.item() every step, SGD momentum.
             --plain-precision both adds the same loop in the harness's precision (bf16 autocast +
             channels_last), the like-for-like row.
(b) harness: ablations.train.train on ablations.data.load_dataset (uint8 data resident on the GPU,
             augmentation batched on the device, precision auto: bf16 autocast + channels_last on CUDA
             and on CPUs with native bf16, fused SGD on CUDA).
--rounds N interleaves the paths N times per model (a change of load hits every path alike).

Both run the same models (SE-ResNet-18-CIFAR and SE-ResNet-56, r = 16), batch size and optimizer
settings. Images/s count training only and exclude warm-up: with --epochs (default on a GPU) the
first epoch; in steps mode (--quick, and always on a CPU) the first --warmup-steps steps of one
short epoch, s/epoch then being extrapolated to the full training set and labelled so. Also
printed: the ratio, and MFU against the GPU's bf16 dense peak.

The other questions have their own scripts: bench/accuracy_parity.py (do both paths reach the same
test error), bench/packing.py (aggregate images/s of K cells sharing one GPU), bench/se_overhead.py
(SE-ResNet-50 vs ResNet-50 time).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import _path  # noqa: F401  (first: this checkout on sys.path)

import torch

import benchlib
from ablations.config import TrainConfig
from ablations.data import Dataset, load_dataset
from ablations.train import seed_everything
from ablations.train import train as harness_train
from ablations.util.device import native_bf16
from benchlib import MODELS, SPEED_LR, ModelSpec, StepWindow, WindowDone
from senet import complexity

DEFAULT_MODELS = ("se_resnet18_cifar", "se_resnet56")

# bf16 dense tensor-core peak, TFLOP/s: (substring of the device name, substrings of which one must
# also occur (empty: none needed), peak). First match wins; H100 NVL etc. are deliberately absent.
PEAK_BF16_TFLOPS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("H100", ("PCIE",), 756.0),
    ("H100", ("SXM", "HBM3"), 989.0),
    ("H200", (), 989.0),
    ("A100", (), 312.0),
)


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


def speed_train_config(timing: Timing, compile_: bool = False) -> TrainConfig:
    """The optimizer settings both paths use in speed runs (the plain path reads lr, momentum,
    nesterov and weight decay from it; precision/channels_last/compile are the harness's)."""
    return TrainConfig(epochs=timing.epochs if timing.mode == "epochs" else 1, batch_size=timing.batch_size,
                       lr=SPEED_LR, momentum=0.9, nesterov=True, weight_decay=5e-4, label_smoothing=0.0,
                       schedule="cosine", warmup_epochs=0.0, compile=compile_)


# --------------------------------------------------------------------------- (a) the plain loop


def plain_speed(spec: ModelSpec, ds: torch.utils.data.Dataset, device: torch.device, timing: Timing,
                workers: int, seed: int = 0, bf16: bool = False) -> Speed:
    """Images/s of the plain loop on `spec`: fp32 and contiguous, or (`bf16`) bf16 autocast + channels_last."""
    seed_everything(seed)
    model = benchlib.make_model(spec).to(device, memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    tc = speed_train_config(timing)
    opt = benchlib.plain_optimizer(model, tc)
    full = len(ds)  # type: ignore[arg-type]
    if timing.mode == "steps":
        loader = benchlib.plain_loader(ds, timing.batch_size, workers, seed, subset=timing.subset_size)
        window = StepWindow(timing.warmup_steps, timing.timed_steps)
        with contextlib.suppress(WindowDone):
            benchlib.plain_epoch(model, loader, opt, device, window=window, bf16=bf16)
        steps, images, seconds = window.measured()
        del loader  # shuts its workers down
        return Speed(images / seconds, full * seconds / images, True, full, images, seconds, steps)
    loader = benchlib.plain_loader(ds, timing.batch_size, workers, seed)
    times, counts = [], []
    for _ in range(timing.epochs):
        benchlib.sync(device)
        start = time.perf_counter()  # worker start-up included: it is part of every epoch here
        seen, _ = benchlib.plain_epoch(model, loader, opt, device, bf16=bf16)
        benchlib.sync(device)
        times.append(time.perf_counter() - start)
        counts.append(seen)
    images, seconds = sum(counts[1:]), sum(times[1:])
    del model, opt
    benchlib.free_memory(device)
    return Speed(images / seconds, seconds / len(times[1:]), False, counts[-1], images, seconds,
                 len(times[1:]) * len(loader))


# --------------------------------------------------------------------------- (b) the harness


def harness_data(root: Path, timing: Timing, test_size: int | None = None) -> Dataset:
    return load_dataset("cifar10", root, train_size=timing.subset_size, test_size=test_size)


def harness_speed(spec: ModelSpec, data: Dataset, root: Path, device: torch.device, timing: Timing,
                  full_train_size: int, compile_: bool = False, seed: int = 0) -> Speed:
    """Images/s of ablations.train.train on `spec`: the harness's own per-epoch figure (epochs
    mode) or a StepWindow fed by its observer (steps mode)."""
    tc = speed_train_config(timing, compile_)
    cfg = benchlib.harness_config(spec, tc, root, data, seed)
    seed_everything(seed)
    model = benchlib.make_model(spec, len(data.classes))
    if timing.mode == "steps":
        window = StepWindow(timing.warmup_steps, timing.timed_steps)
        # sync points fall exactly on the warm-up's last step and the window's last step
        every = math.gcd(timing.warmup_steps, timing.timed_steps)
        with contextlib.suppress(WindowDone):
            harness_train(cfg, model, data, device, observer=benchlib.HarnessObserver(window, tc.batch_size),
                          sync_every=every)
        steps, images, seconds = window.measured()
        del model
        benchlib.free_memory(device)
        return Speed(images / seconds, full_train_size * seconds / images, True, full_train_size,
                     images, seconds, steps)
    result = harness_train(cfg, model, data, device)
    timed = result.history[1:]
    epoch_images = (len(data.train) // tc.batch_size) * tc.batch_size
    seconds = sum(epoch_images / s.images_per_s for s in timed)
    images = epoch_images * len(timed)
    del model, result
    benchlib.free_memory(device)
    return Speed(images / seconds, seconds / len(timed), False, epoch_images, images, seconds,
                 len(timed) * (len(data.train) // tc.batch_size))


# --------------------------------------------------------------------------- MFU


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
        model = benchlib.make_model(spec)
    return 3 * 2 * complexity(model, (3, 32, 32)).macs


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    return None if peak is None else images_per_s * flops_per_image / peak


# --------------------------------------------------------------------------- the report


def print_model(label: str, gmacs: float, timing: Timing, row: dict[str, Any], peak_note: str) -> None:
    print(f"\n{label}  ({gmacs:.3f} GMAC/image forward, batch {timing.batch_size})")
    print(f"  {'path':10s} {'images/s':>10s} {'s/epoch (train)':>26s} {'timed':>18s} {'MFU':>8s}")
    for path in [p for p in ("plain", "plain_bf16", "harness") if p in row]:
        s = row[path]
        per_epoch = f"{s['seconds_per_epoch']:.1f}" + (" (extrapolated)" if s["extrapolated"] else "")
        what = f"{s['timed_steps']} steps {s['timed_seconds']:.1f}s"
        m = row["mfu"].get(path)
        print(f"  {path:10s} {s['images_per_s']:10.1f} {per_epoch:>26s} {what:>18s} "
              f"{(f'{100 * m:.1f}%' if m is not None else 'n/a'):>8s}")
    print(f"  harness/plain images/s: {row['ratio']:.2f}x" + ("" if row["mfu"]["plain"] is not None else
                                                               f"   (MFU {peak_note})"))
    if "ratio_vs_plain_bf16" in row:
        print(f"  harness/plain_bf16 images/s: {row['ratio_vs_plain_bf16']:.2f}x")


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
    ap.add_argument("--plain-precision", choices=("fp32", "both"), default="fp32",
                    help="both: also the plain loop in the harness's precision (bf16 autocast + channels_last "
                         "where the harness picks bf16), for a like-for-like row")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (plain, plain-bf16, harness) per model")
    ap.add_argument("--plain-dataset", choices=("cifar10-style", "imagefolder"), default="cifar10-style",
                    help="offline (no torchvision pickles): the decoded copy through a torchvision-CIFAR10-style "
                         "in-memory Dataset, or ImageFolder decoding the JPEGs every epoch")
    ap.add_argument("--json-out", type=Path, help="also write the numbers as JSON")
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
    plain_ds, plain_source = benchlib.plain_train_set(root, cifar_style=args.plain_dataset == "cifar10-style")
    print(f"plain:   {plain_source}, {len(plain_ds)} train images ({time.perf_counter() - start:.1f} s)")  # type: ignore[arg-type]
    print(f"         {benchlib.PLAIN_RECIPE.format(workers=workers)}")
    start = time.perf_counter()
    data = harness_data(root, timing, test_size=None if timing.mode == "epochs" else 10)
    full_train = len(plain_ds)  # type: ignore[arg-type]
    tc = speed_train_config(timing, args.compile)
    bf16 = native_bf16(device)  # what the harness's precision: auto picks here
    print(f"harness: ablations.data.load_dataset -> {data.source} ({time.perf_counter() - start:.1f} s); "
          f"ablations.train.train: {'bf16 autocast + channels_last' if bf16 else 'fp32'} (precision auto), "
          f"{'fused' if cuda else 'foreach'} SGD, compile={tc.compile}")
    paths = ["plain"] + (["plain_bf16"] if args.plain_precision == "both" and bf16 else []) + ["harness"]
    if args.rounds > 1 or len(paths) > 2:
        print(f"interleaved: {args.rounds} round(s) of {', '.join(paths)} per model; each path's row is its median round")

    report: dict[str, Any] = {"environment": env, "timing": asdict(timing) | {"subset_size": timing.subset_size},
                              "plain_source": plain_source, "plain_workers": workers,
                              "harness_source": data.source, "peak_bf16": {"flops": peak, "note": peak_note},
                              "models": []}
    for spec in specs:
        flops = training_flops_per_image(spec)
        rounds: dict[str, list[Speed]] = {p: [] for p in paths}
        for r in range(args.rounds):  # interleaved, so that a change of load hits every path alike
            for path in paths:
                if path == "harness":
                    speed = harness_speed(spec, data, root, device, timing, full_train, args.compile)
                else:
                    speed = plain_speed(spec, plain_ds, device, timing, workers, bf16=path == "plain_bf16")
                rounds[path].append(speed)
                if args.rounds > 1 or len(paths) > 2:
                    print(f"  {spec.label} round {r + 1}/{args.rounds} {path}: {speed.images_per_s:.1f} images/s "
                          f"({speed.timed_steps} steps, load {os.getloadavg()[0]:.2f})", flush=True)
        best = {p: sorted(v, key=lambda s: s.images_per_s)[len(v) // 2] for p, v in rounds.items()}
        plain, harness = best["plain"], best["harness"]
        row = {"key": spec.key, "label": spec.label, "arch": spec.arch, "se_reduction": spec.reduction,
               "gmacs_forward": flops / 6e9, "training_flops_per_image": flops,
               "plain": asdict(plain), "harness": asdict(harness),
               "ratio": harness.images_per_s / plain.images_per_s,
               "mfu": {"plain": mfu(plain.images_per_s, flops, peak), "harness": mfu(harness.images_per_s, flops, peak)},
               "rounds": {p: [asdict(s) for s in v] for p, v in rounds.items()}}
        if "plain_bf16" in best:
            row["plain_bf16"] = asdict(best["plain_bf16"])
            row["ratio_vs_plain_bf16"] = harness.images_per_s / best["plain_bf16"].images_per_s
        report["models"].append(row)
        print_model(spec.label, flops / 6e9, timing, row, peak_note)
    print(f"\nMFU = images/s x 3 x 2 x forward multiply-adds / bf16 dense peak; {peak_note}")
    benchlib.end_report(report, t0, device, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
