"""The GPU path, exercised on whatever device is here: no host<->device traffic in the training
step, compile that holds across many cells, resumable epochs, clean out-of-memory handling,
channels_last kept end to end, and the preflight (run for real, with a real MLflow store).

Every device-parametrised test also runs on `cuda` where a GPU is present.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ablations.config import ExperimentConfig
from ablations.data import Dataset, DeviceSplit, Split, device_split, iterate_batches
from ablations.train import CellFailed, seed_everything, train
from senet import build_model

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def _dataset(n_train: int = 96, n_test: int = 32, side: int = 8, style: str = "cifar", seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), (np.arange(n) % 10).astype(np.int64))

    size = side if style == "cifar" else side - 2
    return Dataset("synthetic", "test", tuple(map(str, range(10))), split(n_train), split(n_test),
                   (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), style, size)


def _config(arch: str = "resnet20", se: dict | None = None, **train) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "dataset": {"name": "synthetic"},
        "model": {"arch": arch, "num_classes": 10, "se": se},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, **train},
        "seed": 0,
    })


# --------------------------------------------------------------------------- no traffic in the hot loop


class _HostTensors(TorchFunctionMode):
    """Python-level tensor constructions that stage data on the host: torch.tensor()/as_tensor()
    (always built on the host, then copied), and any factory call without an explicit device
    (it lands on the default device, the CPU, and needs a copy to reach the data's device)."""

    _LITERAL = {torch.tensor, torch.as_tensor, torch.asarray}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.factories = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._LITERAL:
            self.found.append(f"torch.{func.__name__}(...)")
        elif func in self.factories and kwargs.get("device") is None:
            self.found.append(f"torch.{func.__name__}(...) without device=")
        return func(*args, **kwargs)


class _CrossDevice(TorchDispatchMode):
    """Every aten op whose tensors (inputs and outputs) live on more than one device: a copy between
    host and device, or a host tensor fed to a device kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {t.device for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.found.append(f"{func} on {sorted(map(str, devices))}")
        return out


class _WatchSteps:
    """An Observer that watches steps 2..N of epoch 1 (from the end of step 1 to the end of step N):
    whole training steps, data loading and augmentation included."""

    def __init__(self, last: int) -> None:
        self.last, self.host, self.cross, self.watched = last, _HostTensors(), _CrossDevice(), 0

    def on_step(self, epoch: int, step: int, steps: int, loss) -> None:
        if epoch != 1:
            return
        if step == 1:
            self.host.__enter__()
            self.cross.__enter__()
        elif step <= self.last:
            self.watched += 1
            if step == self.last:
                self.cross.__exit__(None, None, None)
                self.host.__exit__(None, None, None)

    def on_epoch(self, stats) -> None:
        pass


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_move_nothing_between_host_and_device(device):
    data = _dataset(n_train=96)  # 6 steps of 16; steps 2-6 are watched
    if device == "cuda":  # resident, the GPU's hot path (a split streamed from host memory copies by design)
        device_split(data.train, device)
    cfg = _config(channels_last=True)
    watch = _WatchSteps(last=6)
    seed_everything(0)
    train(cfg, build_model(cfg.model), data, torch.device(device), observer=watch, sync_every=1000)
    assert watch.watched == 5
    assert not watch.host.found, f"the training step builds tensors on the host: {sorted(set(watch.host.found))}"
    assert not watch.cross.found, f"the training step moves tensors between devices: {sorted(set(watch.cross.found))}"


@pytest.mark.parametrize("device", DEVICES)
def test_resident_batches_move_nothing_between_host_and_device(device):
    """The resident path (the whole split on the device, the GPU case) on its own: after the
    per-epoch setup, a batch is device gathers and device arithmetic only."""
    data = _dataset(n_train=96)
    resident = DeviceSplit.from_split(data.train, device)
    batches = iterate_batches(resident, data, batch_size=16, train=True, device=device, seed=1, channels_last=True)
    host, cross = _HostTensors(), _CrossDevice()
    with host, cross:
        got = [x for x, _ in batches]
    assert len(got) == 6 and all(x.is_contiguous(memory_format=torch.channels_last) for x in got)
    assert not host.found, f"batches build tensors on the host: {sorted(set(host.found))}"
    assert not cross.found, f"batches move tensors between devices: {sorted(set(cross.found))}"


# --------------------------------------------------------------------------- resumable, deterministic epochs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("style", ["cifar", "imagenet"])
def test_epoch_from_batch_k_is_the_tail_of_the_whole_epoch(device, style):
    from ablations.data import augmentation_generator

    data = _dataset(n_train=100, side=10, style=style)
    kw = dict(batch_size=16, train=True, device=device, seed=7, epoch=3, drop_last=False)
    whole = list(iterate_batches(data.train, data, **kw))
    assert len(whole) == 7  # the last batch has 4 images: skipping must draw for its real size
    for k in (0, 1, 4, 6, 7):
        tail = list(iterate_batches(data.train, data, start=k, **kw))
        assert len(tail) == len(whole) - k
        for (xa, ya), (xb, yb) in zip(whole[k:], tail):
            assert torch.equal(xa, xb) and torch.equal(ya, yb), f"start={k} differs from the whole epoch"
    resident = list(iterate_batches(DeviceSplit.from_split(data.train, device), data, start=4, **kw))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[4:], resident))  # resident == streamed
    again = list(iterate_batches(data.train, data, **kw))
    other = list(iterate_batches(data.train, data, **{**kw, "epoch": 4}))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again))
    assert not torch.equal(whole[0][0], other[0][0])
    g = augmentation_generator(7, 3, device)
    assert g.device.type == torch.device(device).type
    assert torch.equal(torch.rand(4, generator=g, device=device),
                       torch.rand(4, generator=augmentation_generator(7, 3, device), device=device))


# --------------------------------------------------------------------------- torch.compile across cells


_ARCH_CELLS = [(a, se) for a in ("resnet20", "resnet32", "resnet44", "resnet56") for se in (None, {"reduction": 4})] + [
    ("resnet20", {"reduction": 8, "squeeze": "max"}), ("resnet20", {"reduction": 4, "integration": "post"}),
    ("resnet32", {"reduction": 4, "excitation": "hardsigmoid", "stages": [3, 4]})]


def test_compile_holds_for_eleven_architectures_in_one_process(monkeypatch):
    """Eleven cells of different architectures in one process, each compiled. Dynamo's recompile
    limit (8) is what used to turn cell 9 on silently eager; it lives in dynamo, before any backend,
    so dynamo's 'eager' backend is used here: inductor's CPU code generation costs ~100 s per model
    on a 2-core machine (tests/test_train.py covers one inductor-compiled cell)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    data = _dataset(n_train=32, n_test=16)
    statuses = []
    for i, (arch, se) in enumerate(_ARCH_CELLS):
        before = counters["stats"]["unique_graphs"]
        cfg = _config(arch, se, compile=True)
        seed_everything(0)
        result = train(cfg, build_model(cfg.model), data, torch.device("cpu"), sync_every=1000)
        graphs = counters["stats"]["unique_graphs"] - before
        assert graphs > 0, f"cell {i + 1} ({arch}, se={se}) ran eagerly: dynamo compiled no graph for it"
        statuses.append(getattr(result, "compile_status", "?"))
    assert statuses == ["on"] * len(_ARCH_CELLS)


def test_a_failing_compile_warns_trains_eagerly_and_says_so(monkeypatch):
    """A compiler that cannot compile (here: a backend that raises, as a missing C++ compiler would)
    never degrades silently: a warning, the status the runner logs as the run's `compile` tag, and
    the cell still trains."""

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    cfg = _config(compile=True)
    seed_everything(0)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        result = train(cfg, build_model(cfg.model), _dataset(n_train=32, n_test=16), torch.device("cpu"))
    assert result.compile_status.startswith("eager fallback") and "no C++ compiler" in result.compile_status
    assert len(result.history) == 1 and np.isfinite(result.final.train_loss)


# --------------------------------------------------------------------------- out of memory


class _OomAfterAllocating(torch.nn.Module):
    """Allocates a tensor in its forward, then fails the way a GPU out of memory does."""

    def __init__(self, held: list) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)
        self.held = held

    def forward(self, x):
        big = torch.empty(1 << 20, device=x.device)
        self.held.append(weakref.ref(big))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 MiB")


