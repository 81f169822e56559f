"""One cell, one run, one checkpoint, one claim per store: cells shared between grids are trained
once and linked into every grid that lists them; the queue is the store's own; older stores (cells
named by the legacy id rule) resume without retraining; the printed config names the same cell.

Real stores and real (tiny) training, in this process through the CLI's `main`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from ablations.cli import main
from ablations.config import load_experiments, resolve_cells

ROOT = Path(__file__).resolve().parents[1]
# The shipped grids, made tiny: synthetic data, resnet20 with SE in its last stage only (r = 32 fits there).
TINY = ["--preset", "smoke", "--set", "dataset.name=synthetic", "--set", "dataset.train_size=64",
        "--set", "dataset.test_size=32", "--set", "model.arch=resnet20", "--set", "model.se.stages=[3]",
        "--device", "cpu", "--threads", "1"]
OWN_FILE = {
    "defaults": {
        "dataset": {"name": "synthetic", "train_size": 64, "test_size": 32},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0},
        "seeds": [0],
    },
    "grids": {"pair": {"description": "two cells", "axes": {"model.se.reduction": [4, 8]}}},
}


def uri(path: Path) -> str:
    return f"sqlite:///{path}"


def cell_runs(store: Path, grid: str) -> list:
    client = MlflowClient(tracking_uri=uri(store))
    exp = client.get_experiment_by_name(grid)
    found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if "cell_id" in r.data.tags]


def the_parent(store: Path, grid: str) -> str:
    """The id of the grid's one parent run, every cell run of the grid (links too) nested under it."""
    client = MlflowClient(tracking_uri=uri(store))
    exp = client.get_experiment_by_name(grid)
    parents = client.search_runs([exp.experiment_id], "tags.grid_parent = 'true'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    assert "cell_id" not in parent.data.tags and parent.info.run_name == grid
    assert {r.data.tags.get("mlflow.parentRunId") for r in cell_runs(store, grid)} == {parent.info.run_id}
    return parent.info.run_id


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # reports land under the test's folder
    monkeypatch.setenv("SENET_ABLATIONS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(OWN_FILE, sort_keys=False))
    return tmp_path


def test_fresh_store_beside_another_trains_its_own_cells(here, capsys):
    """Two stores in one folder: each has its own queue, so the second one trains its cells too."""
    for name in ("a.db", "b.db"):
        assert main(["--config", str(here / "experiments.yaml"), "--grid", "pair", "--tracking-uri",
                     uri(here / name), "--device", "cpu", "--threads", "1"]) == 0
        err = capsys.readouterr().err
        assert "grid pair: 2 finished, 0 skipped (already done)" in err, err
        assert (here / f"{name}.queue.journal").is_file()
        assert sorted(r.info.status for r in cell_runs(here / name, "pair")) == ["FINISHED", "FINISHED"]


def test_shared_cell_is_trained_once_and_linked(here, capsys):
    """reduction, then squeeze on one store: squeeze's avg is reduction's r=16, trained once; the
    squeeze experiment shows it through a linked run carrying its metrics."""
    store = here / "mlflow.db"
    args = ["--config", str(ROOT / "experiments.yaml"), "--tracking-uri", uri(store), *TINY]
    assert main([*args, "--grid", "reduction"]) == 0
    assert "grid reduction: 6 finished" in capsys.readouterr().err
    assert main([*args, "--grid", "squeeze"]) == 0
    err = capsys.readouterr().err
    assert "grid squeeze: 1 finished, 1 reused from other grids, 0 skipped (already done), 0 failed" in err, err
    assert err.count("FINISHED squeeze=") == 1 and "FINISHED squeeze=max" in err  # only the new cell trained

    runs = {r.data.tags["variant"]: r for r in cell_runs(store, "squeeze")}
    assert sorted(runs) == ["squeeze=avg", "squeeze=max"] and all(r.info.status == "FINISHED" for r in runs.values())
    link = runs["squeeze=avg"]
    source = {r.data.tags["variant"]: r for r in cell_runs(store, "reduction")}["r=16"]
    assert link.data.tags["reused_from_run"] == source.info.run_id and link.data.tags["reused_from_grid"] == "reduction"
    assert link.data.tags["cell_id"] == source.data.tags["cell_id"] and link.data.tags["grid"] == "squeeze"
    assert link.data.metrics == source.data.metrics and link.data.params == source.data.params
    client = MlflowClient(tracking_uri=uri(store))
    hist = lambda r: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "test_top1_err")]
    assert hist(link) == hist(source)
    assert not client.list_artifacts(link.info.run_id)  # no weights: the source run has them
    assert "reused_from_run" not in runs["squeeze=max"].data.tags
    table = pd.read_csv(here / "results/presets/smoke/synthetic/squeeze/table.csv")  # the report counts each cell once
    assert sorted(table["variant"]) == ["squeeze=avg", "squeeze=max"]
    assert table.set_index("variant").loc["squeeze=avg", "run_id"] == link.info.run_id

    # Each grid is a parent run with its cells nested under it, the link under its own grid's parent;
    # the report's files are the parent's artifacts.
    parents = {grid: the_parent(store, grid) for grid in ("reduction", "squeeze")}
    assert parents["reduction"] != parents["squeeze"]
    assert {a.path for a in client.list_artifacts(parents["squeeze"], "presets/smoke/synthetic")} >= \
        {"presets/smoke/synthetic/table.md", "presets/smoke/synthetic/errors.png"}

    # Again: nothing trains, nothing is linked twice, and no second parent.
    assert main([*args, "--grid", "squeeze"]) == 0
    assert "grid squeeze: 0 finished, 2 skipped (already done)" in capsys.readouterr().err
    assert len(cell_runs(store, "squeeze")) == 2 and len(cell_runs(store, "reduction")) == 6
    assert the_parent(store, "squeeze") == parents["squeeze"]
    # A later invocation that adds cells (a second seed) nests them under the same parent.
    assert main([*args, "--grid", "squeeze", "--seeds", "0,1"]) == 0
    err = capsys.readouterr().err
    assert "grid squeeze: 2 finished, 2 skipped (already done)" in err, err.splitlines()[-3:]
    assert len(cell_runs(store, "squeeze")) == 4 and the_parent(store, "squeeze") == parents["squeeze"]


