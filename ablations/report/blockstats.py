"""The aggregated excitation statistics of SE blocks (types shared by the role-of-SE analysis and its figures).

Definitions used in the figures, tables and `findings_paragraph`:

* Excitation per image: s[i, c] for image i and channel c. With squeeze=none (NoSqueeze) the gate
  outputs one value per position; s[i, c] is then that map averaged over all positions.
* Class statistics: mean and population standard deviation (ddof=0) of s[:, c] over the images
  of one class, and over all images.
* Class-specificity of a block (the correlation ratio eta^2, averaged over channels): with
  mu_kc the mean of class k, mu_c the all-image mean, n_k images in class k and N in all,
      B_c = sum_k (n_k / N) (mu_kc - mu_c)^2      (variance of the class means)
      T_c = (1 / N) sum_i (s[i, c] - mu_c)^2      (total variance)
      specificity = mean over channels with T_c > 1e-12 of B_c / T_c.
  0 means every class has the same mean (class-agnostic), 1 means every image sits on its class
  mean (fully class-determined). Activations that ignore the class still score about
  (K - 1) / (N - 1) on N images of K classes (the `chance_specificity` column).
* Saturated fraction: the share of (image, channel) values above 0.9 x the gate's upper bound:
  s > 0.9 for sigmoid, hardsigmoid and tanh (all bounded by 1). ReLU has no upper bound, so its
  saturated fraction is undefined (NaN).
* Class range of a block: per channel, the largest minus the smallest class mean, averaged over
  channels (how far apart the class curves of Fig. 6 lie).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

SATURATION_LEVEL = 0.9  # a value counts as saturated above this fraction of the gate's upper bound
_MIN_VARIANCE = 1e-12  # channels with less total variance than this carry no class information
_BLOCK_NAME = re.compile(r"^stage(\d+)\.block(\d+)\.se$")


def block_label(module_name: str) -> str:
    """'stage3.block4.se' -> 'SE_3_4', the paper's name for the block."""
    m = _BLOCK_NAME.match(module_name)
    return f"SE_{m.group(1)}_{m.group(2)}" if m else module_name


def _stage_index(module_name: str) -> tuple[int, int]:
    m = _BLOCK_NAME.match(module_name)
    if m is None:
        raise ValueError(f"{module_name!r} is not named stage<S>.block<B>.se")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class BlockStats:
    """Aggregated excitations of one SE block (K classes, C channels)."""

    name: str  # module name, e.g. 'stage3.block4.se'
    counts: np.ndarray  # (K,) images per class
    class_mean: np.ndarray  # (K, C)
    class_std: np.ndarray  # (K, C), population std within each class
    all_mean: np.ndarray  # (C,)
    all_std: np.ndarray  # (C,), population std over all images
    saturated_fraction: float  # NaN where the gate has no upper bound

    @property
    def label(self) -> str:
        return block_label(self.name)

    @property
    def stage(self) -> int:
        return _stage_index(self.name)[0]

    @property
    def index(self) -> int:
        return _stage_index(self.name)[1]

    @property
    def channels(self) -> int:
        return int(self.all_mean.shape[0])

    def specificity_per_channel(self) -> np.ndarray:
        """B_c / T_c per channel (NaN where T_c is ~0); see the module docstring."""
        present = self.counts > 0  # an empty class has NaN means and no weight
        weights = self.counts[present] / self.counts.sum()
        between = (weights[:, None] * (self.class_mean[present] - self.all_mean) ** 2).sum(0)
        total = self.all_std**2
        out = np.full_like(total, np.nan)
        ok = total > _MIN_VARIANCE
        out[ok] = np.clip(between[ok] / total[ok], 0.0, 1.0)  # clip: float rounding only
        return out

    def specificity(self) -> float:
        per = self.specificity_per_channel()
        return float(np.nanmean(per)) if np.isfinite(per).any() else math.nan

    def class_range(self) -> float:
        present = self.class_mean[self.counts > 0]
        return float((present.max(0) - present.min(0)).mean())


@dataclass(frozen=True)
class ExcitationStats:
    """Every SE block's statistics, in forward order, for one model on one split."""

    blocks: list[BlockStats]
    classes: tuple[str, ...]
    gate: str  # 'sigmoid', 'tanh', 'relu' or 'hardsigmoid'
    bound: float | None  # the gate's upper bound; None for unbounded gates (ReLU)
    spatial: bool  # True: the gate output had positions (squeeze=none) and was averaged over them

    @property
    def threshold(self) -> float | None:
        """Values above this count as saturated; None where saturation is undefined."""
        return SATURATION_LEVEL * self.bound if self.bound is not None else None

    @property
    def images(self) -> int:
        return int(self.blocks[0].counts.sum()) if self.blocks else 0
