"""What a loaded dataset is: Split, Dataset, DataError, and the constants every data stage shares.

Kept free of imports from its siblings, so every other module of ablations.data can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR_STYLE_MAX_PX = 64  # stored images up to this size get CIFAR-style augmentation
EVAL_MARGIN = 8 / 7  # imagenet style stores round(size * 8/7) so crops have room (256 for 224)
SPLITS = ("train", "test")


class DataError(RuntimeError):
    """A dataset could not be found, decoded or subset; the message is one line."""


@dataclass(frozen=True, eq=False)
class Split:
    images: np.ndarray  # uint8 (N, H, W, 3), possibly a read-only memmap
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str  # 'cifar10', 'cifar100', 'imagefolder', 'synthetic'
    source: str  # where the pixels came from, e.g. 'torchvision:/path', 'jpeg-archive:/x.tar.gz'
    classes: tuple[str, ...]
    train: Split
    test: Split
    mean: tuple[float, float, float]  # per channel, [0, 1] units
    std: tuple[float, float, float]
    style: str  # 'cifar' (pad-crop-flip) or 'imagenet' (random-resized-crop + flip, centre-crop eval)
    image_size: int  # the size the model sees


def fail(name: str, msg: str) -> DataError:
    """The DataError for dataset ``name``, on one line."""
    return DataError(f"dataset {name}: {msg}".replace("\n", " "))


def short(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
