"""Datasets as decoded uint8 arrays, cached on disk, and a DataLoader-free batch iterator.

Every dataset is decoded ONCE into equal-size uint8 images (N, H, W, 3) + int64 labels and
cached as .npy under ``cache_dir`` (images reopened with ``mmap_mode='r'``). Training slices
those arrays directly, moves the batch to the device and augments the whole batch there
(see ``ablations.data.augment``). On CUDA a split that fits is made resident on the GPU once.

Image-folder trees scale past RAM: images are decoded once, at the training resolution (the
shorter side resized to round(image_size * 8/7), ~1.15x the crop), in bounded chunks written
straight into the cache's .npy file, with streaming channel statistics; only the selected
``classes`` are decoded. Peak RSS while building or training does not grow with the dataset
(bench/data_scaling.py measures it).

Archives (.tar.gz) are decoded straight from the tar stream rather than extracted first:
extracting CIFAR-10's 60k files with tarfile alone took ~20 s, twice the decode, and would
leave loose files in the cache. Nothing is ever written next to the source.

Normalisation constants: cifar10/cifar100 use the standard published per-channel constants
(so every subset and source - torchvision pickles or the JPEG copy - normalises identically);
image-folder trees and synthetic use mean/std computed from the (subset) train split.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

from ablations.data import augment

__all__ = [
    "Split", "Dataset", "DataError", "DeviceSplit", "load_dataset", "iterate_batches",
    "device_split", "clear_device_cache", "default_cache_dir", "read_class_list", "CIFAR10_CLASSES", "IMAGE_TREES",
]

CACHE_VERSION = 2  # bump when the on-disk layout or decode rules change
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"})
CIFAR_STYLE_MAX_PX = 64  # stored images up to this size get CIFAR-style augmentation
EVAL_MARGIN = 8 / 7  # imagenet style stores round(size * 8/7) so crops have room (256 for 224)
_PROGRESS_EVERY_S = 5.0


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


# --------------------------------------------------------------------------- small helpers


def default_cache_dir() -> Path:
    env = os.environ.get("SENET_ABLATIONS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "senet-ablations"


def _fail(name: str, msg: str) -> DataError:
    return DataError(f"dataset {name}: {msg}".replace("\n", " "))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _hash_key(parts: dict) -> str:
    blob = json.dumps({**parts, "v": CACHE_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _file_fingerprint(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _dir_fingerprint(root: Path) -> str:
    """Hash of every file's relative path, size and mtime under ``root`` (a few pickles for CIFAR)."""
    h = hashlib.sha256(str(root.resolve()).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temp dir into place; if another process won, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_tmp(final: Path) -> Path:
    # Leftovers of killed runs share the prefix; we hold the lock, so they are safe to delete.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    return tmp


def _progress(label: str, total: int | None) -> Callable[..., None]:
    """Returns tick(done, final=False): a stderr line every few seconds with count, total, ETA."""
    start = last = time.monotonic()

    def tick(done: int, final: bool = False) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < _PROGRESS_EVERY_S and not (final and now - start >= _PROGRESS_EVERY_S):
            return  # quiet between reports, and entirely for short jobs
        last = now
        of = f"/{total}" if total else ""
        eta = f", ETA {(now - start) / max(done, 1) * (total - done):.0f}s" if total and not final else ""
        print(f"{label}: {done}{of} images, {now - start:.0f}s{eta}", file=sys.stderr, flush=True)

    return tick


# --------------------------------------------------------------------------- on-disk cache

_SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Decoded:
    """A full decoded dataset as written to / read from the cache."""

    classes: tuple[str, ...]
    train: Split
    test: Split
    meta: dict  # extra JSON-able facts (e.g. full-train mean/std)


def _write_cache(dst: Path, dec: _Decoded) -> None:
    for s in _SPLITS:
        split: Split = getattr(dec, s)
        np.save(dst / f"{s}_images.npy", np.ascontiguousarray(split.images, dtype=np.uint8))
        np.save(dst / f"{s}_labels.npy", np.asarray(split.labels, dtype=np.int64))
    (dst / "meta.json").write_text(json.dumps({**dec.meta, "classes": list(dec.classes)}))


def _read_cache(src: Path) -> _Decoded:
    meta = json.loads((src / "meta.json").read_text())
    splits = {
        s: Split(np.load(src / f"{s}_images.npy", mmap_mode="r"), np.load(src / f"{s}_labels.npy"))
        for s in _SPLITS
    }
    return _Decoded(tuple(meta.pop("classes")), splits["train"], splits["test"], meta)


def _build_cached(cache_dir: Path, tag: str, key: dict, build: Callable[[Path], None]) -> _Decoded:
    """Return the cache entry for ``key``; on a miss run ``build(tmp_dir)`` once, under a lock.

    ``build`` writes {train,test}_{images,labels}.npy and meta.json into the temp dir, which is
    then renamed into place: a killed build leaves only a temp dir, removed by the next one.
    """
    final = cache_dir / f"{tag}-{_hash_key(key)}"
    if (final / "meta.json").is_file():
        return _read_cache(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One lock per entry, so concurrent runs decode a dataset once, not N times.
    with FileLock(str(cache_dir / f".{final.name}.lock")):
        if not (final / "meta.json").is_file():  # another process may have finished meanwhile
            tmp = _fresh_tmp(final)
            try:
                build(tmp)
                (tmp / "key.json").write_text(json.dumps(key, indent=1))  # for humans inspecting it
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _publish_dir(tmp, final)
    return _read_cache(final)


def _cached(cache_dir: Path, tag: str, key: dict, decode: Callable[[], _Decoded]) -> _Decoded:
    """_build_cached for decoders that hold the (small) dataset in memory: CIFAR pickles, synthetic."""
    return _build_cached(cache_dir, tag, key, lambda tmp: _write_cache(tmp, decode()))


# --------------------------------------------------------------------------- image decoding

_Key = tuple[str, str, str]  # (split folder: train/val/test, class folder, file name)
_EVAL_SPLITS = ("val", "test")  # the first one present is the test split
_CHUNK_BYTES = 64 << 20  # bounded working set for statistics passes over a memmap


def _stored_size(image_size: int | None) -> tuple[int | None, str | None]:
    """(square side stored in the cache, style) for a requested model image size.

    Small targets are stored at their own size (pad-crop needs no margin); larger ones at
    round(size * 8/7) so random-resized-crop has room and eval centre-crops.
    """
    if image_size is None:
        return None, None  # native size; style decided from it
    big = round(image_size * EVAL_MARGIN)
    return (image_size, "cifar") if big <= CIFAR_STYLE_MAX_PX else (big, "imagenet")


def _decode_one(src: Path | bytes, side: int | None) -> np.ndarray:
    """Decode to RGB uint8; if ``side``, resize the shorter side to it and centre-crop square."""
    from PIL import Image

    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        if side is None:
            return np.asarray(im.convert("RGB"))
        w, h = im.size
        k = side / min(w, h)
        nw, nh = max(side, round(w * k)), max(side, round(h * k))
        im.draft("RGB", (nw, nh))  # JPEG: let libjpeg downscale by 2^k first (big speed-up)
        rgb = im.convert("RGB")
        if rgb.size != (nw, nh):
            rgb = rgb.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - side) // 2, (nh - side) // 2
        return np.asarray(rgb.crop((left, top, left + side, top + side)))


def _is_image(filename: str) -> bool:
    return os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class _Listing:
    """What a tree or archive holds, known before any pixel is decoded."""

    all_classes: tuple[str, ...]  # every class folder of train/, sorted
    classes: tuple[str, ...]  # the classes to decode, in label order
    items: dict[str, list[_Key]]  # 'train' / 'test' -> keys in storage order (label, file name)

    def labels(self, split: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[c] for _, c, _ in self.items[split]], dtype=np.int64)


