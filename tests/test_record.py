"""A study's record (`--export-record`, `--restore-record`): the FINISHED cell runs without artifacts,
restored into any store, regenerate the same tables and resume the study without training a finished
cell again. Then the committed CPU study: its tables regenerate from its committed record, byte for byte.

Real stores and real (tiny) training, in this process through the CLI's `main`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ablations.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STUDY = ROOT / "results" / "cifar10-cpu"  # the committed CPU-scale study: tables per grid and record.db
GRID_FILE = {
    "defaults": {
        "dataset": {"name": "synthetic", "train_size": 64, "test_size": 32},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0},
        "seeds": [0],
    },
    "grids": {
        "pair": {"description": "two cells", "axes": {"model.se.reduction": [4, 8]}},
        "other": {"description": "r = 8 again, and r = 16", "axes": {"model.se.reduction": [8, 16]}},
    },
}


def uri(path: Path) -> str:
    return f"sqlite:///{path}"


def cell_runs(store: Path, grid: str) -> list:
    client = MlflowClient(tracking_uri=uri(store))
    exp = client.get_experiment_by_name(grid)
    found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if "cell_id" in r.data.tags]


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SENET_ABLATIONS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    return tmp_path


def cli(here: Path, store: Path, *args: str) -> int:
    return main(["--config", str(here / "experiments.yaml"), "--tracking-uri", uri(store), "--device", "cpu",
                 "--threads", "1", *args])


def tables(folder: Path) -> dict[str, bytes]:
    """The report's tables under `folder` (the role-of-SE analysis is not the report's: its own test below)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.suffix in (".md", ".tex", ".csv") and p.name != "README.md" and "role_of_se" not in p.parts}


def test_record_restores_into_a_fresh_store_that_reports_the_same_and_resumes(here, capsys):
    study, record, fresh = here / "study.db", here / "record" / "record.db", here / "fresh.db"
    assert cli(here, study, "--grid", "pair") == 0
    assert cli(here, study, "--export-record", str(record)) == 0
    assert "record" in capsys.readouterr().out
    assert not list(record.parent.glob("*.partial"))
    # Without artifacts: no weights travel, and the record is a small SQLite file.
    assert record.stat().st_size < 2_000_000 and not (record.parent / "mlartifacts").exists()

    # Cell runs only: no grid parent run, and no run nested under one of the study's store.
    con = sqlite3.connect(record)
    assert con.execute("select count(*) from tags where key in ('grid_parent', 'mlflow.parentRunId')").fetchone() == (0,)
    assert con.execute("select count(*) from runs").fetchone() == (2,)
    con.close()

    # A new machine: the record restored into a fresh store; the finished grid trains nothing.
    assert cli(here, fresh, "--restore-record", str(record)) == 0
    assert "2 finished cell runs copied, 0 already there" in capsys.readouterr().out
    client = MlflowClient(uri(fresh))  # the copies are nested under the grid's parent run there
    parents = client.search_runs([client.get_experiment_by_name("pair").experiment_id], "tags.grid_parent = 'true'")
    assert len(parents) == 1 and {r.data.tags.get("mlflow.parentRunId") for r in cell_runs(fresh, "pair")} == \
        {parents[0].info.run_id}
    assert cli(here, fresh, "--grid", "pair") == 0
    assert "grid pair: 0 finished, 2 skipped (already done)" in capsys.readouterr().err
    # The study goes on from there: of grid `other`, r = 8 is pair's cell (linked), only r = 16 trains.
    assert cli(here, fresh, "--grid", "other") == 0
    err = capsys.readouterr().err
    assert "grid other: 1 finished, 1 reused from other grids" in err, err
    assert cli(here, study, "--grid", "other") == 0  # the same step in the original store
    capsys.readouterr()

    # A record of the store that resumed from one: the link is pointed at the copy of its source.
    again = here / "again.db"
    assert cli(here, fresh, "--export-record", str(record)) == 0
    assert cli(here, again, "--restore-record", str(record)) == 0
    assert "4 finished cell runs copied, 0 already there" in capsys.readouterr().out
    linked = {r.data.tags["variant"]: r for r in cell_runs(again, "other")}["r=8"]
    source = {r.data.tags["variant"]: r for r in cell_runs(again, "pair")}["r=8"]
    assert linked.data.tags["reused_from_run"] == source.info.run_id

    # The study's own record, restored, reports the study's tables byte for byte (run ids are the
    # study's), with every epoch and the start times carried over.
    restored = here / "restored.db"
    assert cli(here, study, "--export-record", str(here / "study-record.db")) == 0
    assert cli(here, restored, "--restore-record", str(here / "study-record.db")) == 0
    for store, out in ((study, "from-study"), (restored, "from-record")):
        assert cli(here, store, "--report", "--results-dir", str(here / out)) == 0
    assert tables(here / "from-study") == tables(here / "from-record") != {}
    client = MlflowClient(uri(restored))
    by_cell = lambda store: {r.data.tags["cell_id"]: r for r in cell_runs(store, "pair")}
    for cid, run in by_cell(study).items():
        copy = by_cell(restored)[cid]
        assert copy.info.start_time == run.info.start_time and copy.info.end_time == run.info.end_time
        assert [(m.step, m.value) for m in client.get_metric_history(copy.info.run_id, "test_top1_err")] == \
            [(m.step, m.value) for m in MlflowClient(uri(study)).get_metric_history(run.info.run_id, "test_top1_err")]
        assert copy.data.params == run.data.params and copy.data.tags["record_of_run"] == run.info.run_id

    # Restoring twice copies nothing new.
    assert cli(here, again, "--restore-record", str(record)) == 0
    assert "0 finished cell runs copied, 4 already there" in capsys.readouterr().out


