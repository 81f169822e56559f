"""What the benchmarks share: a device sync for honest timings, the machine they ran on, and
safe archive extraction."""

from __future__ import annotations

import datetime as dt
import os
import platform
import tarfile
from pathlib import Path
from typing import Any

import torch


DEVICE_HELP = "cpu | cuda | cuda:N, required: a GPU run must say so, and never falls back to the CPU"


def bench_device(spec: str) -> torch.device:
    """The device a benchmark was told to use. No 'auto': a GPU benchmark that quietly ran on the
    CPU would publish CPU figures as GPU figures. Exits 2 (one line) when CUDA is asked for and absent."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SystemExit(f"error: --device {spec}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {spec}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {spec}: CUDA is not available here (torch {torch.__version__}); "
                         "refusing to run on the CPU instead")
    return device


def preflight_cuda(device: torch.device, compile: bool = False) -> None:
    """Before a GPU benchmark: one real training step with the harness's GPU settings; exit 2 with the cause."""
    if device.type != "cuda":
        return
    from ablations.run.preflight import PreflightFailed, preflight

    from ablations.config import ExperimentConfig

    config = ExperimentConfig.model_validate({"model": {"arch": "resnet20", "num_classes": 10, "se": {"reduction": 4}},
                                              "train": {"batch_size": 128, "compile": compile}, "seed": 0})
    try:
        print(preflight(str(device), config), flush=True)
    except PreflightFailed as exc:
        raise SystemExit(f"preflight failed: {exc}") from None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Date, versions and machine, for the JSON and RESULTS.md."""
    import torchvision

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "host": platform.node(),
    }
    if device.type == "cuda":
        env.update(cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        env.update(loadavg_1_5_15=list(os.getloadavg()))
    return env


def extract_all(tar: tarfile.TarFile, dst: Path) -> None:
    try:
        tar.extractall(dst, filter="data")  # refuses absolute paths and links out of dst
    except TypeError:  # Python without extraction filters
        tar.extractall(dst)
