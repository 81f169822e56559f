"""Filesystem steps that several processes may take at once: write a file or publish a folder whole, atomically.

A cache entry (decoded images, an unpacked archive) is built in a private temp folder beside its
final place and renamed into place in one step, under a lock, so concurrent processes build it once
and nobody ever sees it half written.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Callable

from filelock import FileLock

from ablations.util.procs import pid_alive

# A file a writer may still be working on is named after it: `<stem>@<host>@<pid><suffix>` (a host name
# has no "@"). Files of writers of other hosts cannot be checked: they count as abandoned after this long.
ABANDONED_AFTER_SECONDS = 24 * 3600.0


def lock_for(final: Path) -> FileLock:
    """The lock that guards building `final` (a dot file beside it)."""
    return FileLock(str(final.parent / f".{final.name}.lock"))


def writer_tag() -> str:
    """This process, as the files it writes are named: `@<host>@<pid>`."""
    return f"@{socket.gethostname()}@{os.getpid()}"


def writer_of(name: str) -> tuple[str | None, int] | None:
    """(host, pid) of the writer a file is named after; host None for the older `.<name>.<pid>.tmp`
    temp files (written without a host); None if the name names no writer."""
    stem = name.removesuffix(".tmp") if name.endswith(".tmp") else name.rsplit(".", 1)[0]
    parts = stem.rsplit("@", 2)
    if len(parts) == 3 and parts[2].isdigit():
        return parts[1], int(parts[2])
    old = stem.rsplit(".", 1)
    if name.endswith(".tmp") and len(old) == 2 and old[1].isdigit():
        return None, int(old[1])
    return None


def abandoned(path: Path) -> bool:
    """Whether no live writer can still be working on `path` (named after its writer, `writer_of`): its
    process of this host is gone, or is this one (call it between this process's own writes); a file of
    another host's writer once it was last written ABANDONED_AFTER_SECONDS ago. An older temp file named with
    a pid alone counts as this host's; a file named after no writer is never abandoned."""
    writer = writer_of(path.name)
    if writer is None:
        return False  # not a file a writer names after itself: not ours to judge
    try:
        if time.time() - path.stat().st_mtime > ABANDONED_AFTER_SECONDS:
            return True
    except OSError:
        return False  # already gone
    where, pid = writer
    if where is not None and where != socket.gethostname():
        return False  # its pid means nothing here: only its age tells
    return pid == os.getpid() or not pid_alive(pid)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(fh)` into a private temp file beside `path` (`.<name>@<host>@<pid>.tmp`, so that a later
    writer can tell a leftover of a killed one from a live one's, `abandoned`), fsync it, then rename it
    over `path` in one step: a reader (or a process killed mid-write) sees the old file or the new one,
    never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{writer_tag()}.tmp")
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
