"""Training one cell: the loop (`loop`), its checkpoints and stop requests (`checkpoint`).

The names most callers need are re-exported here: `from ablations.train import train`.
"""

from ablations.train.checkpoint import TrainingStopped
from ablations.train.loop import (CellFailed, CellOutOfMemory, EpochStats, Observer, TrainResult, evaluate, lr_at,
                                  precision_for, seed_everything, train)

__all__ = ["CellFailed", "CellOutOfMemory", "EpochStats", "Observer", "TrainResult", "TrainingStopped", "evaluate",
           "lr_at", "precision_for", "seed_everything", "train"]
