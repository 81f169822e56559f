"""Reports from a real MLflow store: runs logged through the harness's own CellRun, with KNOWN metrics.

Nothing is trained: each cell of a real grid (resolved from experiments.yaml) gets a run with
hand-chosen errors, so every number in the tables can be checked against this file.
Set UPDATE_GOLDEN=1 to rewrite tests/golden/* (then read the diff before committing it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from nbclient import NotebookClient
from PIL import Image

from ablations import report
from ablations.report import paper
from ablations.report import write as report_write
from ablations.config import load_experiments, resolve_cells
from ablations.tracking import CellRun, ensure_experiment, runs_of

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
EXPS = ROOT / "experiments.yaml"
EPOCHS = 15  # experiments.yaml's default recipe
SOURCE = "jpeg-archive:/somewhere/on/a/machine/cifar10-jpeg.tar.gz"

# Final top-1 errors (%) per variant, one per seed (0, 1, 2). Chosen so that r=2 and r=4 tie-break
# on the best mean, r=32 and the plain backbone are clearly worse than r=16, and r=2..8 are not.
REDUCTION_TOP1 = {
    "baseline": [7.45, 7.52, 7.48],  # mean 7.483333, +0.48 vs r=16: p < 0.01
    "r=2": [6.90, 7.02, 6.95],  # mean 6.956667 (best)
    "r=4": [6.88, 6.97, 7.10],  # mean 6.983333
    "r=8": [7.05, 6.93, 6.99],  # mean 6.99
    "r=16": [7.00, 7.08, 6.94],  # mean 7.006667 (reference)
    "r=32": [7.20, 7.31, 7.15],  # mean 7.22, +0.21 vs r=16: 0.01 < p < 0.05
}
# Top-5 errors: the same ordering is not needed; r=8 is best here.
REDUCTION_TOP5 = {
    "baseline": [0.31, 0.35, 0.30], "r=2": [0.26, 0.28, 0.27], "r=4": [0.27, 0.25, 0.29],
    "r=8": [0.24, 0.25, 0.23], "r=16": [0.26, 0.27, 0.28], "r=32": [0.29, 0.30, 0.28],
}
# senet.complexity of resnet18_cifar at 32x32 (trainable params, multiply-adds in G).
RESNET18 = {
    "baseline": (11_173_962, 0.55542272), "r=2": (11_873_162, 0.55661056), "r=4": (11_524_522, 0.5562624),
    "r=8": (11_350_202, 0.55608832), "r=16": (11_263_042, 0.55600128), "r=32": (11_219_462, 0.55595776),
}


def curve(final: float, seed: int, epochs: int) -> list[float]:
    """A plausible test-error curve ending exactly at `final`."""
    return [final + 45.0 * (1 - e / epochs) ** 2 + (0.4 * ((e + seed) % 3 - 1) if e < epochs else 0.0)
            for e in range(1, epochs + 1)]


def log_cell(client: MlflowClient, exp_id: str, cell, top1: float, top5: float, cost: tuple[int, float],
             epochs: int, tags: dict[str, str] | None = None, status: str = "FINISHED") -> str:
    # provenance as a study's runs carry it, fixed: the golden tables must not name this machine or commit
    machine = {"git_commit": "0123456789abcdef", "cpu_model": "Example CPU", "device_name": "cpu (2 cores, 2 threads)",
               "torch_version": "2.14.1", "precision": "bf16", "compile": "off"}
    run = CellRun(client, exp_id, cell, torch.device("cpu"), SOURCE, extra_tags={**machine, **(tags or {})})
    history = []  # every epoch in one batch: a store write costs more than the metrics in it
    for epoch, err in enumerate(curve(top1, cell.seed, epochs), start=1):
        values = {"train_loss": 1.0 / epoch, "train_err": err - 2, "test_top1_err": err,
                  "test_top5_err": top5 + err / 20 - top1 / 20, "lr": 0.1, "epoch_seconds": 1.0,
                  "images_per_s": 1000.0}
        history += [Metric(k, v, 0, epoch) for k, v in values.items()]
    client.log_batch(run.run_id, metrics=history)
    params, gflops = cost
    run.log_metrics({"params": params, "caffe_params": params + 9620, "gflops": gflops,
                     "final_top1_err": top1, "final_top5_err": top5,
                     "best_top1_err": top1 - 0.05, "best_top5_err": top5 - 0.01}, step=epochs)
    run.end(status, None if status == "FINISHED" else "diverged")
    return run.run_id


def fill(uri: str, exps, grid: str, top1: dict[str, list[float]], top5: dict[str, list[float]],
         cost: dict[str, tuple[int, float]], seeds: list[int], preset: str | None = None,
         tags: dict[str, str] | None = None, sets: tuple[str, ...] = ()) -> None:
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, uri, grid, exps.grids[grid].description)
    for cell in resolve_cells(exps, grid, preset=preset, sets=sets, seeds=seeds):
        if cell.variant in top1:
            i = seeds.index(cell.seed)
            epochs = cell.config.train.epochs
            log_cell(client, exp_id, cell, top1[cell.variant][i], top5[cell.variant][i], cost[cell.variant],
                     epochs, tags)


SHORT = ("dataset.train_size=320", "dataset.test_size=200", "train.epochs=2", "train.batch_size=32")


@pytest.fixture(scope="module")
def exps():
    return load_experiments(EXPS)


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow store; creating one runs MLflow's migrations (seconds), copying it does not."""
    db = tmp_path_factory.mktemp("blank") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def new_store(blank_db):
    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blank_db, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"
    return make


