"""The backbones as data: stages, widths, block kind and stem of every `model.arch`.

Its own module, importing nothing from senet: the config validates arch names against it and
the networks are built from it, without the two importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BlockKind = Literal["basic", "bottleneck", "preact_bottleneck"]


@dataclass(frozen=True)
class Arch:
    """A backbone as data: one entry per stage in `depths`, `widths` (unit output) and `mids`."""

    block: BlockKind
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    mids: tuple[int, ...] | None = None  # bottleneck widths (the 3x3 conv's channels)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    stem_width: int = 64
    groups: int = 1
    shortcut: Literal["projection", "pad"] = "projection"
    stride_in: Literal["1x1", "3x3"] = "1x1"

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(range(2, 2 + len(self.depths)))


def _classic_cifar(n: int) -> Arch:
    # He et al. 2016, Sec. 4.2: 6n+2 layers, 16/32/64 channels, option-A (zero-pad) shortcuts.
    return Arch("basic", (n, n, n), (16, 32, 64), stem="cifar", stem_width=16, shortcut="pad")


_IMAGENET_OUT = (256, 512, 1024, 2048)
_IMAGENET_MID = (64, 128, 256, 512)

ARCHS: dict[str, Arch] = {
    **{f"resnet{6 * n + 2}": _classic_cifar(n) for n in (3, 5, 7, 9, 18)},
    # He et al. 2016b (identity mappings): pre-activation bottlenecks, 9n+2 layers.
    "resnet164": Arch("preact_bottleneck", (18, 18, 18), (64, 128, 256), (16, 32, 64), "cifar", 16),
    # CIFAR stem (3x3, no max-pool) with the four ImageNet stages; stride in the 3x3 as is usual on CIFAR.
    "resnet18_cifar": Arch("basic", (2, 2, 2, 2), (64, 128, 256, 512), stem="cifar"),
    "resnet50_cifar": Arch("bottleneck", (3, 4, 6, 3), _IMAGENET_OUT, _IMAGENET_MID, "cifar", stride_in="3x3"),
    # CPU-scale study backbones (README, "The cpu preset"): the four stages of ResNet-18/50 (so SE in
    # stages 2-5 as in the paper), one unit per stage, 32 channels at the narrowest (r = 32 leaves one
    # hidden unit). The bottleneck twin (expansion 2, not 4) costs the same MACs and parameters, for the
    # 3x3 position of Table 15.
    "resnet10_cifar_w32": Arch("basic", (1, 1, 1, 1), (32, 64, 128, 256), stem="cifar", stem_width=32),
    "resnet14_cifar_w32": Arch("bottleneck", (1, 1, 1, 1), (64, 128, 256, 512), (32, 64, 128, 256), "cifar", 32,
                               stride_in="3x3"),
    # Half as wide (a quarter of the MACs): on a CPU the bottleneck's wide unit outputs cost memory
    # traffic, not MACs, and only this width trains 8 epochs of CIFAR-10 inside 10 minutes on 2 cores
    # (bench/RESULTS.md). The cpu preset's se_3x3 grid trains it.
    "resnet14_cifar_w16": Arch("bottleneck", (1, 1, 1, 1), (32, 64, 128, 256), (16, 32, 64, 128), "cifar", 32,
                               stride_in="3x3"),
    # The original ResNets (stride in the first 1x1 conv), as in the Caffe models SENet measured.
    "resnet50": Arch("bottleneck", (3, 4, 6, 3), _IMAGENET_OUT, _IMAGENET_MID),
    "resnet101": Arch("bottleneck", (3, 4, 23, 3), _IMAGENET_OUT, _IMAGENET_MID),
    "resnet152": Arch("bottleneck", (3, 8, 36, 3), _IMAGENET_OUT, _IMAGENET_MID),
    # Xie et al. 2017, Sec. 4: downsampling by stride-2 in the 3x3 (grouped) conv.
    "resnext50_32x4d": Arch("bottleneck", (3, 4, 6, 3), _IMAGENET_OUT, (128, 256, 512, 1024), groups=32, stride_in="3x3"),
}
