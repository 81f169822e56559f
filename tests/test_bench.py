"""bench/ on tiny configurations: every path gives finite positive images/s, the JSON
is well formed, and the sweep's process protocol works. No timing assertions: this machine is shared."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ablations.config import TrainConfig

from conftest import SHARED

BENCH = Path(__file__).resolve().parents[1] / "bench"
IMAGENETTE = SHARED / "imagenette-224-mini.tar.gz"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # as when a script runs: its folder first (bench/_path.py, bench/benchlib.py)


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


benchlib = _load_bench("benchlib")
ts = _load_bench("train_speed")
accuracy = _load_bench("accuracy_parity")
packing = _load_bench("packing")
se_overhead = _load_bench("se_overhead")
loaders = _load_bench("imagefolder_loader")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Keep the decoded / extracted mini archive out of the user's cache (children inherit it)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SENET_ABLATIONS_CACHE", str(path))
    return path


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _no_nan(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_quick_run_writes_json_with_both_paths(mini_cifar_root, cache, tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = ts.main(["--quick", "--device", "cpu", "--data-root", str(mini_cifar_root), "--models", "se_resnet20",
                  "--batch-size", "8", "--warmup-steps", "1", "--steps", "2", "--plain-workers", "1",
                  "--plain-dataset", "imagefolder", "--json-out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ImageFolder" in text and "extracted once" in text  # says which copy the plain path used
    assert "harness/plain" in text and "n/a" in text

    report = _no_nan(out.read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and "date" in env
    assert report["timing"]["mode"] == "steps" and report["plain_workers"] == 1
    (row,) = report["models"]
    assert row["label"] == "SE-ResNet-20" and _positive(row["training_flops_per_image"])
    for path in ("plain", "harness"):
        s = row[path]
        assert _positive(s["images_per_s"]) and _positive(s["seconds_per_epoch"]), s
        assert s["extrapolated"] is True and s["timed_steps"] >= 2 and s["timed_images"] == 8 * s["timed_steps"]
        assert s["epoch_images"] == 1000  # the mini archive's full train split
        assert row["mfu"][path] is None  # no GPU peak on a CPU
    assert _positive(row["ratio"])
    assert report["peak_bf16"]["flops"] is None


def test_se_overhead_writes_json(tmp_path, capsys):
    """The SE overhead (once a section of train_speed.py) keeps its JSON rows, plus inference and complexity."""
    out = tmp_path / "se.json"
    assert se_overhead.main(["--device", "cpu", "--batch", "1", "--repeats", "1", "--size", "64",
                             "--json-out", str(out)]) == 0
    assert "SE-ResNet-50" in capsys.readouterr().out
    report = _no_nan(out.read_text())
    (se,) = report["se_overhead"]
    assert _positive(se["resnet50_ms"]) and _positive(se["se_resnet50_ms"]) and se["paper_pct"] == 10.0
    inference = report["se_overhead_inference"]
    assert _positive(inference["resnet50_ms"]) and _positive(inference["se_resnet50_ms"])
    assert report["complexity"]["macs_overhead_pct"] > 0 and report["complexity"]["params_overhead_pct"] > 0


def test_packing_sweep_skips_on_a_cpu(tmp_path, capsys):
    """The sweep (once train_speed.py --workers-per-gpu-sweep) says it skipped on a CPU, in its JSON too."""
    out = tmp_path / "packing.json"
    assert packing.main(["sweep", "--device", "cpu", "--workers-per-gpu", "1,2", "--json-out", str(out)]) == 0
    assert "skipped: needs CUDA" in capsys.readouterr().out
    report = _no_nan(out.read_text())
    assert "skipped" in report["workers_per_gpu"]


def test_accuracy_parity_writes_json(mini_cifar_root, cache, tmp_path, capsys):
    """The accuracy check's own script (once train_speed.py --accuracy), on a tiny run."""
    out = tmp_path / "acc.json"
    assert accuracy.main(["--device", "cpu", "--data-root", str(mini_cifar_root), "--seeds", "1", "--epochs", "1",
                          "--train-size", "40", "--test-size", "20", "--plain-workers", "0",
                          "--json-out", str(out)]) == 0
    assert "undetermined (one seed)" in capsys.readouterr().out
    acc = _no_nan(out.read_text())["accuracy"]
    assert acc["train_images"] == 40 and acc["test_images"] == 20 and acc["within_2std"] is None
    assert all(0 <= e <= 100 for path in ("plain", "harness") for e in acc["errors_pct"][path])


