"""The harness's bad-input errors (besides ConfigError in ablations.config and DataError in ablations.data)
and the exit codes of run_ablation.py, in one place (the CLI, workers and launchers all return them).

Each is a user's mistake or an unusable input, told in one line: the CLI prints `error: <message>` and
exits with EXIT_BAD_INPUT (2), before anything is written. Any other exception that reaches the CLI is
a bug, and keeps its traceback (exit 1).
"""

from __future__ import annotations

# Exit codes (ablations.cli, the workers and the launcher all return these):
# 0    every cell is done
# 1    some cell failed (each failed cell is named with its reason)
# 2    bad input: a malformed experiments file, an impossible variant, a missing dataset, an unusable store
# 75   preempted: SIGTERM/SIGUSR1 stopped the grid after checkpointing the running cell; run again to resume
#      (75 is EX_TEMPFAIL of sysexits.h: "temporary failure, try again later")
# 124  the --time-limit was reached: cells not started or checkpointed mid-way; run the same command again
#      (124 is what coreutils' `timeout` returns when the limit struck)
# 130  interrupted (Ctrl-C): the running cell is marked KILLED; the next run resumes it from its checkpoint
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75
EXIT_TIME_LIMIT = 124
EXIT_INTERRUPTED = 130


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


__all__ = ["BadInput", "OutputError", "StoreError", "WeightsError", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT",
           "EXIT_PREEMPTED", "EXIT_TIME_LIMIT", "EXIT_INTERRUPTED"]
