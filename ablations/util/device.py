"""The torch device a run asks for (`auto`, `cpu`, `cuda`, `cuda:N`), checked against this machine."""

from __future__ import annotations

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


__all__ = ["resolve_device"]