def test_out_of_memory_releases_the_failed_step_before_the_cell_fails():
    held: list = []
    cfg = _config()
    with pytest.raises(CellFailed, match="out of memory") as info:
        train(cfg, _OomAfterAllocating(held), _dataset(n_train=32), torch.device("cpu"))
    # While the failure is being handled (its traceback alive), the step's tensors are gone already,
    # so the cache emptied on the way out had them to give back.
    assert held and held[0]() is None, "the failed step's tensors are still referenced (by the OOM traceback)"
    assert info.value.__cause__ is None


# --------------------------------------------------------------------------- layout


def test_channels_last_survives_augmentation_and_the_zero_pad_shortcut():
    from senet.resnet import PadShortcut

    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert PadShortcut(32, 2)(x).is_contiguous(memory_format=torch.channels_last)
    assert PadShortcut(32, 2)(x.contiguous()).is_contiguous()
    model = build_model(_config().model).to(memory_format=torch.channels_last)
    seen = []
    for m in model.modules():
        if isinstance(m, PadShortcut):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    model(torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    assert seen and all(seen)
    data = _dataset()
    x, _ = next(iterate_batches(data.train, data, batch_size=8, train=True, device="cpu", channels_last=True,
                                dtype=torch.bfloat16))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.bfloat16


# --------------------------------------------------------------------------- preflight


@pytest.fixture
def _preflight(monkeypatch, capsys):
    """`python -m ablations.run.preflight ARGS` in this process (its `main`, what the module runs):
    (exit code, stderr). The pass it records in the environment is undone after the test."""
    from ablations.run import preflight

    monkeypatch.setenv(preflight.PREFLIGHT_PASSED_ENV, "")
    monkeypatch.delenv(preflight.PREFLIGHT_PASSED_ENV)

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = preflight.main(list(args))
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    return run


def test_preflight_trains_one_step_and_writes_the_store(tmp_path, _preflight):
    db = tmp_path / "mlflow.db"
    done = _preflight("--device", "cpu", "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "preflight ok on cpu" in done.stderr and "MLflow write ok" in done.stderr
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from ablations.run.preflight import _store_write

    client = MlflowClient(f"sqlite:///{db}")

    def probes() -> list:
        return [e for e in client.search_experiments(view_type=ViewType.ALL) if e.name.startswith("_preflight-")]

    (exp,) = probes()  # the probe's own experiment
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    assert len(runs) == 1 and runs[0].info.lifecycle_stage == "deleted"  # written, then out of the way
    assert exp.lifecycle_stage == "deleted" and {e.name for e in client.search_experiments()} == {"Default"}
    _store_write(f"sqlite:///{db}")  # the next preflight writes its own and deletes it: nothing shared
    assert len(probes()) == 2 and all(e.lifecycle_stage == "deleted" for e in probes())
    assert {e.name for e in client.search_experiments()} == {"Default"}


def test_preflight_names_an_unwritable_store_in_one_line(tmp_path, _preflight):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = _preflight("--device", "cpu", "--tracking-uri", f"sqlite:///{blocker}/sub/mlflow.db", cwd=tmp_path)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith("preflight failed:")]
    assert len(failed) == 1 and "not writable" in failed[0] and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message; this machine has CUDA")
def test_preflight_on_cuda_without_cuda_exits_2_with_the_cause(tmp_path, _preflight):
    done = _preflight("--device", "cuda", cwd=tmp_path)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("preflight failed: no CUDA"), done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path; this machine has CUDA")
def test_a_grid_on_cuda_without_cuda_stops_before_any_cell_with_the_preflights_cause(tmp_path, capsys):
    """The grid stops at the CLI's device check, before the preflight would run: its one line gives the
    preflight's own diagnosis (test_preflight_on_cuda_without_cuda_exits_2_with_the_cause runs the preflight)."""
    import yaml

    from ablations.cli import main
    from ablations.run.preflight import cuda_problem

    grids = {"defaults": {"dataset": {"name": "synthetic", "train_size": 32, "test_size": 16},
                          "model": {"arch": "resnet20"}, "train": {"epochs": 1, "batch_size": 16}, "seeds": [0]},
             "grids": {"one": {"description": "one cell", "axes": {"model.se.reduction": [4]}}}}
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(grids))
    code = main(["--config", str(tmp_path / "experiments.yaml"), "--grid", "one", "--device", "cuda",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"error: --device cuda: {cuda_problem('cuda')}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments.yaml"]  # no store, no run, no report
