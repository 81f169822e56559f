"""Accuracy parity: do the plain PyTorch loop and the harness trainer reach the same test error?

    python bench/accuracy_parity.py --device cpu|cuda [--data-root ../shared/data] [--seeds 2]
                                    [--epochs N] [--train-size N] [--test-size N]
                                    [--plain-workers 4] [--json-out PATH]

SE-ResNet-20 (r = 16) is trained with each path and seed on the same recipe (SGD with Nesterov
momentum, the harness's per-step cosine LR schedule), then both are evaluated by the harness's
evaluator in fp32 on the same test images. The verdict: is the difference of the mean errors
within 2 x the pooled seed std? Defaults: on a GPU 10 epochs, batch 512, lr 0.4, all images; on a
CPU 4 epochs, batch 64, lr 0.1, 2,000 train and 1,000 test images. The plain path is the one of
bench/train_speed.py (torchvision dataset or ImageFolder, DataLoader, fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import _path  # noqa: F401  (first: this checkout on sys.path)

import torch
from torch import nn

import benchlib
from ablations.config import TrainConfig
from ablations.data import Dataset, load_dataset
from ablations.train import evaluate, lr_at, seed_everything
from ablations.train import train as harness_train
from benchlib import MODELS, ModelSpec


def plain_fit(model: nn.Module, loader: torch.utils.data.DataLoader, tc: TrainConfig, device: torch.device) -> None:
    """The plain loop with the harness's recipe (same per-step LR schedule), for a like-for-like error."""
    opt = benchlib.plain_optimizer(model, tc)
    steps = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps * tc.epochs, tc, steps) / tc.lr)
    for _ in range(tc.epochs):
        benchlib.plain_epoch(model, loader, opt, device, tc.label_smoothing, sched)


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
        model = benchlib.make_model(spec).to(device)
        plain_fit(model, benchlib.plain_loader(plain_ds, tc.batch_size, workers, seed, subset=train_size), tc, device)
        errors["plain"].append(top1_error(model, data, device, 2 * tc.batch_size))
        mid = time.perf_counter()
        seed_everything(seed)
        cfg = benchlib.harness_config(spec, tc, root, data, seed)
        result = harness_train(cfg, benchlib.make_model(spec), data, device)
        errors["harness"].append(top1_error(result.model, data, device, 2 * tc.batch_size))
        log(f"  seed {seed}: plain {errors['plain'][-1]:.2f}% ({mid - start:.0f} s), "
            f"harness {errors['harness'][-1]:.2f}% ({time.perf_counter() - mid:.0f} s)")
        del model, result
        benchlib.free_memory(device)
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", required=True, help=benchlib.DEVICE_HELP)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per path (default 2)")
    ap.add_argument("--epochs", type=int, help="default 10 GPU, 4 CPU")
    ap.add_argument("--train-size", type=int, help="default all on a GPU, 2000 on a CPU")
    ap.add_argument("--test-size", type=int, help="default all on a GPU, 1000 on a CPU")
    ap.add_argument("--plain-workers", type=int, default=4, help="the plain path's DataLoader workers (default 4)")
    ap.add_argument("--json-out", type=Path, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    device = benchlib.bench_device(args.device)
    cuda = device.type == "cuda"
    benchlib.preflight_cuda(device)
    root = Path(args.data_root).expanduser().resolve()
    env = benchlib.environment(device)
    print(f"device {device} ({env['device_name']}), torch {env['torch']}, CUDA {env['cuda']}, "
          f"threads {env['cpu_threads']}, {env['date']}"
          + (f", load average {env['loadavg_1_5_15'][0]:.2f}" if not cuda else ""))
    plain_ds, plain_source = benchlib.plain_train_set(root)
    print(f"plain:   {plain_source}; {benchlib.PLAIN_RECIPE.format(workers=args.plain_workers)}")
    tc = TrainConfig(epochs=args.epochs or (10 if cuda else 4), batch_size=512 if cuda else 64,
                     lr=0.4 if cuda else 0.1, nesterov=True, weight_decay=5e-4, label_smoothing=0.0,
                     schedule="cosine", warmup_epochs=1.0 if cuda else 0.0)
    train_size = args.train_size or (None if cuda else 2000)
    test_size = args.test_size or (None if cuda else 1000)
    seeds = list(range(args.seeds))
    print(f"\nAccuracy check: SE-ResNet-20, {tc.epochs} epochs, batch {tc.batch_size}, lr {tc.lr} cosine, "
          f"{train_size or 'all'} train images, seeds {seeds}; test error of both on the same "
          f"{test_size or 'all'} test images (fp32 evaluation)")
    acc = accuracy_check(root, plain_ds, device, tc, seeds, args.plain_workers, train_size, test_size)
    report: dict[str, Any] = {"environment": env, "plain_source": plain_source, "plain_workers": args.plain_workers,
                              "accuracy": acc}
    m, s, num = acc["mean_pct"], acc["std_pct"], benchlib.fmt_num
    verdict = {True: "within", False: "NOT within", None: "undetermined (one seed)"}[acc["within_2std"]]
    print(f"  plain   {m['plain']:.2f} ± {num(s['plain'], '.2f')}%   harness {m['harness']:.2f} ± "
          f"{num(s['harness'], '.2f')}%   difference {acc['diff_pct']:+.2f} points: {verdict} "
          f"2 x pooled seed std ({num(2 * acc['pooled_std_pct'], '.2f')})")
    benchlib.end_report(report, t0, device, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
