"""Which images a run uses: class lists and selection, and seeded stratified subsets.

One stratified sampler (``stratified_indices``) serves both the training subsets here and the
analysis's excitation sample (ablations.report.analysis), so every subset spreads over classes alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ablations.data.dataset import Split, fail, short


def resolve_classes(name: str, all_classes: tuple[str, ...], wanted: Sequence[str | int] | None) -> list[int]:
    """Indices into ``all_classes`` of the ``wanted`` names or indices (None: all), in the wanted order."""
    if wanted is None:
        return list(range(len(all_classes)))
    out: list[int] = []
    for c in wanted:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= int(c) < len(all_classes):
                raise fail(name, f"class index {c} out of range (0..{len(all_classes) - 1})")
            out.append(int(c))
        elif isinstance(c, str) and c in all_classes:
            out.append(all_classes.index(c))
        else:
            raise fail(name, f"unknown class {c!r} (known: {', '.join(all_classes[:12])}"
                             f"{', ...' if len(all_classes) > 12 else ''})")
    if len(set(out)) != len(out):
        raise fail(name, f"duplicate classes in {list(wanted)}")
    if not out:
        raise fail(name, "empty class list")
    return out


def select_classes(name: str, all_classes: tuple[str, ...], wanted: Sequence[str | int] | None) -> tuple[str, ...]:
    """The names of the ``wanted`` classes, in label order."""
    return tuple(all_classes[i] for i in resolve_classes(name, all_classes, wanted))


def class_spec(wanted: Sequence[str | int] | None) -> list | None:
    """``dataset.classes`` as a JSON-able cache-key part (order matters: it is the label order)."""
    return None if wanted is None else [int(c) if isinstance(c, (int, np.integer)) else str(c) for c in wanted]


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
        raise fail(name, f"classes: no class list file {' or '.join(map(str, tried))}")
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(name, f"classes: cannot read {p}: {short(exc)}") from exc
    ids = [line.split("#", 1)[0].split()[0] for line in lines if line.split("#", 1)[0].strip()]
    if not ids:
        raise fail(name, f"classes: {p} lists no class")
    return ids


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


def stratified_indices(labels: np.ndarray, size: int, seed: Sequence[int] | int | None = None,
                       n_classes: int | None = None) -> np.ndarray:
    """Sorted indices of ``size`` items spread over classes 0..n_classes-1 as equally as they allow.

    ``seed``: each class's items are a seeded random choice (one permutation per class, in class
    order); None takes each class's first items in index order (a deterministic, balanced sample).
    Labels outside 0..n_classes-1 (e.g. -1 for dropped classes) are never picked; ``n_classes``
    defaults to the largest label + 1.
    """
    labels = np.asarray(labels)
    if n_classes is None:
        n_classes = int(labels.max()) + 1 if labels.size else 0
    per_class = [np.flatnonzero(labels == k) for k in range(n_classes)]
    available = np.array([len(p) for p in per_class])
    if not 1 <= size <= available.sum():
        raise ValueError(f"cannot sample {size} of {available.sum()} items")
    quota = _stratified_quota(available, size)
    if seed is None:
        per_class = [p[:q] for p, q in zip(per_class, quota)]
    else:
        rng = np.random.default_rng(seed)
        per_class = [rng.permutation(p)[:q] for p, q in zip(per_class, quota)]
    return np.sort(np.concatenate(per_class))  # sorted: sequential memmap reads


def subset(name: str, label: str, split: Split, n_classes: int, keep: list[int], size: int | None,
           rng_seed: list[int]) -> Split:
    """Keep classes ``keep`` (relabelled 0..k-1 in that order) and a stratified sample of ``size``."""
    if size is None and keep == list(range(n_classes)):
        return split  # untouched full split: keep the zero-copy memmap
    remap = np.full(n_classes, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    new = remap[split.labels]
    if size is None:
        idx = np.flatnonzero(new >= 0)
    else:
        available = int((new >= 0).sum())
        if size < 1:
            raise fail(name, f"{label}_size must be >= 1, got {size}")
        if size > available:
            raise fail(name, f"{label}_size={size} too large: only {available} {label} images "
                             f"in the selected {len(keep)} classes")
        idx = stratified_indices(new, size, rng_seed, n_classes=len(keep))
    return Split(np.ascontiguousarray(split.images[idx]), new[idx])
