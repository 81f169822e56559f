"""Bad input gets one line, the documented exit code, no traceback, and nothing written.

Each failure class runs through the real CLI (`ablations.cli.main`, stderr captured) against a real
MLflow store (a SQLite file) and real files. "Nothing written" is checked on the file system (the
working folder's tree before and after) and in the store (its runs). A few checks run in a child
process: those that must show a traceback, or whose old failure was a hang.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from ablations import report
from ablations.cli import main
from ablations.config import ConfigError, load_experiments, resolve_cells
from ablations.errors import EXIT_BAD_INPUT, EXIT_OK
from ablations.run.runner import with_num_classes
from ablations.tracking import CellRun, ensure_experiment, runs_of
from senet import build_model
from senet.resnet import ARCHS, BasicBlock, ResNet

ROOT = Path(__file__).resolve().parents[1]
SAFETY_TIMEOUT = 600  # seconds; only a hang reaches it (the old validator never finished)

# A tiny grid: ResNet-20 on 40 synthetic images (nothing here trains; the analysis reads 20 test images).
TINY = {
    "defaults": {
        "dataset": {"name": "synthetic", "train_size": 40, "test_size": 20},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 1, "batch_size": 20, "lr": 0.05, "warmup_epochs": 0},
        "seeds": [0],
    },
    "grids": {"tiny": {"description": "tiny", "axes": {"model.se.reduction": [4, 8]}}},
    "presets": {"smoke": {"train": {"epochs": 1}}},
}


def write_config(folder: Path, spec: dict | str, name: str = "exp.yaml") -> str:
    path = folder / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return str(path)


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def bad_input(capsys, argv: list[str], where: Path) -> str:
    """Run the CLI; assert exit 2, one stderr line starting 'error:', no traceback, nothing new in `where`."""
    before = tree(where)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == EXIT_BAD_INPUT, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert tree(where) == before, f"written: {sorted(tree(where) - before)}"
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working folder (the cwd, so default outputs land in it) with the tiny experiments file."""
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, TINY)
    return tmp_path


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow store; copying it is cheaper than MLflow's migrations per test."""
    db = tmp_path_factory.mktemp("blank") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def smoke_store(folder: Path, blank_db: Path, exps, weights: str = "plain") -> tuple[str, str]:
    """A store holding one FINISHED smoke-preset run of tiny (r=4), as the runner logs it: config.json,
    final metrics and the model's weights (`weights='pickle'`: a file that is more than tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blank_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, uri, "tiny", "tiny")
    cell = resolve_cells(exps, "tiny", preset="smoke")[0]
    config = with_num_classes(cell.config, 10)
    run = CellRun(client, exp_id, cell, torch.device("cpu"), "synthetic(seed=0)", config)
    run.log_text(config.model_dump_json(indent=2), "config.json")
    run.log_metrics({"final_top1_err": 88.0, "final_top5_err": 50.0, "params": 1.0, "gflops": 0.1}, step=1)
    torch.manual_seed(0)
    state = build_model(config.model).state_dict()
    if weights == "pickle":
        (folder / "model").mkdir()
        torch.save({**state, "extra": _Payload()}, folder / "model" / "weights.pt")
        client.log_artifact(run.run_id, str(folder / "model" / "weights.pt"), "model")
    else:
        run.log_state_dict(state)
    run.end("FINISHED")
    return uri, run.run_id


class _Payload:
    """Pickles as a call of print(): what weights_only=True exists to refuse."""

    def __reduce__(self):
        return (print, ("this code ran while loading weights",))


# ----------------------------------------------------------------------------- 1 tracking URI


def test_tracking_uri_that_cannot_be_opened(work, capsys, blank_db):
    (work / "a_file").write_text("in the way\n")
    (work / "notes.db").write_text("not a database\n" * 50)
    import sqlite3
    other = sqlite3.connect(work / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.close()
    cases = {
        f"sqlite:///{work}/a_file/mlflow.db": f"{work}/a_file is not a folder",
        f"sqlite:///{work}/no_such_folder/mlflow.db": f"folder {work}/no_such_folder does not exist",
        "foo://bar/mlflow": "unknown scheme 'foo'",
        f"sqlite:///{work}/notes.db": f"{work}/notes.db is not an SQLite database",
        f"sqlite:///{work}/other.db": "is an SQLite database but not an MLflow store",
    }
    for uri, why in cases.items():
        for command in (["--grid", "tiny", "--device", "cpu"], ["--report"]):
            line = bad_input(capsys, ["--config", "exp.yaml", *command, "--tracking-uri", uri], work)
            assert line.startswith(f"error: --tracking-uri {uri}: ") and why in line, line
    assert (work / "notes.db").read_text() == "not a database\n" * 50


def test_unknown_device_is_bad_input(work, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is no mistake here")
    line = bad_input(capsys, ["--config", "exp.yaml", "--grid", "tiny", "--device", "cuda",
                              "--tracking-uri", f"sqlite:///{work}/mlflow.db"], work)
    from ablations.run.preflight import cuda_problem

    assert line == f"error: --device cuda: {cuda_problem('cuda')}"  # the preflight's diagnosis: why there is none


# ----------------------------------------------------------------------------- 2 results folder


def test_unwritable_results_folder(work, capsys, blank_db):
    exps = load_experiments(work / "exp.yaml")
    uri, _ = smoke_store(work / "store", blank_db, exps)
    (work / "a_file").write_text("in the way\n")
    client = MlflowClient(tracking_uri=uri)
    runs_before = len(runs_of(client, client.get_experiment_by_name("tiny").experiment_id))
    line = bad_input(capsys, ["--config", "exp.yaml", "--report", "--preset", "smoke", "--tracking-uri", uri,
                              "--results-dir", str(work / "a_file" / "results")], work)
    assert line == f"error: --results-dir {work}/a_file/results: {work}/a_file is not a folder"
    assert len(runs_of(client, client.get_experiment_by_name("tiny").experiment_id)) == runs_before  # no report run


# ----------------------------------------------------------------------------- 3 weights


def test_weights_that_weights_only_refuses(work, capsys, blank_db):
    exps = load_experiments(work / "exp.yaml")
    uri, run_id = smoke_store(work / "store", blank_db, exps, weights="pickle")
    before = tree(work)
    code = main(["--config", "exp.yaml", "--analyze", "--grid", "tiny", "--run-id", run_id, "--tracking-uri", uri,
                 "--device", "cpu", "--results-dir", str(work / "results")])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == EXIT_BAD_INPUT, out.err
    # the one error line, after the analysis's own progress line
    assert [l for l in lines if not l.startswith("role of SE")] == [
        f"error: run {run_id}: model/weights.pt is not a plain state dict of tensors and will not be loaded "
        "(it refers to print)"], out.err
    assert "Traceback" not in out.err and "weights_only=False" not in out.err
    assert "this code ran" not in out.out + out.err  # nothing of the file was executed
    assert tree(work) == before


# ----------------------------------------------------------------------------- 4 YAML


def _alias_bomb(depth: int) -> str:
    """A YAML value with 9**depth leaves, defined in place (anchors within the value itself)."""
    value = "&a0 [x, x, x, x, x, x, x, x, x]"
    for i in range(1, depth + 1):
        value = f"&a{i} [{value}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    return value


BOMBS = {  # 9**10 = 3.5 billion leaves, nested as a value somewhere the schema reads it
    "train.epochs": (f"defaults: {{train: {{epochs: {_alias_bomb(10)}}}}}\n"
                     "grids: {g: {description: d, axes: {model.se.reduction: [4]}}}\n",
                     "error: defaults.train.epochs: [[...], [...], [...], [...], ...]: Input should be a valid integer"),
    "an axis value": (f"defaults: {{model: {{arch: resnet20}}}}\n"
                      f"grids: {{g: {{description: d, axes: {{model.se.reduction: [4, {_alias_bomb(10)}]}}}}}}\n",
                      "error: grids.g.axes.model.se.reduction[1]: [[...], [...], [...], [...], ...]: Input should be a valid integer"),
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_yaml_alias_bomb_nested_as_a_value(tmp_path, case):
    where, expected = BOMBS[case]
    config = write_config(tmp_path, where)
    code = f"from ablations.cli import main; raise SystemExit(main(['--config', {config!r}, '--list']))"
    try:  # a child process: the old validator never returned (it built the repr of billions of elements)
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=SAFETY_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timeout: validating the alias bomb ({case}) did not finish in {SAFETY_TIMEOUT} s")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == EXIT_BAD_INPUT and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0] == expected


def test_non_utf8_experiments_file_is_named(work, capsys):
    text = yaml.safe_dump(TINY, sort_keys=False).replace("description: tiny", "description: café")
    (work / "latin1.yaml").write_bytes(text.encode("latin-1"))  # é is one byte, 0xe9, in Latin-1
    line = bad_input(capsys, ["--config", "latin1.yaml", "--list"], work)
    assert line.startswith("error: latin1.yaml:") and "not UTF-8 text (byte 0xe9)" in line


# ----------------------------------------------------------------------------- 5 accepted silently before


STRICT = {  # (key path, value) -> the one line
    "epochs: true": (("train", "epochs"), True, "error: defaults.train.epochs: true: a boolean, not a number"),
    "epochs: '3'": (("train", "epochs"), "3", "error: defaults.train.epochs: '3': a string, not an integer"),
    "lr: true": (("train", "lr"), True, "error: defaults.train.lr: true: a boolean, not a number"),
    "reduction: true": (("model", "se", "reduction"), True,
                        "error: defaults.model.se.reduction: true: a boolean, not a number"),
    "nesterov: 1": (("train", "nesterov"), 1, "error: defaults.train.nesterov: 1: Input should be a valid boolean"),
}


def _with(spec: dict, path: tuple[str, ...], value) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(spec))
    node = spec["defaults"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return spec


@pytest.mark.parametrize("case", list(STRICT))
def test_loose_coercion_is_an_error(work, capsys, case):
    path, value, expected = STRICT[case]
    write_config(work, _with(TINY, path, value), "bad.yaml")
    line = bad_input(capsys, ["--config", "bad.yaml", "--grid", "tiny", "--dry-run"], work)
    assert line.startswith(expected), line


def test_yaml_natural_numbers_still_load(work):
    """YAML 1.1 reads 1e-3 (no dot) as a string, and 1 as an int: a float field takes both."""
    spec = _with(_with(TINY, ("train", "weight_decay"), "1e-3"), ("train", "lr"), 1)
    (cell, _) = resolve_cells(load_experiments(write_config(work, spec, "ok.yaml")), "tiny")
    assert (cell.config.train.weight_decay, cell.config.train.lr) == (1e-3, 1.0)
    assert isinstance(cell.config.train.lr, float)


def test_set_that_a_grid_axis_overrides(work, capsys):
    line = bad_input(capsys, ["--config", "exp.yaml", "--grid", "tiny", "--dry-run", "--set", "model.se.reduction=2"],
                     work)
    assert line == ("error: --set model.se.reduction=2: no cell of grid tiny uses it: grid tiny sweeps "
                    "model.se.reduction, so every variant sets its own value")


def test_set_that_no_cell_uses(work, capsys):
    """A grid of only its baseline has no SE block: an SE option set for it reaches no cell."""
    spec = {**TINY, "grids": {"plain": {"description": "plain", "baseline": True, "axes": {"model.se.reduction": [4]}}}}
    write_config(work, spec, "plain.yaml")
    exps = load_experiments(work / "plain.yaml")
    assert {c.variant for c in resolve_cells(exps, "plain", sets=["model.se.squeeze=max"])} == {"baseline", "r=4"}
    # a later --set replaces an earlier one of the same key: the earlier one is reported
    line = bad_input(capsys, ["--config", "plain.yaml", "--grid", "plain", "--dry-run",
                              "--set", "train.epochs=2", "--set", "train.epochs=3"], work)
    assert line == ("error: --set train.epochs=2: no cell of grid plain uses it: "
                    "the later --set train.epochs=3 replaces it")
    # milestones are read by the multistep schedule only; every cell here is cosine
    line = bad_input(capsys, ["--config", "plain.yaml", "--grid", "plain", "--dry-run",
                              "--set", "train.milestones=[0.3, 0.6]"], work)
    assert line == ("error: --set train.milestones=[0.3, 0.6]: no cell of grid plain uses it: only train.schedule "
                    "multistep reads train.milestones, and every cell has train.schedule cosine")
    cells = resolve_cells(exps, "plain", sets=["train.schedule=multistep", "train.milestones=[0.3, 0.6]"])
    assert all(c.config.train.milestones == [0.3, 0.6] for c in cells)


def test_option_a_block_does_not_take(work, capsys):
    # on the command line and in the file: named as a one-line ConfigError, not swallowed by the block
    line = bad_input(capsys, ["--config", "exp.yaml", "--grid", "tiny", "--dry-run", "--set", "model.stride_in=3x3"],
                     work)
    assert line == ("error: --set model.stride_in=3x3: resnet20 has basic blocks, which have no 1x1 conv to put "
                    "the stride in; leave stride_in out")
    write_config(work, _with(TINY, ("model", "stride_in"), "3x3"), "stride.yaml")
    with pytest.raises(ConfigError, match=r"^defaults\.model\.stride_in: resnet20 has basic blocks"):
        load_experiments(work / "stride.yaml")
    # the blocks themselves take only the options they use
    with pytest.raises(TypeError):
        BasicBlock(16, 16, 1, stride_in="3x3")
    with pytest.raises(ValueError, match="^model.arch: preact sets groups, which preact_bottleneck blocks do not take"):
        ResNet(replace(ARCHS["resnet164"], groups=4), 10, name="preact")


# ----------------------------------------------------------------------------- 6 bugs are bugs


def test_a_bug_is_not_reported_as_bad_input(work, capsys, blank_db, monkeypatch):
    """A ValueError from report code is a bug: main() lets it through, so its traceback shows (exit 1)."""
    exps = load_experiments(work / "exp.yaml")
    uri, _ = smoke_store(work / "store", blank_db, exps)

    def broken(*args, **kwargs):
        raise ValueError("a bug in report code")

    monkeypatch.setattr(report, "report_all", broken)
    with pytest.raises(ValueError, match="a bug in report code"):
        main(["--config", "exp.yaml", "--report", "--preset", "smoke", "--tracking-uri", uri])
    assert "error:" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- 7 misleading output


def test_report_without_preset_on_a_smoke_store_writes_nothing(work, capsys, blank_db):
    exps = load_experiments(work / "exp.yaml")
    uri, _ = smoke_store(work / "store", blank_db, exps)
    readme = work / "results" / "README.md"  # the tracked results index, as in the repository
    readme.parent.mkdir()
    readme.write_text("# Ablation results\n\nNo real results yet.\n")
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("tiny").experiment_id
    before = tree(work)
    assert main(["--config", "exp.yaml", "--report", "--tracking-uri", uri]) == EXIT_OK
    out = capsys.readouterr()
    assert out.err.strip() == ("report: grid tiny has no finished runs without a preset; nothing written "
                               "(runs of preset smoke are in the store: add --preset smoke)")
    assert out.out == ""
    assert readme.read_text() == "# Ablation results\n\nNo real results yet.\n"
    assert tree(work) - before <= {"store/mlartifacts"}, sorted(tree(work) - before)  # no placeholder tables
    assert not runs_of(client, exp_id, "tags.report = 'true'")
    assert not runs_of(client, exp_id, "tags.grid_parent = 'true'")  # no parent run made to hold nothing


def test_smoke_figures_and_findings_say_smoke(work, blank_db):
    """Preset runs are pipeline checks: their figure titles say so, and the role-of-SE findings do not
    read a 1-epoch model against the paper's Section 7."""
    from ablations.report.analysis import analyze_run

    exps = load_experiments(work / "exp.yaml")
    uri, run_id = smoke_store(work / "store", blank_db, exps)
    client = MlflowClient(tracking_uri=uri)
    frame = report.runs_frame(client, client.get_experiment_by_name("tiny").experiment_id)
    figs = report.build_report(frame, "tiny", preset="smoke").figures()
    assert figs and all("tiny (smoke preset)" in f._suptitle.get_text() for f in figs.values())
    folder = analyze_run(uri, run_id, results_dir=work / "results", device="cpu", cache_dir=work / "cache")
    findings = (folder / "findings.md").read_text()
    assert findings.startswith("This run was trained with the smoke preset (1 epoch on 40 training images): "
                               "a check that the pipeline runs end to end, not a trained model")
    assert "In the paper" not in findings
