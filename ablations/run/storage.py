"""Where the queue lives: opening the Optuna storage, the locks that serialize the few steps that
must not race, and the study that holds one grid.

The storage is a journal file (the default, beside the MLflow store: no server) or a database
(PostgreSQL for many machines). docs/distributed.md explains the design.
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

JOURNAL_NAME = "optuna-journal.log"


def default_storage(tracking_uri: str) -> str:
    """The journal file beside the MLflow store (no server needed), or in the current folder."""
    return str(beside_store(tracking_uri, JOURNAL_NAME))


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
        raise ConfigError(f"--storage {url}: is a folder; give the journal file's path (e.g. {path / JOURNAL_NAME})")
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


def study_name(grid: str, cells: Sequence[Cell], series: str | None = None) -> str:
    """One study per grid *as resolved*: the same flags on any machine give the same study, and a
    worker never sees a cell it cannot build (a different --preset or --seeds is another study).
    `series` names a fresh study of the same cells (--force runs every cell again in one)."""
    digest = hashlib.sha256(",".join(sorted(c.cell_id for c in cells)).encode()).hexdigest()[:10]
    return f"{grid}-{digest}" + (f"-{series}" if series else "")


def new_series() -> str:
    """A name for a --force series: sortable, and distinct for two launches in the same second."""
    return time.strftime("force-%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