@pytest.fixture(scope="module")
def store(tmp_path_factory, exps, blank_db) -> str:
    """reduction: a short run first (another setting, to be left out), a smoke-preset run (reported apart),
    one FAILED run, then 3 seeds of all six variants; stage: 2 seeds with the paper's Table 13 rows plus
    SE_Stage_5 (not in the paper)."""
    folder = tmp_path_factory.mktemp("store")
    shutil.copyfile(blank_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    smoke = {v: [e[0] + 20] for v, e in REDUCTION_TOP1.items() if v in ("r=2", "r=16")}
    fill(uri, exps, "reduction", smoke, {v: [5.0] for v in smoke}, RESNET18, [0], sets=SHORT)
    fill(uri, exps, "reduction", {"r=16": [40.0]}, {"r=16": [12.0]}, RESNET18, [0], preset="smoke")  # apart
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("reduction").experiment_id
    cell = resolve_cells(exps, "reduction", seeds=[0])[1]
    log_cell(client, exp_id, cell, 50.0, 20.0, RESNET18[cell.variant], 2, status="FAILED")
    fill(uri, exps, "reduction", REDUCTION_TOP1, REDUCTION_TOP5, RESNET18, [0, 1, 2], tags={"paper_table": "10"})
    stage_top1 = {"baseline": [7.45, 7.35], "stages=2": [7.30, 7.42], "stages=3": [7.21, 7.25],
                  "stages=4": [7.10, 7.02], "stages=5": [7.18, 7.30], "stages=all": [7.00, 7.06]}
    stage_cost = {"baseline": (11_173_962, 0.55542272), "stages=2": (11_175_314, 0.55563), "stages=3": (11_179_418, 0.55563),
                  "stages=4": (11_195_802, 0.55563), "stages=5": (11_261_466, 0.55563), "stages=all": (11_263_042, 0.55600128)}
    fill(uri, exps, "stage", stage_top1, {v: [0.3, 0.32] for v in stage_top1}, stage_cost, [0, 1],
         tags={"paper_table": "13"})
    return uri


def table_rows(md: str) -> list[list[str]]:
    """The cells of a Markdown table, header first, the alignment row left out."""
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| :---")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


SYNTHETIC = ("SYNTHETIC NUMBERS, NOT RESULTS: hand-chosen errors from tests/test_report.py, logged to a test "
             "store and reported; regenerate with UPDATE_GOLDEN=1 python -m pytest tests/test_report.py")


def golden(name: str, text: str) -> None:
    """Compare with tests/golden/<name>, whose first line says that its numbers are synthetic."""
    header = f"% {SYNTHETIC}\n" if name.endswith(".tex") else f"<!-- {SYNTHETIC} -->\n\n"
    text = header + text
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from the golden file"


# ----------------------------------------------------------------------------- tables


@pytest.fixture(scope="module")
def results(store, tmp_path_factory) -> Path:
    """Every grid of the store reported from the store alone (paper_table from the runs' tags)."""
    root = tmp_path_factory.mktemp("results")
    assert report.report_all(store, results_dir=root) == root / "README.md"
    return root


@pytest.fixture(scope="module")
def reduction_dir(results) -> Path:
    return results / "cifar10" / "reduction"


def test_reduction_table_matches_golden(reduction_dir):
    golden("reduction_table.md", (reduction_dir / "table.md").read_text())
    golden("reduction_table.tex", (reduction_dir / "table.tex").read_text())


def test_reduction_table_content(reduction_dir):
    """What the golden file holds, spelled out: the paper's rows and names, ±, n, bold, Δ with markers."""
    md = (reduction_dir / "table.md").read_text()
    rows = table_rows(md)
    assert rows[0] == ["Ratio r", "n", "top-1 err. (%)", "top-5 err. (%)", "Params (M, trainable)", "Δ top-1 vs r = 16",
                       "Paper top-1 (ImageNet)"]
    assert [r[0] for r in rows[1:]] == ["2", "4", "8", "16", "32", "ResNet-18 (no SE)"]  # the paper's order
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["2"][1:3] == ["3", "**6.96 ± 0.06**"]  # best top-1 mean, bold
    assert by_name["8"][3] == "**0.24 ± 0.01**"  # best top-5 mean, bold
    assert by_name["16"][5] == "ref."
    assert by_name["ResNet-18 (no SE)"][5] == "+0.48**" and by_name["ResNet-18 (no SE)"][4] == "11.17"
    assert by_name["32"][5] == "+0.21*" and by_name["8"][5] == "-0.02"
    assert by_name["2"][6] == "22.29" and by_name["ResNet-18 (no SE)"][6] == "23.30"
    assert "Welch's t-test" in md and "paper Table 10" in md
    # the short runs (another setting) and the FAILED run are not in the table
    assert "2 finished run(s) of another setting" in md and "train.epochs" in md
    tex = (reduction_dir / "table.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "\\textbf{6.96 $\\pm$ 0.06}" in tex and "$+0.48^{**}$" in tex and "$\\Delta$ top-1" in tex


def test_table_csv_has_one_row_per_run(reduction_dir):
    import pandas as pd

    csv = pd.read_csv(reduction_dir / "table.csv")
    assert len(csv) == 18 and set(csv["epochs"]) == {EPOCHS}
    assert csv.groupby("variant").size().to_dict() == {v: 3 for v in REDUCTION_TOP1}
    assert csv.loc[csv["variant"] == "r=2", "final_top1_err"].tolist() == REDUCTION_TOP1["r=2"]
    assert csv["label"].iloc[0] == "2" and csv["label"].iloc[-1] == "ResNet-18 (no SE)"


def test_stage_table_has_gflops_and_marks_rows_not_in_paper(results):
    md = (results / "cifar10" / "stage" / "table.md").read_text()
    golden("stage_table.md", md)
    rows = table_rows(md)
    assert rows[0][:6] == ["Model", "n", "top-1 err. (%)", "top-5 err. (%)", "GFLOPs", "Params (M, trainable)"]
    assert [r[0] for r in rows[1:]] == ["ResNet-18 (no SE)", "SE_Stage_2", "SE_Stage_3", "SE_Stage_4",
                                        "SE_Stage_5", "SE_All"]
    stage5 = next(r for r in rows if r[0] == "SE_Stage_5")
    assert stage5[-1] == "—" and "no such row in the paper" in md
    assert {r[4] for r in rows[1:]} == {"0.5554", "0.5556", "0.5560"}  # one number of decimals per column


def test_one_seed_says_no_spread_no_test(tmp_path, exps, new_store):
    uri = new_store(tmp_path / "store")
    fill(uri, exps, "reduction", {v: e[:1] for v, e in REDUCTION_TOP1.items()},
         {v: e[:1] for v, e in REDUCTION_TOP5.items()}, RESNET18, [0])
    md = (report.write_report(uri, "reduction", tmp_path / "results", experiments=exps) / "table.md").read_text()
    golden("reduction_one_seed.md", md)
    assert "n = 1: no spread, no test" in md and "±" not in md.split("\n\n")[1] and not re.search(r"\bnan\b", md.lower())
    assert "+0.45 (no test: n = 1)" in md


def test_empty_store_says_no_finished_runs(tmp_path, exps, new_store, capsys):
    """No finished run: write_report says so and writes nothing (no placeholder table, no report run)."""
    uri = new_store(tmp_path / "store")
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, uri, "reduction")
    cell = resolve_cells(exps, "reduction", seeds=[0])[0]
    log_cell(client, exp_id, cell, 50.0, 20.0, RESNET18[cell.variant], 2, status="FAILED")
    assert report.write_report(uri, "reduction", tmp_path / "results", experiments=exps) is None
    assert "grid reduction has no finished runs without a preset; nothing written" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    assert not runs_of(client, exp_id, "tags.grid_parent = 'true'")  # no parent run made to hold nothing
    # the table itself (e.g. for the notebook) still says why it is empty
    frame = report.runs_frame(client, exp_id)
    built = report.build_report(frame, "reduction", grid_config=exps.grids["reduction"], default_dataset="cifar10")
    assert "No finished runs" in built.markdown and "no finished runs" in built.latex
    # a store without the grid's experiment at all: same message, nothing logged anywhere
    assert report.write_report(uri, "squeeze", tmp_path / "results", experiments=exps) is None
    assert "grid squeeze has no finished runs" in capsys.readouterr().err
    assert client.get_experiment_by_name("squeeze") is None and not (tmp_path / "results").exists()


def test_preset_runs_are_reported_apart(tmp_path, exps, new_store, capsys):
    """A smoke check logged into the same store never enters the table of the real runs, and back."""
    uri = new_store(tmp_path / "store")
    fill(uri, exps, "reduction", {"r=16": [30.0], "r=2": [31.0]}, {"r=16": [9.0], "r=2": [9.5]}, RESNET18, [0],
         preset="smoke")
    results = tmp_path / "results"
    # only smoke runs so far: no real report; it says how to get the smoke one and writes nothing
    assert report.write_report(uri, "reduction", results, experiments=exps) is None
    assert "(runs of preset smoke are in the store: add --preset smoke)" in capsys.readouterr().err
    assert not results.exists()

    real = {"r=16": [7.0, 7.1], "r=2": [6.9, 7.0]}
    fill(uri, exps, "reduction", real, {v: [0.2, 0.21] for v in real}, RESNET18, [0, 1])
    fill(uri, exps, "reduction", {"r=16": [40.0]}, {"r=16": [12.0]}, RESNET18, [1], preset="smoke")  # latest run
    rows = {r[0]: r for r in table_rows((report.write_report(uri, "reduction", results, experiments=exps)
                                          / "table.md").read_text())[1:]}
    assert rows["16"][1:3] == ["2", "7.05 ± 0.07"] and rows["2"][1] == "2"
    smoke_dir = report.write_report(uri, "reduction", tmp_path / "smoke", experiments=exps, preset="smoke")
    smoke_md = (smoke_dir / "table.md").read_text()
    rows = {r[0]: r for r in table_rows(smoke_md)[1:]}
    assert rows["16"][1:3] == ["2", "35.00 ± 7.07"] and rows["2"][1:3] == ["1", "**31.00**"]
    assert "preset: smoke" in smoke_md and "another setting" not in smoke_md
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(
        report_write._report_run(MlflowClient(tracking_uri=uri), uri, MlflowClient(tracking_uri=uri)
                                 .get_experiment_by_name("reduction").experiment_id, "reduction"), "presets/smoke")}
    assert artifacts == {"presets/smoke/cifar10"}


