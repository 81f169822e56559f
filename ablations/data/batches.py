"""The DataLoader-free batch iterator: order, augmentation and normalisation of whole batches on the device.

Training slices the cached uint8 arrays directly, moves the batch to the device and augments it
there (ablations.data.augment). Each epoch's randomness comes from two streams derived from
(seed, epoch) alone: the sample order on the host, the augmentation on the data's device.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

import ablations.data.augment as augment
from ablations.data.dataset import Dataset, Split
from ablations.data.resident import DeviceSplit, device_split, fits_on_device, is_resident, say_once


def _seeds(seed: int, epoch: int) -> tuple[int, int]:
    # SeedSequence mixes (seed, epoch) so neighbouring pairs give unrelated streams: one for the
    # sample order (host), one for augmentation (device).
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1), int(state[1]) & ((1 << 63) - 1)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The host generator of an epoch's sample order (a permutation, drawn once per epoch)."""
    return torch.Generator(device="cpu").manual_seed(_seeds(seed, epoch)[0])


def augmentation_generator(seed: int, epoch: int, device: torch.device | str) -> torch.Generator:
    """The generator that draws an epoch's augmentation, living on ``device`` (the data's device).

    Fresh at the start of every epoch, so its state is a function of (seed, epoch, device) alone:
    iterate_batches(start=k) re-derives it and advances it past k batches; nothing needs saving.
    """
    return torch.Generator(device=torch.device(device)).manual_seed(_seeds(seed, epoch)[1])


class _HostBatches:
    """Batches gathered from (possibly memmapped) host arrays into reused staging buffers.

    On CUDA two pinned buffers take turns, so the gather of batch i+1 overlaps the async copy of
    batch i; an event per buffer says when its copy is done and it may be refilled.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device) -> None:
        self.split, self.device, self.cuda = split, device, device.type == "cuda"
        shape = (min(batch_size, max(1, len(split))), *split.images.shape[1:])
        self.bufs = [torch.empty(shape, dtype=torch.uint8, device="cpu", pin_memory=self.cuda)
                     for _ in range(2 if self.cuda else 1)]
        self.events: list[object | None] = [None] * len(self.bufs)
        self.turn = 0

    def images(self, idx: np.ndarray) -> Tensor:
        i, self.turn = self.turn, (self.turn + 1) % len(self.bufs)
        if self.events[i] is not None:
            self.events[i].synchronize()  # its previous copy to the device has finished
        buf = self.bufs[i][: len(idx)]
        np.take(self.split.images, idx, axis=0, out=buf.numpy(), mode="clip")
        if not self.cuda:
            return buf  # never yielded as is: augmentation / normalisation make new tensors
        x = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events[i] = event
        return x


def _transform(x: Tensor, dataset: Dataset, train: bool, gen: torch.Generator, dtype: torch.dtype,
               constants: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """uint8 NCHW -> augmented (train) or eval-cropped, normalised batch, in x's memory format."""
    if dataset.style == "cifar":
        if train:
            x = augment.pad_crop_flip(x, 4, generator=gen)
    elif train:
        x = augment.random_resized_crop_flip(x, dataset.image_size, generator=gen)
    elif x.shape[-1] != dataset.image_size or x.shape[-2] != dataset.image_size:
        x = augment.center_crop(x, dataset.image_size)
    return augment.normalize(x, dataset.mean, dataset.std, dtype, constants=constants)


def _skip_draws(dataset: Dataset, n: int, hw: tuple[int, int], gen: torch.Generator, device: torch.device) -> None:
    """Advance ``gen`` exactly as ``_transform(train=True)`` would for a batch of ``n``, without the work."""
    if dataset.style == "cifar":
        augment.pad_crop_flip_params(n, 4, 0.5, gen, device)
    else:
        augment.random_resized_crop_params(n, hw[0], hw[1], (0.08, 1.0), (3 / 4, 4 / 3), 0.5, gen, device)


