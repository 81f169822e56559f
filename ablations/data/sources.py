"""Where a dataset's pixels come from (torchvision CIFAR, JPEG trees and archives, synthetic): load_dataset.

Every source is decoded once into the uint8 cache (ablations.data.cache) and then subset
(ablations.data.subsets). Archives (.tar.gz) are decoded straight from the tar stream rather than
extracted first: extracting CIFAR-10's 60k files with tarfile alone took ~20 s, twice the decode,
and would leave loose files in the cache. Nothing is ever written next to the source.

Normalisation constants: cifar10/cifar100 use the standard published per-channel constants
(so every subset and source - torchvision pickles or the JPEG copy - normalises identically);
image-folder trees and synthetic use mean/std computed from the (subset) train split.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ablations.data.cache import Decoded, build_cached, cached, channel_stats, decode_image_tree, default_cache_dir
from ablations.data.dataset import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                    CIFAR_STYLE_MAX_PX, EVAL_MARGIN, DataError, Dataset, Split, fail, short)
from ablations.data.subsets import class_spec, read_class_list, resolve_classes, subset
from ablations.data.trees import dir_fingerprint, file_fingerprint, find_tree, list_archive, list_tree, tree_fingerprint

# Image-folder trees under a well-known name: the name goes into runs, cell ids and reports, so
# Imagenette and Imagewoof runs of one grid are never mistaken for each other.
IMAGE_TREES = {"imagefolder": None, "imagenette": 10, "imagewoof": 10, "imagenet": None}  # name -> classes
_TV_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _stored_size(image_size: int | None) -> tuple[int | None, str | None]:
    """(square side stored in the cache, style) for a requested model image size.

    Small targets are stored at their own size (pad-crop needs no margin); larger ones at
    round(size * 8/7) so random-resized-crop has room and eval centre-crops.
    """
    if image_size is None:
        return None, None  # native size; style decided from it
    big = round(image_size * EVAL_MARGIN)
    return (image_size, "cifar") if big <= CIFAR_STYLE_MAX_PX else (big, "imagenet")


# --------------------------------------------------------------------------- image-folder trees


def _load_image_tree(name: str, path: Path, cache_dir: Path, side: int | None,
                     wanted: Sequence[str | int] | None = None,
                     stop_check: Callable[[], None] | None = None) -> tuple[Decoded, str]:
    """Cached decode of a tree directory or a tar archive of one, of the ``wanted`` classes only.

    The cache tag comes from the source, so 'cifar10' and 'imagefolder' on the same archive
    share one decode. An archive is listed (one streaming pass over member names) only on a miss.
    """
    resize = side if side is not None else "native"
    spec = class_spec(wanted)
    if path.is_file():
        key = {"kind": "archive", "src": file_fingerprint(path), "resize": resize, "classes": spec}
        tag, source = path.name.split(".")[0], f"jpeg-archive:{path}"

        def build(tmp: Path) -> None:
            decode_image_tree(name, path, list_archive(name, path, wanted), side, tmp, stop_check)
    else:
        tree = find_tree(path)
        if tree is None:
            raise fail(name, f"{path} has no train/ and val/ or test/ folders")
        listing = list_tree(name, tree, wanted)
        key = {"kind": "tree", "src": str(tree.resolve()), "fp": tree_fingerprint(tree, listing),
               "resize": resize, "classes": spec}
        tag, source = tree.resolve().name, f"jpeg-tree:{tree}"

        def build(tmp: Path) -> None:
            decode_image_tree(name, tree, listing, side, tmp, stop_check)
    return build_cached(cache_dir, tag, key, build), source


# --------------------------------------------------------------------------- CIFAR


def _torchvision_cifar(name: str, root: Path, download: bool) -> list:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return [cls(str(root), train=t, download=download) for t in (True, False)]


def _decode_torchvision_cifar(name: str, root: Path) -> Decoded:
    parts = _torchvision_cifar(name, root, download=False)
    splits = [Split(np.ascontiguousarray(d.data, dtype=np.uint8), np.asarray(d.targets, dtype=np.int64))
              for d in parts]
    return Decoded(tuple(parts[0].classes), splits[0], splits[1], {})


def _load_torchvision_cifar(name: str, root: Path, cache_dir: Path) -> Decoded:
    tv_dir = root / _TV_DIRS[name]
    key = {"kind": "torchvision", "src": str(tv_dir.resolve()), "fp": dir_fingerprint(tv_dir)}
    return cached(cache_dir, name, key, lambda: _decode_torchvision_cifar(name, root))


def _cifar_jpeg_candidate(root: Path) -> Path | None:
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        return root
    for cand in (root / "cifar10-jpeg", root):
        if cand.is_dir() and (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    archive = root / "cifar10-jpeg.tar.gz"
    return archive if archive.is_file() else None


def _load_cifar(name: str, root: Path, cache_dir: Path, image_size: int | None,
                download: bool, stop_check: Callable[[], None] | None = None) -> tuple[Decoded, str]:
    if image_size not in (None, 32):
        raise fail(name, f"image_size={image_size} unsupported (CIFAR is 32x32; use imagefolder to resize)")
    if (root / _TV_DIRS[name]).is_dir():
        try:
            return _load_torchvision_cifar(name, root, cache_dir), f"torchvision:{root}"
        except RuntimeError as exc:  # e.g. torchvision's integrity check
            if isinstance(exc, DataError):
                raise
            raise fail(name, f"torchvision files under {root} unusable: {short(exc)}") from exc
    if name == "cifar10":
        cand = _cifar_jpeg_candidate(root)
        if cand is not None:
            dec, source = _load_image_tree(name, cand, cache_dir, None, stop_check=stop_check)
            if dec.classes != CIFAR10_CLASSES:
                raise fail(name, f"{cand} class folders {dec.classes} are not the CIFAR-10 classes")
            return dec, source
    looked = f"{_TV_DIRS[name]}" + (", cifar10-jpeg/, cifar10-jpeg.tar.gz" if name == "cifar10" else "")
    if not download:
        raise fail(name, f"not found under {root} (looked for {looked}) and download=False")
    # A missing root is created only once the download worked (it goes to a scratch folder in
    # the cache first): a mistyped --data-root must not leave a directory tree behind.
    scratch: Path | None = None
    try:
        target = root
        if not root.is_dir():
            cache_dir.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".download-{name}-", dir=cache_dir))
            target = scratch
        _torchvision_cifar(name, target, download=True)  # downloads + verifies; then cache as usual
        if scratch is not None:
            root.mkdir(parents=True, exist_ok=True)
            for p in scratch.iterdir():
                shutil.move(str(p), str(root / p.name))
        return _load_torchvision_cifar(name, root, cache_dir), f"torchvision:{root}"
    except Exception as exc:  # network, permissions, checksum: all reported the same way
        if isinstance(exc, DataError):
            raise
        raise fail(name, f"not found under {root} (looked for {looked}) "
                         f"and download failed: {short(exc)}") from exc
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- synthetic


def _synthetic(seed: int, per_class: tuple[int, int], n_classes: int = 10, side: int = 32) -> Decoded:
    """Class = a colour tint + an oriented stripe pattern, under heavy noise.

    The class signal is strong in the per-class mean (a tiny CNN learns it in an epoch) but
    single images are noisy, so it is not trivially separable pixel by pixel.
    """
    rng = np.random.default_rng(seed)
    tints = rng.uniform(-50, 50, size=(n_classes, 3))
    angles = np.arange(n_classes) * (np.pi / n_classes)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)

    def make(n_per: int) -> Split:
        labels = np.repeat(np.arange(n_classes), n_per)
        labels = labels[rng.permutation(labels.size)]
        phase = rng.uniform(0, 2 * np.pi, size=(labels.size, 1, 1))
        proj = xx * np.cos(angles[labels])[:, None, None] + yy * np.sin(angles[labels])[:, None, None]
        stripes = 40 * np.sin(2 * np.pi * proj / 8 + phase)
        img = 128 + tints[labels][:, None, None, :] + stripes[..., None]
        img += rng.normal(0, 30, size=img.shape)
        return Split(np.clip(img, 0, 255).round().astype(np.uint8), labels.astype(np.int64))

    return Decoded(tuple(f"class{i}" for i in range(n_classes)), make(per_class[0]), make(per_class[1]), {})


def noise_dataset(image_size: int, n_train: int, n_test: int, num_classes: int, *,
                  source: str = "noise", seed: int = 0) -> Dataset:
    """A tiny in-memory dataset of uniform-noise images whose labels cycle through the classes.

    For checks that run the training path end to end (preflight), not for learning anything.
    Images are stored as a model of ``image_size`` expects them: at that size for CIFAR style
    (up to CIFAR_STYLE_MAX_PX), else at round(size * 8/7) for random-resized-crop and centre-crop.
    """
    style = "cifar" if image_size <= CIFAR_STYLE_MAX_PX else "imagenet"
    side = image_size if style == "cifar" else round(image_size * EVAL_MARGIN)
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
                     (np.arange(n) % num_classes).astype(np.int64))

    return Dataset("synthetic", source, tuple(f"class{i}" for i in range(num_classes)), split(n_train),
                   split(n_test), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), style, image_size)


# --------------------------------------------------------------------------- public loader


@dataclass(frozen=True)
class _Source:
    """What one dataset family hands to load_dataset before subsetting."""

    decoded: Decoded
    source: str
    style: str
    image_size: int
    stats: tuple[Sequence[float], Sequence[float]] | None  # None: from the (subset) train split


def _cifar_source(name: str, root: Path, cache: Path, image_size: int | None, download: bool,
                  stop_check: Callable[[], None] | None = None) -> _Source:
    dec, source = _load_cifar(name, root, cache, image_size, download, stop_check)
    stats = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return _Source(dec, source, "cifar", 32, stats)


def _imagefolder_source(name: str, root: Path, cache: Path, image_size: int | None,
                        classes: Sequence[str | int] | None, stop_check: Callable[[], None] | None = None) -> _Source:
    if not root.exists():
        raise fail(name, f"root {root} does not exist")
    side, style = _stored_size(image_size)
    dec, source = _load_image_tree(name, root, cache, side, classes, stop_check)
    n_all = len(dec.meta.get("all_classes", dec.classes))
    if IMAGE_TREES[name] is not None and n_all != IMAGE_TREES[name]:
        raise fail(name, f"{root} has {n_all} class folders, {name} has {IMAGE_TREES[name]} "
                         "(use dataset.name: imagefolder for other trees)")
    _, h, w, _ = dec.train.images.shape
    if h != w:
        raise fail(name, f"images under {root} are {w}x{h}, not square; pass image_size")
    style = style or ("cifar" if h <= CIFAR_STYLE_MAX_PX else "imagenet")
    return _Source(dec, source, style, image_size or h, None)


def _synthetic_source(seed: int, n_classes: int, train_size: int, test_size: int,
                      image_size: int | None) -> _Source:
    if image_size not in (None, 32):
        raise fail("synthetic", f"image_size={image_size} unsupported (synthetic data is 32x32)")
    # Generate enough per class that any class subset can still fill the requested sizes.
    per = (math.ceil(train_size / n_classes), math.ceil(test_size / n_classes))
    return _Source(_synthetic(seed, per), f"synthetic(seed={seed})", "cifar", 32, None)


def load_dataset(
    name: str,
    root: str | Path,
    *,
    classes: Sequence[str | int] | str | Path | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    subset_seed: int = 0,
    image_size: int | None = None,
    download: bool = True,
    cache_dir: str | Path | None = None,
    stop_check: Callable[[], None] | None = None,
) -> Dataset:
    """Load (decoding + caching on first use) a dataset and take the requested subset.

    ``classes``: names or indices into the full class list, or the path of a class list file
    (``read_class_list``); labels become 0..k-1 in that order. Image-folder trees decode only
    these classes.
    ``train_size``/``test_size``: total images per split, stratified, deterministic in subset_seed.
    ``image_size`` (imagefolder): None keeps the native size if all images share one square size
    (style 'imagenet' above 64 px then crops/evaluates at that full size); otherwise images are
    stored at round(size * 8/7) (style 'imagenet') or at ``image_size`` itself when that stored
    size would be <= 64 px (style 'cifar').
    imagenette / imagewoof / imagenet are image-folder trees under their own name (10, 10, any
    number of classes). ``synthetic`` ignores ``root`` and defaults to 512 train / 256 test images.
    ``stop_check()`` is called between decode chunks and may raise to stop (a preemption): the
    partial decode is dropped, and the next load decodes again.
    """
    root = Path(root).expanduser().resolve()  # absolute, so `source` and errors are unambiguous
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if isinstance(classes, (str, Path)):
        classes = read_class_list(classes, root, name)
    if name in ("cifar10", "cifar100"):
        src = _cifar_source(name, root, cache, image_size, download, stop_check)
    elif name in IMAGE_TREES:
        src = _imagefolder_source(name, root, cache, image_size, classes, stop_check)
        # Only the selected classes were decoded, stored in label order; indices meant the full list.
        every = src.decoded.meta.get("all_classes", src.decoded.classes)
        classes = None if classes is None else [
            every[c] if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < len(every) else c
            for c in classes]
    elif name == "synthetic":
        train_size = 512 if train_size is None else train_size
        test_size = 256 if test_size is None else test_size
        src = _synthetic_source(subset_seed, len(classes) if classes else 10, train_size, test_size, image_size)
    else:
        raise fail(name, "unknown dataset name (expected cifar10, cifar100, synthetic, "
                         f"or an image-folder tree: {', '.join(IMAGE_TREES)})")

    dec = src.decoded
    keep = resolve_classes(name, dec.classes, classes)
    n_all = len(dec.classes)
    train = subset(name, "train", dec.train, n_all, keep, train_size, [subset_seed, 0])
    test = subset(name, "test", dec.test, n_all, keep, test_size, [subset_seed, 1])
    if src.stats is not None:
        mean, std = src.stats
    elif train is dec.train and "mean" in dec.meta:
        mean, std = dec.meta["mean"], dec.meta["std"]  # full split: computed once at decode time
    else:
        mean, std = channel_stats(train.images)  # stats of the subset actually trained on
    return Dataset(
        name=name, source=src.source, classes=tuple(dec.classes[i] for i in keep), train=train, test=test,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        style=src.style, image_size=int(src.image_size),
    )
