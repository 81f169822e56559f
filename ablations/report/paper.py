"""The paper's ablation tables (Hu et al., SENet, Section 6, Tables 10-16) as data.

Every number is copied from the project's reference notes
(`../shared/reference/senet-paper-tables.md`): SE-ResNet-50 on ImageNet, single-crop
top-1 / top-5 error in %, GFLOPs as billions of multiply-adds at 224x224, Params in millions
(the paper's count, which includes BatchNorm running statistics).

Each row is keyed by the harness's variant tag (`ablations.config.variant_name`), so a grid
whose variants are all rows of its paper table can be laid out like that table.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAIN = "baseline"  # the variant tag of the plain backbone (a grid with `baseline: true`)


@dataclass(frozen=True)
class PaperRow:
    variant: str  # the harness's variant tag, e.g. 'r=16', 'stages=2', 'baseline'
    name: str  # the paper's row name; for PLAIN it is replaced by the run's own backbone name
    top1: float | None = None  # None: the paper has no such row (e.g. SE_Stage_5)
    top5: float | None = None
    gflops: float | None = None
    params_m: float | None = None


@dataclass(frozen=True)
class PaperTable:
    number: int
    title: str  # what the ablation varies, as a caption would say it
    header: str  # the paper's heading of the first column
    rows: tuple[PaperRow, ...]  # in the paper's order
    params: bool = False  # the paper's table has a Params column
    gflops: bool = False  # ... and a GFLOPs column
    prefix: str = ""  # put before a row name when it is quoted alone, e.g. 'r = ' + '16'

    def row(self, variant: str) -> PaperRow | None:
        return next((r for r in self.rows if r.variant == variant), None)

    def covers(self, variants: list[str]) -> bool:
        """Whether every one of these variants is a row of this table."""
        return all(self.row(v) is not None for v in variants)


TABLES: dict[int, PaperTable] = {
    10: PaperTable(10, "reduction ratio r", "Ratio r", (
        PaperRow("r=2", "2", 22.29, 6.00, None, 45.7),
        PaperRow("r=4", "4", 22.25, 6.09, None, 35.7),
        PaperRow("r=8", "8", 22.26, 5.99, None, 30.7),
        PaperRow("r=16", "16", 22.28, 6.03, None, 28.1),
        PaperRow("r=32", "32", 22.72, 6.20, None, 26.9),
        PaperRow(PLAIN, "ResNet-50", 23.30, 6.55, None, 25.6),
    ), params=True, prefix="r = "),
    11: PaperTable(11, "squeeze operator", "Squeeze", (
        PaperRow("squeeze=max", "Max", 22.57, 6.09),
        PaperRow("squeeze=avg", "Avg", 22.28, 6.03),
    )),
    12: PaperTable(12, "excitation operator", "Excitation", (
        PaperRow("excitation=relu", "ReLU", 23.47, 6.98),
        PaperRow("excitation=tanh", "Tanh", 23.00, 6.38),
        PaperRow("excitation=sigmoid", "Sigmoid", 22.28, 6.03),
    )),
    # The paper's Table 13 has no SE_Stage_5 row; the harness runs it anyway (no reference number).
    13: PaperTable(13, "SE blocks in one stage only", "Model", (
        PaperRow(PLAIN, "ResNet-50", 23.30, 6.55, 3.86, 25.6),
        PaperRow("stages=2", "SE_Stage_2", 23.03, 6.48, 3.86, 25.6),
        PaperRow("stages=3", "SE_Stage_3", 23.04, 6.32, 3.86, 25.7),
        PaperRow("stages=4", "SE_Stage_4", 22.68, 6.22, 3.86, 26.4),
        PaperRow("stages=5", "SE_Stage_5"),
        PaperRow("stages=all", "SE_All", 22.28, 6.03, 3.87, 28.1),
    ), params=True, gflops=True),
    14: PaperTable(14, "integration strategy", "Design", (
        PaperRow("integration=standard", "SE", 22.28, 6.03),
        PaperRow("integration=pre", "SE-PRE", 22.23, 6.00),
        PaperRow("integration=post", "SE-POST", 22.78, 6.35),
        PaperRow("integration=identity", "SE-Identity", 22.20, 6.15),
    )),
    15: PaperTable(15, "SE after the 3x3 conv of each bottleneck", "Design", (
        PaperRow("position=output", "SE", 22.28, 6.03, 3.87, 28.1),
        PaperRow("position=3x3", "SE_3x3", 22.48, 6.02, 3.86, 25.8),
    ), params=True, gflops=True),
    16: PaperTable(16, "no squeeze (1x1 convs at every position)", "Model", (
        PaperRow(PLAIN, "ResNet-50", 23.30, 6.55, 3.86, 25.6),
        PaperRow("squeeze=none", "NoSqueeze", 22.93, 6.39, 4.27, 28.1),
        PaperRow("squeeze=avg", "SE", 22.28, 6.03, 3.87, 28.1),
    ), params=True, gflops=True),
}

CITATION = "Hu et al., Squeeze-and-Excitation Networks (TPAMI 2019)"
SETTING = "SE-ResNet-50 on ImageNet"


def paper_table(number: int | None) -> PaperTable | None:
    return TABLES.get(number) if number is not None else None


__all__ = ["CITATION", "PLAIN", "PaperRow", "PaperTable", "SETTING", "TABLES", "paper_table"]
