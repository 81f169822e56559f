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
    """Whether bf16 runs natively here: a CUDA GPU of compute capability 8.0 or more (A100, H100, RTX 30xx
    and later; any ROCm GPU torch supports), or a CPU with AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo
    flags; elsewhere False). Where it does, bf16 autocast measured faster than fp32 on a CPU.

    Not `torch.cuda.is_bf16_supported()`: it says True on a V100 or T4 too, where bf16 is emulated
    (no bf16 tensor cores) and runs slower than fp32."""
    if device.type == "cuda":
        if torch.version.hip:
            return torch.cuda.is_bf16_supported()
        return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)
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
