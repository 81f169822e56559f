"""One way to run a cell: plain runs of one grid started side by side, as a researcher does in two
terminals or a cluster in a job array, share the queue. Real processes, a real MLflow store that does
not exist yet, real CIFAR-10 images: every cell must end FINISHED exactly once."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ablations.cli import main
from conftest import wait_for_exit

ROOT = Path(__file__).resolve().parents[1]

GRID_FILE = {
    "defaults": {
        "dataset": {"name": "cifar10", "train_size": 64, "test_size": 32, "download": False},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0},
        "seeds": [0, 1],
    },
    "grids": {
        # 3 variants x 2 seeds = 6 cells of about a second each
        "race": {"description": "two plain runs at once", "axes": {"model.se.reduction": [4, 8, 16]}},
    },
}


def start(d: Path, data_root: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run_ablation.py"), "--config", str(d / "experiments.yaml"),
           "--data-root", str(data_root), "--tracking-uri", f"sqlite:///{d / 'store' / 'mlflow.db'}",
           "--device", "cpu", "--threads", "1", *extra]
    env = {**os.environ, "SENET_ABLATIONS_CACHE": str(d / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished_per_cell(d: Path, grid: str) -> collections.Counter:
    client = MlflowClient(tracking_uri=f"sqlite:///{d / 'store' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(grid)
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000)
    return collections.Counter(r.data.tags["cell_id"] for r in runs if "cell_id" in r.data.tags)


def grid_parents(d: Path, grid: str) -> tuple[list[str], set[str | None]]:
    """The grid's parent runs, and the parents its cell runs are nested under."""
    client = MlflowClient(tracking_uri=f"sqlite:///{d / 'store' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(grid)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return ([r.info.run_id for r in runs if r.data.tags.get("grid_parent") == "true"],
            {r.data.tags.get("mlflow.parentRunId") for r in runs if "cell_id" in r.data.tags})


@pytest.mark.slow
def test_three_plain_runs_on_a_new_store_finish_each_cell_once(tmp_path, mini_cifar_root):
    """Three `run_ablation.py --grid race` processes (no --workers) started together on a store that
    does not exist yet: none crashes creating the store, all exit 0, each cell FINISHED once, and the
    grid has one parent run with every cell run nested under it."""
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    (tmp_path / "store").mkdir()
    procs = [start(tmp_path, mini_cifar_root, "--grid", "race") for _ in range(3)]
    outs = [wait_for_exit(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n----\n".join(outs)
    per_cell = finished_per_cell(tmp_path, "race")
    assert len(per_cell) == 6 and set(per_cell.values()) == {1}, per_cell
    for out in outs:
        assert "Traceback" not in out and "grid race: " in out and "0 failed, 0 not done, of 6 cells" in out
    parents, nested_under = grid_parents(tmp_path, "race")
    assert len(parents) == 1 and nested_under == set(parents), (parents, nested_under)

    again = start(tmp_path, mini_cifar_root, "--grid", "race")  # a fourth run finds everything done
    out = wait_for_exit(again)
    assert again.returncode == 0 and "0 finished, 6 skipped (already done)" in out, out
    assert finished_per_cell(tmp_path, "race") == per_cell
    assert grid_parents(tmp_path, "race") == (parents, set(parents))


def test_force_runs_every_cell_again_once(tmp_path, mini_cifar_root, capsys):
    """--force: every cell once more, in a study of its own; a plain run after it runs nothing."""
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(
        {**GRID_FILE, "grids": {"race": {**GRID_FILE["grids"]["race"], "axes": {"model.se.reduction": [4]}}}}))
    (tmp_path / "store").mkdir()
    argv = ["--config", str(tmp_path / "experiments.yaml"), "--data-root", str(mini_cifar_root), "--device", "cpu",
            "--tracking-uri", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "--grid", "race", "--seeds", "0"]
    assert main(argv) == 0
    assert main(argv + ["--force"]) == 0
    assert list(finished_per_cell(tmp_path, "race").values()) == [2]
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 finished, 1 skipped (already done)" in capsys.readouterr().err
    assert list(finished_per_cell(tmp_path, "race").values()) == [2]


@pytest.mark.parametrize("where", ["under a file", "read-only folder"])
def test_unwritable_storage_is_one_line_and_writes_nothing(tmp_path, capsys, where):
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(
        {**GRID_FILE, "defaults": {**GRID_FILE["defaults"], "dataset": {"name": "synthetic", "train_size": 32,
                                                                         "test_size": 16}}}))
    if where == "under a file":
        (tmp_path / "afile").write_text("")
        storage = tmp_path / "afile" / "journal.log"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        storage = tmp_path / "ro" / "journal.log"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["--config", str(tmp_path / "experiments.yaml"), "--grid", "race", "--device", "cpu",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(storage)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: --storage {storage}: ") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no journal, no lock file