def iterate_batches(
    split: Split | DeviceSplit,
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    device: torch.device | str,
    epoch: int = 0,
    seed: int = 0,
    drop_last: bool | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    start: int = 0,
    resident: bool | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (normalised NCHW images of ``dtype``, int64 labels) on ``device``.

    train=True: order = randperm from a host generator seeded by (seed, epoch), drawn once per
    epoch; augmentation is drawn by ``augmentation_generator(seed, epoch, device)``, so an epoch
    is reproducible on a given device. train=False: in order, only the eval centre crop
    (imagenet style). drop_last defaults to ``train``.

    start=k begins at batch k and yields exactly what an uninterrupted epoch yields from there:
    the k skipped batches' random draws are consumed (without augmenting anything).

    resident: None decides (a CUDA split that fits is copied to the GPU once, then every batch
    is a device gather); False streams from the host arrays (unless a copy is there already);
    True makes the split resident (on a CPU too: a copy in host memory).
    All per-epoch setup (order, generators, normalisation constants) happens here, before the
    first batch, so the loop itself copies nothing between host and device when resident.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    device = torch.device(device)
    drop_last = train if drop_last is None else drop_last
    n = len(split)
    order = torch.randperm(n, generator=_epoch_generator(seed, epoch), device="cpu") if train else None
    gen = augmentation_generator(seed, epoch, device)

    if isinstance(split, Split):
        if device.type == "cuda" and resident is None and not is_resident(split, device):
            resident, why = fits_on_device(split, device)
            say_once(split, device, resident, why if resident else why + "; streaming it from host memory")
        if resident or is_resident(split, device):
            try:
                split = device_split(split, device)  # whole split resident: batches are pure device gathers
            except torch.cuda.OutOfMemoryError as exc:  # the room went (another worker) between sizing and copying
                why = str(exc).splitlines()[0][:120] if str(exc) else "out of memory"
                say_once(split, device, False, f"copying the data to the GPU failed ({why}); streaming it from host memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    end = n - n % batch_size if drop_last else n
    constants = augment.affine_constants(dataset.mean, dataset.std, device)
    hw = tuple(split.images.shape[1:3])
    first = min(start * batch_size, end)
    if train:
        for s in range(0, first, batch_size):
            _skip_draws(dataset, min(batch_size, end - s), hw, gen, device)
    if isinstance(split, DeviceSplit):
        where = split.images.device
        order_on = order.to(where) if train else torch.arange(n, device=where)
        return _resident_batches(split, dataset, order_on, first, end, batch_size, train, device, gen, dtype,
                                 channels_last, constants)
    # Labels and order go to the device once per epoch; only the images are streamed batch by batch.
    labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64)).to(device)
    order_host = order.numpy() if train else np.arange(n)
    order_dev = order.to(device) if train else torch.arange(n, device=device)
    return _streamed_batches(split, dataset, labels, order_host, order_dev, first, end, batch_size, train, device,
                             gen, dtype, channels_last, constants)


def _finish(x: Tensor, dataset: Dataset, train: bool, gen: torch.Generator, dtype: torch.dtype,
            channels_last: bool, constants: tuple[Tensor, Tensor]) -> Tensor:
    x = x.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: channels_last strides, no copy
    if not channels_last:
        x = x.contiguous()  # the layout change on uint8, the cheapest place for it
    x = _transform(x, dataset, train, gen, dtype, constants)  # keeps the memory format
    # A no-op on the pad-crop path; grid_sample (imagenet style) returns NCHW, converted here.
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _resident_batches(split: DeviceSplit, dataset: Dataset, order: Tensor, first: int, end: int, batch_size: int,
                      train: bool, device: torch.device, gen: torch.Generator, dtype: torch.dtype,
                      channels_last: bool, constants: tuple[Tensor, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    for s in range(first, end, batch_size):
        idx = order[s : s + batch_size]
        x, y = split.images[idx], split.labels[idx]
        if x.device != device:  # a DeviceSplit made for another device; not the hot path
            x, y = x.to(device), y.to(device)
        yield _finish(x, dataset, train, gen, dtype, channels_last, constants), y


def _streamed_batches(split: Split, dataset: Dataset, labels: Tensor, order_host: np.ndarray,
                      order_dev: Tensor, first: int, end: int, batch_size: int, train: bool,
                      device: torch.device, gen: torch.Generator, dtype: torch.dtype, channels_last: bool,
                      constants: tuple[Tensor, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    host = _HostBatches(split, batch_size, device)
    for s in range(first, end, batch_size):
        x = host.images(order_host[s : s + batch_size])
        y = labels[order_dev[s : s + batch_size]]
        yield _finish(x, dataset, train, gen, dtype, channels_last, constants), y