def _class_spec(wanted: Sequence[str | int] | None) -> list | None:
    """``dataset.classes`` as a JSON-able cache-key part (order matters: it is the label order)."""
    return None if wanted is None else [int(c) if isinstance(c, (int, np.integer)) else str(c) for c in wanted]


def _select(name: str, all_classes: tuple[str, ...], wanted: Sequence[str | int] | None) -> tuple[str, ...]:
    return tuple(all_classes[i] for i in _resolve_classes(name, all_classes, wanted))


def _finish_listing(name: str, where: str, all_classes: tuple[str, ...], eval_split: str | None,
                    files: dict[tuple[str, str], list[str]], wanted: Sequence[str | int] | None,
                    empty: Sequence[str] = ()) -> _Listing:
    """Checks shared by trees and archives; ``files``: (split, class) -> sorted image file names."""
    if not all_classes or eval_split is None:
        raise _fail(name, f"{where} needs images under train/<class>/ and val/<class>/ or test/<class>/")
    unknown = sorted({c for s, c in files if s == eval_split} - set(all_classes))
    if unknown:
        raise _fail(name, f"{where}: {eval_split}/ has classes missing from train/: {', '.join(unknown[:8])}"
                          f"{' ...' if len(unknown) > 8 else ''}")
    chosen = _select(name, all_classes, wanted)
    for split in ("train", eval_split):
        for cls in chosen:
            if (split, cls) in files and not files[split, cls] or f"{split}/{cls}" in empty:
                raise _fail(name, f"empty class folder {where}/{split}/{cls} (no image files)")
    items = {
        s: [(split, c, f) for c in chosen for f in files.get((split, c), [])]
        for s, split in (("train", "train"), ("test", eval_split))
    }
    for s, split in (("train", "train"), ("test", eval_split)):
        if not items[s]:
            raise _fail(name, f"no images under {where}/{split}/ for the selected classes")
    return _Listing(all_classes, chosen, items)


