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


# --------------------------------------------------------------------------- on a real cluster (issue #22, item 8)
#
# GPU-only conditions, simulated on the CPU where there is no GPU: an out-of-memory error raised by a
# forward hook, the residency sizing replaced by a decision function, a V100's capability. The harness
# logic around them runs for real: a real MLflow store, real checkpoints on disk, real training.

_GRID = {
    "defaults": {"dataset": {"name": "synthetic", "train_size": 64, "test_size": 32},
                 "model": {"arch": "resnet20", "se": {"reduction": 4}},
                 "train": {"epochs": 3, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0}, "seeds": [0]},
    "grids": {"one": {"description": "one cell", "axes": {"model.se.reduction": [4]}}},
}


class _Progress:
    """The runner's progress display, quiet, with test hooks at a cell's start and after each epoch."""

    def __init__(self, on_start=None, on_epoch=None) -> None:
        import io

        from ablations.run.progress import GridProgress

        self.inner = GridProgress("one", 1, io.StringIO(), live=False)
        self.on_start, self.on_epoch_hook = on_start, on_epoch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def start_cell(self, cell, epochs: int, done: float = 0.0) -> None:
        self.inner.start_cell(cell, epochs, done)
        if self.on_start:
            self.on_start()

    def on_epoch(self, stats) -> None:
        self.inner.on_epoch(stats)
        if self.on_epoch_hook:
            self.on_epoch_hook(stats)


@pytest.fixture
def one_cell(tmp_path):
    """(cell, client, experiment id, data, checkpoints): one cell of a grid in a real MLflow store."""
    import yaml
    from mlflow import MlflowClient

    from ablations.config import load_experiments, resolve_cells
    from ablations.run.runner import dataset_key, load_data
    from ablations.tracking import ensure_experiment
    from ablations.train.checkpoint import Checkpoints

    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(_GRID))
    cell = resolve_cells(load_experiments(tmp_path / "experiments.yaml"), "one")[0]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = ensure_experiment(client, uri, "one")
    data = load_data([cell], cache_dir=tmp_path / "cache")[dataset_key(cell.config.dataset)]
    return cell, client, exp, data, Checkpoints(tmp_path / "checkpoints")


@pytest.fixture
def stop_requests():
    """STOP as a worker has it: SIGTERM/SIGUSR1 set the stop request. Undone after the test."""
    from ablations.train.checkpoint import STOP

    previous = STOP.install()
    yield STOP
    STOP.restore(previous)
    STOP.reset()


def _signal_stop() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGUSR1)  # a preemption, as SLURM sends it; the handler runs before this returns


class _OomInTraining:
    """A global forward hook, armed when the cell starts training: every training forward fails as a
    GPU out of memory does (from the first step on, or only while `when()` holds)."""

    def __init__(self, when=lambda: True) -> None:
        self.armed, self.when, self.raised = False, when, 0
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.armed and module.training and self.when():
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (simulated)")

    def remove(self) -> None:
        self.handle.remove()


def test_out_of_memory_on_resume_keeps_the_checkpoint_and_the_next_attempt_resumes_it(one_cell, stop_requests):
    """8a: a cell preempted after epoch 1 resumes and runs out of memory at its first step (on a GPU:
    the data copied there against a freshly reset peak). The checkpoint is kept, the run is left
    resumable (KILLED, the reason in `failure_reason`), the queue is told FAILED (a retry counts, so a
    cell that never fits ends failed for good); the next attempt resumes in the same run, no epoch lost."""
    from ablations.run.runner import execute_cell, resumable

    cell, client, exp, data, checkpoints = one_cell
    cpu = torch.device("cpu")
    first = execute_cell(cell, data, client, exp, cpu, _Progress(on_epoch=lambda s: s.epoch == 1 and _signal_stop()),
                         checkpoints=checkpoints)
    assert first.status == "STOPPED" and checkpoints.exists(cell.cell_id)
    stop_requests.reset()

    oom = _OomInTraining()
    try:
        failed = execute_cell(cell, data, client, exp, cpu, _Progress(on_start=lambda: setattr(oom, "armed", True)),
                              checkpoints=checkpoints)
    finally:
        oom.remove()
    assert oom.raised == 1 and failed.status == "FAILED" and "out of memory" in failed.reason
    assert checkpoints.exists(cell.cell_id), "the out-of-memory failure deleted the checkpoint: epoch 1 is lost"
    run = client.get_run(first.run_id)
    assert run.info.status == "KILLED" and "out of memory" in run.data.tags["failure_reason"]
    assert resumable(client, cell, checkpoints)["epoch"] == 1

    done = execute_cell(cell, data, client, exp, cpu, _Progress(), checkpoints=checkpoints)
    assert done.status == "FINISHED" and done.run_id == first.run_id
    assert [m.step for m in client.get_metric_history(done.run_id, "train_loss")] == [1, 2, 3]
    assert client.get_run(done.run_id).data.tags["resumes"] == "2"


