"""Checkpoint cost: size and save/load time of one cell's checkpoint, as a share of an epoch.

The checkpoint is what a running cell writes every `train.checkpoint_every` epochs and on
preemption (ablations/train/checkpoint.py): model, SGD momentum buffers, RNG states, history; written to
a temporary file, fsynced, then renamed, and named by a manifest written the same way. The epoch time is
measured with the harness trainer (`ablations.train.train`, the recipe of experiments.yaml: batch 512
on a GPU, bf16 and channels_last there) on synthetic 32x32 images, and extrapolated from the training
throughput to the 50,000 images of a CIFAR-10 epoch (evaluation left out, so the share is, if anything, too high).

    python bench/checkpoint_cost.py --device cpu|cuda [--arch resnet18_cifar] [--batch 512]
                                    [--images 2048] [--repeats 5] [--dir PATH] [--json-out PATH]

On a CPU use a smaller --batch and --images (e.g. 32 and 96): the epoch is then a CPU epoch, and
the share says little about a GPU, where the epoch is some 100x shorter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _path  # noqa: F401  (first: this checkout on sys.path)

import torch

from ablations.train import checkpoint as ckpt
from ablations.config import DatasetConfig, ExperimentConfig, TrainConfig
from ablations.data import load_dataset
from ablations.train import seed_everything, train
from ablations.util.device import resolve_device
from benchlib import environment, sync
from senet import build_model

CIFAR_TRAIN = 50_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18_cifar")
    ap.add_argument("--device", required=True, help="cpu, cuda or cuda:N (required: a GPU figure must not silently come "
                    "from the CPU)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--images", type=int, default=2048, help="training images timed (one epoch of them)")
    ap.add_argument("--repeats", type=int, default=5, help="checkpoint saves and loads timed (the median is kept)")
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temporary folder)")
    ap.add_argument("--json-out", metavar="PATH")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cfg = ExperimentConfig(
        dataset=DatasetConfig(name="synthetic", train_size=args.images, test_size=64),
        model={"arch": args.arch, "num_classes": 10, "se": {"reduction": 16}},
        train=TrainConfig(epochs=1, batch_size=args.batch, lr=0.4, momentum=0.9, weight_decay=5e-4,
                          label_smoothing=0.1, warmup_epochs=0), seed=0)
    data = load_dataset("synthetic", "unused", train_size=args.images, test_size=64)

    # One epoch with the real trainer; its last state (momentum buffers filled) is the one checkpointed.
    seed_everything(0)
    model = build_model(cfg.model)
    states: list[dict] = []
    result = train(cfg, model, data, device, on_checkpoint=states.append)
    images_per_s = result.final.images_per_s
    epoch_s = CIFAR_TRAIN / images_per_s

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp) / "bench"
        saves, loads = [], []
        for _ in range(args.repeats):
            sync(device)
            saves.append(ckpt.save(folder, states[-1]))
            start = time.perf_counter()
            ckpt.load(folder)
            loads.append(time.perf_counter() - start)
        size = ckpt.state_path(folder, ckpt.read_manifest(folder)).stat().st_size
    save_s, load_s = statistics.median(saves), statistics.median(loads)
    out = {
        "arch": args.arch, "batch": args.batch, "images_timed": args.images, "device": str(device),
        "checkpoint_bytes": size, "save_seconds_median": save_s, "save_seconds_all": saves,
        "load_seconds_median": load_s, "train_images_per_s": images_per_s,
        "cifar10_epoch_seconds_extrapolated": epoch_s, "save_share_of_epoch": save_s / epoch_s,
        "env": environment(device),
    }
    print(f"{args.arch} (SE, r=16) on {device}: checkpoint {size / 2**20:.1f} MiB; save (write + fsync + rename) "
          f"{save_s * 1e3:.0f} ms, load {load_s * 1e3:.0f} ms (medians of {args.repeats})")
    print(f"training {images_per_s:,.1f} images/s at batch {args.batch} -> a CIFAR-10 epoch takes {epoch_s:,.1f} s; "
          f"one checkpoint per epoch costs {100 * save_s / epoch_s:.3f}% of it")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
