"""The `cpu` preset: the seven CIFAR-10 grids at CPU scale (per-grid backbones, 3 seeds), reported as a
study of its own; and what `auto` chose (precision, channels_last, compile) recorded on each run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from ablations.cli import main
from ablations.config import ConfigError, load_experiments, resolve_cells
from ablations.util.device import native_bf16

ROOT = Path(__file__).resolve().parents[1]
CIFAR_GRIDS = ("reduction", "squeeze", "excitation", "stage", "integration", "se_3x3", "nosqueeze")


@pytest.mark.parametrize("grid", CIFAR_GRIDS)
def test_dry_run_lists_three_seeds_per_variant_on_the_cpu_backbones(grid, capsys):
    assert main(["--config", str(ROOT / "experiments.yaml"), "--grid", grid, "--preset", "cpu", "--dry-run",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    variants = {r["variant"] for r in rows}
    assert len(rows) == 3 * len(variants)
    assert all(sorted(r["seed"] for r in rows if r["variant"] == v) == [0, 1, 2] for v in variants)
    arch = "resnet14_cifar_w16" if grid == "se_3x3" else "resnet10_cifar_w32"  # the 3x3 position needs bottlenecks
    assert {r["config"]["model"]["arch"] for r in rows} == {arch}
    if grid == "se_3x3":  # the narrow bottleneck twin (bench/RESULTS.md: the wide one overran the budget)
        assert all(0.3e6 < r["params"] < 0.34e6 and 0.015 < r["gflops"] < 0.02 for r in rows)
    else:
        assert all(r["params"] > 1e6 and 0.05 < r["gflops"] < 0.08 for r in rows)


def test_the_preset_keeps_the_paper_axes_unclamped():
    """r = 32 on the narrowest (32-channel) stage, SE in each of stages 2-5, the 3x3 position on bottlenecks."""
    exps = load_experiments(ROOT / "experiments.yaml")
    r = {c.variant: c for c in resolve_cells(exps, "reduction", preset="cpu") if c.seed == 0}
    assert r["r=32"].config.model.se.reduction == 32
    stages = {c.variant for c in resolve_cells(exps, "stage", preset="cpu")}
    assert {"stages=2", "stages=3", "stages=4", "stages=5", "stages=all", "baseline"} == stages
    s3 = {c.variant: c.config.model for c in resolve_cells(exps, "se_3x3", preset="cpu")}
    assert s3["position=3x3"].se.position == "3x3" and s3["position=3x3"].arch == "resnet14_cifar_w16"


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_preset_value_for_an_unknown_grid_is_bad_input(tmp_path):
    raw = {"grids": {"g": {"description": "d", "axes": {"model.se.reduction": [4]}}},
           "presets": {"p": {"grids": {"nope": {"model": {"arch": "resnet20"}}}}}}
    with pytest.raises(ConfigError, match=r"presets\.p\.grids\.nope: no such grid \(have: g\)"):
        load_experiments(_write(tmp_path / "e.yaml", raw))


# A tiny study preset on synthetic data: per-grid values, a study label, real training.
TINY = {
    "defaults": {"dataset": {"name": "synthetic", "train_size": 64, "test_size": 32},
                 "model": {"arch": "resnet20", "se": {"reduction": 4}},
                 "train": {"epochs": 1, "batch_size": 16, "lr": 0.05}, "seeds": [0]},
    "grids": {"ratio": {"description": "r", "axes": {"model.se.reduction": [2, 4]}}},
    "presets": {"mini": {"study": "Mini study (ResNet-20, 1 epoch)", "train": {"eval_flip": True},
                         "grids": {"ratio": {"seeds": [0, 1]}}}},
}


def test_a_study_preset_is_reported_as_its_study_beside_the_real_results(tmp_path, monkeypatch):
    monkeypatch.setenv("SENET_ABLATIONS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path / "experiments.yaml", TINY)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--config", str(config), "--grid", "ratio", "--preset", "mini", "--tracking-uri", store, "--device", "cpu"]
    assert main(common) == 0
    runs = MlflowClient(tracking_uri=store).search_runs(
        [MlflowClient(tracking_uri=store).get_experiment_by_name("ratio").experiment_id], "tags.cell_id != ''")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)  # the grid's own seeds: 2 x 2
    expected = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    for r in runs:  # what `auto` chose, as tags
        assert r.data.tags["precision"] == expected and r.data.tags["compile"] == "off"
        assert r.data.tags["channels_last"] == ("true" if expected == "bf16" else "false")
        assert r.data.params["train.eval_flip"] == "True"
    table = tmp_path / "results" / "synthetic-mini" / "ratio" / "table.md"
    assert table.is_file(), sorted(str(p) for p in (tmp_path / "results").rglob("*"))
    text = table.read_text()
    assert "Mini study (ResNet-20, 1 epoch)" in text and "mini preset" not in text
    assert not (tmp_path / "results" / "presets").exists()
    index = (tmp_path / "results" / "README.md").read_text()
    assert "## synthetic-mini" in index and "Mini study" in index
