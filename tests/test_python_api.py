"""Running a grid from Python: RunOptions and run_grids, no command line (real training, a real MLflow store)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient

from ablations.cli import build_parser, run_options
from ablations.config import load_experiments, resolve_cells
from ablations.errors import EXIT_OK
from ablations.run import RunOptions, run_grids
from ablations.run.launcher import _worker_argv

# Two ResNet-20 cells, one epoch on 64 synthetic images each: seconds on a CPU.
GRID_FILE = {
    "defaults": {
        "dataset": {"name": "synthetic", "train_size": 64, "test_size": 32},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "warmup_epochs": 0},
        "seeds": [0],
    },
    "grids": {"tiny": {"description": "two cells", "axes": {"model.se.reduction": [4, 8]}}},
    "presets": {"short": {"train": {"epochs": 1}}},
}


def write_grid(d: Path) -> Path:
    path = d / "experiments.yaml"
    path.write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    return path


def test_run_grids_from_python_finishes_every_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("SENET_ABLATIONS_CACHE", str(tmp_path / "cache"))
    config = write_grid(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = RunOptions(config=str(config), grids=("tiny",), tracking_uri=uri, device="cpu")

    assert run_grids(options) == EXIT_OK

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny")
    found = [r for r in client.search_runs([exp.experiment_id]) if "cell_id" in r.data.tags]
    expected = {c.cell_id for c in resolve_cells(load_experiments(config), "tiny")}
    assert {r.data.tags["cell_id"] for r in found} == expected and len(found) == 2
    assert all(r.info.status == "FINISHED" for r in found)
    assert not list((tmp_path / "checkpoints").glob("*/*"))  # FINISHED cells keep no checkpoint (state, manifest)


def test_launcher_worker_command_line_carries_the_options(tmp_path):
    """A launcher's worker, parsing the command line the launcher built, resolves the same cells."""
    config = write_grid(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = RunOptions(config=str(config), grids=("tiny",), preset="short", sets=("train.lr=0.1",), seeds=(2, 5),
                         data_root=str(tmp_path / "data"), tracking_uri=uri, device="cpu", retries=1, heartbeat=3,
                         grace=9, keep_checkpoints=True)
    argv = _worker_argv(options, uri, str(tmp_path / "journal.log"), "w0", "cpu", 1, None)
    assert argv[:4] == [sys.executable, "-m", "ablations.cli", "worker"]
    joined = run_options(build_parser().parse_args(argv[4:]))
    for name in ("config", "grids", "preset", "sets", "seeds", "data_root", "tracking_uri", "device", "retries",
                 "heartbeat", "grace", "keep_checkpoints"):
        assert getattr(joined, name) == getattr(options, name), name
    assert joined.launched and joined.worker_id == "w0" and joined.threads == 1
    assert joined.checkpoints(uri) == options.checkpoints(uri)
    exps = load_experiments(config)
    assert [c.cell_id for _, cells in joined.resolve(exps) for c in cells] == \
        [c.cell_id for _, cells in options.resolve(exps) for c in cells]
