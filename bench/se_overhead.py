"""SE overhead: wall time of SE-ResNet-50 (r = 16) vs ResNet-50 at 224x224, on synthetic data.

    python bench/se_overhead.py --device cpu|cuda [--batch N] [--repeats N] [--size 224] [--json-out PATH]

Forward+backward in fp32 and, on CUDA, also with bf16 autocast + channels_last (the harness's GPU
settings); forward only (inference) in fp32; multiply-adds and parameters of both. The paper
(Section 4) reports +10% for forward+backward (190 -> 209 ms, minibatch 256 on 8 GPUs) and +1.8%
for CPU inference (164 -> 167 ms). Timings alternate between the two models so that drift
(thermal, other load) hits both alike; the median of the repeats is reported, after one warm-up
step each (allocator, cuDNN algorithm choice). Defaults: batch 64 and 10 repeats on a GPU,
batch 8 and 7 repeats on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import _path  # noqa: F401  (first: this checkout on sys.path)

import torch

import benchlib
from senet import build_model, complexity

PAPER_SE_OVERHEAD_PCT = 10.0  # Section 4: 190 -> 209 ms forward+backward, ResNet-50 vs SE-ResNet-50
PAPER_CPU_INFERENCE_PCT = 1.8  # Section 4: 164 -> 167 ms


def step_time(model: torch.nn.Module, x: torch.Tensor, train: bool) -> float:
    """Seconds of one forward (+ backward when `train`) pass, synced on both ends."""
    benchlib.sync(x.device)
    start = time.perf_counter()
    if train:
        model(x).sum().backward()
    else:
        with torch.no_grad():
            model(x)
    benchlib.sync(x.device)
    return time.perf_counter() - start


def _models(device: torch.device, fmt: torch.memory_format) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "resnet50": build_model({"arch": "resnet50"}).to(device, memory_format=fmt),
        "se_resnet50": build_model({"arch": "resnet50", "se": {"reduction": 16}}).to(device, memory_format=fmt),
    }


def se_overhead_timing(device: torch.device, batch: int, repeats: int, size: int = 224,
                       bf16: bool = False, train: bool = True) -> dict[str, Any]:
    """Median ms of ResNet-50 vs SE-ResNet-50 (r=16), forward+backward (`train`) or forward only."""
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    models = _models(device, fmt)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)

    def timed(m: torch.nn.Module, inp: torch.Tensor) -> float:
        m.zero_grad(set_to_none=True)  # outside the timed region, as in a training step
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            return step_time(m, inp, train)

    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.train(train)
        timed(m, x)  # warm-up: allocator, cuDNN algorithm choice
    for _ in range(repeats):
        for k, m in models.items():
            times[k].append(timed(m, x))
    base, se = (statistics.median(times[k]) for k in models)
    macs = {k: complexity(m, (3, size, size)).macs for k, m in models.items()}
    del models, x
    benchlib.free_memory(device)
    return {
        "precision": "bf16 autocast + channels_last" if bf16 else "fp32",
        "batch": batch, "size": size, "repeats": repeats,
        "resnet50_ms": 1e3 * base, "se_resnet50_ms": 1e3 * se,
        "overhead_pct": 100 * (se / base - 1),
        "paper_pct": PAPER_SE_OVERHEAD_PCT if train else PAPER_CPU_INFERENCE_PCT,
        "macs_overhead_pct": 100 * (macs["se_resnet50"] / macs["resnet50"] - 1),
    }


def complexity_row(size: int) -> dict[str, float]:
    """Multiply-adds and parameters of both models, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        models = _models(torch.device("meta"), torch.contiguous_format)
    c0, c1 = (complexity(m, size) for m in models.values())
    return {"resnet50_gmacs": c0.gflops, "se_resnet50_gmacs": c1.gflops,
            "macs_overhead_pct": 100 * (c1.macs / c0.macs - 1),
            "resnet50_mparams": c0.params / 1e6, "se_resnet50_mparams": c1.params / 1e6,
            "params_overhead_pct": 100 * (c1.params / c0.params - 1)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", required=True, help=benchlib.DEVICE_HELP)
    ap.add_argument("--batch", type=int, help="images per step (default 64 GPU, 8 CPU)")
    ap.add_argument("--repeats", type=int, help="timed steps per model, alternating (default 10 GPU, 7 CPU)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json-out", type=Path, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    device = benchlib.bench_device(args.device)
    cuda = device.type == "cuda"
    batch, repeats = args.batch or (64 if cuda else 8), args.repeats or (10 if cuda else 7)
    env = benchlib.environment(device)
    print(f"device {device} ({env['device_name']}), torch {env['torch']}, threads {env['cpu_threads']}, "
          f"{env['date']}" + (f", load average {env['loadavg_1_5_15'][0]:.2f}" if not cuda else ""))
    print(f"SE overhead, SE-ResNet-50 vs ResNet-50, {args.size}x{args.size} synthetic, batch {batch}, "
          f"median of {repeats}:")
    report: dict[str, Any] = {"environment": env, "se_overhead": []}
    for bf16 in ((False, True) if cuda else (False,)):
        r = se_overhead_timing(device, batch, repeats, args.size, bf16)
        report["se_overhead"].append(r)
        print(f"  forward+backward {r['precision']:30s} ResNet-50 {r['resnet50_ms']:8.1f} ms  "
              f"SE-ResNet-50 {r['se_resnet50_ms']:8.1f} ms  overhead {r['overhead_pct']:+5.1f}%  "
              f"(paper: +{PAPER_SE_OVERHEAD_PCT:.0f}% GPU)")
    r = se_overhead_timing(device, batch, repeats, args.size, bf16=False, train=False)
    report["se_overhead_inference"] = r
    print(f"  forward (inference) {r['precision']:27s} ResNet-50 {r['resnet50_ms']:8.1f} ms  "
          f"SE-ResNet-50 {r['se_resnet50_ms']:8.1f} ms  overhead {r['overhead_pct']:+5.1f}%  "
          f"(paper: +{PAPER_CPU_INFERENCE_PCT}% CPU inference)")
    c = report["complexity"] = complexity_row(args.size)
    print(f"  multiply-adds {c['resnet50_gmacs']:.3f} -> {c['se_resnet50_gmacs']:.3f} G "
          f"({c['macs_overhead_pct']:+.2f}%), params {c['resnet50_mparams']:.2f} -> "
          f"{c['se_resnet50_mparams']:.2f} M ({c['params_overhead_pct']:+.1f}%)")
    if not cuda:
        print("  (CPU timing; the paper's +10% is for GPUs, its CPU figure is +1.8% for inference)")
    benchlib.end_report(report, t0, device, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
