"""What a worker prints: its lines prefixed with its id (workers sharing a terminal stay readable),
progress counted over every process working on the grid, and the summary with the exit code."""

from __future__ import annotations

import io
from typing import Mapping, Sequence, TextIO

from ablations.run.cellqueue import CellStatus, GridQueue, count
from ablations.config import Cell
from ablations.errors import EXIT_FAILED, EXIT_OK
from ablations.run.progress import GridProgress


class Prefixed(io.TextIOBase):
    """A text stream that starts every line with a prefix (a worker's id).

    Whole lines only, one write each: lines of workers sharing a terminal or pipe never mix.
    """

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self.stream, self.prefix, self._partial = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


class WorkerProgress(GridProgress):
    """A grid's progress as one of possibly many processes sees it: cells done are counted over all
    of them (read from the queue every few seconds, counted locally in between), and the ETA is
    shared between the cells running at once."""

    def __init__(self, grid: str, total: int, stream: TextIO, queue: GridQueue, live: bool | None = False) -> None:
        super().__init__(grid, total, stream=stream, live=live)
        self.queue, self.parallel = queue, 1

    def _sync(self) -> None:
        try:
            counts = self.queue.progress_counts()
        except Exception:  # the storage out of reach: the display keeps its own count (the heartbeat judges)
            return
        if counts is not None:
            self.done, running = counts
            self.parallel = max(1, running)

    def _grid_eta(self) -> float | None:
        eta = super()._grid_eta()
        return eta / self.parallel if eta else eta

    def start_cell(self, cell: Cell, epochs: int, done: float = 0.0) -> None:
        self._sync()
        super().start_cell(cell, epochs, done)

    def end_cell(self, cell: Cell, status: str, summary: str = "") -> None:
        self._sync()  # the trial is told after this line, so `done` counts it once when it goes up by one
        super().end_cell(cell, status, summary)

    def skip(self, cell: Cell, why: str = "already FINISHED") -> None:
        self._sync()
        super().skip(cell, why)


def failed_line(grid: str, cell: Cell, st: CellStatus) -> str:
    tries = f" after {st.attempts} attempts" if st.attempts > 1 else ""
    return f"FAILED {grid}/{cell.variant} seed={cell.seed} (cell_id {cell.cell_id}){tries}: {st.reason}"


def summary(queues: Sequence[GridQueue], retries: int | None, tracking_uri: str, stream: TextIO,
            already: Mapping[str, int] | None = None, reused: Mapping[str, int] | None = None) -> int:
    """Print each grid's tally and every failed cell; return the exit code.

    `already`: cells that were done before this launch (they count as skipped, not finished);
    `reused`: cells trained in another grid's experiment and linked into this one during it."""
    failed_lines, unsettled = [], 0
    for q in queues:
        st = q.statuses(q.retries(retries))
        done, skipped, used = count(st, "done"), (already or {}).get(q.grid, 0), (reused or {}).get(q.grid, 0)
        failed = [(q.cells[cid], s) for cid, s in st.items() if s.state == "failed"]
        left = len(st) - done - len(failed)
        unsettled += left
        used_txt = f"{used} reused from other grids, " if used else ""
        print(f"grid {q.grid}: {done - skipped - used} finished, {used_txt}{skipped} skipped (already done), "
              f"{len(failed)} failed, "
              f"{left} not done, of {len(st)} cells; tracking {tracking_uri}; queue {q.url} (study {q.name})",
              file=stream)
        failed_lines += [failed_line(q.grid, cell, s) for cell, s in failed]
    for line in failed_lines:
        print(line, file=stream)
    if unsettled:
        print(f"{unsettled} cells not done: no worker is left to run them; run the grid again", file=stream)
    return EXIT_FAILED if failed_lines or unsettled else EXIT_OK
