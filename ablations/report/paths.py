"""Where report files go: folder names made from tags, and the check that a results folder can be written."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from ablations.errors import OutputError


def safe_name(name: str) -> str:
    """A tag (dataset, grid, variant) as one folder name: anything but [A-Za-z0-9_.=+-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name) or "_"


def dataset_folder(dataset: str, study_preset: str | None = None) -> str:
    """results/<this>/<grid>/: the dataset, and for a study preset (real results of their own recipe, e.g. the
    CPU-scale study) the preset too, e.g. `cifar10-cpu`, so they sit beside, never over, full-recipe results."""
    return safe_name(dataset) + (f"-{safe_name(study_preset)}" if study_preset else "")


def check_output_dir(results_dir: str | Path) -> None:
    """Raise OutputError, in one line, when `results_dir` cannot be created or written; create nothing."""
    folder = Path(results_dir)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"--results-dir {results_dir}: {existing} is not a folder")
    try:  # a real write, then gone: access() says yes to root even on a read-only file system
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputError(f"--results-dir {results_dir}: cannot write in {existing}: {exc.strerror or exc}") from None