def test_generic_layout_for_a_grid_without_paper_table(tmp_path, new_store):
    """Two axes (r x squeeze) on ResNet-20: variants in axis order, Δ against r=16 with avg pooling."""
    spec = {"defaults": {"dataset": {"name": "cifar10"}, "model": {"arch": "resnet20", "se": {}},
                         "train": {"epochs": 3}},
            "grids": {"two_axes": {"description": "r x squeeze",
                                   "axes": {"model.se.reduction": [8, 16], "model.se.squeeze": ["max", "avg"]}}}}
    (tmp_path / "exps.yaml").write_text(yaml.safe_dump(spec))
    exps = load_experiments(tmp_path / "exps.yaml")
    uri = new_store(tmp_path / "store")
    top1 = {"r=8, squeeze=max": [8.4, 8.6], "r=8, squeeze=avg": [8.0, 8.2],
            "r=16, squeeze=max": [8.5, 8.5], "r=16, squeeze=avg": [8.1, 8.3]}
    cost = {"r=8, squeeze=max": (278_554, 0.04107), "r=8, squeeze=avg": (278_554, 0.04107),
            "r=16, squeeze=max": (274_922, 0.04106), "r=16, squeeze=avg": (274_922, 0.04106)}
    fill(uri, exps, "two_axes", top1, {v: [0.5, 0.6] for v in top1}, cost, [0, 1])
    # the table alone (write_report's figures are covered elsewhere): the same function write_report calls
    client = MlflowClient(tracking_uri=uri)
    frame = report.runs_frame(client, client.get_experiment_by_name("two_axes").experiment_id)
    md = report.build_report(frame, "two_axes", grid_config=exps.grids["two_axes"]).markdown
    golden("generic_table.md", md)
    rows = table_rows(md)
    assert rows[0][0] == "Variant" and len(rows[0]) == 7  # no paper column
    assert [r[0] for r in rows[1:]] == list(top1)  # the grid's axis order
    assert rows[0][6] == "Δ top-1 vs r=16, squeeze=avg" and rows[4][6] == "ref."
    assert rows[3][6] == "+0.30"  # r=16, max: Welch's test on [8.5, 8.5] vs [8.1, 8.3]: p = 0.2, no marker
    assert rows[2][2] == "**8.10 ± 0.14**" and not any("**" in r[3] for r in rows)  # top-5 all tie: no bold


