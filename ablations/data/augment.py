"""Batched, device-agnostic image augmentation on NCHW tensors.

Every function works on a whole batch at once (no Python loop over images) so it
runs as a handful of kernels on the GPU. Random parameters are drawn on the batch's
own device from a ``torch.Generator`` that lives there, and every index tensor is
made there too: a training step moves nothing between host and device. The same
seed gives the same draws on the same device (CPU and CUDA generators differ).

The ``*_params`` functions draw exactly what their augmentation draws, so a caller can
advance a generator past a batch without doing the work (resuming mid-epoch).

Layout: the output keeps the input's memory format. A channels_last batch (the NHWC
storage the data lives in, viewed as NCHW) is gathered in NHWC order and stays
channels_last, so no layout copy is needed after augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "pad_crop_flip", "pad_crop_flip_params", "random_resized_crop_flip", "random_resized_crop_params",
    "center_crop", "normalize", "affine_constants",
]


def _check_nchw(x: Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"expected an NCHW batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    return n, c, h, w


def _is_channels_last(x: Tensor) -> bool:
    # A batch with one channel or 1x1 images is both; treat it as NCHW (either gather is right).
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _flip_mask(n: int, flip_p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    # Always draw, even for flip_p=0, so the random stream does not depend on flip_p.
    return torch.rand(n, generator=generator, device=device) < flip_p


def pad_crop_flip_params(
    n: int, pad: int, flip_p: float, generator: torch.Generator | None, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dx, flip) for ``n`` images, drawn on ``device``: crop offsets into the padded image."""
    device = torch.device(device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    return dy, dx, _flip_mask(n, flip_p, generator, device)


def pad_crop_flip(
    x: Tensor, pad: int = 4, generator: torch.Generator | None = None, flip_p: float = 0.5
) -> Tensor:
    """Zero-pad by ``pad``, randomly crop back to (H, W) per image, then flip horizontally.

    Works on any dtype (uint8 is cheapest). Implemented as one advanced-indexing
    gather into the padded batch, with per-image row/column index vectors.
    """
    n, c, h, w = _check_nchw(x)
    if n == 0:
        return x
    dev = x.device
    dy, dx, flip = pad_crop_flip_params(n, pad, flip_p, generator, dev)
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]  # (N, H) indices into the padded image
    cols = torch.arange(w, device=dev)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (N, W)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x  # keeps x's memory format
    bi = torch.arange(n, device=dev)
    if _is_channels_last(padded):
        # Gather whole pixels (all C at once) from the NHWC storage: the result is NHWC-contiguous,
        # i.e. channels_last when viewed back as NCHW.
        nhwc = padded.permute(0, 2, 3, 1)
        return nhwc[bi[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    ci = torch.arange(c, device=dev)
    return padded[bi[:, None, None, None], ci[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def _sample_boxes(
    n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
    generator: torch.Generator | None, device: torch.device, attempts: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Integer crop boxes (top, left, height, width), torchvision's RandomResizedCrop rule, vectorised.

    Each image gets ``attempts`` candidate boxes; the first one that fits is used, else the
    same centre-crop fallback torchvision uses.
    """
    area = float(h * w)
    s = torch.empty(n, attempts, device=device).uniform_(scale[0], scale[1], generator=generator) * area
    log_r = torch.empty(n, attempts, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(s * aspect).round()
    ch = torch.sqrt(s / aspect).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.int().argmax(dim=1)  # index of first valid attempt (0 if none; masked below)
    any_ok = ok.any(dim=1)
    bw = cw.gather(1, first[:, None]).squeeze(1)
    bh = ch.gather(1, first[:, None]).squeeze(1)

    # Fallback: whole image, clamped to the allowed aspect range, centred.
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = float(w), float(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = float(round(h * max(ratio))), float(h)
    else:
        fw, fh = float(w), float(h)
    bw = torch.where(any_ok, bw, torch.full_like(bw, fw))
    bh = torch.where(any_ok, bh, torch.full_like(bh, fh))

    u = torch.rand(n, 2, generator=generator, device=device)
    top = torch.where(any_ok, (u[:, 0] * (h - bh + 1)).floor(), ((h - bh) / 2).round())
    left = torch.where(any_ok, (u[:, 1] * (w - bw + 1)).floor(), ((w - bw) / 2).round())
    return top, left, bh, bw


def random_resized_crop_params(
    n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], flip_p: float,
    generator: torch.Generator | None, device: torch.device | str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(top, left, box height, box width, flip) for ``n`` images of ``h`` x ``w``, drawn on ``device``."""
    device = torch.device(device)
    top, left, bh, bw = _sample_boxes(n, h, w, scale, ratio, generator, device)
    return top, left, bh, bw, _flip_mask(n, flip_p, generator, device)


def random_resized_crop_flip(
    x: Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    flip_p: float = 0.5,
) -> Tensor:
    """Per-image random box resampled to ``size`` x ``size`` with one batched bilinear
    ``grid_sample``, plus a random horizontal flip folded into the same affine map.

    Returns a floating tensor in the input's value range (uint8 input -> float32 in [0, 255]).
    No antialiasing on strong downscales (unlike PIL/torchvision resize); with the usual
    8/7 stored margin the crops are mostly upscaled, where it does not matter.
    """
    n, _, h, w = _check_nchw(x)
    xf = x if x.is_floating_point() else x.float()
    if n == 0:
        return xf.new_empty((0, x.shape[1], size, size))
    dev = x.device
    top, left, bh, bw, flip = random_resized_crop_params(n, h, w, scale, ratio, flip_p, generator, dev)
    # Map output coords in [-1, 1] onto the box in input coords (align_corners=False):
    # u = (bw / W) * v + (2 * left + bw) / W - 1; a flip negates the scale about the box centre.
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = (bw / w) * (1.0 - 2.0 * flip.float())
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta.to(xf.dtype), [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(x: Tensor, size: int) -> Tensor:
    """Central ``size`` x ``size`` window (same offset rounding as torchvision)."""
    _, _, h, w = _check_nchw(x)
    if size > h or size > w:
        raise ValueError(f"center_crop: size {size} larger than image {h}x{w}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[:, :, top : top + size, left : left + size]


def affine_constants(mean: Sequence[float], std: Sequence[float], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(scale, shift), float32 (1, C, 1, 1) on ``device``, with x * scale - shift = (x / 255 - mean) / std.

    Building them copies a few numbers from the host, so make them once (per epoch) and pass
    them to ``normalize``; a training step then copies nothing.
    """
    m = torch.tensor(mean, dtype=torch.float64, device="cpu")
    s = torch.tensor(std, dtype=torch.float64, device="cpu")
    c = len(mean)
    scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, c, 1, 1)
    shift = (m / s).to(torch.float32).view(1, c, 1, 1)
    return scale.to(device), shift.to(device)


def normalize(
    x: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32,
    constants: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """(x / 255 - mean) / std per channel, for uint8 or float input in [0, 255] units.

    Computed in float32 (one multiply and one subtract per element) and cast to ``dtype`` last,
    so bf16 output does not lose precision in the intermediate; the model then gets its compute
    dtype once, here, instead of a cast in its first layer. ``constants`` from ``affine_constants``
    (on x's device) skip the per-call host copy. Elementwise ops keep x's memory format.
    """
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalize: {c} channels but {len(mean)} means / {len(std)} stds")
    scale, shift = constants if constants is not None else affine_constants(mean, std, x.device)
    out = x.to(torch.float32) * scale
    out.sub_(shift)
    return out if dtype == torch.float32 else out.to(dtype)
