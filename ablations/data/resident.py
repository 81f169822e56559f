"""Device-resident splits: copy a Split to the GPU once when it fits this worker's share, and reuse it.

A resident split makes every batch a device gather, so a training step copies nothing from the host.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ablations.data.dataset import Split

# How many worker processes share one GPU; the launcher sets it from --workers-per-gpu.
WORKERS_PER_DEVICE_ENV = "SENET_WORKERS_PER_DEVICE"


@dataclass(frozen=True, eq=False)
class DeviceSplit:
    """A Split copied to a device once (uint8 NHWC + int64 labels), reused across epochs."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_split(cls, split: Split, device: torch.device | str, chunk: int = 8192) -> DeviceSplit:
        device = torch.device(device)
        cuda = device.type == "cuda"
        imgs = torch.empty(split.images.shape, dtype=torch.uint8, device=device)
        # Chunked through one reused (pinned, on CUDA) staging buffer: a memmap is never read whole into RAM.
        stage = torch.empty((min(chunk, max(1, len(split))), *split.images.shape[1:]), dtype=torch.uint8,
                            device="cpu", pin_memory=cuda)
        for s in range(0, len(split), chunk):
            part = stage[: min(chunk, len(split) - s)]
            np.copyto(part.numpy(), split.images[s : s + len(part)])
            imgs[s : s + len(part)].copy_(part)  # blocking: the staging buffer is refilled next
        labels = torch.from_numpy(np.array(split.labels, dtype=np.int64)).to(device)
        return cls(imgs, labels)


# Split has identity hashing (eq=False), so a weak-keyed cache frees the device copy with the Split.
_DEVICE_CACHE: weakref.WeakKeyDictionary[Split, dict[str, DeviceSplit]] = weakref.WeakKeyDictionary()
_SAID: weakref.WeakKeyDictionary[Split, set[str]] = weakref.WeakKeyDictionary()  # residency reasons already logged


def device_split(split: Split, device: torch.device | str) -> DeviceSplit:
    """Cached DeviceSplit: the copy lives as long as ``split`` does (or until clear_device_cache)."""
    per_device = _DEVICE_CACHE.setdefault(split, {})
    key = str(torch.device(device))
    if key not in per_device:
        per_device[key] = DeviceSplit.from_split(split, device)
    return per_device[key]


def is_resident(split: Split | DeviceSplit, device: torch.device | str) -> bool:
    """True when batches of ``split`` on ``device`` are device gathers (no host copy per batch)."""
    if isinstance(split, DeviceSplit):
        return True
    return str(torch.device(device)) in _DEVICE_CACHE.get(split, {})


def clear_device_cache() -> None:
    _DEVICE_CACHE.clear()


def release_device_splits(keep: Iterable[Split] = ()) -> None:
    """Drop the device copies of every split but ``keep``'s. A worker holds its datasets for its whole
    life, so a copy would otherwise stay on the GPU after its cell, whatever the next cell trains on.
    The memory returns to the device once the caller empties the allocator's cache."""
    kept = {id(split) for split in keep}
    for split in list(_DEVICE_CACHE.keys()):
        if id(split) not in kept:
            _DEVICE_CACHE.pop(split, None)


def workers_per_device() -> int:
    try:
        return max(1, int(os.environ.get(WORKERS_PER_DEVICE_ENV, "1")))
    except ValueError:
        return 1


def fits_on_device(split: Split, device: torch.device) -> tuple[bool, str]:
    """Whether ``split`` may live on the GPU, and why, in one line.

    Sized against what is really there: the device's free memory now, this worker's share of
    the device when K workers share it (``--workers-per-gpu``), and this process's measured
    peak so far (model, optimizer state, activations: train() measures one epoch before asking).
    A tenth of the share stays free for allocator fragmentation and cuDNN workspaces.
    """
    free, total = torch.cuda.mem_get_info(device)
    k = workers_per_device()
    share = total // k
    peak = torch.cuda.max_memory_reserved(device)
    need = split.images.nbytes + split.labels.nbytes
    headroom = share // 10
    room = min(free - headroom, share - headroom - peak)
    ok = need <= room
    mib = 2**20
    return ok, (f"{need / mib:.0f} MiB of data {'fits' if ok else 'does not fit'} in {max(0, room) / mib:.0f} MiB "
                f"({free / mib:.0f} MiB free, 1/{k} of {total / mib:.0f} MiB per worker, "
                f"measured peak {peak / mib:.0f} MiB)")


def decide_residency(split: Split, device: torch.device) -> bool:
    """Whether ``split`` is to live on ``device`` (said once on stderr): on a CUDA device when it fits
    (fits_on_device, against the peak measured so far); elsewhere never, since the host's memory is
    where the data is already."""
    if device.type != "cuda":
        return False
    ok, why = fits_on_device(split, device)
    say_once(split, device, ok, why if ok else why + "; streaming it from host memory")
    return ok


def say_once(split: Split, device: torch.device, resident: bool, text: str) -> None:
    """Log a residency decision for ``split`` on stderr once per split, device and decision, not every epoch."""
    said = _SAID.setdefault(split, set())
    key = f"{device}:{resident}"
    if key not in said:
        said.add(key)
        print(f"data on {device}: {text}", file=sys.stderr, flush=True)
