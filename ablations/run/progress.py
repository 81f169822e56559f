"""Progress of a grid: cells done of total with ETA, and the running cell's epoch, loss and error.

On a terminal it is a live display (rich); in a log or CI it is one line per epoch and per
cell, plus a step line at most every `step_interval` seconds for long epochs.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ablations.config import Cell
from ablations.util.timefmt import eta, fmt_duration
from ablations.train import EpochStats


class GridProgress:
    def __init__(self, grid: str, total: int, stream: TextIO | None = None, live: bool | None = None,
                 step_interval: float = 15.0) -> None:
        self.grid, self.total = grid, total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.step_interval = step_interval
        self.done = 0  # cells finished, failed or skipped
        self.trained_seconds: list[float] = []
        self._bars = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bars = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), console=Console(file=self.stream), transient=False,
            )
            self._grid_task = self._bars.add_task(f"grid {grid}", total=total, info="")
            self._cell_task = self._bars.add_task("cell", total=1, info="", visible=False)
            self._bars.start()

    # -- output -------------------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        if self._bars is not None:
            self._bars.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)

    def _grid_eta(self) -> float | None:
        left = self.total - self.done
        if left == 0:
            return 0.0
        per_cell = sum(self.trained_seconds) / len(self.trained_seconds) if self.trained_seconds else None
        if self._cell_start is not None and self._fraction > self._resumed_at:
            elapsed = time.perf_counter() - self._cell_start
            current_left = self._cell_eta(elapsed)
            # the running cell's own pace, until one has ended (a resumed cell's, scaled to a whole cell)
            per_cell = per_cell or (elapsed + current_left) / (1 - self._resumed_at)
            return current_left + per_cell * (left - 1)
        return per_cell * left if per_cell else None

    def _refresh(self, info: str = "") -> None:
        if self._bars is not None:
            self._bars.update(self._grid_task, completed=self.done, info=f"ETA {fmt_duration(self._grid_eta())}")
            if info:
                self._bars.update(self._cell_task, info=info)

    # -- grid events ----------------------------------------------------------------------------------------
    _cell_start: float | None = None
    _fraction = 0.0  # of the running cell, done
    _resumed_at = 0.0  # of the running cell, done before this process took it up (its checkpoint)

    def _cell_eta(self, elapsed: float) -> float | None:
        """Seconds left in the running cell, at the pace of the part trained here: a resumed cell's
        earlier part took no time in this process and would make the pace look faster than it is."""
        if self._resumed_at >= 1:
            return 0.0
        return eta(elapsed, (self._fraction - self._resumed_at) / (1 - self._resumed_at))

    def note(self, line: str) -> None:
        self._print(line)

    def skip(self, cell: Cell, why: str = "already FINISHED") -> None:
        self.done += 1
        self._print(f"[{self.grid}] {self.done}/{self.total} skip {cell.variant} seed={cell.seed} ({why})")
        self._refresh()

    def start_cell(self, cell: Cell, epochs: int, done: float = 0.0) -> None:
        """`done`: the fraction of the cell its checkpoint holds (0 for a fresh start)."""
        self.cell, self.epochs = cell, epochs
        self._cell_start, self._last_step_line = time.perf_counter(), time.perf_counter()
        self._fraction = self._resumed_at = done
        self._print(f"[{self.grid}] cell {self.done + 1}/{self.total}: {cell.variant} seed={cell.seed} "
                    f"(cell_id {cell.cell_id}), {epochs} epoch{'' if epochs == 1 else 's'}")
        if self._bars is not None:
            self._bars.reset(self._cell_task, total=epochs, completed=0, visible=True,
                             description=f"{cell.variant} seed={cell.seed}", info="")

    def end_cell(self, cell: Cell, status: str, summary: str = "") -> None:
        seconds = time.perf_counter() - (self._cell_start or time.perf_counter())
        if status == "FINISHED" and self._resumed_at < 1:  # as the time of a whole cell, at this pace
            self.trained_seconds.append(seconds / (1 - self._resumed_at))
        self.done += 1
        self._cell_start, self._fraction, self._resumed_at = None, 0.0, 0.0
        self._print(f"[{self.grid}] {self.done}/{self.total} {status} {cell.variant} seed={cell.seed} "
                    f"in {fmt_duration(seconds)}{' - ' + summary if summary else ''}; grid ETA {fmt_duration(self._grid_eta())}")
        if self._bars is not None:
            self._bars.update(self._cell_task, visible=False)
        self._refresh()

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    # -- training observer ----------------------------------------------------------------------------------
    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        self._fraction = (epoch - 1 + step / steps) / self.epochs
        now = time.perf_counter()
        cell_eta = self._cell_eta(now - self._cell_start)
        loss_txt = f" loss {loss:.3f}" if loss is not None else ""
        if self._bars is not None:
            self._bars.update(self._cell_task, completed=epoch - 1 + step / steps,
                              info=f"epoch {epoch}/{self.epochs} step {step}/{steps}{loss_txt} ETA {fmt_duration(cell_eta)}")
            self._refresh()
        elif loss is not None and now - self._last_step_line >= self.step_interval:
            self._last_step_line = now
            self._print(f"    epoch {epoch}/{self.epochs} step {step}/{steps}{loss_txt}  cell ETA {fmt_duration(cell_eta)}")

    def on_epoch(self, s: EpochStats) -> None:
        self._fraction = s.epoch / self.epochs
        cell_eta = self._cell_eta(time.perf_counter() - (self._cell_start or time.perf_counter()))
        self._print(
            f"    epoch {s.epoch}/{self.epochs}  loss {s.train_loss:.3f}  train err {s.train_err:.1f}%  "
            f"test err top-1 {s.test_top1_err:.2f}% top-5 {s.test_top5_err:.2f}%  lr {s.lr:.3g}  "
            f"{s.seconds:.1f}s  {s.images_per_s:,.0f} img/s  cell ETA {fmt_duration(cell_eta)}  "
            f"grid ETA {fmt_duration(self._grid_eta())}"
        )
        if self._bars is not None:
            self._bars.update(self._cell_task, completed=s.epoch)
            self._refresh()
