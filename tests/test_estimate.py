"""How long, before it starts: `--dry-run` ends with the grid's estimated wall time on this device and
says where it comes from (epoch times in the store, a calibration of a few real steps, or multiply-adds
at an assumed throughput); a grid sized for a GPU started on a CPU gets one warning line and goes on.

Real stores, real (tiny) training for the calibration, in this process through the CLI's `main`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from ablations.cli import main
from ablations.config import load_experiments, resolve_cells, with_num_classes
from ablations.errors import EXIT_BAD_INPUT
from ablations.run import estimate as E
from ablations.tracking import CellRun, ensure_experiment

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = str(ROOT / "experiments.yaml")
GRID_FILE = {
    "defaults": {
        "dataset": {"name": "synthetic", "train_size": 64, "test_size": 32},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0},
        "seeds": [0],
    },
    "grids": {
        "pair": {"description": "two cells", "axes": {"model.se.reduction": [4, 8]}},
        "wide": {"description": "another backbone", "model": {"arch": "resnet32"}, "axes": {"model.se.reduction": [4]}},
    },
}


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    return tmp_path


def dry(capsys, *args: str) -> tuple[list[str], str]:
    assert main(["--dry-run", "--device", "cpu", "--threads", "2", *args]) == 0
    out = capsys.readouterr()
    return out.out.strip().splitlines(), out.err


def test_dry_run_ends_with_an_estimate_from_an_assumed_throughput(tmp_path, capsys):
    """No store, no calibration: multiply-adds at an assumed throughput, labelled as an assumption;
    the store is never created by an estimate."""
    store = tmp_path / "none.db"
    lines, _ = dry(capsys, "--config", SHIPPED, "--grid", "reduction", "--tracking-uri", f"sqlite:///{store}")
    assert lines[-2].startswith("estimated wall time: about ") and "for 18 cells on this CPU (2 threads)" in lines[-2]
    assert "18 cells: multiply-adds at an ASSUMED throughput" in lines[-1] and "an assumption, not a measurement" in lines[-1]
    assert "--calibrate" in lines[-1] and not store.exists()
    # The same figure, cell by cell, in the JSON; the full recipe on a 2-thread CPU takes days, the smoke preset minutes.
    assert main(["--config", SHIPPED, "--grid", "reduction", "--dry-run", "--json", "--device", "cpu", "--threads", "2",
                 "--tracking-uri", f"sqlite:///{store}"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["estimate_source"] for r in rows} == {"assumption"}
    full = sum(r["estimated_seconds"] for r in rows)
    assert full > 86400
    assert main(["--config", SHIPPED, "--grid", "reduction", "--preset", "smoke", "--dry-run", "--json", "--device",
                 "cpu", "--threads", "2", "--tracking-uri", f"sqlite:///{store}"]) == 0
    smoke = sum(r["estimated_seconds"] for r in json.loads(capsys.readouterr().out))
    assert 0 < smoke < 3600 and smoke < full / 1000
    if not torch.cuda.is_available():  # a GPU run planned from a machine without one: the GPU assumption
        assert main(["--config", SHIPPED, "--grid", "reduction", "--dry-run", "--device", "cuda",
                     "--tracking-uri", f"sqlite:///{store}"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert "for 18 cells on one GPU (none on this machine" in lines[-2]
        assert "A100-class GPU" in lines[-1] and "an assumption, not a measurement" in lines[-1]


def test_dry_run_takes_epoch_times_from_the_store(here, capsys):
    """A cell with epoch times in the store is estimated from them; another cell of the same backbone
    from those; a cell FINISHED is not counted (a run skips it); another backbone is assumed."""
    uri = f"sqlite:///{here / 'mlflow.db'}"
    exps = load_experiments(here / "experiments.yaml")
    r4, r8 = resolve_cells(exps, "pair")
    client = MlflowClient(tracking_uri=uri)
    exp = ensure_experiment(client, uri, "pair")
    for cell, seconds, status in ((r4, [10.0, 12.0], "KILLED"), (r8, [30.0], "FINISHED")):
        run = CellRun(client, exp, cell, torch.device("cpu"), "synthetic", with_num_classes(cell.config, 10))
        for step, s in enumerate(seconds, start=1):
            run.log_metrics({"epoch_seconds": s}, step=step)
        run.end(status)
    assert main(["--config", str(here / "experiments.yaml"), "--grid", "pair", "--grid", "wide", "--dry-run",
                 "--json", "--device", "cpu", "--tracking-uri", uri]) == 0
    rows = {(r["grid"], r["variant"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows["pair", "r=4"]["estimate_source"] == "store: this cell"
    assert rows["pair", "r=4"]["estimated_seconds"] == pytest.approx(3 * 12.0)  # its latest epoch time x 3 epochs
    assert rows["pair", "r=8"]["estimate_source"] == "finished" and rows["pair", "r=8"]["estimated_seconds"] is None
    assert rows["wide", "r=4"]["estimate_source"] == "assumption"

    # The same backbone's runs stand in for a cell never run: r=16 of the same grid's backbone.
    (here / "more.yaml").write_text(yaml.safe_dump({**GRID_FILE, "grids": {"pair": {
        "description": "r = 16", "axes": {"model.se.reduction": [16]}}}}, sort_keys=False))
    lines, _ = dry(capsys, "--config", str(here / "more.yaml"), "--grid", "pair", "--tracking-uri", uri)
    assert "estimated wall time: about 63 s for 1 cell on this CPU" in lines[-2], lines[-2]  # median(12, 30) x 3
    assert lines[-1] == "  from: 1 cell: epoch times measured in this store (this backbone)"


def test_calibrate_times_a_few_real_steps_here(here, capsys):
    lines, _ = dry(capsys, "--config", str(here / "experiments.yaml"), "--grid", "pair", "--grid", "wide",
                   "--calibrate", "--tracking-uri", f"sqlite:///{here / 'none.db'}")
    assert "for 3 cells on this CPU" in lines[-2]
    assert lines[-1].startswith("  from: 3 cells: a calibration on this device (3 steps of resnet20, batch 16, ")
    assert "3 steps of resnet32, batch 16" in lines[-1] and "scaled by each variant's multiply-adds" in lines[-1]
    assert not (here / "none.db").exists()


def test_calibrate_is_only_for_a_dry_run(here, capsys):
    assert main(["--config", str(here / "experiments.yaml"), "--grid", "pair", "--calibrate"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == ("error: --calibrate: only with --dry-run "
                                               "(it times a few training steps for the estimate)")


def test_full_scale_grid_on_a_cpu_warns_once_and_goes_on(tmp_path, capsys, monkeypatch):
    """The shipped reduction grid, full recipe, on a CPU: one warning line first, with the estimate and
    the preset that fits; then the run goes on (here it stops at the missing data, which is bad input)."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", SHIPPED, "--grid", "reduction", "--device", "cpu", "--threads", "2", "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}", "--data-root", str(tmp_path / "empty"), "--set", "dataset.download=false"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("error: dataset cifar10: not found under"), err
    assert re.fullmatch(r"warning: grid reduction is sized for a GPU: about \d+\.\d days for 18 cells on this CPU "
                        r"\(2 threads\) \(an estimate .*\); --preset cpu fits this CPU: about \d+ min per cell; "
                        r"going on", err[0]), err[0]
    # The preset that fits gets no warning; nor does an ImageNet grid's smoke check.
    assert main([*args, "--preset", "cpu"]) == EXIT_BAD_INPUT
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")] == []


