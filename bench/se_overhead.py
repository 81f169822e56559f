"""SE overhead: forward+backward wall time of ResNet-50 vs SE-ResNet-50 (r = 16) at 224x224.

The paper (Section 4) reports +10% for forward+backward (190 -> 209 ms, minibatch 256 on
8 GPUs) and +1.8% for CPU inference (164 -> 167 ms). Timings alternate between the two models
so that drift (thermal, other load) hits both alike; the median of the repeats is reported.

    python bench/se_overhead.py [--batch 8] [--repeats 7] --device cpu|cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchlib import DEVICE_HELP, bench_device, device_name, sync
from senet import build_model, complexity


def step_time(model: torch.nn.Module, x: torch.Tensor, train: bool) -> float:
    sync(x.device)
    start = time.perf_counter()
    if train:
        model(x).sum().backward()
    else:
        with torch.no_grad():
            model(x)
    sync(x.device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", required=True, help=DEVICE_HELP)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    device = bench_device(args.device)
    torch.manual_seed(0)
    models = {
        "ResNet-50": build_model(dict(arch="resnet50")).to(device),
        "SE-ResNet-50": build_model(dict(arch="resnet50", se=dict(reduction=16))).to(device),
    }
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(f"device {device} ({device_name(device)}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.size}x{args.size}, median of {args.repeats}")
    for mode in ("train", "eval"):
        times: dict[str, list[float]] = {k: [] for k in models}
        for m in models.values():
            m.train(mode == "train")
            step_time(m, x, mode == "train")  # warm-up
        for _ in range(args.repeats):
            for k, m in models.items():
                times[k].append(step_time(m, x, mode == "train"))
        base, se = (statistics.median(times[k]) for k in models)
        what = "forward+backward" if mode == "train" else "forward (inference)"
        paper = "+10% (GPU, fwd+bwd)" if mode == "train" else "+1.8% (CPU inference)"
        print(f"{what:20s} ResNet-50 {base * 1e3:8.1f} ms  SE-ResNet-50 {se * 1e3:8.1f} ms  "
              f"overhead {100 * (se / base - 1):+5.1f}%   paper {paper}")
    c0, c1 = (complexity(m, args.size) for m in models.values())
    print(f"multiply-adds {c0.gflops:.3f} -> {c1.gflops:.3f} G ({100 * (c1.macs / c0.macs - 1):+.2f}%), "
          f"params {c0.params / 1e6:.2f} -> {c1.params / 1e6:.2f} M ({100 * (c1.params / c0.params - 1):+.1f}%)")


if __name__ == "__main__":
    main()
