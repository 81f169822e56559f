"""Preflight: one real training step on the run's device, with the run's settings, before any cell is claimed.

    python -m ablations.run.preflight --device cuda --tracking-uri sqlite:///mlflow.db [--compile]

It exercises what a grid will use - the device, bf16 autocast, fused SGD, channels_last,
torch.compile when on, the batch iterator, evaluation - through `train()` itself on a
few random images of the cell's size, then writes (and deletes) one MLflow run in the store.
It takes seconds (plus one compile when compile is on: inductor's on-disk cache then serves
the cells' own compiles of the same model and shapes).

Exit 0 when all of it works; exit 2 with the cause on one line otherwise (no CUDA, a driver
that does not match torch, a missing package, an unwritable store, a step that fails).
`run_ablation.py` runs it before a grid on a GPU, on the device the work uses: a plain run or a
worker on its own device; a launcher (--workers/--gpus) leaves it to each of its workers, each
pinned to its GPU. It frees what it used on the device before returning. It also runs on a CPU
(`--device cpu`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import time
import uuid
from typing import Sequence

import torch

from ablations.errors import EXIT_BAD_INPUT, EXIT_OK

# Set once a preflight passed in this process; a process it starts with this environment (on the same
# device) skips its own. A launcher runs none: its workers, each on its own GPU, run theirs.
PREFLIGHT_PASSED_ENV = "SENET_PREFLIGHT_PASSED"
PREFLIGHT_EXPERIMENT = "_preflight"


class PreflightFailed(Exception):
    """The cause, in one line."""


def cuda_problem(spec: str) -> str | None:
    """Why `spec` (a cuda device) cannot be used, or None."""
    if torch.version.cuda is None:
        return f"no CUDA: this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
    try:
        torch.cuda.init()  # raises the driver's own words ("driver too old", "no CUDA-capable device")
    except Exception as exc:  # noqa: BLE001 - any failure here is the cause to report
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        low = text.lower()
        kind = ("no CUDA" if "no nvidia driver" in low else
                "driver/torch mismatch" if "driver" in low else "no usable CUDA device")
        return f"{kind}: {text} (torch {torch.__version__} built for CUDA {torch.version.cuda})"
    count = torch.cuda.device_count()
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return f"no CUDA device visible (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "no CUDA device"
    index = torch.device(spec).index or 0
    if index >= count:
        return f"--device {spec}: only {count} CUDA device(s) visible"
    return None


def _check_packages(names: Sequence[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - ImportError, or a package broken at import
            raise PreflightFailed(f"missing package: {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:150]}); "
                                  f"pip install {name}") from None


def _tiny_dataset(image_size: int, n_train: int, n_test: int, num_classes: int):
    from ablations.data import noise_dataset

    return noise_dataset(image_size, n_train, n_test, num_classes, source="preflight")


def _training_step(config, device: torch.device) -> str:
    """Train `config`'s model for one step (plus one evaluation); describe what ran."""
    from ablations.train import CellFailed, train
    from senet import build_model

    classes = min(config.model.num_classes, 10)
    config = config.model_copy(update={
        "model": config.model.model_copy(update={"num_classes": classes}),
        "train": config.train.model_copy(update={"epochs": 1, "warmup_epochs": 0.0}),
    })
    from ablations.config import expected_image_size

    image_size = expected_image_size(config.dataset)
    bs = config.train.batch_size
    data = _tiny_dataset(image_size, bs, max(2, min(bs, 16)), classes)
    torch.manual_seed(0)
    try:
        result = train(config, build_model(config.model), data, device, sync_every=1)
    except CellFailed as exc:
        raise PreflightFailed(f"the training step failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever breaks the step is the cause to report
        raise PreflightFailed(f"the training step failed: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
    if result.compile_status.startswith("eager fallback"):
        raise PreflightFailed(f"torch.compile does not work here ({result.compile_status}); "
                              "set train.compile=false or fix the compiler")
    cuda = device.type == "cuda"
    return (f"{config.model.arch} {image_size}px batch {bs}: "  # what train() chose, as the cells will
            f"{'bf16 autocast' if result.precision == 'bf16' else result.precision}, "
            f"{'channels_last' if result.channels_last else 'NCHW'}, {'fused' if cuda else 'foreach'} SGD, "
            f"compile {result.compile_status}")


def _give_back(device: torch.device) -> None:
    """Free what the step left on the device: its compiled graphs, then the allocator's cached blocks
    (the step's tensors died with it). A worker's cells, sized against the device's free memory,
    then find it as it was."""
    import gc

    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _store_write(tracking_uri: str) -> None:
    """Write one run into an experiment of this process's own, then delete both: the store takes writes,
    and `--report` (every experiment in the store) and the MLflow UI never see them.

    The experiment is this probe's alone (named after the host, the process and a random token): the
    tasks of a job array start together, and a shared one would be created, deleted and restored by
    all of them at once, failing some. A busy SQLite store is waited for, as every write of a grid is."""
    try:
        from ablations.tracking import client_for

        client = client_for(tracking_uri)
        name = f"{PREFLIGHT_EXPERIMENT}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        exp_id = client.create_experiment(name)
        run = client.create_run(exp_id, tags={"preflight": "1"})
        client.log_metric(run.info.run_id, "preflight", 1.0)
        client.set_terminated(run.info.run_id, "FINISHED")
        client.delete_run(run.info.run_id)
        client.delete_experiment(exp_id)
    except Exception as exc:  # noqa: BLE001 - sqlite, filesystem and server errors all mean "cannot write"
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise PreflightFailed(f"tracking store {tracking_uri} is not writable: {text}") from None


def preflight(device_spec: str, config=None, tracking_uri: str | None = None) -> str:
    """Run every check; return a one-line summary, or raise PreflightFailed with the cause."""
    from ablations.config import ExperimentConfig

    t0 = time.perf_counter()
    if device_spec.startswith("cuda") or device_spec == "auto":
        problem = cuda_problem("cuda" if device_spec == "auto" else device_spec)
        if problem:
            raise PreflightFailed(problem)
    device = torch.device("cuda" if device_spec == "auto" else device_spec)
    config = config or ExperimentConfig.model_validate({"model": {"arch": "resnet20", "num_classes": 10,
                                                                  "se": {"reduction": 4}},
                                                        "train": {"batch_size": 32}, "seed": 0})
    packages = ["mlflow", "optuna", "pydantic", "numpy"]
    if config.train.compile and device.type == "cuda":
        packages.append("triton")  # inductor's GPU code generation
    _check_packages(packages)
    if tracking_uri:
        _store_write(tracking_uri)  # before the step: a bad store is the commonest and cheapest failure
    try:
        what = _training_step(config, device)
    finally:
        _give_back(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    store = f"; MLflow write ok ({tracking_uri})" if tracking_uri else ""
    return f"preflight ok on {device} ({name}): {what}{store}; {time.perf_counter() - t0:.1f} s"


def run_or_exit_code(device_spec: str, config=None, tracking_uri: str | None = None) -> int:
    """For the CLI: print the outcome on one line (stderr); EXIT_OK or EXIT_BAD_INPUT."""
    try:
        print(preflight(device_spec, config, tracking_uri), file=sys.stderr, flush=True)
    except PreflightFailed as exc:
        print(f"preflight failed: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    os.environ[PREFLIGHT_PASSED_ENV] = "1"
    return EXIT_OK


def gate(grids: Sequence[tuple[str, Sequence]], *, device: str, gpus: str | None = None,
         tracking_uri: str | None = None, launcher: bool = False) -> int:
    """run_ablation.py's hook: on a GPU, preflight the first cell's settings before any cell is claimed.

    `device`, `gpus` (as written, e.g. "0,1") and `tracking_uri` (None: the default store) are the run's.
    `launcher`: this process starts workers (--workers/--gpus); it runs no preflight and touches no
    GPU: each worker, pinned to its own GPU, runs its own there before it claims a cell (the
    launcher's would have run on cuda:0 whatever --gpus said, and held its memory all run long).
    Returns 0 to go on (passed, not on a GPU, or left to the workers), else EXIT_BAD_INPUT after
    printing the cause, or the stop's exit code when a stop was requested during the preflight.
    """
    on_gpu = device.startswith("cuda") or bool(gpus) or (device == "auto" and torch.cuda.is_available())
    cells = [c for _, grid in grids for c in grid]
    if not on_gpu or not cells or os.environ.get(PREFLIGHT_PASSED_ENV):
        return EXIT_OK
    if gpus and not torch.cuda.is_available():  # name the option that asked for a GPU
        from ablations.config import ConfigError

        raise ConfigError("--gpus: CUDA is not available on this machine")
    if launcher:
        return EXIT_OK
    from ablations.tracking import default_tracking_uri
    from ablations.train.checkpoint import STOP, exit_code_for

    spec = "cuda" if gpus or device == "auto" else device
    code = run_or_exit_code(spec, cells[0].config, tracking_uri or default_tracking_uri())
    if code == EXIT_OK and (why := STOP.check()) is not None:  # asked to stop while the step (a compile) ran
        print(f"stopped: {why[1]} during the preflight; no cell was claimed, run again to continue",
              file=sys.stderr, flush=True)
        return exit_code_for(why[0])
    return code


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ablations.run.preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", required=True, help="cuda | cuda:N | cpu (no default: say which one the run uses)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store to write one (deleted) run to")
    p.add_argument("--arch", default="resnet20", help="model architecture (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="input size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="include torch.compile")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = p.parse_args(argv)
    from ablations.config import ConfigError, ExperimentConfig

    try:
        config = ExperimentConfig.model_validate({
            "dataset": {"name": "synthetic", "image_size": args.image_size},
            "model": {"arch": args.arch, "num_classes": 10, "se": {"reduction": 4}},
            "train": {"batch_size": args.batch_size, "compile": args.compile, "precision": args.precision},
            "seed": 0,
        })
    except (ConfigError, ValueError) as exc:
        print(f"preflight failed: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_or_exit_code(args.device, config, args.tracking_uri)


if __name__ == "__main__":
    raise SystemExit(main())