def _scan(name: str, folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise _fail(name, f"cannot list {folder}: {_short(exc)}") from exc


def _list_tree(name: str, tree: Path, wanted: Sequence[str | int] | None) -> _Listing:
    """Class folders of ``tree/{train, val|test}/``; only the selected classes' files are listed."""
    eval_split = next((d for d in _EVAL_SPLITS if (tree / d).is_dir()), None)
    dirs = {s: [e.name for e in _scan(name, tree / s) if e.is_dir() and not e.name.startswith(".")]
            for s in ("train", eval_split) if s is not None}
    all_classes = tuple(dirs.get("train", ()))
    chosen = set(_select(name, all_classes, wanted)) if all_classes else set()
    files: dict[tuple[str, str], list[str]] = {}
    for split, classes in dirs.items():
        for cls in classes:
            if split == eval_split and cls not in all_classes:
                files[split, cls] = []  # reported as unknown by _finish_listing
            elif cls in chosen:
                files[split, cls] = [e.name for e in _scan(name, tree / split / cls)
                                     if _is_image(e.name) and e.is_file()]
    return _finish_listing(name, str(tree), all_classes, eval_split, files, wanted)


def _tree_fingerprint(tree: Path, listing: _Listing) -> str:
    """Hash of the listed files' relative paths, sizes and mtimes: a changed file re-decodes.

    Only the files that are decoded are stat-ed (ImageNet-100 out of a full ImageNet tree stats
    130k files, not 1.3M); that is cheap next to decoding them.
    """
    h = hashlib.sha256(str(tree.resolve()).encode())
    h.update(json.dumps(listing.all_classes).encode())
    for split in _SPLITS:
        for key in listing.items[split]:
            st = os.stat(tree.joinpath(*key))
            h.update(f"{'/'.join(key)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _archive_walk(name: str, archive: Path, read: frozenset[_Key] | None = None,
                  unsafe: list[str] | None = None) -> Iterator[tuple[_Key, bytes | None]]:
    """Stream ``[<top>/]{train,val,test}/<class>/<file>`` members of a tar archive, in archive order.

    Decoding from the stream avoids extracting tens of thousands of small files (Python's
    tarfile needs ~20 s just to extract CIFAR-10) and never writes next to the source.
    ``read``: the keys whose bytes are wanted (others are yielded with None, i.e. listed only).
    Directory members come out as (split, class, '') so empty class folders can be told apart.
    ``unsafe`` collects the names of members never looked at: absolute or '..' paths, links, devices.
    """
    top: tuple[str, ...] | None = None
    try:
        with tarfile.open(archive, "r|*") as tf:
            for m in tf:
                path = PurePosixPath(m.name)
                parts = tuple(p for p in path.parts if p != ".")
                if path.is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                    if unsafe is not None:
                        unsafe.append(m.name)
                    continue
                depth = 2 if m.isdir() else 3
                if len(parts) not in (depth, depth + 1) or parts[-depth] not in ("train", *_EVAL_SPLITS):
                    continue
                if parts[-depth + 1].startswith(".") or (m.isfile() and not _is_image(parts[-1])):
                    continue
                if m.isdir():
                    if top is None or parts[:-2] == top:
                        yield (parts[-2], parts[-1], ""), None
                    continue
                if top is None:
                    top = parts[:-3]
                elif parts[:-3] != top:
                    raise _fail(name, f"archive {archive} holds more than one tree ({'/'.join(top)}, "
                                      f"{'/'.join(parts[:-3])})")
                key = (parts[-3], parts[-2], parts[-1])
                if read is not None and key in read:
                    fh = tf.extractfile(m)
                    yield key, fh.read() if fh is not None else b""
                else:
                    yield key, None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _fail(name, f"cannot read archive {archive}: {_short(exc)}") from exc


def _list_archive(name: str, archive: Path, wanted: Sequence[str | int] | None) -> _Listing:
    """First pass over an archive: member names only (no pixels decoded, no bytes kept)."""
    unsafe: list[str] = []
    files: dict[tuple[str, str], list[str]] = {}
    dirs: set[tuple[str, str]] = set()
    for (split, cls, fn), _ in _archive_walk(name, archive, unsafe=unsafe):
        if fn:
            files.setdefault((split, cls), []).append(fn)
        else:
            dirs.add((split, cls))
    if unsafe:  # never extracted, but say so: a silently smaller dataset is worse than a warning
        print(f"warning: dataset {name}: skipped {len(unsafe)} unsafe member(s) of {archive} "
              f"(absolute path, '..', link or device), e.g. {unsafe[0]!r}", file=sys.stderr, flush=True)
    eval_split = next((e for e in _EVAL_SPLITS if any(s == e for s, _ in files)), None)
    all_classes = tuple(sorted({c for s, c in files if s == "train"} | {c for s, c in dirs if s == "train"}))
    empty = [f"{s}/{c}" for s, c in dirs if (s, c) not in files and s in ("train", eval_split)]
    for k in files:
        files[k].sort()
    return _finish_listing(name, str(archive), all_classes, eval_split, files, wanted, empty)


class _NpyWriter:
    """A uint8 (N, H, W, 3) .npy filled in place with pwrite, in any order.

    Plain writes, not a writable memmap: dirty mapped pages would count toward the process's RSS
    until written back, so RSS would grow with the dataset. Written pages sit in the page cache.
    """

    def __init__(self, path: Path, n: int, shape: tuple[int, ...]) -> None:
        self.shape, self.item = shape, int(np.prod(shape))
        self.fh = open(path, "wb")
        np.lib.format.write_array_header_1_0(
            self.fh, {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)})
        self.offset = self.fh.tell()
        self.fh.truncate(self.offset + n * self.item)  # sparse until written
        self.written = np.zeros(n, dtype=bool)

    def write(self, i: int, img: np.ndarray) -> None:
        os.pwrite(self.fh.fileno(), np.ascontiguousarray(img).data, self.offset + i * self.item)
        self.written[i] = True

    def close(self) -> None:
        self.fh.close()


