"""The on-disk uint8 cache: decode a dataset once into .npy files, then reopen them memory-mapped.

An entry is {train,test}_{images,labels}.npy + meta.json under ``cache_dir/<tag>-<key hash>``,
built once among concurrent processes (ablations.util.fs.build_once). Image-folder trees are
decoded in bounded chunks written in place into the .npy file, with streaming channel statistics,
so peak RSS does not grow with the dataset (bench/data_scaling.py measures it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ablations.data.dataset import CIFAR_STYLE_MAX_PX, SPLITS, Split, fail, short
from ablations.data.trees import Key, Listing, archive_walk
from ablations.util.fs import build_once

CACHE_VERSION = 2  # bump when the on-disk layout or decode rules change
_PROGRESS_EVERY_S = 5.0
_CHUNK_BYTES = 64 << 20  # bounded working set for statistics passes over a memmap


def default_cache_dir() -> Path:
    env = os.environ.get("SENET_ABLATIONS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "senet-ablations"


def _hash_key(parts: dict) -> str:
    blob = json.dumps({**parts, "v": CACHE_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


@dataclass(frozen=True)
class Decoded:
    """A full decoded dataset as written to / read from the cache."""

    classes: tuple[str, ...]
    train: Split
    test: Split
    meta: dict  # extra JSON-able facts (e.g. full-train mean/std)


def _write_cache(dst: Path, dec: Decoded) -> None:
    for s in SPLITS:
        split: Split = getattr(dec, s)
        np.save(dst / f"{s}_images.npy", np.ascontiguousarray(split.images, dtype=np.uint8))
        np.save(dst / f"{s}_labels.npy", np.asarray(split.labels, dtype=np.int64))
    (dst / "meta.json").write_text(json.dumps({**dec.meta, "classes": list(dec.classes)}))


def _read_cache(src: Path) -> Decoded:
    meta = json.loads((src / "meta.json").read_text())
    splits = {
        s: Split(np.load(src / f"{s}_images.npy", mmap_mode="r"), np.load(src / f"{s}_labels.npy"))
        for s in SPLITS
    }
    return Decoded(tuple(meta.pop("classes")), splits["train"], splits["test"], meta)


def build_cached(cache_dir: Path, tag: str, key: dict, build: Callable[[Path], None]) -> Decoded:
    """Return the cache entry for ``key``; on a miss run ``build(tmp_dir)`` once, under a lock.

    ``build`` writes {train,test}_{images,labels}.npy and meta.json into the temp dir, which is
    then renamed into place: a killed build leaves only a temp dir, removed by the next one.
    One lock per entry, so concurrent runs decode a dataset once, not N times.
    """
    def build_entry(tmp: Path) -> None:
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(key, indent=1))  # for humans inspecting it

    final = build_once(cache_dir / f"{tag}-{_hash_key(key)}", lambda f: (f / "meta.json").is_file(), build_entry)
    return _read_cache(final)


def cached(cache_dir: Path, tag: str, key: dict, decode: Callable[[], Decoded]) -> Decoded:
    """build_cached for decoders that hold the (small) dataset in memory: CIFAR pickles, synthetic."""
    return build_cached(cache_dir, tag, key, lambda tmp: _write_cache(tmp, decode()))


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


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0, 1] units from 256-bin histograms, in bounded chunks."""
    hist = np.zeros((3, 256), dtype=np.int64)
    per_image = max(1, int(np.prod(images.shape[1:])))
    chunk = max(1, _CHUNK_BYTES // per_image)
    for s in range(0, images.shape[0], chunk):
        hist += _histogram(np.asarray(images[s : s + chunk]))
    return _stats_from_hist(hist)


def decode_image_tree(name: str, src: Path, listing: Listing, side: int | None, dst: Path,
                      stop_check: Callable[[], None] | None = None) -> None:
    """Decode the listed images of a tree (or tar archive of one) straight into the cache's .npy files.

    RAM stays bounded whatever the dataset's size: images go from a bounded queue of decoded
    chunks to their row of the on-disk array; channel statistics are streaming 256-bin histograms.
    ``stop_check()`` is called before each chunk is handed out and may raise to stop: a big tree
    decodes for hours, longer than a stop request (SIGTERM, a time limit) may wait.
    """
    where = str(src)
    pos = {key: (s, i) for s in SPLITS for i, key in enumerate(listing.items[s])}
    total = len(pos)
    if src.is_file():
        items: Iterable[tuple[Key, Path | bytes]] = (
            (k, b) for k, b in archive_walk(name, src, read=frozenset(pos)) if b is not None)
    else:
        items = ((k, src.joinpath(*k)) for s in SPLITS for k in listing.items[s])
    tick = _progress(f"decoding {name} from {where}", total)
    writers: dict[str, _NpyWriter] = {}
    hist = np.zeros((3, 256), dtype=np.int64)
    done = 0

    def run(chunk: list[tuple[Key, Path | bytes]]) -> tuple[list[tuple[Key, np.ndarray]], np.ndarray]:
        res, h = [], np.zeros((3, 256), dtype=np.int64)
        for key, item in chunk:
            try:
                img = _decode_one(item, side)
            except Exception as exc:  # PIL and the OS raise many types; name the file
                raise fail(name, f"cannot read {where}/{'/'.join(key)}: {short(exc)}") from exc
            if pos[key][0] == "train":
                h += _histogram(img)
            res.append((key, img))
        return res, h

    def store(result: tuple[list[tuple[Key, np.ndarray]], np.ndarray]) -> None:
        nonlocal hist, done
        res, h = result
        for key, img in res:
            if not writers:
                for s in SPLITS:
                    writers[s] = _NpyWriter(dst / f"{s}_images.npy", len(listing.items[s]), img.shape)
            shape = writers["train"].shape
            if img.shape != shape:
                raise fail(name, f"images differ in size ({shape[1]}x{shape[0]} vs {img.shape[1]}x"
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
            raise fail(name, f"no images found in {where}")
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

            chunk: list[tuple[Key, Path | bytes]] = []
            try:
                for item in it:
                    chunk.append(item)
                    if len(chunk) == step:
                        if stop_check is not None:
                            stop_check()  # the chunks in flight are cancelled or finish (seconds), below
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
        missing = [s for s in SPLITS if not writers[s].written.all()]
        if missing:  # e.g. the archive was replaced between the listing and the decoding pass
            raise fail(name, f"{where} changed while it was decoded; run again")
    finally:
        for w in writers.values():
            w.close()
    for s in SPLITS:
        np.save(dst / f"{s}_labels.npy", listing.labels(s))
    mean, std = _stats_from_hist(hist)
    (dst / "meta.json").write_text(json.dumps({
        "mean": mean, "std": std, "all_classes": list(listing.all_classes), "classes": list(listing.classes)}))