def test_record_leaves_out_unfinished_runs(here, capsys):
    """A KILLED or RUNNING run stays out of the record: on a new machine its cell trains afresh."""
    study, record = here / "study.db", here / "record.db"
    assert cli(here, study, "--grid", "pair") == 0
    client = MlflowClient(uri(study))
    run = cell_runs(study, "pair")[0]
    client.set_terminated(run.info.run_id, "KILLED")
    assert cli(here, study, "--export-record", str(record)) == 0
    assert "1 finished cell runs copied" in capsys.readouterr().out
    fresh = here / "fresh.db"
    assert cli(here, fresh, "--restore-record", str(record)) == 0
    assert cli(here, fresh, "--grid", "pair") == 0
    assert "grid pair: 1 finished, 1 skipped (already done)" in capsys.readouterr().err


def test_a_model_kept_with_the_record_is_analysed_after_a_restore_as_before(here, capsys):
    """`--export-record --run-id ID` keeps that run's config and weights beside the record; a restore
    logs them into the restored run, and `--analyze` there gives the same statistics as on the study's
    own store. Runs without weights are skipped with one line; an unknown run is one line, exit 2."""
    study, record, fresh = here / "study.db", here / "out" / "record.db", here / "fresh.db"
    assert cli(here, study, "--grid", "pair") == 0
    runs = {r.data.tags["variant"]: r for r in cell_runs(study, "pair")}
    kept = runs["r=4"].info.run_id
    assert cli(here, study, "--export-record", str(record), "--run-id", kept) == 0
    assert "1 model(s) with weights" in capsys.readouterr().out
    models = record.parent / "record.db.models"
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file()) == \
        [f"{kept}/config.json", f"{kept}/model/weights.pt"]
    # A later export need not name it again; one of a run no longer recorded is removed.
    (models / "0123456789abcdef").mkdir()
    assert cli(here, study, "--export-record", str(record)) == 0
    assert sorted(p.name for p in models.iterdir()) == [kept]

    assert cli(here, fresh, "--restore-record", str(record)) == 0
    assert "1 model(s) with weights" in capsys.readouterr().out
    assert cli(here, fresh, "--analyze", "--grid", "pair", "--results-dir", str(here / "after")) == 0
    err = capsys.readouterr().err
    assert "1 of 2 SE run(s) of pair have no weights in this store" in err, err
    assert cli(here, study, "--analyze", "--grid", "pair", "--run-id", kept, "--results-dir", str(here / "before")) == 0
    capsys.readouterr()
    stats = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.csv"))}
    assert stats(here / "before") == stats(here / "after") != {}

    # Restoring again logs nothing twice.
    assert cli(here, fresh, "--restore-record", str(record)) == 0
    assert "model(s)" not in capsys.readouterr().out

    assert cli(here, study, "--export-record", str(record), "--run-id", "feedc0de") == 2
    assert capsys.readouterr().err.strip() == \
        "error: --run-id feedc0de: not a FINISHED cell run of the record's grids, so its model is not kept"