def _cells_of(line: str) -> list[str]:
    """A pipe-table row's cells, split on the pipes that are not escaped as \\|."""
    assert line.startswith("| ") and line.endswith(" |"), line
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line[1:-1])]


def test_a_pipe_in_a_variant_keeps_the_markdown_table_valid():
    """Variant names (and so labels and the Δ column's header) may hold '|': escaped, every row keeps its columns."""
    variants = {"r=16|avg": (16, [7.0, 7.2]), "r=8|max": (8, [7.4, 7.6])}
    rows = []
    for i, (variant, (r, errors)) in enumerate(variants.items()):
        for seed, err in enumerate(errors):
            rows.append({"run_id": f"run{i}{seed}", "status": "FINISHED",
                         "start_time": pd.Timestamp(i * 10 + seed, unit="s"), "tags.cell_id": f"cell{i}{seed}", "tags.grid": "pipes", "tags.variant": variant,
                         "tags.seed": str(seed), "tags.dataset": "cifar10", "params.model.arch": "resnet20",
                         "params.model.se.reduction": str(r), "metrics.final_top1_err": err,
                         "metrics.final_top5_err": err / 10, "metrics.params": 270_000.0, "metrics.gflops": 0.041})
    md = report.build_report(pd.DataFrame(rows), "pipes").markdown
    table = [line for line in md.splitlines() if line.startswith("| ")]
    widths = {len(_cells_of(line)) for line in table}
    assert len(table) == 4 and widths == {7}, md  # header, alignment row, two variants
    assert _cells_of(table[0])[-1] == r"Δ top-1 vs r=16\|avg"
    assert [_cells_of(line)[0] for line in table[2:]] == [r"r=16\|avg", r"r=8\|max"]


