"""run_ablation.py end to end: real training on real CIFAR-10 JPEGs, tracked in a real MLflow store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ablations.cli import main
from conftest import SAFETY_TIMEOUT, wait_until

ROOT = Path(__file__).resolve().parents[1]

# A real two-axis grid: r x squeeze on ResNet-20 (cheap on a CPU), 2 epochs on 600 real images.
GRID_FILE = {
    "defaults": {
        "dataset": {"name": "cifar10", "train_size": 600, "test_size": 300, "download": False},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 0},
        "seeds": [0],
    },
    "grids": {
        "two_axes": {
            "description": "r x squeeze",
            "axes": {"model.se.reduction": [4, 8], "model.se.squeeze": ["avg", "max"]},
        },
        "diverge": {
            "description": "one cell diverges",
            "axes": {"train.lr": [0.05, 1.0e+12]},
            "train": {"epochs": 1},
        },
    },
    "presets": {"tiny": {"dataset": {"train_size": 100, "test_size": 50}, "train": {"epochs": 1}}},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mini_cifar_root):
    d = tmp_path_factory.mktemp("grid")
    (d / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    return d


def cli(workdir: Path, mini_cifar_root: Path, *extra: str) -> list[str]:
    return ["--config", str(workdir / "experiments.yaml"), "--data-root", str(mini_cifar_root),
            "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--device", "cpu", *extra]


def env_with_cache(workdir: Path) -> dict[str, str]:
    return {**os.environ, "SENET_ABLATIONS_CACHE": str(workdir / "cache"), "PYTHONPATH": str(ROOT)}


def runs(workdir: Path, grid: str) -> list:
    """The cell runs of a grid (the grid's report run, tagged report=true, has no cell_id)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(grid)
    found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if "cell_id" in r.data.tags]


def finished(workdir: Path, grid: str) -> list:
    return [r for r in runs(workdir, grid) if r.info.status == "FINISHED"]


