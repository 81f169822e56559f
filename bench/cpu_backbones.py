"""Training speed of the CPU study's candidate backbones: images/s of one SGD step, nothing else.

    python bench/cpu_backbones.py                       # bf16 autocast + channels_last, 2 threads
    python bench/cpu_backbones.py --precision all       # also fp32, contiguous and channels_last

A step is forward, cross-entropy, backward and SGD with momentum on a random batch (no data path),
timed over --steps after 3 untimed ones; each bottleneck backbone with SE on the unit's output and
after its 3x3 conv. It tells which backbone fits the `cpu` preset's budget before paying for a
training run (bench/cpu_recipe.py). The `b_*` entries are candidates defined here, not in senet.
"""

from __future__ import annotations

import argparse
import time

import _path  # noqa: F401  (first: this checkout on sys.path)

import torch

from senet import build_model
from senet.archs import ARCHS, Arch

# Bottleneck candidates for the se_3x3 grid: b_o<unit outputs of stage 2>_m<3x3 width of stage 2>.
CANDIDATES = {
    "b_o64_m16": Arch("bottleneck", (1, 1, 1, 1), (64, 128, 256, 512), (16, 32, 64, 128), "cifar", 32, stride_in="3x3"),
    "b_o48_m24": Arch("bottleneck", (1, 1, 1, 1), (48, 96, 192, 384), (24, 48, 96, 192), "cifar", 24, stride_in="3x3"),
}
DEFAULT = "resnet10_cifar_w32,resnet14_cifar_w32,resnet14_cifar_w16,b_o64_m16,b_o48_m24"
PRECISIONS = {"bf16-cl": (True, True), "fp32": (False, False), "fp32-cl": (False, True)}


def images_per_s(arch: str, bf16: bool, channels_last: bool, position: str, steps: int, batch: int) -> float:
    model = build_model({"arch": arch, "se": {"reduction": 16, "position": position}, "num_classes": 10})
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=DEFAULT, help="comma-separated (default: %(default)s)")
    ap.add_argument("--precision", choices=("bf16-cl", "all"), default="bf16-cl")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ARCHS.update(CANDIDATES)
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as fh:
        print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, {args.steps} timed steps; "
              f"load at start {fh.read().split()[0]}")
    precisions = PRECISIONS if args.precision == "all" else {"bf16-cl": PRECISIONS["bf16-cl"]}
    print("| backbone | precision | SE position | images/s |\n| --- | --- | --- | ---: |")
    for arch in args.archs.split(","):
        positions = ["output", "3x3"] if ARCHS[arch].block == "bottleneck" else ["output"]
        for name, (bf16, cl) in precisions.items():
            for position in positions:
                rate = images_per_s(arch, bf16, cl, position, args.steps, args.batch_size)
                print(f"| {arch} | {name} | {position} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