@pytest.mark.parametrize("device", DEVICES)
def test_the_residency_decision_is_kept_with_the_checkpoint_and_reused_on_resume(device, monkeypatch):
    """8a: whether a split lives on the device is decided once per cell, after a training epoch has
    measured the peak memory, and saved with the checkpoint. Here the decision function stands in for
    the GPU's sizing: 'does not fit' when first asked, 'fits' when asked again (as a resume's peak,
    reset to zero, would say), and a training step with the training split resident runs out of
    memory (as it would on that GPU). The resumed cell reuses the saved decision: it streams, asks
    nothing and finishes; a checkpoint without a decision (an older one) streams its first resumed
    epoch and decides only after it."""
    import ablations.train.loop as loop
    from ablations.data import is_resident
    from ablations.train import TrainingStopped

    dev = torch.device(device)
    data = _dataset(n_train=64, n_test=32)
    asked: list[str] = []

    def decide(split, on):
        asked.append("train" if split is data.train else "test")
        return len(asked) > 2  # the first decision of each split: does not fit; any later question: fits

    monkeypatch.setattr(loop, "decide_residency", decide)
    oom = _OomInTraining(when=lambda: is_resident(data.train, dev))
    oom.armed = True
    cfg = _config(epochs=2)
    evaluated: list[int] = []
    states: list[dict] = []
    try:
        model = build_model(cfg.model)
        model.register_forward_pre_hook(lambda m, a: evaluated.append(1) if not m.training else None)
        seed_everything(0)
        with pytest.raises(TrainingStopped):  # stopped once epoch 1's training is done
            train(cfg, model, data, dev, on_checkpoint=states.append,
                  should_stop=lambda: ("preempted", "test stop") if evaluated else None)
        state = states[-1]
        assert state["data_resident"] == {"train": False, "test": False} and sorted(asked) == ["test", "train"]

        seed_everything(0)
        resumed = train(cfg, build_model(cfg.model), data, dev, resume=state)
        assert len(resumed.history) == 2 and oom.raised == 0 and len(asked) == 2  # streamed; nothing asked again

        older = {k: v for k, v in state.items() if k != "data_resident"}
        seed_everything(0)
        train(cfg, build_model(cfg.model), data, dev, resume=older)
        assert oom.raised == 0 and len(asked) == 4  # epoch 2 streamed (its peak measured), then decided
    finally:
        oom.remove()
        from ablations.data import clear_device_cache

        clear_device_cache()


def test_a_resident_split_is_freed_when_a_cell_uses_other_data_and_after_out_of_memory():
    """8c: the device copy of a split (on a GPU: the whole training set in GPU memory) is dropped when
    the next cell trains on other data, and by the out-of-memory handler. On the CPU the copy is made
    with device_split, as a GPU cell's residency decision would; the copies are watched by weak reference."""
    cpu = torch.device("cpu")
    previous, other = _dataset(seed=0), _dataset(seed=1)
    gone = weakref.ref(device_split(previous.train, cpu).images)  # the previous cell's training data, resident
    cfg = _config()
    seed_everything(0)
    train(cfg, build_model(cfg.model), other, cpu)
    assert gone() is None, "the previous cell's resident split outlived it"

    kept = weakref.ref(device_split(other.train, cpu).images)
    with pytest.raises(CellFailed, match="out of memory"):
        train(cfg, _OomAfterAllocating([]), other, cpu)
    assert kept() is None, "the out-of-memory handler kept the resident split"


class _BackwardCompileFails:
    """A torch.compile backend as inductor is one: AOTAutograd compiles the forward graph at the first
    call and the backward graph at the first backward; here the backward's compile fails."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def fail(bw_gm, bw_inputs):
            raise self.error

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), bw_compiler=fail)(gm, example_inputs)


def _backward_errors() -> list:
    from torch._inductor.exc import CppCompileError, InductorError

    return [InductorError(RuntimeError("triton: backward kernel failed to compile"), None),  # how inductor reports it
            CppCompileError(["g++", "bw.cpp"], "error: no C++ compiler")]  # a kernel build failing on its own


@pytest.mark.parametrize("error", _backward_errors(), ids=["InductorError", "CppCompileError"])
def test_a_failing_backward_compile_warns_trains_eagerly_and_says_so(monkeypatch, error):
    """8d: the compile fallback covers the first backward too: the backward graph is compiled after the
    forward ran, and its failure used to fail the cell. Now the step is done again eagerly, with a
    warning and the run's `compile` tag saying why."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=_BackwardCompileFails(error)))
    cfg = _config(compile=True)
    seed_everything(0)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        result = train(cfg, build_model(cfg.model), _dataset(n_train=32, n_test=16), torch.device("cpu"))
    assert result.compile_status.startswith("eager fallback") and "compile" in result.compile_status
    assert type(error).__name__ in result.compile_status
    assert len(result.history) == 1 and np.isfinite(result.final.train_loss)