@pytest.fixture(scope="module")
def first_run(workdir, mini_cifar_root):
    """Run the two-axis grid once, killing it after its first cell, then finishing it."""
    cmd = [sys.executable, str(ROOT / "run_ablation.py"), *cli(workdir, mini_cifar_root, "--grid", "two_axes")]
    # The store exists before the grid starts: this test's own polling client never creates its tables
    # while the grid's process does (MLflow's migrations do not take concurrent creators).
    assert runs(workdir, "two_axes") == []
    proc = subprocess.Popen(cmd, env=env_with_cache(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait for the event (a first cell FINISHED, or the process ending), however slow the machine is.
    wait_until(lambda: finished(workdir, "two_axes") or proc.poll() is not None, "a first FINISHED cell", every=0.5)
    assert proc.poll() is None, "the grid ended before it could be killed:\n" + proc.stdout.read()
    survivors = {r.info.run_id for r in finished(workdir, "two_axes")}
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the running cell stays RUNNING
    proc.wait()
    killed_log = proc.stdout.read()
    proc.stdout.close()
    assert 1 <= len(survivors) < 4
    resumed = subprocess.run(cmd, env=env_with_cache(workdir), capture_output=True, text=True, timeout=SAFETY_TIMEOUT)
    return survivors, killed_log, resumed


@pytest.mark.slow
def test_killed_grid_resumes_only_missing_cells(workdir, first_run):
    survivors, _, resumed = first_run
    assert resumed.returncode == 0, resumed.stderr
    done = finished(workdir, "two_axes")
    assert len(done) == 4
    assert len({r.data.tags["cell_id"] for r in done}) == 4  # no duplicate FINISHED runs
    assert survivors <= {r.info.run_id for r in done}  # the cells done before the kill were kept
    assert f"{len(survivors)} skipped" in resumed.stderr
    # the run the kill interrupted is no longer RUNNING: it was marked KILLED at the next start, and
    # resumed into the same run if it had reached its first checkpoint (tests/test_checkpoint.py)
    statuses = [r.info.status for r in runs(workdir, "two_axes")]
    resumed_runs = [r for r in runs(workdir, "two_axes") if r.data.tags.get("resumes")]
    assert "RUNNING" not in statuses and statuses.count("KILLED") + len(resumed_runs) == 1


@pytest.mark.slow
def test_runs_carry_params_metrics_and_tags(workdir, first_run):
    done = finished(workdir, "two_axes")
    variants = sorted(r.data.tags["variant"] for r in done)
    assert variants == ["r=4, squeeze=avg", "r=4, squeeze=max", "r=8, squeeze=avg", "r=8, squeeze=max"]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    for run in done:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["grid"] == "two_axes" and tags["seed"] == "0" and len(tags["cell_id"]) == 16
        assert tags["torch_version"] and tags["git_commit"] and tags["device_name"].startswith("cpu")
        assert tags["data_source"].startswith("jpeg-archive:")
        assert params["model.arch"] == "resnet20" and params["model.num_classes"] == "10"
        assert params["model.se.reduction"] in ("4", "8") and params["train.epochs"] == "2"
        assert params["dataset.train_size"] == "600"
        for key in ("train_loss", "train_err", "test_top1_err", "test_top5_err", "lr", "epoch_seconds", "images_per_s"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [1, 2], key
        assert metrics["final_top1_err"] < 90.0  # better than chance (90% error) after 2 short epochs
        assert 0 <= metrics["final_top5_err"] <= metrics["final_top1_err"]
        assert metrics["best_top1_err"] <= metrics["final_top1_err"]
        assert metrics["params"] > 270_000 and metrics["caffe_params"] > metrics["params"]
        assert 0.04 < metrics["gflops"] < 0.05
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "model_summary.txt", "model"} <= artifacts
    # the weights load back with weights_only=True into the same architecture
    import torch

    from senet import build_model

    local = client.download_artifacts(done[0].info.run_id, "model/weights.pt", str(workdir))
    state = torch.load(local, weights_only=True)
    model = build_model({"arch": "resnet20", "num_classes": 10,
                         "se": {"reduction": int(done[0].data.params["model.se.reduction"]),
                                "squeeze": done[0].data.params["model.se.squeeze"]}})
    model.load_state_dict(state)


@pytest.mark.slow
def test_rerun_skips_every_cell(workdir, mini_cifar_root, first_run, capsys):
    before = {r.info.run_id for r in runs(workdir, "two_axes")}
    assert main(cli(workdir, mini_cifar_root, "--grid", "two_axes")) == 0
    err = capsys.readouterr().err
    assert "0 finished, 4 skipped (already done)" in err
    assert {r.info.run_id for r in runs(workdir, "two_axes")} == before


@pytest.mark.slow
def test_diverging_cell_fails_named_and_grid_goes_on(workdir, mini_cifar_root, first_run, capsys):
    code = main(cli(workdir, mini_cifar_root, "--grid", "diverge"))
    err = capsys.readouterr().err
    assert code == 1
    assert "FAILED diverge/lr=1000000000000.0 seed=0" in err and "loss became" in err
    by_variant = {r.data.tags["variant"]: r for r in runs(workdir, "diverge")}
    assert by_variant["lr=0.05"].info.status == "FINISHED"
    assert by_variant["lr=1000000000000.0"].info.status == "FAILED"
    assert "loss became" in by_variant["lr=1000000000000.0"].data.tags["failure_reason"]


@pytest.mark.slow
def test_preset_runs_are_tagged_and_reported_apart(workdir, mini_cifar_root, first_run, tmp_path, monkeypatch,
                                                   capsys):
    monkeypatch.chdir(tmp_path)
    assert main(cli(workdir, mini_cifar_root, "--grid", "two_axes", "--preset", "tiny")) == 0
    tiny = [r for r in finished(workdir, "two_axes") if r.data.tags.get("preset") == "tiny"]
    assert len(tiny) == 4 and all(r.data.params["dataset.train_size"] == "100" for r in tiny)
    # the automatic report of a preset run goes to results/presets/<preset>/, never over the real one
    smoke_table = (tmp_path / "results" / "presets" / "tiny" / "cifar10" / "two_axes" / "table.md").read_text()
    assert "preset: tiny" in smoke_table and "100 training images" in smoke_table
    assert not (tmp_path / "results" / "cifar10").exists()
    capsys.readouterr()
    assert main(cli(workdir, mini_cifar_root, "--report", "--grid", "two_axes")) == 0
    real_table = (tmp_path / "results" / "cifar10" / "two_axes" / "table.md").read_text()
    assert "600 training images" in real_table and "preset" not in real_table


def test_missing_dataset_is_bad_input(tmp_path, workdir, capsys):
    code = main(["--config", str(workdir / "experiments.yaml"), "--data-root", str(tmp_path / "nowhere"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--grid", "two_axes", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: dataset cifar10: not found under") and "\n" not in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing was logged


def test_list_and_dry_run_on_shipped_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script, config = str(ROOT / "run_ablation.py"), str(ROOT / "experiments.yaml")
    listed = subprocess.run([sys.executable, script, "--config", config, "--list"], cwd=tmp_path,
                            capture_output=True, text=True, env=env)
    assert listed.returncode == 0
    for grid in ("reduction", "squeeze", "excitation", "stage", "integration", "se_3x3", "nosqueeze"):
        assert grid in listed.stdout
    dry = subprocess.run([sys.executable, script, "--config", config, "--grid", "reduction", "--dry-run", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    import json

    cells = json.loads(dry.stdout)
    assert len(cells) == 18 and cells[0]["variant"] == "baseline"
    params = {c["variant"]: c["params"] for c in cells}
    assert params["baseline"] < params["r=32"] < params["r=16"] < params["r=8"] < params["r=4"] < params["r=2"]
    assert list(tmp_path.iterdir()) == []  # no store, no cache: a dry run writes nothing


GOOD = yaml.safe_dump(GRID_FILE, sort_keys=False)

# (what is wrong, the file's text, the path the one-line error must name)
MALFORMED = [
    ("unknown top-level key", GOOD + "extra: 1\n", "extra"),
    ("unknown train key", GOOD.replace("epochs: 2", "epoch: 2"), "defaults.train.epoch"),
    ("wrong type", GOOD.replace("batch_size: 32", "batch_size: many"), "defaults.train.batch_size"),
    ("zero reduction in an axis", GOOD.replace("- 8\n", "- 0\n", 1), "grids.two_axes.axes.model.se.reduction[1]"),
    ("bad squeeze in an axis", GOOD.replace("- max", "- mean"), "grids.two_axes.axes.model.se.squeeze[1]"),
    ("r too large for resnet20", GOOD.replace("- 8\n", "- 32\n", 1), "grids.two_axes.axes.model.se.reduction[1]"),
    ("unknown arch", GOOD.replace("arch: resnet20", "arch: resnet21"), "defaults.model.arch"),
    ("unknown dataset", GOOD.replace("name: cifar10", "name: mnist"), "defaults.dataset.name"),
    ("negative lr", GOOD.replace("lr: 0.05", "lr: -0.05"), "defaults.train.lr"),
    ("unknown axis key", GOOD.replace("model.se.squeeze:", "model.se.squash:"), "grids.two_axes.axes.model.se.squash"),
    ("grid without description", GOOD.replace("    description: r x squeeze\n", ""), "grids.two_axes.description"),
    ("stage that does not exist", GOOD.replace("    se:\n      reduction: 4\n", "    se:\n      reduction: 4\n      stages: [5]\n"),
     "model.se.stages"),
    ("YAML syntax", GOOD.replace("grids:", "grids: [", 1), "experiments.yaml:"),
]


@pytest.mark.parametrize("what,text,path", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_exits_2_naming_the_path(tmp_path, capsys, what, text, path):
    (tmp_path / "experiments.yaml").write_text(text)
    code = main(["--config", str(tmp_path / "experiments.yaml"), "--grid", "two_axes", "--device", "cpu",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--data-root", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, what
    assert err.startswith("error: ") and "\n" not in err
    assert path in err, (what, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments.yaml"]  # nothing logged
