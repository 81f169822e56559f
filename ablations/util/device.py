"""The torch device a run asks for (`auto`, `cpu`, `cuda`, `cuda:N`), checked against this machine."""

from __future__ import annotations

import functools

import torch


def resolve_device(spec: str | torch.device) -> torch.device:
    """`auto` is the GPU when there is one; a CUDA device on a machine without CUDA is a ValueError."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively here: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX-BF16
    (Linux /proc/cpuinfo flags; elsewhere False). Where it does, bf16 autocast measured faster than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


__all__ = ["native_bf16", "resolve_device"]
