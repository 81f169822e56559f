"""Role of SE (paper Section 7): excitation statistics of a really trained run, checked by hand."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from ablations.report.analysis import analyze_grid, analyze_run, balanced_subset
from ablations.report.excitations import block_table, collect_excitations
from ablations.report.findings import findings_paragraph, write_outputs
from ablations.cli import main
from ablations.config import ExperimentConfig
from ablations.errors import BadInput, StoreError
from ablations.data import Split, iterate_batches, load_dataset
from senet import build_model

GRID = "role"
GRID_FILE = {
    "defaults": {
        "dataset": {"name": "cifar10", "train_size": 300, "test_size": 200, "download": False},
        "model": {"arch": "resnet20", "se": {"reduction": 4}},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "warmup_epochs": 0},
        "seeds": [0],
    },
    # the baseline (no SE blocks) must be left out of the analysis
    "grids": {GRID: {"description": "one SE variant and the plain backbone", "baseline": True,
                     "axes": {"model.se.reduction": [4]}}},
}
FIGURES = ("class_means", "within_class", "specificity", "saturation")
RESNET20_BLOCKS = [f"SE_{s}_{b}" for s in (2, 3, 4) for b in (1, 2, 3)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mini_cifar_root):
    """Train the grid through the real CLI, then analyse it; yields (workdir, tracking uri, written dirs, stderr)."""
    work = tmp_path_factory.mktemp("role")
    (work / "experiments.yaml").write_text(yaml.safe_dump(GRID_FILE, sort_keys=False))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SENET_ABLATIONS_CACHE", str(work / "cache"))
        rc = main(["--config", str(work / "experiments.yaml"), "--grid", GRID, "--data-root", str(mini_cifar_root),
                   "--tracking-uri", uri, "--device", "cpu"])
        assert rc == 0
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            dirs = analyze_grid(uri, GRID, results_dir=work / "results", data_root=str(mini_cifar_root), device="cpu")
        yield work, uri, dirs, err.getvalue()


def _se_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(GRID)
    runs = [r for r in client.search_runs([exp.experiment_id])  # cell runs only: the report run has no cell_id
            if "cell_id" in r.data.tags and r.data.tags["variant"] != "baseline"]
    assert len(runs) == 1
    return client, runs[0]


def test_figures_tables_and_artifacts(trained):
    work, uri, dirs, err = trained
    assert dirs == [work / "results" / "cifar10" / GRID / "role_of_se" / "r=4_seed0"]  # the baseline is skipped
    out = dirs[0]
    for name in FIGURES:
        with Image.open(out / f"{name}.png") as im:
            im.verify()
            assert im.size[0] > 800
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")

    table = pd.read_csv(out / "block_stats.csv")
    assert table["block"].tolist() == RESNET20_BLOCKS
    assert table["channels"].tolist() == [16] * 3 + [32] * 3 + [64] * 3
    assert (table["images"] == 200).all() and (table["classes"] == 10).all()
    assert table["class_specificity"].between(0, 1).all() and table["saturated_fraction"].between(0, 1).all()
    md = (out / "block_stats.md").read_text()
    assert md.count("\n| SE_") == 9 and "class_specificity" in md

    client, run = _se_run(uri)
    logged = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "role_of_se")}
    assert {f"{n}.{e}" for n in FIGURES for e in ("png", "pdf")} | {"block_stats.csv", "block_stats.md"} <= logged
    assert "[1/1]" in err and "ETA" in err and "r=4" in err


def _hand_excitation(model: torch.nn.Module, x: torch.Tensor, stage: int, block: int) -> torch.Tensor:
    """s of SE_<stage>_<block> without hooks: walk the network to the block, then apply the SE layers."""
    h = model.stem(x)
    for name in model.stage_names:
        for bname, unit in getattr(model, name).named_children():
            if (name, bname) == (f"stage{stage}", f"block{block}"):
                u = unit.branch(h)  # standard integration: SE acts on the branch output
                se = unit.se
                z = u.mean((2, 3), keepdim=True)
                return torch.sigmoid(se.expand(torch.relu(se.reduce(z)))).flatten(1)
            h = unit(h)
    raise AssertionError("block not found")


@torch.no_grad()
def test_statistics_match_a_direct_computation(trained, mini_cifar_root, tmp_path):
    work, uri, dirs, _ = trained
    client, run = _se_run(uri)
    config = ExperimentConfig.model_validate_json(Path(client.download_artifacts(
        run.info.run_id, "config.json", str(tmp_path))).read_text())
    model = build_model(config.model)
    model.load_state_dict(torch.load(client.download_artifacts(run.info.run_id, "model/weights.pt", str(tmp_path)),
                                     weights_only=True))
    model.eval()
    ds = config.dataset
    data = load_dataset(ds.name, mini_cifar_root, train_size=ds.train_size, test_size=ds.test_size,
                        download=False, cache_dir=work / "cache")

    # 8 images: every per-class mean, the specificity score and the saturated fraction, by hand
    few = balanced_subset(data.test, 8)
    assert sorted(np.bincount(few.labels, minlength=10)) == [0, 0] + [1] * 8
    x, y = next(iterate_batches(few, data, batch_size=8, train=False, device="cpu"))
    s = _hand_excitation(model, x, 3, 2).double().numpy()
    stats = collect_excitations(model, few, data, batch_size=3)  # batches of 3: sums must add up across batches
    b = {blk.label: blk for blk in stats.blocks}["SE_3_2"]
    for k in np.unique(y):
        np.testing.assert_allclose(b.class_mean[k], s[y.numpy() == k].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.all_mean, s.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.all_std, s.std(0), rtol=1e-4, atol=1e-6)
    frame = pd.DataFrame(s).assign(label=y.numpy())
    between = frame.groupby("label").mean().sub(s.mean(0)).pow(2).mul(frame["label"].value_counts(normalize=True).sort_index(), axis=0).sum()
    eta2 = (between.to_numpy() / s.var(0))
    assert b.specificity() == pytest.approx(eta2.mean(), rel=1e-4)
    assert b.saturated_fraction == pytest.approx((s > 0.9).mean())

    # the whole test split: the per-class means analyze_grid wrote for SE_3_2
    saved = np.load(dirs[0] / "channel_stats.npz")
    s_all, y_all = [], []
    for xb, yb in iterate_batches(data.test, data, batch_size=64, train=False, device="cpu"):
        s_all.append(_hand_excitation(model, xb, 3, 2).double())
        y_all.append(yb)
    s_all, y_all = torch.cat(s_all).numpy(), torch.cat(y_all).numpy()
    assert saved["SE_3_2.counts"].tolist() == np.bincount(y_all, minlength=10).tolist()
    for k in range(10):
        np.testing.assert_allclose(saved["SE_3_2.class_mean"][k], s_all[y_all == k].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["SE_3_2.class_std"][k], s_all[y_all == k].std(0), rtol=1e-4, atol=1e-6)
    table = pd.read_csv(dirs[0] / "block_stats.csv").set_index("block")
    assert table.loc["SE_3_2", "mean_activation"] == pytest.approx(s_all.mean(), rel=1e-5)
    assert table.loc["SE_3_2", "std_activation"] == pytest.approx(s_all.std(), rel=1e-4)
    assert table.loc["SE_3_2", "saturated_fraction"] == pytest.approx((s_all > 0.9).mean())


def test_findings_paragraph_quotes_the_table(trained):
    _, _, dirs, _ = trained
    table = pd.read_csv(dirs[0] / "block_stats.csv")
    text = findings_paragraph(table)
    assert "SE_5_2" in text and "class-agnostic" in text  # the paper's findings
    assert f"{table['class_specificity'].iloc[0]:.3f} at SE_2_1" in text
    assert f"{table['class_specificity'].iloc[-1]:.3f} at SE_4_3" in text
    assert f"{table['chance_specificity'].iloc[0]:.3f}" in text
    top = table.loc[table["saturated_fraction"].idxmax()]
    assert f"highest at {top['block']} ({top['saturated_fraction']:.1%}" in text
    assert (dirs[0] / "findings.md").read_text().strip() == text


def test_single_run_and_refusals(trained, mini_cifar_root):
    work, uri, _, _ = trained
    client, run = _se_run(uri)
    exp = client.get_experiment_by_name(GRID)
    baseline = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("variant") == "baseline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SENET_ABLATIONS_CACHE", str(work / "cache"))
        with pytest.raises(BadInput, match="no SE blocks"):  # bad input: one line, exit 2 at the CLI
            analyze_run(uri, baseline.info.run_id, results_dir=work / "other", data_root=str(mini_cifar_root))
        out = analyze_grid(uri, GRID, results_dir=work / "few", data_root=str(mini_cifar_root), max_images=20,
                           run_id=run.info.run_id)
    table = pd.read_csv(out[0] / "block_stats.csv")
    assert (table["images"] == 20).all() and len(table) == 9
    with pytest.raises(StoreError, match="no MLflow experiment"):
        analyze_grid(uri, "no_such_grid")


@torch.no_grad()
def test_nosqueeze_relu_gate_is_averaged_over_positions(tmp_path):
    """squeeze=none: the gate gives a map per image, averaged over positions; ReLU has no saturation."""
    data = load_dataset("synthetic", tmp_path, train_size=10, test_size=20, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model = build_model({"arch": "resnet20", "num_classes": 10,
                         "se": {"reduction": 4, "squeeze": "none", "excitation": "relu"}}).eval()
    stats = collect_excitations(model, data.test, data, batch_size=7)
    assert stats.spatial and stats.threshold is None
    x, y = next(iterate_batches(data.test, data, batch_size=20, train=False, device="cpu"))
    unit = model.stage2.block1
    u = unit.branch(model.stem(x))
    s = torch.relu(unit.se.expand(torch.relu(unit.se.reduce(u)))).mean((2, 3)).double().numpy()
    b = stats.blocks[0]
    assert b.label == "SE_2_1"
    for k in range(10):
        np.testing.assert_allclose(b.class_mean[k], s[y.numpy() == k].mean(0), rtol=1e-5, atol=1e-6)
    table = block_table(stats)
    assert table["saturated_fraction"].isna().all() and table["averaged_over_positions"].all()
    written = write_outputs(stats, tmp_path / "out", "nosqueeze / relu (untrained)")
    assert {p.name for p in written} >= {f"{n}.png" for n in FIGURES}
    text = findings_paragraph(table)
    assert "no upper bound" in text and "nan" not in text.lower()


def test_balanced_subset_takes_classes_round_robin():
    labels = np.repeat(np.arange(4), 5)  # sorted by class, as a JPEG tree is
    split = Split(np.zeros((20, 2, 2, 3), dtype=np.uint8), labels)
    few = balanced_subset(split, 6)
    assert np.bincount(few.labels, minlength=4).tolist() == [2, 2, 1, 1]
    assert balanced_subset(split, None) is split and balanced_subset(split, 50) is split
