"""The one Markdown table writer of the report package: GitHub pipe tables with `|` in cells escaped."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

_RULE = {"left": ":---", "right": "---:"}


def escape_cell(text: str) -> str:
    """A cell's text that cannot end the cell early: `|` as `\\|`, a line break as a space (a row is one line)."""
    return " ".join(str(text).replace("|", r"\|").splitlines())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str]) -> str:
    """A pipe table (no trailing newline); `align` holds 'left' or 'right' per column, cells are escaped."""
    if len(align) != len(header):
        raise ValueError(f"{len(header)} columns but {len(align)} alignments")
    lines = [_row(header), _row(_RULE[a] for a in align)]
    for cells in rows:
        cells = list(cells)
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} cells, the header {len(header)}")
        lines.append(_row(cells))
    return "\n".join(lines)


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(escape_cell(c) for c in cells) + " |"


def frame_markdown(frame: pd.DataFrame, *, floatfmt: str = ".3f", missing: str = "n/a") -> str:
    """A frame as a pipe table without its index: floats with `floatfmt`, missing values as `missing`,
    numeric columns right-aligned and the others left-aligned."""
    align, columns = [], []
    for name in frame.columns:
        values = frame[name]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        align.append("right" if numeric else "left")
        columns.append([_format(v, floatfmt, missing) for v in values])
    return markdown_table([str(c) for c in frame.columns], zip(*columns), align)


def _format(value: object, floatfmt: str, missing: str) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return missing
    if isinstance(value, (float, np.floating)):
        return format(value, floatfmt)
    return str(value)
