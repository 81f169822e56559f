"""Image-folder trees and tar archives of them, before any pixel is decoded: listing, fingerprints, a safe walk.

A tree is ``[<top>/]{train, val|test}/<class>/<image>``; an archive (.tar.gz) holds one. Archives are
read as a stream of members, never extracted: nothing is ever written next to the source.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ablations.data.dataset import SPLITS, fail, short
from ablations.data.subsets import select_classes

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"})
EVAL_SPLITS = ("val", "test")  # the first one present is the test split
Key = tuple[str, str, str]  # (split folder: train/val/test, class folder, file name)


def is_image(filename: str) -> bool:
    return os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Listing:
    """What a tree or archive holds, known before any pixel is decoded."""

    all_classes: tuple[str, ...]  # every class folder of train/, sorted
    classes: tuple[str, ...]  # the classes to decode, in label order
    items: dict[str, list[Key]]  # 'train' / 'test' -> keys in storage order (label, file name)

    def labels(self, split: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[c] for _, c, _ in self.items[split]], dtype=np.int64)


def file_fingerprint(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def dir_fingerprint(root: Path) -> str:
    """Hash of every file's relative path, size and mtime under ``root`` (a few pickles for CIFAR)."""
    h = hashlib.sha256(str(root.resolve()).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _finish_listing(name: str, where: str, all_classes: tuple[str, ...], eval_split: str | None,
                    files: dict[tuple[str, str], list[str]], wanted: Sequence[str | int] | None,
                    empty: Sequence[str] = ()) -> Listing:
    """Checks shared by trees and archives; ``files``: (split, class) -> sorted image file names."""
    if not all_classes or eval_split is None:
        raise fail(name, f"{where} needs images under train/<class>/ and val/<class>/ or test/<class>/")
    unknown = sorted({c for s, c in files if s == eval_split} - set(all_classes))
    if unknown:
        raise fail(name, f"{where}: {eval_split}/ has classes missing from train/: {', '.join(unknown[:8])}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    chosen = select_classes(name, all_classes, wanted)
    for split in ("train", eval_split):
        for cls in chosen:
            if (split, cls) in files and not files[split, cls] or f"{split}/{cls}" in empty:
                raise fail(name, f"empty class folder {where}/{split}/{cls} (no image files)")
    items = {
        s: [(split, c, f) for c in chosen for f in files.get((split, c), [])]
        for s, split in (("train", "train"), ("test", eval_split))
    }
    for s, split in (("train", "train"), ("test", eval_split)):
        if not items[s]:
            raise fail(name, f"no images under {where}/{split}/ for the selected classes")
    return Listing(all_classes, chosen, items)


def _scan(name: str, folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise fail(name, f"cannot list {folder}: {short(exc)}") from exc


def list_tree(name: str, tree: Path, wanted: Sequence[str | int] | None) -> Listing:
    """Class folders of ``tree/{train, val|test}/``; only the selected classes' files are listed."""
    eval_split = next((d for d in EVAL_SPLITS if (tree / d).is_dir()), None)
    dirs = {s: [e.name for e in _scan(name, tree / s) if e.is_dir() and not e.name.startswith(".")]
            for s in ("train", eval_split) if s is not None}
    all_classes = tuple(dirs.get("train", ()))
    chosen = set(select_classes(name, all_classes, wanted)) if all_classes else set()
    files: dict[tuple[str, str], list[str]] = {}
    for split, classes in dirs.items():
        for cls in classes:
            if split == eval_split and cls not in all_classes:
                files[split, cls] = []  # reported as unknown by _finish_listing
            elif cls in chosen:
                files[split, cls] = [e.name for e in _scan(name, tree / split / cls)
                                     if is_image(e.name) and e.is_file()]
    return _finish_listing(name, str(tree), all_classes, eval_split, files, wanted)


def tree_fingerprint(tree: Path, listing: Listing) -> str:
    """Hash of the listed files' relative paths, sizes and mtimes: a changed file re-decodes.

    Only the files that are decoded are stat-ed (ImageNet-100 out of a full ImageNet tree stats
    130k files, not 1.3M); that is cheap next to decoding them.
    """
    h = hashlib.sha256(str(tree.resolve()).encode())
    h.update(json.dumps(listing.all_classes).encode())
    for split in SPLITS:
        for key in listing.items[split]:
            st = os.stat(tree.joinpath(*key))
            h.update(f"{'/'.join(key)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def archive_walk(name: str, archive: Path, read: frozenset[Key] | None = None,
                 unsafe: list[str] | None = None) -> Iterator[tuple[Key, bytes | None]]:
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
                if len(parts) not in (depth, depth + 1) or parts[-depth] not in ("train", *EVAL_SPLITS):
                    continue
                if parts[-depth + 1].startswith(".") or (m.isfile() and not is_image(parts[-1])):
                    continue
                if m.isdir():
                    if top is None or parts[:-2] == top:
                        yield (parts[-2], parts[-1], ""), None
                    continue
                if top is None:
                    top = parts[:-3]
                elif parts[:-3] != top:
                    raise fail(name, f"archive {archive} holds more than one tree ({'/'.join(top)}, "
                                     f"{'/'.join(parts[:-3])})")
                key = (parts[-3], parts[-2], parts[-1])
                if read is not None and key in read:
                    fh = tf.extractfile(m)
                    yield key, fh.read() if fh is not None else b""
                else:
                    yield key, None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise fail(name, f"cannot read archive {archive}: {short(exc)}") from exc


def list_archive(name: str, archive: Path, wanted: Sequence[str | int] | None) -> Listing:
    """First pass over an archive: member names only (no pixels decoded, no bytes kept)."""
    unsafe: list[str] = []
    files: dict[tuple[str, str], list[str]] = {}
    dirs: set[tuple[str, str]] = set()
    for (split, cls, fn), _ in archive_walk(name, archive, unsafe=unsafe):
        if fn:
            files.setdefault((split, cls), []).append(fn)
        else:
            dirs.add((split, cls))
    if unsafe:  # never extracted, but say so: a silently smaller dataset is worse than a warning
        print(f"warning: dataset {name}: skipped {len(unsafe)} unsafe member(s) of {archive} "
              f"(absolute path, '..', link or device), e.g. {unsafe[0]!r}", file=sys.stderr, flush=True)
    eval_split = next((e for e in EVAL_SPLITS if any(s == e for s, _ in files)), None)
    all_classes = tuple(sorted({c for s, c in files if s == "train"} | {c for s, c in dirs if s == "train"}))
    empty = [f"{s}/{c}" for s, c in dirs if (s, c) not in files and s in ("train", eval_split)]
    for k in files:
        files[k].sort()
    return _finish_listing(name, str(archive), all_classes, eval_split, files, wanted, empty)


def find_tree(base: Path) -> Path | None:
    """The folder holding train/ and val/ or test/: ``base`` itself or its single subfolder."""
    def is_tree(p: Path) -> bool:
        return (p / "train").is_dir() and any((p / e).is_dir() for e in EVAL_SPLITS)

    if is_tree(base):
        return base
    subdirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return subdirs[0] if len(subdirs) == 1 and is_tree(subdirs[0]) else None