def test_missing_record_is_bad_input(here, capsys):
    assert cli(here, here / "s.db", "--restore-record", str(here / "nope.db")) == 2
    assert capsys.readouterr().err.strip() == f"error: --restore-record {here / 'nope.db'}: no such file"
    (here / "notes.txt").write_text("not a store")
    assert cli(here, here / "s.db", "--restore-record", str(here / "notes.txt")) == 2
    assert capsys.readouterr().err.strip().endswith("not a record (a record is an SQLite file from --export-record)")
    assert not (here / "s.db").exists()  # nothing written


# ----------------------------------------------------------------------------- the committed study


def committed_grids() -> list[str]:
    return sorted(p.name for p in STUDY.iterdir() if (p / "table.csv").is_file()) if STUDY.is_dir() else []


@pytest.mark.skipif(not (STUDY / "record.db").is_file(), reason="no committed CPU study record yet")
def test_committed_study_tables_regenerate_from_its_record_byte_for_byte(tmp_path):
    store = tmp_path / "restored.db"
    assert main(["--restore-record", str(STUDY / "record.db"), "--tracking-uri", uri(store)]) == 0
    out = tmp_path / "results"
    assert main(["--config", str(ROOT / "experiments.yaml"), "--report", "--preset", "cpu", "--tracking-uri", uri(store),
                 "--results-dir", str(out)]) == 0
    committed = tables(STUDY)
    assert committed and tables(out / STUDY.name) == committed


@pytest.mark.skipif(not (STUDY / "record.db").is_file(), reason="no committed CPU study record yet")
@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent (the CIFAR-10 JPEGs the study trained on)")
def test_committed_study_resumes_from_its_record_without_training_a_finished_cell(tmp_path, monkeypatch, capsys):
    """Every committed grid's cells are in the record: restored into a fresh store, nothing of them trains."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "restored.db"
    assert main(["--restore-record", str(STUDY / "record.db"), "--tracking-uri", uri(store)]) == 0
    con = sqlite3.connect(STUDY / "record.db")
    done = [g for (g,) in con.execute("select distinct name from experiments")]
    con.close()
    grids = [g for g in committed_grids() if g in done and "Not finished yet" not in (STUDY / g / "table.md").read_text()]
    if not grids:
        pytest.skip("no grid of the committed study is finished yet")
    for grid in grids:
        capsys.readouterr()
        assert main(["--config", str(ROOT / "experiments.yaml"), "--grid", grid, "--preset", "cpu", "--tracking-uri", uri(store), "--data-root", str(DATA),
                     "--results-dir", str(tmp_path / "results")]) == 0
        assert f"grid {grid}: 0 finished," in capsys.readouterr().err


ROLE_OF_SE = STUDY / "reduction" / "role_of_se"


@pytest.mark.slow  # the analysis runs the full CIFAR-10 test split: about 3 min on 2 cores
@pytest.mark.skipif(not (STUDY / "record.db.models").is_dir(), reason="no model committed with the CPU study's record yet")
@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent (the CIFAR-10 JPEGs the study trained on)")
def test_committed_role_of_se_regenerates_from_the_model_kept_with_the_record(tmp_path):
    """The committed role-of-SE statistics and findings come from the model committed beside the record:
    restored and analysed again, they are the same byte for byte (figures aside: PNG/PDF encoders)."""
    store = tmp_path / "restored.db"
    assert main(["--restore-record", str(STUDY / "record.db"), "--tracking-uri", uri(store)]) == 0
    out = tmp_path / "results"
    assert main(["--config", str(ROOT / "experiments.yaml"), "--analyze", "--grid", "reduction", "--preset", "cpu",
                 "--tracking-uri", uri(store), "--data-root", str(DATA), "--results-dir", str(out), "--device", "cpu"]) == 0
    committed = {str(p.relative_to(ROLE_OF_SE)): p.read_bytes() for p in sorted(ROLE_OF_SE.rglob("*"))
                 if p.suffix in (".csv", ".md")}
    again = out / STUDY.name / "reduction" / "role_of_se"
    assert committed and {k: (again / k).read_bytes() for k in committed} == committed
