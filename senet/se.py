"""The Squeeze-and-Excitation block (Hu et al., Section 3).

    u (B, C, H, W) --squeeze--> z (B, C, 1, 1) --reduce--> relu --expand--> gate --> s
    output = s * u   (channel-wise rescale)

The two FC layers are 1x1 convolutions, as in the released Caffe models: on a
pooled 1x1 map they are exactly the paper's W1 (C/r x C) and W2 (C x C/r), and
with `squeeze="none"` (NoSqueeze, Table 16) the same layers run at every
position. Forward hooks on `<block>.se.gate` see the excitations s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from senet.config import Excitation, Squeeze

_GATES: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "hardsigmoid": nn.Hardsigmoid,
}


class SqueezeExcitation(nn.Module):
    """SE block on `channels` feature maps with hidden width `channels // reduction`."""

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        squeeze: Squeeze = "avg",
        excitation: Excitation = "sigmoid",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if squeeze not in ("avg", "max", "none"):
            raise ValueError(f"squeeze: {squeeze!r} is not one of avg, max, none")
        if excitation not in _GATES:
            raise ValueError(f"excitation: {excitation!r} is not one of {', '.join(_GATES)}")
        hidden = channels // reduction  # exactly C // r: no rounding to a multiple of 8
        if hidden < 1:
            raise ValueError(f"reduction: r={reduction} leaves {channels} channels with 0 hidden units")
        self.channels, self.hidden, self.squeeze = channels, hidden, squeeze
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=bias)
        self.gate = _GATES[excitation]()

    def forward(self, x: Tensor) -> Tensor:
        if self.squeeze == "avg":
            z = x.mean((2, 3), keepdim=True)
        elif self.squeeze == "max":
            z = x.amax((2, 3), keepdim=True)
        else:
            z = x
        s = self.gate(self.expand(self.relu(self.reduce(z))))
        return x * s

    def extra_repr(self) -> str:
        return f"squeeze={self.squeeze}"


