"""Where the queue lives: opening the Optuna storage, the locks that serialize the few steps that
must not race, and the study that holds a store's cells.

The storage is a journal file (the default: named after the MLflow store, beside it, so each store
has its own queue; no server) or a database (PostgreSQL for many machines). One study holds the
cells of every grid of a store (one per --force series); a grid is a view of it. docs/distributed.md
explains the design.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import optuna
from filelock import FileLock
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from ablations.config import ConfigError
from ablations.util.paths import beside_store

if TYPE_CHECKING:
    from ablations.config import Cell

optuna.logging.set_verbosity(optuna.logging.WARNING)

JOURNAL_SUFFIX = ".queue.journal"  # mlflow.db -> mlflow.db.queue.journal
STUDY = "cells"  # the study of a store's cells (a --force series gets its own)


def default_storage(tracking_uri: str) -> str:
    """The store's own journal file, named after it and beside it (no server needed): two stores
    in one folder never share a queue. A server store's journal is named after its URL, here."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).resolve()) + JOURNAL_SUFFIX
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return str(Path(tracking_uri.removeprefix("file://").removeprefix("file:")).resolve()) + JOURNAL_SUFFIX
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tracking_uri.split("://", 1)[1])
    return str(beside_store(tracking_uri, name.strip("_") + JOURNAL_SUFFIX))


def is_rdb(url: str) -> bool:
    return "://" in url


def check_storage(url: str) -> None:
    """Bad input before anything is written: a journal file whose folder is missing or not writable.

    A database URL is checked when it is opened (it needs the server)."""
    if is_rdb(url):
        return
    path = Path(url).expanduser().absolute()
    parent = path.parent
    if path.is_dir():
        raise ConfigError(f"--storage {url}: is a folder; give the journal file's path (e.g. {path / ('mlflow.db' + JOURNAL_SUFFIX)})")
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() or any(p.is_file() for p in parent.parents) else "does not exist"
        raise ConfigError(f"--storage {url}: the folder {parent} {why}")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise ConfigError(f"--storage {url}: cannot write {'the file' if path.exists() else 'into ' + str(parent)} "
                          "(permission denied)")


def open_storage(url: str, heartbeat: int, grace: int) -> tuple[BaseStorage, RDBStorage | None]:
    """The Optuna storage at `url` (and its RDBStorage, for locks), heartbeats on for databases."""
    if not is_rdb(url):
        check_storage(url)
        try:
            return JournalStorage(JournalFileBackend(str(Path(url).expanduser().resolve()))), None
        except OSError as exc:
            raise ConfigError(f"--storage {url}: cannot open the journal file ({exc.strerror or exc})") from None
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are 'experimental' in Optuna; relied on here on purpose
                warnings.simplefilter("ignore", ExperimentalWarning)
                rdb = RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                 engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True})
            break
        except ModuleNotFoundError as exc:
            raise ConfigError(f"--storage {url}: needs the {exc.name} package (pip install psycopg2-binary)") from None
        except Exception as exc:
            # Workers starting together on an empty database race to create Optuna's tables; the
            # loser's next try finds them. Anything still failing (no server, bad credentials) is bad input.
            if attempt == 3:
                raise ConfigError(f"--storage {url}: cannot open: {str(exc).splitlines()[0]}") from None
            time.sleep(0.5 * (attempt + 1))
    return optuna.storages.get_storage(rdb), rdb


def file_lock(path: str | Path) -> FileLock:
    """An exclusive lock between processes (and machines, on a filesystem with working locks)."""
    return FileLock(str(path))


@contextlib.contextmanager
def pg_lock(rdb: RDBStorage, name: str) -> Iterator[None]:
    """A PostgreSQL advisory lock named `name`, held for the block."""
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with rdb.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


@contextlib.contextmanager
def store_init_lock(tracking_uri: str) -> Iterator[None]:
    """Processes starting together on a new SQLite MLflow store take turns creating its tables
    (MLflow's schema migration is not safe to run twice at once: 'duplicate column name')."""
    if tracking_uri.startswith("sqlite:///"):
        with file_lock(tracking_uri.removeprefix("sqlite:///") + ".init.lock"):
            yield
    else:
        yield


def study_name(series: str | None = None) -> str:
    """The one study of a store's cells, whichever grid lists them; `series` names a fresh one of
    the same cells (--force runs every cell again in one)."""
    return STUDY + (f"-{series}" if series else "")


def view_name(grid: str, cells: Sequence[Cell]) -> str:
    """A grid *as resolved*: the same flags on any machine give the same name (a different --preset
    or --seeds is another view). It namespaces the trial params a view sets."""
    digest = hashlib.sha256(",".join(sorted(c.cell_id for c in cells)).encode()).hexdigest()[:10]
    return f"{grid}-{digest}"


def new_series() -> str:
    """A name for a --force series: sortable, and distinct for two launches in the same second."""
    return time.strftime("force-%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
