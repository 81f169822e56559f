"""The results index, results/README.md: every grid's table.md inlined, with links to its figures and files."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from ablations.report.build import FIGURES


def _demote(markdown: str) -> str:
    """Headings one level down, so a table.md sits under the index's own heading."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


FINDINGS = "FINDINGS.md"


def write_index(results_dir: str | Path = "results") -> Path:
    """results/README.md: every results/<dataset>/<grid>/table.md inlined, with links to its figures."""
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    tables = sorted(root.glob("*/*/table.md"))
    lines = ["# Ablation results", "",
             "Generated from the MLflow store by `ablations.report` (`write_report` per grid, then "
             "`write_index`); do not edit by hand.", ""]
    if (root / FINDINGS).is_file():  # written by hand, never regenerated: what the tables mean
        lines += [f"What the results say, grid by grid, against the paper's claims: [{FINDINGS}]({FINDINGS}).", ""]
    if not tables:
        lines += ["No reports yet.", ""]
    for dataset, group in itertools.groupby(tables, key=lambda p: p.parent.parent.name):
        lines += [f"## {dataset}", ""]
        for table in group:
            folder = table.parent
            rel = folder.relative_to(root).as_posix()
            lines += [_demote(table.read_text(encoding="utf-8")).rstrip(), ""]
            links = [f"[{p.stem.replace('_', ' ')}]({rel}/{p.name}) ([PDF]({rel}/{p.stem}.pdf))"
                     for p in sorted(folder.glob("*.png"), key=lambda p: _figure_rank(p.stem))]
            files = f"[Markdown]({rel}/table.md), [LaTeX]({rel}/table.tex), [CSV]({rel}/table.csv)"
            lines += [f"Figures: {', '.join(links)}." if links else "No figures (no finished runs).", "",
                      f"Files: {files}.", ""]
            lines += _role_of_se_section(folder, root)
    index = root / "README.md"
    index.write_text("\n".join(lines), encoding="utf-8")
    return index


def _role_of_se_section(folder: Path, root: Path) -> list[str]:
    """The findings paragraph and figure links of each analysed run (ablations.report.analysis writes them)."""
    lines: list[str] = []
    for findings in sorted(folder.glob("role_of_se/*/findings.md")):
        run_dir = findings.parent
        rel = run_dir.relative_to(root).as_posix()
        figures = ", ".join(f"[{p.stem.replace('_', ' ')}]({rel}/{p.name})" for p in sorted(run_dir.glob("*.png")))
        lines += [f"#### Role of SE: {run_dir.name}", "", findings.read_text(encoding="utf-8").strip(), "",
                  f"Figures: {figures}; statistics: [Markdown]({rel}/block_stats.md), [CSV]({rel}/block_stats.csv).", ""]
    return lines


def _figure_rank(stem: str) -> tuple[int, str]:
    return (FIGURES.index(stem) if stem in FIGURES else len(FIGURES), stem)
