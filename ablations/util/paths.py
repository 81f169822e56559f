"""Where a store's companions live: the queue journal, checkpoints and artifacts go beside the MLflow store."""

from __future__ import annotations

from pathlib import Path


def store_folder(tracking_uri: str) -> Path | None:
    """The folder holding a local store (an SQLite file's folder, a file store's parent), else None (a server)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return Path(tracking_uri.removeprefix("file://")).resolve().parent
    return None


def beside_store(tracking_uri: str, name: str) -> Path:
    """`name` in the store's folder; for a server store (nothing local), in the current folder."""
    return (store_folder(tracking_uri) or Path.cwd()) / name


__all__ = ["beside_store", "store_folder"]