def test_paper_numbers_are_the_reference_notes():
    """Every number in ablations/report/paper.py appears in the reference notes it was copied from."""
    notes = ROOT.parent / "shared" / "reference" / "senet-paper-tables.md"
    if not notes.is_file():
        pytest.skip(f"reference notes absent: {notes}")
    text = notes.read_text()
    for table in paper.TABLES.values():
        for row in table.rows:
            for value in (row.top1, row.top5):
                if value is not None:
                    assert f"{value:.2f}" in text, (table.number, row.name, value)
            if row.top1 is not None and row.variant != paper.PLAIN:
                assert row.name.split("-")[0] in text or row.name in text


@pytest.mark.parametrize("arch, name", [("resnet18_cifar", "ResNet-18"), ("resnet50", "ResNet-50"),
                                        ("resnext50_32x4d", "ResNeXt-50 (32x4d)"), ("resnet110", "ResNet-110")])
def test_backbone_names(arch, name):
    assert report.backbone_name(arch) == name


# ----------------------------------------------------------------------------- figures, idempotence, index


def test_figures_are_valid_images(reduction_dir):
    for name in ("errors", "error_vs_r", "learning_curves", "error_vs_cost"):
        with Image.open(reduction_dir / f"{name}.png") as img:
            img.verify()
        with Image.open(reduction_dir / f"{name}.png") as img:
            assert img.format == "PNG" and img.size[0] >= 1200 and img.size[1] >= 400
        assert (reduction_dir / f"{name}.pdf").read_bytes().startswith(b"%PDF")


