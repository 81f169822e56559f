"""Durations for people: the one formatter and the one ETA rule of the harness."""

from __future__ import annotations

import math


def fmt_duration(seconds: float | None) -> str:
    """`42s`, `3m05s`, `2h07m`; `?` when unknown (None, NaN or infinite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_long(seconds: float) -> str:
    """A duration as people plan with it: `40 s`, `25 min`, `5.1 h`, `3.8 days`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def eta(elapsed: float, fraction: float) -> float | None:
    """Seconds left for work that took `elapsed` seconds to get `fraction` (0..1] done, at the same pace.

    Used for a cell (by steps), a grid (by cells), the launcher and the role-of-SE analysis (by runs)."""
    if fraction <= 0:
        return None
    return elapsed / fraction * (1 - min(fraction, 1.0))


__all__ = ["eta", "fmt_duration", "fmt_long"]