def test_store_with_legacy_ids_resumes_without_retraining(here, capsys):
    """Runs tagged with the cells' legacy ids (an older store) are these cells' runs; that store's
    runs (made before grids had parent runs) are nested under the grid's parent, which its former
    report run (tagged report=true) becomes."""
    store = here / "mlflow.db"
    cells = resolve_cells(load_experiments(here / "experiments.yaml"), "pair")
    assert all(c.legacy_id and c.legacy_id != c.cell_id for c in cells)  # num_classes now enters the id
    client = MlflowClient(tracking_uri=uri(store))
    exp = client.create_experiment("pair")
    for c in cells:
        run = client.create_run(exp, tags={"cell_id": c.legacy_id, "grid": "pair", "variant": c.variant,
                                           "seed": str(c.seed)})
        client.log_metric(run.info.run_id, "final_top1_err", 50.0)
        client.set_terminated(run.info.run_id, "FINISHED")
    report = client.create_run(exp, tags={"report": "true", "grid": "pair"}, run_name="report").info.run_id
    client.set_terminated(report, "FINISHED")
    assert main(["--config", str(here / "experiments.yaml"), "--grid", "pair", "--tracking-uri", uri(store),
                 "--device", "cpu", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "grid pair: 0 finished, 2 skipped (already done)" in err, err
    assert len(cell_runs(store, "pair")) == 2
    assert the_parent(store, "pair") == report  # no seventh row: the report run is the parent now
    assert "report" not in client.get_run(report).data.tags and len(client.search_runs([exp])) == 3


def test_printed_config_written_back_names_the_same_cell(here, capsys):
    """`--dry-run --json`: each cell's printed config, as an experiments file, resolves to its cell id."""
    assert main(["--config", str(ROOT / "experiments.yaml"), "--grid", "reduction", "--grid", "squeeze",
                 "--dry-run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row in rows:
        config = row["config"]
        first = next(iter(config["train"]))  # a one-value axis: the grid is the printed config as it is
        back = {"defaults": {k: config[k] for k in ("dataset", "model", "train")},
                "grids": {"back": {"description": "written back", "seeds": [row["seed"]],
                                   "axes": {f"train.{first}": [config["train"][first]]}}}}
        path = here / "back.yaml"
        path.write_text(yaml.safe_dump(back, sort_keys=False))
        (cell,) = resolve_cells(load_experiments(path), "back")
        assert cell.cell_id == row["cell_id"], (row["grid"], row["variant"])


def test_a_run_resumed_by_another_grid_stays_under_its_own_grids_parent(here):
    """A cell has one run per store, in the grid it was started in: resumed by another grid's worker,
    it keeps its parent (or, made before parents, waits for its own grid's), never the other grid's."""
    import torch

    from ablations.config import with_num_classes
    from ablations.tracking import PARENT_RUN_ID, CellRun, ensure_experiment, ensure_parent

    store = uri(here / "mlflow.db")
    client = MlflowClient(tracking_uri=store)
    exp_a, exp_b = (ensure_experiment(client, store, g) for g in ("a", "b"))
    parent_a, parent_b = (ensure_parent(client, store, e, g) for e, g in ((exp_a, "a"), (exp_b, "b")))
    assert ensure_parent(client, store, exp_a, "a") == parent_a  # found again, not made twice
    cell = resolve_cells(load_experiments(here / "experiments.yaml"), "pair")[0]
    config = with_num_classes(cell.config, 10)
    nested = CellRun(client, exp_a, cell, torch.device("cpu"), "synthetic", config, {PARENT_RUN_ID: parent_a})
    nested.end("KILLED")
    older = CellRun(client, exp_a, cell, torch.device("cpu"), "synthetic", config)  # a run from before parents
    older.end("KILLED")
    for run, expected in ((nested, parent_a), (older, None)):
        CellRun(client, exp_b, cell, torch.device("cpu"), "synthetic", config, {PARENT_RUN_ID: parent_b},
                resume_run_id=run.run_id).end("FINISHED")
        assert client.get_run(run.run_id).data.tags.get(PARENT_RUN_ID) == expected