def test_report_twice_is_identical_with_one_report_run(store, exps, reduction_dir):
    """Again, now with the experiments file: byte for byte the same files, and still one run holding
    them: the grid's parent, with every cell run nested under it."""
    before = {p.name: p.read_bytes() for p in reduction_dir.iterdir()}
    again = report.write_report(store, "reduction", reduction_dir.parents[1], experiments=exps)
    assert again == reduction_dir
    after = {p.name: p.read_bytes() for p in reduction_dir.iterdir()}
    assert after.keys() == before.keys()
    for name in before:  # tables and figures alike: no timestamps, no versions
        assert after[name] == before[name], name
    client = MlflowClient(tracking_uri=store)
    exp_id = client.get_experiment_by_name("reduction").experiment_id
    reports = client.search_runs([exp_id], "tags.grid_parent = 'true'")
    assert len(reports) == 1
    run = reports[0]
    assert "cell_id" not in run.data.tags and run.info.status == "FINISHED" and run.info.run_name == "reduction"
    cells = [r for r in client.search_runs([exp_id], max_results=1000) if "cell_id" in r.data.tags]
    assert cells and {r.data.tags.get("mlflow.parentRunId") for r in cells} == {run.info.run_id}
    assert not client.search_runs([exp_id], "tags.report = 'true'")  # no separate report run beside the cells
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "cifar10")}
    assert {"cifar10/table.md", "cifar10/table.tex", "cifar10/table.csv", "cifar10/errors.png"} <= logged
    local = client.download_artifacts(run.info.run_id, "cifar10/table.md", str(reduction_dir.parents[2]))
    assert Path(local).read_bytes() == before["table.md"]


def test_index_inlines_every_table(results):
    text = (results / "README.md").read_text()
    assert text.count("| Ratio r |") == 1 and text.count("| Model |") == 1
    assert "### reduction on cifar10: paper Table 10" in text and "### stage on cifar10: paper Table 13" in text
    assert "(cifar10/reduction/error_vs_r.png)" in text and "(cifar10/stage/learning_curves.pdf)" in text
    assert report.write_index(results).read_text() == text  # regenerating changes nothing


# ----------------------------------------------------------------------------- notebook


@pytest.mark.slow
def test_notebook_runs_headless_against_a_small_store(store, tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "ablation_results.ipynb", as_version=4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
    assert "Ratio r" in text and "SE_Stage_2" in text  # both grids' tables, built by ablations.report
    assert "preset: smoke" in text and "40.00" in text  # the smoke run, in a table of its own
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 7  # reduction: 4 figures, stage: 3
    assert list(tmp_path.iterdir()) == [] or all(p.name.startswith(".") for p in tmp_path.iterdir())