def test_accuracy_check_reports_mean_std_per_path(mini_cifar_root, cache):
    plain_ds, _ = benchlib.plain_train_set(mini_cifar_root)
    tc = TrainConfig(epochs=1, batch_size=10, lr=0.05, label_smoothing=0.0)
    acc = accuracy.accuracy_check(mini_cifar_root, plain_ds, torch.device("cpu"), tc, seeds=[0, 1], workers=0,
                                  train_size=40, test_size=20, log=lambda *_: None)
    for path in ("plain", "harness"):
        assert len(acc["errors_pct"][path]) == 2
        assert all(0 <= e <= 100 for e in acc["errors_pct"][path])
        assert math.isfinite(acc["std_pct"][path])
    assert acc["train_images"] == 40 and acc["test_images"] == 20
    assert isinstance(acc["within_2std"], bool)


@pytest.mark.slow
def test_sweep_processes_share_one_window(mini_cifar_root, cache):
    """The `packing.py cell` protocol (READY, common window, RESULT) on a CPU; the CLI runs it on CUDA only."""
    rows = packing.workers_sweep([1], torch.device("cpu"), mini_cifar_root, batch_size=8, warmup_s=1.0,
                                 window_s=2.0, spec_key="se_resnet20", train_size=64, test_size=10,
                                 log=lambda *_: None)
    (row,) = rows
    assert row["errors"] == [] and _positive(row["aggregate_images_per_s"])


def test_windows_time_exactly_the_requested_steps():
    w = benchlib.StepWindow(warmup=2, timed=3)
    with pytest.raises(benchlib.WindowDone):
        for _ in range(10):
            w.step(4)
            w.synced()
    assert w.steps == 5 and w.measured()[:2] == (3, 12)


def test_peak_table():
    assert ts.peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert ts.peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert ts.peak_for_name("NVIDIA H200") == 989e12
    assert ts.peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert ts.peak_for_name("Tesla T4") is None
    assert ts.bf16_peak(torch.device("cpu"))[0] is None
    assert ts.mfu(1000.0, 1e9, None) is None and ts.mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)


@pytest.mark.skipif(not IMAGENETTE.is_file(), reason=f"Imagenette sample absent: {IMAGENETTE}")
def test_imagefolder_pipelines_all_deliver_batches(cache, tmp_path, capsys):
    out = tmp_path / "loaders.json"
    rc = loaders.main(["--device", "cpu", "--data-root", str(SHARED), "--batch-size", "50", "--epochs", "2",
                       "--workers", "1", "--json-out", str(out)])
    assert rc == 0
    report = _no_nan(out.read_text())
    assert len(report["pipelines"]) == 3 and "harness" in capsys.readouterr().out
    for r in report["pipelines"].values():
        assert r["epoch_images"] == 400 and _positive(r["images_per_s"]) and _positive(r["first_epoch_s"])


def test_imagefolder_bench_names_a_missing_archive(tmp_path, capsys):
    assert loaders.main(["--device", "cpu", "--data-root", str(tmp_path)]) == 2
    assert "imagenette-224-mini.tar.gz not found" in capsys.readouterr().err


def test_device_kit_scripts_parse():
    """bench/device/ runs on a GPU host; on any machine at least its scripts must parse."""
    import subprocess

    for script in ("session.sh", "fetch_wheels.sh"):
        done = subprocess.run(["bash", "-n", str(BENCH / "device" / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    compile((BENCH / "device" / "check_env.py").read_text(), "check_env.py", "exec")


def test_data_scaling_measurements_are_well_formed(tmp_path):
    scaling = _load_bench("data_scaling")
    pool = scaling.make_tree(tmp_path / "pool", 40)
    tree = scaling.link_tree(pool, tmp_path / "t20", 20)
    assert len(list((tree / "train").rglob("*.jpg"))) == 20 and (tree / "train" / "c0" / "000000.jpg").is_symlink()
    for what in ("harness-decode", "harness-epoch", "dataloader"):
        row = scaling.measure(tree, what, 32, tmp_path / "cache", workers=0, batch_size=4)
        assert row["images"] in (20, 20 + 10 * scaling.VAL_PER_CLASS) and row["images_per_s"] > 0, row
        assert row["peak_vmrss_mb"] >= row["peak_rssanon_mb"] > 0, row
        if what == "harness-decode":
            assert 32 * 32 * 3 <= row["cache_bytes_per_image"] < 32 * 32 * 3 + 16  # uint8 pixels + .npy headers
    assert "| synthetic | 20 |" in scaling.table({"rows": [{**row, "data": "synthetic", "n_train": 20}]})


def test_the_offline_plain_dataset_serves_items_as_torchvision_cifar10_does(mini_cifar_root, cache):
    """The default offline plain path: the decoded copy in memory, one PIL image per item through the
    transforms, `targets` a list of ints (what torchvision.datasets.CIFAR10 gives a user)."""
    ds, source = benchlib.plain_train_set(mini_cifar_root, cifar_style=True)
    assert "CIFAR10-style" in source and len(ds) == len(ds.targets) > 0
    x, y = ds[0]
    assert tuple(x.shape) == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert all(isinstance(t, int) for t in ds.targets[:10])