def _histogram(img: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(img[..., c].ravel(), minlength=256) for c in range(3)])


def _stats_from_hist(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    count = hist.sum(1)
    if count.min() == 0:
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    v = np.arange(256) / 255.0
    mean = hist @ v / count
    std = np.sqrt(np.maximum(hist @ (v * v) / count - mean * mean, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _decode_image_tree(name: str, src: Path, listing: _Listing, side: int | None, dst: Path) -> None:
    """Decode the listed images of a tree (or tar archive of one) straight into the cache's .npy files.

    RAM stays bounded whatever the dataset's size: images go from a bounded queue of decoded
    chunks to their row of the on-disk array; channel statistics are streaming 256-bin histograms.
    """
    where = str(src)
    pos = {key: (s, i) for s in _SPLITS for i, key in enumerate(listing.items[s])}
    total = len(pos)
    if src.is_file():
        items: Iterable[tuple[_Key, Path | bytes]] = (
            (k, b) for k, b in _archive_walk(name, src, read=frozenset(pos)) if b is not None)
    else:
        items = ((k, src.joinpath(*k)) for s in _SPLITS for k in listing.items[s])
    tick = _progress(f"decoding {name} from {where}", total)
    writers: dict[str, _NpyWriter] = {}
    hist = np.zeros((3, 256), dtype=np.int64)
    done = 0

    def run(chunk: list[tuple[_Key, Path | bytes]]) -> tuple[list[tuple[_Key, np.ndarray]], np.ndarray]:
        res, h = [], np.zeros((3, 256), dtype=np.int64)
        for key, item in chunk:
            try:
                img = _decode_one(item, side)
            except Exception as exc:  # PIL and the OS raise many types; name the file
                raise _fail(name, f"cannot read {where}/{'/'.join(key)}: {_short(exc)}") from exc
            if pos[key][0] == "train":
                h += _histogram(img)
            res.append((key, img))
        return res, h

    def store(result: tuple[list[tuple[_Key, np.ndarray]], np.ndarray]) -> None:
        nonlocal hist, done
        res, h = result
        for key, img in res:
            if not writers:
                for s in _SPLITS:
                    writers[s] = _NpyWriter(dst / f"{s}_images.npy", len(listing.items[s]), img.shape)
            shape = writers["train"].shape
            if img.shape != shape:
                raise _fail(name, f"images differ in size ({shape[1]}x{shape[0]} vs {img.shape[1]}x"
                                  f"{img.shape[0]} at {where}/{'/'.join(key)}); pass image_size")
            s, i = pos[key]
            writers[s].write(i, img)
        hist += h
        done += len(res)
        tick(done)

    it = iter(items)
    try:
        first = next(it, None)
        if first is None:
            raise _fail(name, f"no images found in {where}")
        store(run([first]))
        shape = writers["train"].shape
        # Tiny images (CIFAR) cost mostly per-call Python overhead under the GIL: threads measured
        # slower there. Larger ones spend their time in libjpeg/resize and do scale.
        small = shape[0] * shape[1] <= CIFAR_STYLE_MAX_PX ** 2
        workers, step = (1, 1024) if small else (min(8, os.cpu_count() or 1), 32)
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def drain(limit: int) -> None:
                while len(pending) > limit:  # bounded in-flight work keeps memory flat
                    store(pending.popleft().result())

            chunk: list[tuple[_Key, Path | bytes]] = []
            try:
                for item in it:
                    chunk.append(item)
                    if len(chunk) == step:
                        pending.append(pool.submit(run, chunk))
                        chunk = []
                        drain(2 * workers)
                if chunk:
                    pending.append(pool.submit(run, chunk))
                drain(0)
            finally:
                for f in pending:
                    f.cancel()
        tick(done, final=True)
        missing = [s for s in _SPLITS if not writers[s].written.all()]
        if missing:  # e.g. the archive was replaced between the listing and the decoding pass
            raise _fail(name, f"{where} changed while it was decoded; run again")
    finally:
        for w in writers.values():
            w.close()
    for s in _SPLITS:
        np.save(dst / f"{s}_labels.npy", listing.labels(s))
    mean, std = _stats_from_hist(hist)
    (dst / "meta.json").write_text(json.dumps({
        "mean": mean, "std": std, "all_classes": list(listing.all_classes), "classes": list(listing.classes)}))


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0, 1] units from 256-bin histograms, in bounded chunks."""
    hist = np.zeros((3, 256), dtype=np.int64)
    per_image = max(1, int(np.prod(images.shape[1:])))
    chunk = max(1, _CHUNK_BYTES // per_image)
    for s in range(0, images.shape[0], chunk):
        hist += _histogram(np.asarray(images[s : s + chunk]))
    return _stats_from_hist(hist)


def _find_tree(base: Path) -> Path | None:
    """The folder holding train/ and val/ or test/: ``base`` itself or its single subfolder."""
    def is_tree(p: Path) -> bool:
        return (p / "train").is_dir() and any((p / e).is_dir() for e in _EVAL_SPLITS)

    if is_tree(base):
        return base
    subdirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return subdirs[0] if len(subdirs) == 1 and is_tree(subdirs[0]) else None


# --------------------------------------------------------------------------- sources


def _load_image_tree(name: str, path: Path, cache_dir: Path, side: int | None,
                     wanted: Sequence[str | int] | None = None) -> tuple[_Decoded, str]:
    """Cached decode of a tree directory or a tar archive of one, of the ``wanted`` classes only.

    The cache tag comes from the source, so 'cifar10' and 'imagefolder' on the same archive
    share one decode. An archive is listed (one streaming pass over member names) only on a miss.
    """
    resize = side if side is not None else "native"
    spec = _class_spec(wanted)
    if path.is_file():
        key = {"kind": "archive", "src": _file_fingerprint(path), "resize": resize, "classes": spec}
        tag, source = path.name.split(".")[0], f"jpeg-archive:{path}"

        def build(tmp: Path) -> None:
            _decode_image_tree(name, path, _list_archive(name, path, wanted), side, tmp)
    else:
        tree = _find_tree(path)
        if tree is None:
            raise _fail(name, f"{path} has no train/ and val/ or test/ folders")
        listing = _list_tree(name, tree, wanted)
        key = {"kind": "tree", "src": str(tree.resolve()), "fp": _tree_fingerprint(tree, listing),
               "resize": resize, "classes": spec}
        tag, source = tree.resolve().name, f"jpeg-tree:{tree}"

        def build(tmp: Path) -> None:
            _decode_image_tree(name, tree, listing, side, tmp)
    return _build_cached(cache_dir, tag, key, build), source


_TV_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _torchvision_cifar(name: str, root: Path, download: bool) -> list:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return [cls(str(root), train=t, download=download) for t in (True, False)]


def _decode_torchvision_cifar(name: str, root: Path) -> _Decoded:
    parts = _torchvision_cifar(name, root, download=False)
    splits = [Split(np.ascontiguousarray(d.data, dtype=np.uint8), np.asarray(d.targets, dtype=np.int64))
              for d in parts]
    return _Decoded(tuple(parts[0].classes), splits[0], splits[1], {})


def _load_torchvision_cifar(name: str, root: Path, cache_dir: Path) -> _Decoded:
    tv_dir = root / _TV_DIRS[name]
    key = {"kind": "torchvision", "src": str(tv_dir.resolve()), "fp": _dir_fingerprint(tv_dir)}
    return _cached(cache_dir, name, key, lambda: _decode_torchvision_cifar(name, root))


def _cifar_jpeg_candidate(root: Path) -> Path | None:
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        return root
    for cand in (root / "cifar10-jpeg", root):
        if cand.is_dir() and (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    archive = root / "cifar10-jpeg.tar.gz"
    return archive if archive.is_file() else None


def _load_cifar(name: str, root: Path, cache_dir: Path, image_size: int | None,
                download: bool) -> tuple[_Decoded, str]:
    if image_size not in (None, 32):
        raise _fail(name, f"image_size={image_size} unsupported (CIFAR is 32x32; use imagefolder to resize)")
    if (root / _TV_DIRS[name]).is_dir():
        try:
            return _load_torchvision_cifar(name, root, cache_dir), f"torchvision:{root}"
        except RuntimeError as exc:  # e.g. torchvision's integrity check
            if isinstance(exc, DataError):
                raise
            raise _fail(name, f"torchvision files under {root} unusable: {_short(exc)}") from exc
    if name == "cifar10":
        cand = _cifar_jpeg_candidate(root)
        if cand is not None:
            dec, source = _load_image_tree(name, cand, cache_dir, None)
            if dec.classes != CIFAR10_CLASSES:
                raise _fail(name, f"{cand} class folders {dec.classes} are not the CIFAR-10 classes")
            return dec, source
    looked = f"{_TV_DIRS[name]}" + (", cifar10-jpeg/, cifar10-jpeg.tar.gz" if name == "cifar10" else "")
    if not download:
        raise _fail(name, f"not found under {root} (looked for {looked}) and download=False")
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
        raise _fail(name, f"not found under {root} (looked for {looked}) "
                          f"and download failed: {_short(exc)}") from exc
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _synthetic(seed: int, per_class: tuple[int, int], n_classes: int = 10, side: int = 32) -> _Decoded:
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

    return _Decoded(tuple(f"class{i}" for i in range(n_classes)), make(per_class[0]), make(per_class[1]), {})


# --------------------------------------------------------------------------- subsets


def _resolve_classes(name: str, all_classes: tuple[str, ...], wanted: Sequence[str | int] | None) -> list[int]:
    if wanted is None:
        return list(range(len(all_classes)))
    out: list[int] = []
    for c in wanted:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= int(c) < len(all_classes):
                raise _fail(name, f"class index {c} out of range (0..{len(all_classes) - 1})")
            out.append(int(c))
        elif isinstance(c, str) and c in all_classes:
            out.append(all_classes.index(c))
        else:
            raise _fail(name, f"unknown class {c!r} (known: {', '.join(all_classes[:12])}"
                              f"{', ...' if len(all_classes) > 12 else ''})")
    if len(set(out)) != len(out):
        raise _fail(name, f"duplicate classes in {list(wanted)}")
    if not out:
        raise _fail(name, "empty class list")
    return out


def _stratified_quota(available: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes as equally as their availability allows (water-filling)."""
    quota = np.zeros_like(available)
    left = total
    while left > 0:
        open_ = np.flatnonzero(quota < available)
        share, extra = divmod(left, len(open_))
        add = np.full(len(open_), share)
        add[:extra] += 1  # remainder to the first classes, deterministically
        add = np.minimum(add, available[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    return quota


def _subset(name: str, label: str, split: Split, n_classes: int, keep: list[int], size: int | None,
            rng_seed: list[int]) -> Split:
    """Keep classes ``keep`` (relabelled 0..k-1 in that order) and a stratified sample of ``size``."""
    if size is None and keep == list(range(n_classes)):
        return split  # untouched full split: keep the zero-copy memmap
    remap = np.full(n_classes, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    new = remap[split.labels]
    per_class = [np.flatnonzero(new == k) for k in range(len(keep))]
    if size is not None:
        available = np.array([len(p) for p in per_class])
        if size < 1:
            raise _fail(name, f"{label}_size must be >= 1, got {size}")
        if size > available.sum():
            raise _fail(name, f"{label}_size={size} too large: only {available.sum()} {label} images "
                              f"in the selected {len(keep)} classes")
        rng = np.random.default_rng(rng_seed)
        quota = _stratified_quota(available, size)
        per_class = [rng.permutation(p)[:q] for p, q in zip(per_class, quota)]
    idx = np.sort(np.concatenate(per_class))  # sorted: sequential memmap reads
    return Split(np.ascontiguousarray(split.images[idx]), new[idx])


# --------------------------------------------------------------------------- public loader


@dataclass(frozen=True)
class _Source:
    """What one dataset family hands to load_dataset before subsetting."""

    decoded: _Decoded
    source: str
    style: str
    image_size: int
    stats: tuple[Sequence[float], Sequence[float]] | None  # None: from the (subset) train split


def _cifar_source(name: str, root: Path, cache: Path, image_size: int | None, download: bool) -> _Source:
    dec, source = _load_cifar(name, root, cache, image_size, download)
    stats = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return _Source(dec, source, "cifar", 32, stats)


# Image-folder trees under a well-known name: the name goes into runs, cell ids and reports, so
# Imagenette and Imagewoof runs of one grid are never mistaken for each other.
IMAGE_TREES = {"imagefolder": None, "imagenette": 10, "imagewoof": 10, "imagenet": None}  # name -> classes


def _imagefolder_source(name: str, root: Path, cache: Path, image_size: int | None,
                        classes: Sequence[str | int] | None) -> _Source:
    if not root.exists():
        raise _fail(name, f"root {root} does not exist")
    side, style = _stored_size(image_size)
    dec, source = _load_image_tree(name, root, cache, side, classes)
    n_all = len(dec.meta.get("all_classes", dec.classes))
    if IMAGE_TREES[name] is not None and n_all != IMAGE_TREES[name]:
        raise _fail(name, f"{root} has {n_all} class folders, {name} has {IMAGE_TREES[name]} "
                          "(use dataset.name: imagefolder for other trees)")
    _, h, w, _ = dec.train.images.shape
    if h != w:
        raise _fail(name, f"images under {root} are {w}x{h}, not square; pass image_size")
    style = style or ("cifar" if h <= CIFAR_STYLE_MAX_PX else "imagenet")
    return _Source(dec, source, style, image_size or h, None)


def read_class_list(path: str | Path, root: str | Path | None = None, name: str = "dataset") -> list[str]:
    """Class ids from a text file (e.g. ImageNet-100's 100 WordNet ids), in label order.

    One class per line, its first word (so 'n01440764 tench' works); blank lines and '#' comments
    are skipped. A relative path is looked up in the working directory, then under ``root``.
    """
    p = Path(path).expanduser()
    tried = [p]
    if not p.is_absolute() and not p.is_file() and root is not None:
        tried.append(Path(root).expanduser() / p)
        p = tried[-1]
    if not p.is_file():
        raise _fail(name, f"classes: no class list file {' or '.join(map(str, tried))}")
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(name, f"classes: cannot read {p}: {_short(exc)}") from exc
    ids = [line.split("#", 1)[0].split()[0] for line in lines if line.split("#", 1)[0].strip()]
    if not ids:
        raise _fail(name, f"classes: {p} lists no class")
    return ids


def _synthetic_source(seed: int, n_classes: int, train_size: int, test_size: int,
                      image_size: int | None) -> _Source:
    if image_size not in (None, 32):
        raise _fail("synthetic", f"image_size={image_size} unsupported (synthetic data is 32x32)")
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
    """
    root = Path(root).expanduser().resolve()  # absolute, so `source` and errors are unambiguous
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if isinstance(classes, (str, Path)):
        classes = read_class_list(classes, root, name)
    if name in ("cifar10", "cifar100"):
        src = _cifar_source(name, root, cache, image_size, download)
    elif name in IMAGE_TREES:
        src = _imagefolder_source(name, root, cache, image_size, classes)
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
        raise _fail(name, "unknown dataset name (expected cifar10, cifar100, synthetic, "
                          f"or an image-folder tree: {', '.join(IMAGE_TREES)})")

    dec = src.decoded
    keep = _resolve_classes(name, dec.classes, classes)
    n_all = len(dec.classes)
    train = _subset(name, "train", dec.train, n_all, keep, train_size, [subset_seed, 0])
    test = _subset(name, "test", dec.test, n_all, keep, test_size, [subset_seed, 1])
    if src.stats is not None:
        mean, std = src.stats
    elif train is dec.train and "mean" in dec.meta:
        mean, std = dec.meta["mean"], dec.meta["std"]  # full split: computed once at decode time
    else:
        mean, std = _channel_stats(train.images)  # stats of the subset actually trained on
    return Dataset(
        name=name, source=src.source, classes=tuple(dec.classes[i] for i in keep), train=train, test=test,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        style=src.style, image_size=int(src.image_size),
    )


# --------------------------------------------------------------------------- device + batches

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


def workers_per_device() -> int:
    try:
        return max(1, int(os.environ.get(WORKERS_PER_DEVICE_ENV, "1")))
    except ValueError:
        return 1


def _fits_on_device(split: Split, device: torch.device) -> tuple[bool, str]:
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


def _say_once(split: Split, device: torch.device, resident: bool, text: str) -> None:
    said = _SAID.setdefault(split, set())
    key = f"{device}:{resident}"
    if key not in said:  # once per split, device and decision, not every epoch
        said.add(key)
        print(f"data on {device}: {text}", file=sys.stderr, flush=True)


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
    is a device gather); False streams from the host arrays; True forces residency.
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

    if isinstance(split, Split) and device.type == "cuda":
        if resident is None and not is_resident(split, device):
            resident, why = _fits_on_device(split, device)
            _say_once(split, device, resident, why if resident else why + "; streaming it from host memory")
        if resident or is_resident(split, device):
            try:
                split = device_split(split, device)  # whole split resident: batches are pure GPU gathers
            except torch.cuda.OutOfMemoryError as exc:  # the room went (another worker) between sizing and copying
                why = str(exc).splitlines()[0][:120] if str(exc) else "out of memory"
                _say_once(split, device, False, f"copying the data to the GPU failed ({why}); streaming it from host memory")
                torch.cuda.empty_cache()
    elif isinstance(split, Split) and resident and device.type != "cpu":
        split = device_split(split, device)

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
