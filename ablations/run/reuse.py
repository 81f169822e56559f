"""Cells shared between grids: which cells of a grid the store holds FINISHED, and the linked runs
that show a cell trained in one grid's experiment in every other grid's experiment that lists it."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

from mlflow import MlflowClient
from mlflow.entities import Run

from ablations.config import Cell
from ablations.run.cellqueue import GridQueue
from ablations.run.storage import file_lock
from ablations.tracking import is_link, link_run, runs_of_cell, store_finished_runs


def attach_store(queue: GridQueue, client: MlflowClient) -> None:
    """Let the queue count a cell done only when the store holds its FINISHED run (any grid's,
    under its id or its legacy id)."""

    def in_store() -> set[str]:
        finished = store_finished_runs(client)
        return {cid for cid, cell in queue.cells.items() if runs_of_cell(finished, cell)}

    queue.in_store = in_store


@contextlib.contextmanager
def link_lock(tracking_uri: str) -> Iterator[None]:
    """Processes linking into one SQLite store take turns, so a cell gets one link per grid. Other
    stores: a rare second link is counted once by the reports (they keep one run per cell)."""
    if tracking_uri.startswith("sqlite:///"):
        with file_lock(tracking_uri.removeprefix("sqlite:///") + ".link.lock"):
            yield
    else:
        yield


def link_missing(client: MlflowClient, tracking_uri: str, experiment_id: str, cells: Iterable[Cell],
                 tags: Mapping[str, str] | None = None, source: Run | None = None) -> list[Cell]:
    """Link into `experiment_id` each of `cells` that the store holds FINISHED elsewhere and this
    experiment does not (`source`: the run to link, else the oldest trained run); the cells linked."""
    cells = list(cells)
    if not cells:
        return []
    linked = []
    with link_lock(tracking_uri):
        finished = store_finished_runs(client)
        for cell in cells:
            runs = runs_of_cell(finished, cell)
            if not runs or any(r.info.experiment_id == experiment_id for r in runs):
                continue
            origin = source or next((r for r in runs if not is_link(r)), runs[0])
            link_run(client, experiment_id, cell, origin, tags)
            linked.append(cell)
    return linked


def reused_since(client: MlflowClient, experiment_id: str, cells: Iterable[Cell], since_ms: int) -> int:
    """How many of `cells` this experiment shows through a link made since `since_ms` (reused from
    another grid during this launch)."""
    finished = store_finished_runs(client)
    return sum(any(r.info.experiment_id == experiment_id and is_link(r) and (r.info.start_time or 0) >= since_ms
                   for r in runs_of_cell(finished, c)) for c in cells)
