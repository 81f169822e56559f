"""The ImageNet-subset grids (imagenet_*): one shared recipe, the paper's complexity columns at
224 px, and every cell trained for one step on real Imagenette images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ablations import paper
from ablations.cli import main
from ablations.config import load_experiments, resolve_cells
from conftest import ROOT, SHARED

IMAGENETTE_TGZ = SHARED / "imagenette-224-mini.tar.gz"
TABLES = {"reduction": 10, "squeeze": 11, "excitation": 12, "stage": 13, "integration": 14, "se_3x3": 15,
          "nosqueeze": 16}
GRIDS = [f"imagenet_{g}" for g in TABLES]


@pytest.fixture(scope="module")
def shipped():
    return load_experiments(ROOT / "experiments.yaml")


def test_imagenet_grids_share_one_recipe_and_switch_dataset_with_one_set(shipped):
    for base, number in TABLES.items():
        assert shipped.grids[f"imagenet_{base}"].paper_table == number == shipped.grids[base].paper_table
        assert len(resolve_cells(shipped, f"imagenet_{base}")) == len(resolve_cells(shipped, base))  # same variants
    cells = [c for g in GRIDS for c in resolve_cells(shipped, g)]
    recipes = {(c.config.dataset, c.config.train.model_copy(update={})) for c in cells}
    assert len(recipes) == 1  # one dataset and one training recipe across all seven grids
    ((ds, tr),) = recipes
    assert (ds.name, ds.image_size) == ("imagenette", 160)
    assert (tr.label_smoothing, tr.schedule, tr.precision, tr.channels_last) == (0.1, "cosine", "auto", "auto")
    assert tr.warmup_epochs > 0
    assert {c.config.model.arch for c in cells} == {"resnet50"}  # the original ResNet-50, ImageNet stem
    assert {c.seed for c in cells} == {0, 1, 2}
    # One --set switches the dataset of every grid and keeps the rest of the recipe.
    woof = resolve_cells(shipped, "imagenet_stage", sets=["dataset={name: imagewoof, root: /data/imagewoof2-320}"])
    assert {(c.config.dataset.name, c.config.dataset.root, c.config.dataset.image_size) for c in woof} == {
        ("imagewoof", "/data/imagewoof2-320", 160)}
    nette = resolve_cells(shipped, "imagenet_stage")
    assert {c.cell_id for c in woof}.isdisjoint(c.cell_id for c in nette)  # different runs, never skipped as done


def _dry_run(capsys, *args: str) -> list[dict]:
    import json

    assert main(["--config", str(ROOT / "experiments.yaml"), "--dry-run", "--json", "--seeds", "0", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_at_224_px_matches_paper_tables_10_and_13(capsys):
    rows = _dry_run(capsys, "--grid", "imagenet_reduction", "--grid", "imagenet_stage",
                    "--set", "dataset.name=imagenet", "--set", "dataset.image_size=224")
    assert {r["input_size"] for r in rows} == {224} and len(rows) == 12
    checked = 0
    for r in rows:
        table = paper.TABLES[10 if r["grid"] == "imagenet_reduction" else 13]
        row = table.row(r["variant"].replace("stages=all", "r=16").replace("stages=", "stages="))
        ref = table.row(r["variant"]) or (paper.TABLES[10].row("r=16") if r["variant"] == "stages=all" else None)
        if ref is None:  # SE_Stage_5 is no row of the paper
            assert r["variant"] == "stages=5"
            continue
        # The paper's Params counts BatchNorm statistics (Caffe blobs); its r=2 row is the one
        # exception, printed from the trainable count (tests/test_models.py).
        params = r["params"] if r["variant"] == "r=2" else r["caffe_params"]
        assert round(params / 1e6, 1) == ref.params_m, r["variant"]
        if table.gflops:
            assert round(r["gflops"], 2) == ref.gflops, r["variant"]
        checked += 1
        del row
    assert checked == 11
    # At the grids' own resolution the multiply-adds scale with the pixel count.
    small = {r["variant"]: r for r in _dry_run(capsys, "--grid", "imagenet_stage", "--set", "dataset.name=imagenet")}
    assert small["stages=all"]["input_size"] == 160
    assert small["stages=all"]["gflops"] == pytest.approx(3.8715 * (160 / 224) ** 2, rel=0.02)


@pytest.mark.skipif(not IMAGENETTE_TGZ.is_file(), reason=f"real data absent: {IMAGENETTE_TGZ}")
def test_every_imagenet_grid_cell_trains_one_step_on_imagenette(tmp_path, monkeypatch, capsys):
    """All 26 cells, one optimiser step each, on real Imagenette images at 64 px (CPU-sized)."""
    monkeypatch.setenv("SENET_ABLATIONS_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "mlflow.db"
    grids = [a for g in GRIDS for a in ("--grid", g)]
    code = main(["--config", str(ROOT / "experiments.yaml"), *grids, "--seeds", "0", "--device", "cpu",
                 "--tracking-uri", f"sqlite:///{store}", "--results-dir", str(tmp_path / "results"),
                 "--data-root", str(IMAGENETTE_TGZ),
                 "--set", "dataset.image_size=64", "--set", "dataset.train_size=8", "--set", "dataset.test_size=10",
                 "--set", "train.batch_size=8", "--set", "train.epochs=1", "--set", "train.warmup_epochs=0"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    runs = [r for g in GRIDS for r in client.search_runs([client.get_experiment_by_name(g).experiment_id])]
    assert len(runs) == 26 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert r.data.tags["dataset"] == "imagenette" and r.data.params["model.arch"] == "resnet50"
        assert math.isfinite(r.data.metrics["train_loss"]) and 0 <= r.data.metrics["test_top1_err"] <= 100
    # The report's caption names the dataset and the resolution.
    table = next((tmp_path / "results").rglob("imagenet_reduction/table.md")).read_text()
    assert "on imagenette at 64x64 px" in table
