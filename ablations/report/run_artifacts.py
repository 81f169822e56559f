"""Reading a finished run back from MLflow: the run, its config and its weights (a plain state dict only)."""

from __future__ import annotations

import pickle
import re
import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient
from torch import Tensor

from ablations.config import ExperimentConfig
from ablations.errors import StoreError, WeightsError
from ablations.tracking import download_artifact


def load_weights(path: Path, what: str) -> dict[str, Tensor]:
    """A plain state dict (names -> tensors) from `path`, loaded with weights_only=True and nothing else.

    Anything more (a pickled object, code to run) is refused with WeightsError: such a file is never
    loaded, and there is no switch that would load it.
    """
    refused = f"{what} is not a plain state dict of tensors and will not be loaded"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met something other than tensors and containers
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        raise WeightsError(f"{refused} (it refers to {found[1]})" if found else refused) from None
    except (RuntimeError, EOFError, OSError) as exc:  # truncated, or not a torch file at all
        raise WeightsError(f"{what} cannot be read as torch weights: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise WeightsError(refused)
    # a torch.compile'd model's state dict prefixes every key; the plain model has none
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def get_run(client: MlflowClient, run_id: str):
    """The run, or StoreError naming the id when the store has none."""
    try:
        return client.get_run(run_id)
    except Exception as exc:  # MLflow's own error for an unknown id, per store kind
        raise StoreError(f"--run-id {run_id}: no such run in the store ({str(exc).splitlines()[0][:120]})") from None


def load_run(client: MlflowClient, run_id: str) -> tuple[ExperimentConfig, dict[str, Tensor]]:
    """The run's config.json and model/weights.pt (read through a temporary folder, removed after)."""
    with tempfile.TemporaryDirectory() as tmp:
        config_file = download_artifact(client, run_id, "config.json", tmp)
        config = ExperimentConfig.model_validate_json(config_file.read_text())
        weights = download_artifact(client, run_id, "model/weights.pt", tmp)
        state = load_weights(weights, f"run {run_id}: model/weights.pt")
    return config, state
