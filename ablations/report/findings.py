"""Writing a run's role-of-SE outputs: figures, the block table, per-channel arrays and the findings paragraph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ablations.report.blockstats import SATURATION_LEVEL, ExcitationStats
from ablations.report.excitations import block_table
from ablations.report.markdown import frame_markdown


def _markdown(table: pd.DataFrame) -> str:
    """The block table as Markdown (floats to 3 decimals; NaN and infinities as n/a)."""
    shown = table.drop(columns=["module"], errors="ignore").replace([np.inf, -np.inf], np.nan)
    return frame_markdown(shown, floatfmt=".3f", missing="n/a") + "\n"


def findings_paragraph(stats: pd.DataFrame, preset_note: str | None = None) -> str:
    """The paper's Section 7 findings next to what `stats` (a `block_table`) shows; numbers only from it.

    With `preset_note` (a preset run, e.g. smoke: one epoch on a few hundred images) the note stands in
    for the paper's findings: such a model is a pipeline check, not one to compare with the paper."""
    if stats.empty:
        return preset_note or "No SE block statistics to compare with the paper's Section 7."
    first, last = stats.iloc[0], stats.iloc[-1]
    n, k, gate = int(first["images"]), int(first["classes"]), str(first["gate"])
    paper = ("In the paper (SE-ResNet-50 on ImageNet, Section 7, Figs. 6 and 7) the excitations of early SE "
             "blocks are nearly class-agnostic, they become class-specific with depth, and SE_5_2 is close to "
             "saturation (most activations near 1, so the block acts almost as an identity).")
    per_stage = stats.groupby("stage", sort=True)["class_specificity"].mean()
    trend = _trend(per_stage.to_numpy())
    stage_text = ", ".join(f"stage {s} {v:.3f}" for s, v in per_stage.items())
    top = stats.loc[stats["class_specificity"].idxmax()]
    here = (f"Here ({n} test images of {k} classes, {gate} gate) the class-specificity score (between-class "
            f"share of each channel's variance, averaged over channels; about {first['chance_specificity']:.3f} "
            f"for class-independent activations) is {first['class_specificity']:.3f} at {first['block']} and "
            f"{last['class_specificity']:.3f} at {last['block']}; its mean per stage is {stage_text}, so it "
            f"{trend}. The highest score is {top['class_specificity']:.3f} at {top['block']}.")
    return f"{preset_note or paper} {here} {_saturation_sentence(stats)}"


def _trend(values: np.ndarray) -> str:
    steps = np.diff(values)
    if len(steps) == 0:
        return "cannot be compared across stages (one stage only)"
    if (steps > 0).all():
        return "rises from stage to stage"
    if (steps < 0).all():
        return "falls from stage to stage"
    return "does not change monotonically from stage to stage"


def _saturation_sentence(stats: pd.DataFrame) -> str:
    sat = stats["saturated_fraction"]
    if not np.isfinite(sat).any():
        return (f"The {stats.iloc[0]['gate']} gate has no upper bound, so saturation is not defined; the mean "
                f"activation ranges from {stats['mean_activation'].min():.3g} to {stats['mean_activation'].max():.3g}.")
    top = stats.loc[sat.idxmax()]
    last_stage = stats["stage"] == stats["stage"].max()
    inner, outer = sat[last_stage].mean(), sat[~last_stage].mean()
    compare = ""
    if (~last_stage).any():
        closer = "closer to" if inner > outer else "not closer to"
        compare = (f" Averaged over the last stage's blocks it is {inner:.1%}, against {outer:.1%} over the earlier "
                   f"blocks, so the last stage is {closer} saturation than the earlier ones.")
    return (f"The fraction of activations above {SATURATION_LEVEL} of the gate's upper bound is highest at "
            f"{top['block']} ({top['saturated_fraction']:.1%}; mean activation {top['mean_activation']:.3f}).{compare}")


def _stats_arrays(stats: ExcitationStats) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"classes": np.array(stats.classes)}
    for b in stats.blocks:
        out.update({f"{b.label}.counts": b.counts, f"{b.label}.class_mean": b.class_mean,
                    f"{b.label}.class_std": b.class_std, f"{b.label}.all_mean": b.all_mean,
                    f"{b.label}.all_std": b.all_std})
    return out


def write_outputs(stats: ExcitationStats, directory: Path, title: str, preset_note: str | None = None) -> list[Path]:
    """Figures (PNG + PDF), the block table (CSV + Markdown), per-channel arrays and the findings.

    `preset_note` (a preset run) replaces the comparison with the paper in the findings."""
    from ablations.report.role_plots import save_all  # matplotlib only when figures are drawn

    directory.mkdir(parents=True, exist_ok=True)
    table = block_table(stats)
    written = save_all(stats, table, directory, title)
    table.to_csv(directory / "block_stats.csv", index=False)
    (directory / "block_stats.md").write_text(_markdown(table), encoding="utf-8")
    np.savez_compressed(directory / "channel_stats.npz", **_stats_arrays(stats))
    (directory / "findings.md").write_text(findings_paragraph(table, preset_note) + "\n", encoding="utf-8")
    written += [directory / n for n in ("block_stats.csv", "block_stats.md", "channel_stats.npz", "findings.md")]
    return written
