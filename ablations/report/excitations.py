"""Recording every SE block's excitations of a model on a split (forward hooks), and the per-block table.

Every SE block's excitation vector s (the output of `<block>.se.gate`) is recorded for each image
and aggregated per class and over all classes. Aggregates are streamed (per-class sums and sums of
squares in float64), so the whole ImageNet validation set costs no more memory than CIFAR's. The
statistics are defined in `ablations.report.blockstats`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ablations.data import Dataset, Split, iterate_batches
from ablations.report.blockstats import SATURATION_LEVEL, BlockStats, ExcitationStats
from senet import se_blocks

_GATE_KINDS: dict[type[nn.Module], tuple[str, float | None]] = {  # gate -> (name, upper bound)
    nn.Sigmoid: ("sigmoid", 1.0),
    nn.Hardsigmoid: ("hardsigmoid", 1.0),
    nn.Tanh: ("tanh", 1.0),
    nn.ReLU: ("relu", None),
}


class _Accumulator:
    """Per-class running sums of s and s^2 (float64), plus the count of saturated values."""

    def __init__(self, n_classes: int, channels: int, threshold: float | None) -> None:
        self.count = np.zeros(n_classes, dtype=np.int64)
        self.sum = np.zeros((n_classes, channels))
        self.sumsq = np.zeros((n_classes, channels))
        self.threshold = threshold
        self.saturated = 0

    def add(self, s: Tensor, labels: Tensor) -> None:
        s64 = s.double().cpu()
        y = labels.cpu()
        k = len(self.count)
        self.count += np.bincount(y.numpy(), minlength=k)
        self.sum += torch.zeros(k, s64.shape[1], dtype=torch.float64).index_add_(0, y, s64).numpy()
        self.sumsq += torch.zeros(k, s64.shape[1], dtype=torch.float64).index_add_(0, y, s64 * s64).numpy()
        if self.threshold is not None:
            self.saturated += int((s64 > self.threshold).sum())

    def result(self, name: str) -> BlockStats:
        n = self.count[:, None].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):  # empty classes give NaN, on purpose
            mean = self.sum / n
            var = np.maximum(self.sumsq / n - mean**2, 0.0)
        total = self.count.sum()
        all_mean = self.sum.sum(0) / total
        all_var = np.maximum(self.sumsq.sum(0) / total - all_mean**2, 0.0)
        channels = self.sum.shape[1]
        saturated = self.saturated / (total * channels) if self.threshold is not None else math.nan
        return BlockStats(name, self.count.copy(), mean, np.sqrt(var), all_mean, np.sqrt(all_var), saturated)


def _gate_kind(se: nn.Module) -> tuple[str, float | None]:
    for cls, kind in _GATE_KINDS.items():
        if isinstance(se.gate, cls):
            return kind
    raise ValueError(f"unknown excitation gate {type(se.gate).__name__}")


@torch.no_grad()
def collect_excitations(model: nn.Module, split: Split, dataset: Dataset, *, device: str | torch.device = "cpu",
                        batch_size: int = 256) -> ExcitationStats:
    """Run `split` through `model` (eval mode) and aggregate every SE block's excitation per class.

    Hooks sit on `<block>.se.gate`; a spatial gate output (squeeze=none) is averaged over positions.
    """
    device = torch.device(device)
    blocks = se_blocks(model)
    if not blocks:
        raise ValueError("the model has no SE blocks")
    kinds = {_gate_kind(se) for se in blocks.values()}
    if len(kinds) != 1:
        raise ValueError(f"SE blocks use different gates: {sorted(k[0] for k in kinds)}")
    gate, bound = kinds.pop()
    threshold = SATURATION_LEVEL * bound if bound is not None else None
    n_classes = len(dataset.classes)
    accs = {name: _Accumulator(n_classes, se.channels, threshold) for name, se in blocks.items()}
    current: dict[str, Tensor] = {}
    spatial = False

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs: tuple, out: Tensor) -> None:
            nonlocal spatial
            s = out.detach().float()
            if s.dim() == 4 and s.shape[2] * s.shape[3] > 1:
                spatial = True
            accs[name].add(s.mean((2, 3)) if s.dim() == 4 else s, current["labels"])
        return hook

    model.to(device).eval()
    handles = [se.gate.register_forward_hook(hook_for(name)) for name, se in blocks.items()]
    try:
        for x, y in iterate_batches(split, dataset, batch_size=batch_size, train=False, device=device):
            current["labels"] = y
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ExcitationStats([accs[name].result(name) for name in blocks], dataset.classes, gate, bound, spatial)


def block_table(stats: ExcitationStats) -> pd.DataFrame:
    """One row per SE block, in forward order (see ablations.report.blockstats for each definition)."""
    k, n = len(stats.classes), stats.images
    chance = (k - 1) / (n - 1) if n > 1 else math.nan
    rows = []
    for depth, b in enumerate(stats.blocks, start=1):
        rows.append({
            "block": b.label, "module": b.name, "stage": b.stage, "index": b.index, "depth": depth,
            "channels": b.channels, "images": n, "classes": k, "gate": stats.gate,
            "averaged_over_positions": stats.spatial,  # squeeze=none: s is each image's map averaged over positions
            "class_specificity": b.specificity(), "chance_specificity": chance,
            "saturated_fraction": b.saturated_fraction,
            "mean_activation": float(b.all_mean.mean()),
            # total std over all (image, channel) values: within-channel variance plus the spread of channel means
            "std_activation": float(np.sqrt((b.all_std**2 + b.all_mean**2).mean() - b.all_mean.mean() ** 2)),
            "class_range": b.class_range(),
        })
    return pd.DataFrame(rows)
