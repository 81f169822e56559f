"""Filesystem steps that several processes may take at once: write a file or publish a folder whole, atomically.

A cache entry (decoded images, an unpacked archive) is built in a private temp folder beside its
final place and renamed into place in one step, under a lock, so concurrent processes build it once
and nobody ever sees it half written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO, Callable

from filelock import FileLock


def lock_for(final: Path) -> FileLock:
    """The lock that guards building `final` (a dot file beside it)."""
    return FileLock(str(final.parent / f".{final.name}.lock"))


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(fh)` into a private temp file beside `path`, fsync it, then rename it over `path` in one step:
    a reader (or a process killed mid-write) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temp folder into place; if another process won, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def _fresh_tmp(final: Path) -> Path:
    """An empty private temp folder beside `final`; call it holding `final`'s lock."""
    # Leftovers of killed builds share the prefix; we hold the lock, so no live build owns one.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def build_once(final: Path, done: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Make sure the folder `final` exists and is `done`; if not, `build(tmp)` it (once among all
    processes, under a lock) into an empty temp folder that is then published whole. Returns `final`.

    A killed build leaves only its temp folder, removed by the next build of `final`."""
    if done(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with lock_for(final):
        if not done(final):  # another process may have finished meanwhile
            tmp = _fresh_tmp(final)
            try:
                build(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of an older version
            publish_dir(tmp, final)
    return final