def _a_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """This process sees one CUDA GPU of `capability`, as torch reports it (bf16 emulated below 8.0)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # torch's own answer: True on sm80+, and True below it too unless emulation is excluded
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability >= (8, 0) or including_emulation)


@pytest.mark.parametrize("capability,name,expected", [((7, 0), "V100", "fp32"), ((7, 5), "T4", "fp32"),
                                                       ((8, 0), "A100", "bf16"), ((9, 0), "H100", "bf16")])
def test_precision_auto_takes_bf16_only_on_gpus_that_run_it_natively(monkeypatch, capability, name, expected):
    """8e: `precision: auto` used torch.cuda.is_bf16_supported(), which says True on a V100 or T4 too
    (bf16 emulated, slower than fp32). bf16 is chosen on compute capability 8.0 and up only; below, fp32."""
    from ablations.config import TrainConfig
    from ablations.util.device import native_bf16

    _a_gpu(monkeypatch, capability)
    cuda = torch.device("cuda")
    assert native_bf16(cuda) is (expected == "bf16"), name
    from ablations.train.loop import precision_for

    assert precision_for(TrainConfig(), cuda) == expected
    assert precision_for(TrainConfig(precision="bf16"), cuda) == "bf16"  # asked for: as asked
    assert precision_for(TrainConfig(precision="fp32"), cuda) == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_precision_auto_on_this_gpu_matches_its_capability():
    cfg = _config()
    seed_everything(0)
    result = train(cfg, build_model(cfg.model), _dataset(n_train=32, n_test=16), torch.device("cuda"))
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert result.precision == ("bf16" if native else "fp32")


def test_a_launcher_leaves_the_preflight_to_its_workers_each_on_its_own_gpu(tmp_path, monkeypatch, capsys):
    """8b: with --gpus 1,2 the launcher ran the preflight itself, on cuda:0 (GPU 0, which the run does not
    use), and held that memory for the whole run. Now the launcher runs none (it never touches a GPU)
    and leaves the preflight to each worker, pinned to its own GPU. Here there is no GPU: CUDA is
    reported available, and a worker's preflight fails on the real driver check, which shows it ran."""
    import yaml

    from ablations.config import load_experiments, resolve_cells
    from ablations.errors import EXIT_BAD_INPUT, EXIT_OK
    from ablations.run import RunOptions
    from ablations.run.api import prepare
    from ablations.run.preflight import PREFLIGHT_PASSED_ENV

    if torch.cuda.is_available():
        pytest.skip("shows a failing worker preflight: needs a machine without a GPU")
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(_GRID))
    grids = [("one", resolve_cells(load_experiments(tmp_path / "experiments.yaml"), "one"))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(PREFLIGHT_PASSED_ENV, "")
    monkeypatch.delenv(PREFLIGHT_PASSED_ENV)
    common = dict(config=str(tmp_path / "experiments.yaml"), grids=("one",), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    capsys.readouterr()
    launcher = RunOptions(**common, device="cuda", gpus="1,2")
    assert prepare(launcher, grids) == EXIT_OK, capsys.readouterr().err
    assert capsys.readouterr().err == "" and PREFLIGHT_PASSED_ENV not in os.environ
    worker = RunOptions(**common, device="cuda", launched=True)  # what the launcher starts, CUDA_VISIBLE_DEVICES=<its GPU>
    assert prepare(worker, grids) == EXIT_BAD_INPUT
    assert "preflight failed" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_preflight_gives_its_gpu_memory_back():
    """8b on a GPU: once the preflight's step is done, none of its memory stays reserved."""
    import gc

    from ablations.run.preflight import preflight

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    preflight("cuda")
    assert torch.cuda.memory_reserved() <= before


def test_a_stop_requested_before_the_first_step_does_not_wait_for_the_compile(monkeypatch):
    """8f: the first compiled step compiles the model (a minute or more on a GPU); a stop requested
    before it (while the model and data were set up) stops there, with a checkpoint, compiling nothing."""
    from torch._dynamo.utils import counters

    from ablations.train import TrainingStopped

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg = _config(compile=True)
    states: list[dict] = []
    seed_everything(0)
    before = counters["stats"]["unique_graphs"]
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, build_model(cfg.model), _dataset(n_train=32, n_test=16), torch.device("cpu"),
              on_checkpoint=states.append, should_stop=lambda: ("preempted", "test stop"))
    assert counters["stats"]["unique_graphs"] == before, "the stop waited for the compile"
    assert (stopped.value.epoch, stopped.value.step_in_epoch) == (0, 0)
    assert len(states) == 1 and states[0]["global_step"] == 0
