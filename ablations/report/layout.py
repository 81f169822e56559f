"""How a grid's table reads: row order and names, the Δ reference, and the grid's paper table if it matches."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from ablations.config import GridConfig, variant_name
from ablations.report.paper import PLAIN, PaperTable, paper_table
from senet.config import SEConfig

SE_KEYS = ("reduction", "squeeze", "excitation", "stages", "integration", "position")  # the ablated options


@dataclass(frozen=True)
class Layout:
    """How a grid's table reads: rows, their names, columns, and the row Δ compares with."""

    header: str  # heading of the first column
    variants: tuple[str, ...]  # row order
    labels: dict[str, str]  # variant tag -> row name
    reference: str | None  # the variant whose SE options are the defaults (r=16, avg, sigmoid, ...)
    paper: PaperTable | None  # set when every variant is a row of the grid's paper table
    paper_number: int | None  # the grid's paper table, matched or not
    params: bool
    gflops: bool
    ratios: dict[str, int] = field(default_factory=dict)  # variant -> r, when the grid sweeps r alone

    def label(self, variant: str) -> str:
        return self.labels.get(variant, variant)


def backbone_name(arch: str | None) -> str:
    """'resnet18_cifar' -> 'ResNet-18', 'resnext50_32x4d' -> 'ResNeXt-50 (32x4d)'."""
    m = re.fullmatch(r"(resnext|resnet)(\d+)(?:_(\d+x\d+d))?(?:_cifar)?", arch or "")
    if m is None:
        return arch or "plain backbone"
    name = f"{'ResNeXt' if m[1] == 'resnext' else 'ResNet'}-{m[2]}"
    return f"{name} ({m[3]})" if m[3] else name


def expected_variants(grid: GridConfig | None) -> list[str]:
    """The variant tags the runner gives this grid, in its order."""
    if grid is None:
        return []
    combos = itertools.product(*grid.axes.values())
    named = [variant_name(dict(zip(grid.axes, combo))) for combo in combos]
    return ([PLAIN] if grid.baseline else []) + named


def _observed_order(runs: pd.DataFrame) -> list[str]:
    """Variants by their first run (the runner runs variants in axis order), the plain one first."""
    first = runs.groupby("variant")["start_time"].min().sort_values(kind="stable")
    order = list(first.index)
    return sorted(order, key=lambda v: v != PLAIN)


def default_variant(runs: pd.DataFrame) -> str | None:
    """The variant whose swept SE options all equal the SE block's defaults (the Δ column's reference)."""
    se = runs.loc[~runs["plain"]]
    columns = [f"params.model.se.{k}" for k in SE_KEYS if f"params.model.se.{k}" in se.columns]
    per_variant = se.groupby("variant")[columns].first().astype(object).fillna("").astype(str)
    swept = [c for c in columns if per_variant[c].nunique() > 1]
    if not swept:
        return None
    defaults = SEConfig()
    want = {c: str(getattr(defaults, c.rsplit(".", 1)[-1])) for c in swept}
    matches = [v for v, row in per_variant.iterrows() if all(row[c] == want[c] for c in swept)]
    return matches[0] if len(matches) == 1 else None


def _ratios(variants: Sequence[str]) -> dict[str, int]:
    found = {v: int(m[1]) for v in variants if (m := re.fullmatch(r"r=(\d+)", v))}
    swept_alone = len(found) >= 2 and all(v in found or v == PLAIN for v in variants)
    return found if swept_alone else {}


def make_layout(runs: pd.DataFrame, grid: GridConfig | None = None, paper_number: int | None = None,
                arch: str | None = None) -> Layout:
    expected = expected_variants(grid)
    variants = expected + [v for v in _observed_order(runs) if v not in expected]
    plain_arch = runs.loc[runs["plain"], "arch"].dropna()
    any_arch = runs["arch"].dropna()
    arch = plain_arch.iloc[0] if len(plain_arch) else any_arch.iloc[0] if len(any_arch) else arch
    plain_label = f"{backbone_name(arch)} (no SE)"
    table = paper_table(paper_number)
    reference = default_variant(runs) if not runs.empty else None
    if table is not None and variants and table.covers(variants):
        rows = [r for r in table.rows if r.variant in variants]
        labels = {r.variant: plain_label if r.variant == PLAIN else r.name for r in rows}
        return Layout(table.header, tuple(r.variant for r in rows), labels, reference, table, paper_number,
                      table.params, table.gflops, _ratios(variants))
    labels = {v: plain_label if v == PLAIN else v for v in variants}
    return Layout("Variant", tuple(variants), labels, reference, None, paper_number, True, True, _ratios(variants))

