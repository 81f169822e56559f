"""The ImageNet-subset grids (imagenet_*): one shared recipe, the paper's complexity columns at
224 px, and every cell trained for one step on real Imagenette images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ablations.report import paper
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
    recipes = {(c.config.dataset.model_dump_json(), c.config.train.model_dump_json()) for c in cells}
    assert len(recipes) == 1  # one dataset and one training recipe across all seven grids
    ds, tr = cells[0].config.dataset, cells[0].config.train
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
        ref = table.row(r["variant"])
        if ref is None or ref.params_m is None:  # SE_Stage_5 is no row of the paper
            assert r["variant"] == "stages=5"
            continue
        # The paper's Params counts BatchNorm statistics (Caffe blobs); its r=2 row is the one
        # exception, printed from the trainable count (see tests/test_models.py).
        params = r["params"] if r["variant"] == "r=2" else r["caffe_params"]
        assert round(params / 1e6, 1) == ref.params_m, r["variant"]
        if table.gflops:
            assert round(r["gflops"], 2) == ref.gflops, r["variant"]
        checked += 1
    assert checked == 11
    # At the grids' own resolution the multiply-adds scale with the pixel count.
    small = {r["variant"]: r for r in _dry_run(capsys, "--grid", "imagenet_stage", "--set", "dataset.name=imagenet")}
    assert small["stages=all"]["input_size"] == 160
    assert small["stages=all"]["gflops"] == pytest.approx(3.8715 * (160 / 224) ** 2, rel=0.02)


needs_imagenette = pytest.mark.skipif(not IMAGENETTE_TGZ.is_file(), reason=f"real data absent: {IMAGENETTE_TGZ}")
# CPU-sized: 64 px is the smallest crop that keeps the ImageNet-style pipeline (random-resized crop
# from 73-px stored images; below ~57 px the harness switches to CIFAR-style pad-crop), one batch of 8.
ONE_STEP = ["dataset.image_size=64", "dataset.train_size=8", "dataset.test_size=10", "train.batch_size=8",
            "train.epochs=1", "train.warmup_epochs=0"]


@needs_imagenette
def test_every_imagenet_grid_cell_trains_one_step_on_imagenette(shipped, tmp_path):
    """All 26 cells of the seven grids, one optimiser step each, on real Imagenette images."""
    from ablations.run.runner import load_data, with_num_classes
    from ablations.train import train
    from senet import build_model, se_blocks

    sets = [*ONE_STEP, f"dataset.root={IMAGENETTE_TGZ}"]
    cells = [c for g in GRIDS for c in resolve_cells(shipped, g, sets=sets, seeds=[0])]
    assert len(cells) == 26
    (data,) = load_data(cells, tmp_path / "cache").values()  # one dataset for every grid
    assert (data.name, data.style, data.image_size, len(data.classes), len(data.train)) == (
        "imagenette", "imagenet", 64, 10, 8)
    trained = 0
    for cell in cells:
        config = with_num_classes(cell.config, len(data.classes))
        torch.manual_seed(0)
        model = build_model(config.model)
        result = train(config, model, data, torch.device("cpu"))
        (epoch,) = result.history
        assert math.isfinite(epoch.train_loss) and 0 <= epoch.test_top1_err <= 100, (cell.grid, cell.variant)
        se = config.model.se
        depth = {2: 3, 3: 4, 4: 6, 5: 3}  # ResNet-50's blocks per stage
        expected = 0 if se is None else 16 if se.stages == "all" else sum(depth[k] for k in se.stages)
        assert len(se_blocks(model)) == expected, (cell.grid, cell.variant)
        trained += 1
    assert trained == 26


@needs_imagenette
def test_imagenet_grid_end_to_end_names_dataset_and_resolution(tmp_path, monkeypatch, capsys):
    """The CLI path: MLflow runs tagged with the dataset, a report whose caption says dataset and px."""
    monkeypatch.setenv("SENET_ABLATIONS_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "mlflow.db"
    code = main(["--config", str(ROOT / "experiments.yaml"), "--grid", "imagenet_squeeze", "--seeds", "0",
                 "--device", "cpu", "--tracking-uri", f"sqlite:///{store}", "--results-dir", str(tmp_path / "results"),
                 "--data-root", str(IMAGENETTE_TGZ), *(a for item in ONE_STEP for a in ("--set", item))])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("imagenet_squeeze").experiment_id])
            if "cell_id" in r.data.tags]  # the experiment's report run aside
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert r.data.tags["dataset"] == "imagenette" and r.data.params["model.arch"] == "resnet50"
        assert math.isfinite(r.data.metrics["train_loss"])
    table = (tmp_path / "results" / "imagenette" / "imagenet_squeeze" / "table.md").read_text()
    assert "on imagenette at 64x64 px" in table


def _images_per_split(archive: Path) -> dict[str, int]:
    """Image files per split (train, val) of an image-tree archive, counted from its member list."""
    import tarfile

    counts: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 4:  # <tree>/<split>/<class>/<image>
                counts[parts[1]] = counts.get(parts[1], 0) + 1
    return counts


@needs_imagenette
def test_smoke_preset_fits_the_imagenette_sample(tmp_path, capsys):
    """--preset smoke on every imagenet_* grid asks the 500-image sample for no more images than it has,
    and the dataset the dry run prints loads from it as asked."""
    from ablations.config import DatasetConfig
    from ablations.data import load_dataset

    assert _images_per_split(IMAGENETTE_TGZ) == {"train": 400, "val": 100}
    rows = _dry_run(capsys, *(a for g in GRIDS for a in ("--grid", g)), "--preset", "smoke",
                    "--data-root", str(IMAGENETTE_TGZ))
    assert len(rows) == 26
    (dataset,) = {json.dumps(r["config"]["dataset"], sort_keys=True) for r in rows}  # one dataset for every grid
    ds = DatasetConfig.model_validate(json.loads(dataset))
    assert (ds.name, ds.root, ds.train_size, ds.test_size) == ("imagenette", str(IMAGENETTE_TGZ), 320, 100)
    data = load_dataset(ds.name, ds.root, classes=ds.classes, train_size=ds.train_size, test_size=ds.test_size,
                        subset_seed=ds.subset_seed, image_size=ds.image_size, download=False,
                        cache_dir=tmp_path / "cache")
    assert (len(data.train), len(data.test), len(data.classes)) == (320, 100, 10)


def test_class_list_file_in_the_config(shipped, tmp_path, monkeypatch):
    """ImageNet-100 is a list, not a copy: dataset.classes takes a file; --dry-run counts its classes."""
    from ablations.config import expected_num_classes

    (tmp_path / "two.txt").write_text("n01440764  # tench\nn02102040\n")
    monkeypatch.chdir(tmp_path)
    cells = resolve_cells(shipped, "imagenet_squeeze", seeds=[0],
                          sets=["dataset={name: imagenet, root: /data/imagenet, classes: two.txt}"])
    assert {c.config.dataset.classes for c in cells} == {"two.txt"}
    assert expected_num_classes(cells[0].config.dataset, 1000) == 2