def test_imagenet_subset_sizes_without_reading_the_data(tmp_path):
    """Split sizes come from what is known of a dataset: Imagenette's release, an ImageNet class list,
    a tree's files, or the subset asked for."""
    exps = load_experiments(ROOT / "experiments.yaml")
    cell = resolve_cells(exps, "imagenet_reduction")[0]
    assert E.split_sizes(cell.config) == (9_469, 3_925)
    (tmp_path / "imagenet100.txt").write_text("".join(f"n{i:08d}\n" for i in range(100)))
    subset = cell.config.model_copy(update={"dataset": cell.config.dataset.model_copy(update={
        "name": "imagenet", "root": str(tmp_path), "classes": str(tmp_path / "imagenet100.txt")})})
    assert E.split_sizes(subset) == (128_116, 5_000)
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            (tmp_path / "tree" / split / "a").mkdir(parents=True, exist_ok=True)
            (tmp_path / "tree" / split / "a" / f"{i}.jpg").write_bytes(b"x")
    tree = cell.config.model_copy(update={"dataset": cell.config.dataset.model_copy(update={
        "name": "imagefolder", "root": str(tmp_path / "tree")})})
    assert E.split_sizes(tree) == (3, 2)
    nowhere = tree.model_copy(update={"dataset": tree.dataset.model_copy(update={"root": str(tmp_path / "none")})})
    assert E.split_sizes(nowhere) is None
