"""The harness's bad-input errors, besides ConfigError (ablations.config) and DataError (ablations.data).

Each is a user's mistake or an unusable input, told in one line: the CLI prints `error: <message>` and
exits with EXIT_BAD_INPUT (2), before anything is written. Any other exception that reaches the CLI is
a bug, and keeps its traceback (exit 1).
"""

from __future__ import annotations


class BadInput(Exception):
    """A bad input that is neither the experiments file nor a dataset; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class StoreError(BadInput):
    """The MLflow tracking store cannot be opened, or lacks what was asked of it."""


class OutputError(BadInput):
    """An output folder (e.g. --results-dir) cannot be created or written."""


class WeightsError(BadInput):
    """A run's weights file is not a plain state dict of tensors; it is not loaded."""


__all__ = ["BadInput", "OutputError", "StoreError", "WeightsError"]
