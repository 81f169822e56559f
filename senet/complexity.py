"""Parameter and multiply-add counts, as the SENet paper counts them.

- params:        trainable parameters.
- caffe_params:  what the paper's Params column counts: Caffe stores BatchNorm's running
                 mean and variance as blobs (plus one scale-factor scalar per layer), so
                 they count as parameters. This reproduces Tables 10, 13, 15, 16 to 0.1M.
- macs:          multiply-adds of conv and linear layers, plus the SE block's global
                 pooling and channel-wise rescale at one per element. Without the latter
                 SE-ResNet-50 comes to 3.8605 G, not the paper's 3.87.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from senet.se import SqueezeExcitation


@dataclass(frozen=True)
class Complexity:
    params: int
    caffe_params: int
    macs: int

    @property
    def gflops(self) -> float:
        """Billions of multiply-adds, the paper's "GFLOPs"."""
        return self.macs / 1e9


def _per_sample(t: Tensor) -> int:
    return t.numel() // t.shape[0]


def _macs_of(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return _per_sample(out) * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return _per_sample(out) * module.in_features
    if isinstance(module, SqueezeExcitation):
        pooling = 0 if module.squeeze == "none" else _per_sample(inp)
        return pooling + _per_sample(inp)  # + the rescale s * u
    return 0


def count_macs(model: nn.Module, input_size: int | Sequence[int]) -> int:
    """Multiply-adds of one forward pass of a single image of `input_size`."""
    if isinstance(input_size, int):
        input_size = (3, input_size, input_size)
    shape = tuple(input_size)
    if len(shape) == 3:
        shape = (1, *shape)
    total = 0

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        total += _macs_of(module, args[0], out)

    kinds = (nn.Conv2d, nn.Linear, SqueezeExcitation)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    first = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device=first.device, dtype=first.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, Caffe-style) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bn_blobs = sum(
        m.running_mean.numel() + m.running_var.numel() + 1
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return trainable, trainable + bn_blobs


def complexity(model: nn.Module, input_size: int | Sequence[int] = (3, 224, 224)) -> Complexity:
    """Params, Caffe-style params and multiply-adds; works on a model on the meta device too."""
    params, caffe = count_params(model)
    return Complexity(params, caffe, count_macs(model, input_size))
