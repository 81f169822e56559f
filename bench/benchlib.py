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
