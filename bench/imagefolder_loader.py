"""ImageNet-style input pipelines: which one feeds training faster (issue #6, item 1).

    python bench/imagefolder_loader.py [--data-root ../shared/data] --device cpu|cuda
                                       [--batch-size 64] [--epochs 4] [--workers 4] [--json-out PATH]

Three ways to turn an ImageFolder of JPEGs into augmented, normalised training batches on the
device (random-resized crop to 224 + flip), timed over whole epochs, the first excluded:

(a) dataloader: torchvision ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize,
                DataLoader(num_workers, pin_memory on CUDA, persistent_workers), batches moved to the device;
(b) gpu-decode: the JPEG bytes read once, decoded per batch by torchvision.io.decode_jpeg on the
                device (nvJPEG on CUDA), then the harness's batched random-resized crop;
(c) harness:    ablations.data (decoded once into a uint8 cache, resident on the GPU when it
                fits, batched augmentation on the device), i.e. what ablations.train uses.

No model runs: this is the input side alone, the ceiling each pipeline puts on training speed.
Data: the Imagenette sample in ../shared/data (400 train images, 224x224 JPEG), extracted into
a temporary folder for (a) and (b).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import _path  # noqa: F401  (first: this checkout on sys.path)

import torch

import benchlib

from ablations.data import augment
from ablations.data import iterate_batches, load_dataset

ARCHIVE = "imagenette-224-mini.tar.gz"
SIZE = 224


def time_epochs(make_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], epochs: int,
                device: torch.device) -> dict[str, float]:
    """Images/s over epochs 2..N (epoch 1 pays worker start-up, caches and cuDNN/nvJPEG init)."""
    times, counts = [], []
    for epoch in range(epochs):
        benchlib.sync(device)
        start = time.perf_counter()
        seen = 0
        for x, _ in make_epoch(epoch):
            seen += len(x)
        benchlib.sync(device)
        times.append(time.perf_counter() - start)
        counts.append(seen)
    return {"images_per_s": sum(counts[1:]) / sum(times[1:]), "first_epoch_s": times[0],
            "steady_epoch_s": sum(times[1:]) / len(times[1:]), "epoch_images": counts[-1]}


def dataloader_pipeline(tree: Path, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int,
                        workers: int, device: torch.device) -> Callable[[int], Iterable]:
    import torchvision
    import torchvision.transforms as T

    tf = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = torchvision.datasets.ImageFolder(str(tree / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)

    def epoch(_: int):
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return epoch


def gpu_decode_pipeline(tree: Path, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int,
                        device: torch.device) -> Callable[[int], Iterable]:
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    # a list of images in one call (one nvJPEG batch on CUDA) exists from torchvision 0.20
    batched = tuple(int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2]) >= (0, 20)
    ds = torchvision.datasets.ImageFolder(str(tree / "train"))
    # the bytes in host memory, read once (torchvision.io.read_file is deprecated in 0.29)
    raw = [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path, _ in ds.samples]
    labels = torch.tensor(ds.targets)

    def epoch(e: int):
        gen = torch.Generator().manual_seed(e)
        order = torch.randperm(len(raw), generator=gen)
        for start in range(0, len(raw) - len(raw) % batch_size, batch_size):
            idx = order[start:start + batch_size]
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec
                warnings.simplefilter("ignore")
                batch = [raw[i] for i in idx]
                imgs = (decode_jpeg(batch, mode=ImageReadMode.RGB, device=device) if batched else
                        [decode_jpeg(b, mode=ImageReadMode.RGB, device=device) for b in batch])
            x = torch.stack(imgs)  # the Imagenette sample is 224x224 throughout
            x = augment.random_resized_crop_flip(x, SIZE, generator=gen)
            yield augment.normalize(x, mean, std, torch.float32), labels[idx].to(device)
    return epoch


def harness_pipeline(root: Path, batch_size: int, device: torch.device) -> tuple[Callable[[int], Iterable], Any]:
    data = load_dataset("imagefolder", root / ARCHIVE)

    def epoch(e: int):
        return iterate_batches(data.train, data, batch_size=batch_size, train=True, device=device, epoch=e)
    return epoch, data


def extract(archive: Path, dst: Path) -> Path:
    with tarfile.open(archive, "r:*") as tar:
        benchlib.extract_all(tar, dst)
    (tree,) = [p for p in dst.iterdir() if (p / "train").is_dir()]
    return tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", required=True, help=benchlib.DEVICE_HELP)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4, help="total per pipeline, the first excluded (>= 2)")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of (a)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2: the first epoch is not timed")
    device = benchlib.bench_device(args.device)
    root = Path(args.data_root).expanduser().resolve()
    if not (root / ARCHIVE).is_file():
        print(f"error: {root / ARCHIVE} not found (the Imagenette sample; see ../shared/data/README.md)", file=sys.stderr)
        return 2
    env = benchlib.environment(device)
    print(f"device {device} ({env['device_name']}), torch {env['torch']}, CUDA {env['cuda']}, threads {env['cpu_threads']}, "
          f"{env['date']}; batch {args.batch_size}, {args.epochs} epochs each (the first not timed)")

    start = time.perf_counter()
    harness_epoch, data = harness_pipeline(root, args.batch_size, device)
    prepare = {"harness": time.perf_counter() - start}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tree = extract(root / ARCHIVE, Path(tmp))
        prepare["extract"] = time.perf_counter() - start
        pipelines = {
            f"dataloader (num_workers={args.workers})":
                lambda: dataloader_pipeline(tree, data.mean, data.std, args.batch_size, args.workers, device),
            f"gpu-decode (decode_jpeg on {device.type})":
                lambda: gpu_decode_pipeline(tree, data.mean, data.std, args.batch_size, device),
            "harness (uint8 cache, batched augmentation)": lambda: harness_epoch,
        }
        for label, make in pipelines.items():
            results[label] = time_epochs(make(), args.epochs, device)
            gc.collect()  # the DataLoader's persistent workers exit now, not during the next pipeline
            r = results[label]
            print(f"  {label:46s} {r['images_per_s']:9.0f} images/s   first epoch {r['first_epoch_s']:6.2f} s, "
                  f"then {r['steady_epoch_s']:6.2f} s per {r['epoch_images']} images")
    print(f"harness first load (decode + cache, or read the cache): {prepare['harness']:.1f} s; "
          f"archive extraction for (a), (b): {prepare['extract']:.1f} s")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"environment": env, "prepare_s": prepare, "pipelines": results},
                                            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
