"""Where a table's numbers come from: commits, command, machine, torch, precision, time; and which
cells of the grid have no finished run yet.

Pure functions of the tidy cell runs (frames.cell_runs), so a table regenerated from a study's
record says the same as the one written from the study's store.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd

from ablations.util.timefmt import fmt_duration


def _values(runs: pd.DataFrame, name: str) -> list[str]:
    """The distinct values of a column, most frequent first (ties by value)."""
    if name not in runs:
        return []
    counts = runs[name].dropna().astype(str).value_counts()
    return sorted(counts.index, key=lambda v: (-counts[v], v))


def command(grid: str, preset: str | None) -> str:
    return f"python run_ablation.py --grid {grid}" + (f" --preset {preset}" if preset else "")


def provenance(runs: pd.DataFrame, grid: str, preset: str | None) -> list[str]:
    """The sentences of a table's provenance paragraph."""
    out = [f"Command: `{command(grid, preset)}` (with `--data-root` where the dataset lives)."]
    commits = [c[:10] for c in _values(runs, "git_commit")]
    if commits:
        out.append(f"Trained at commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}.")
    machine = [m for m in (", ".join(_values(runs, "cpu_model")), ", ".join(_values(runs, "device_name"))) if m]
    if machine:
        out.append(f"Machine: {'; '.join(machine)}.")
    stack = []
    if torch := _values(runs, "torch_version"):
        stack.append(f"torch {', '.join(torch)}")
    if precision := _values(runs, "precision"):
        stack.append(f"precision {', '.join(precision)}")
    if compiled := _values(runs, "compile"):
        stack.append(f"compile {', '.join(compiled)}")
    if stack:
        out.append("Software: " + "; ".join(stack) + ".")
    seconds = pd.to_numeric(runs.get("train_seconds"), errors="coerce").dropna() if "train_seconds" in runs else None
    if seconds is not None and len(seconds):
        reused = int(runs["reused"].sum()) if "reused" in runs else 0
        own = seconds[~runs.loc[seconds.index, "reused"]] if "reused" in runs else seconds
        cells = f"{len(own)} cell{'s' if len(own) != 1 else ''}"
        text = (f"Training time per cell (its epochs and evaluations): mean {fmt_duration(seconds.mean())}, "
                f"{fmt_duration(seconds.min())} to {fmt_duration(seconds.max())}; the grid's {cells} trained "
                f"here took {fmt_duration(own.sum())}")
        shared = f"{reused} more {'was' if reused == 1 else 'were'} trained once, for another grid"
        out.append(text + (f"; {shared}." if reused else "."))
    return out


def missing_cells(runs: pd.DataFrame, expected: Iterable[tuple[str, int]]) -> str | None:
    """'Not finished yet (3 cells): r=8 seeds 1, 2; baseline seed 2.' for the expected (variant, seed)
    cells without a finished run; None when every one has one."""
    have = set(zip(runs["variant"], runs["seed"].astype(int)))
    by_label: dict[str, list[int]] = {}
    for variant, seed in expected:
        if (variant, seed) not in have:
            by_label.setdefault(variant, []).append(seed)
    if not by_label:
        return None
    parts = [f"{label} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}"
             for label, seeds in by_label.items()]
    total = sum(map(len, by_label.values()))
    return f"Not finished yet ({total} cell{'s' if total > 1 else ''}): {'; '.join(parts)}."
