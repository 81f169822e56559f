"""ResNets and ResNeXt with SE blocks placed by data (stages, integration, position).

Module names, for forward hooks (stages are numbered as in the paper, so the
first residual stage is stage 2; blocks count from 1 within a stage):

    stem                      the input convolution(s)
    stage{S}.block{B}         a residual unit; e.g. stage3.block4 (SE-ResNet-50: SE_3_4)
    stage{S}.block{B}.se      its SE block, wherever `integration`/`position` put it
    stage{S}.block{B}.se.gate the excitation nonlinearity: its output is s (B, C, 1, 1)
    post_norm, pool, fc       the head (post_norm is BN+ReLU for pre-activation nets, else empty)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from senet.archs import ARCHS, Arch
from senet.config import ModelConfig, SEConfig, parse_model_config
from senet.se import SqueezeExcitation


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False)


def _projection(cin: int, cout: int, stride: int, norm: bool = True) -> nn.Module:
    conv = _conv(cin, cout, 1, stride)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(cout))) if norm else conv


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample, then zero-pad the new channels (no parameters)."""

    def __init__(self, cout: int, stride: int) -> None:
        super().__init__()
        self.cout, self.stride = cout, stride

    def forward(self, x: Tensor) -> Tensor:
        # The output keeps the input's layout (channels_last stays channels_last): F.pad allocates
        # in the input's suggested memory format, and the request below is then a no-op, never a copy.
        fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.cout - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2)).contiguous(memory_format=fmt)


class ResidualUnit(nn.Module):
    """Wires branch, shortcut and SE together; subclasses define the branch.

    `se_at` says where the SE block acts (Table 14 and 15):
      standard  on the branch output, before the sum
      pre       on the branch input (the shortcut keeps the unrecalibrated input)
      post      on the unit's output, after the sum (and its ReLU)
      identity  on the shortcut, in parallel to the branch
      3x3       inside the branch, after the 3x3 conv (its BN and ReLU)
    """

    final_relu = True

    def __init__(self) -> None:
        super().__init__()
        self.se_at: str | None = None

    def add_se(self, se: SEConfig, channels: dict[str, int], where: str) -> None:
        self.se_at = where
        self.se = SqueezeExcitation(channels[where], se.reduction, se.squeeze, se.excitation, se.bias)

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(branch input, identity)."""
        return x, self.shortcut(x)

    def maybe_se(self, x: Tensor, where: str) -> Tensor:
        return self.se(x) if self.se_at == where else x

    def forward(self, x: Tensor) -> Tensor:
        x, identity = self.split(x)
        out = self.maybe_se(self.branch(self.maybe_se(x, "pre")), "standard")
        out = out + self.maybe_se(identity, "identity")
        if self.final_relu:
            out = F.relu(out)
        return self.maybe_se(out, "post")


class BasicBlock(ResidualUnit):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "projection") -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv(cout, cout, 3), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(cout, stride)
        else:
            self.shortcut = _projection(cin, cout, stride)
        self.se_channels = {"pre": cin, "standard": cout, "post": cout, "identity": cout}

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(ResidualUnit):
    def __init__(self, cin: int, cout: int, stride: int, mid: int, groups: int = 1, stride_in: str = "1x1") -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        self.conv1, self.bn1 = _conv(cin, mid, 1, s1), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = _conv(mid, mid, 3, s3, groups), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _conv(mid, cout, 1), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else _projection(cin, cout, stride)
        self.se_channels = {"pre": cin, "standard": cout, "post": cout, "identity": cout, "3x3": mid}

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.maybe_se(self.relu(self.bn2(self.conv2(out))), "3x3")
        return self.bn3(self.conv3(out))


class PreActBottleneck(ResidualUnit):
    """BN-ReLU-conv ordering (He et al. 2016b); a projection shortcut takes the pre-activated input."""

    final_relu = False

    def __init__(self, cin: int, cout: int, stride: int, mid: int, stride_in: str = "1x1") -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, mid, 1, s1)
        self.bn2, self.conv2 = nn.BatchNorm2d(mid), _conv(mid, mid, 3, s3)
        self.bn3, self.conv3 = nn.BatchNorm2d(mid), _conv(mid, cout, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None if stride == 1 and cin == cout else _projection(cin, cout, stride, norm=False)
        self.se_channels = {"pre": cin, "standard": cout, "post": cout, "identity": cout, "3x3": mid}

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.relu(self.bn1(x))
        return a, (x if self.shortcut is None else self.shortcut(a))

    def branch(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.maybe_se(self.conv2(self.relu(self.bn2(out))), "3x3")
        return self.conv3(self.relu(self.bn3(out)))


_BLOCKS: dict[str, type[ResidualUnit]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_bottleneck": PreActBottleneck,
}
# The options each block kind takes, besides (cin, cout, stride). A block takes the options it uses and
# no others: an option it would ignore changes the config (and cell_id) but not the model.
_BLOCK_OPTIONS: dict[str, tuple[str, ...]] = {
    "basic": ("shortcut",),
    "bottleneck": ("mid", "groups", "stride_in"),
    "preact_bottleneck": ("mid", "stride_in"),
}


def _block_options(name: str, arch: Arch, stride_in: str | None, mid: int | None) -> dict[str, Any]:
    """The keyword options of `name`'s blocks; an option its block kind does not take is an error."""
    takes = _BLOCK_OPTIONS[arch.block]
    if stride_in is not None and "stride_in" not in takes:
        raise ValueError(f"model.stride_in: {name} has {arch.block} blocks, which have no 1x1 conv to "
                         "put the stride in; leave stride_in out")
    given = {"mid": mid, "groups": arch.groups, "shortcut": arch.shortcut, "stride_in": stride_in or arch.stride_in}
    defaults = {"mid": None, "groups": 1, "shortcut": "projection", "stride_in": "1x1"}
    unused = [k for k in given if k not in takes and given[k] != defaults[k]]
    if unused:  # an Arch entry that sets what its block ignores (e.g. groups on pre-activation bottlenecks)
        raise ValueError(f"model.arch: {name} sets {', '.join(unused)}, which {arch.block} blocks do not take")
    return {k: given[k] for k in takes}


def _se_where(name: str, arch: Arch, se: SEConfig) -> str:
    if se.position == "output":
        return se.integration
    if arch.block == "basic":
        raise ValueError(f"model.se.position: '3x3' needs bottleneck blocks, and {name} has basic blocks")
    if se.integration != "standard":
        raise ValueError(f"model.se.position: '3x3' works with integration 'standard' only, not {se.integration!r}")
    return "3x3"


class ResNet(nn.Module):
    def __init__(self, arch: Arch, num_classes: int, se: SEConfig | None = None, name: str = "resnet", stride_in: str | None = None) -> None:
        super().__init__()
        self.arch = arch
        if arch.stem == "imagenet":
            self.stem = nn.Sequential(OrderedDict(
                conv=_conv(3, arch.stem_width, 7, 2), bn=nn.BatchNorm2d(arch.stem_width),
                relu=nn.ReLU(inplace=True), pool=nn.MaxPool2d(3, 2, 1),
            ))
        elif arch.block == "preact_bottleneck":  # the first unit's BN-ReLU pre-activates the stem
            self.stem = nn.Sequential(OrderedDict(conv=_conv(3, arch.stem_width, 3)))
        else:
            self.stem = nn.Sequential(OrderedDict(
                conv=_conv(3, arch.stem_width, 3), bn=nn.BatchNorm2d(arch.stem_width), relu=nn.ReLU(inplace=True),
            ))

        se_stages: set[int] = set()
        if se is not None:
            se_stages = set(arch.stages) if se.stages == "all" else set(se.stages)
            missing = sorted(se_stages - set(arch.stages))
            if missing:
                have = ", ".join(map(str, arch.stages))
                raise ValueError(f"model.se.stages: stage {missing[0]} does not exist in {name} (stages {have})")
            where = _se_where(name, arch, se)

        block_cls = _BLOCKS[arch.block]
        cin = arch.stem_width
        mids = arch.mids or (None,) * len(arch.depths)
        self.stage_names: list[str] = []
        for stage, depth, cout, mid in zip(arch.stages, arch.depths, arch.widths, mids):
            blocks = OrderedDict()
            for b in range(depth):
                stride = 2 if b == 0 and stage != arch.stages[0] else 1
                block = block_cls(cin, cout, stride, **_block_options(name, arch, stride_in, mid))
                if stage in se_stages:
                    channels = block.se_channels[where]
                    if channels // se.reduction < 1:
                        raise ValueError(
                            f"model.se.reduction: r={se.reduction} is too large for stage {stage} of {name}: "
                            f"{channels} channels // {se.reduction} = 0 hidden units"
                        )
                    block.add_se(se, block.se_channels, where)
                blocks[f"block{b + 1}"] = block
                cin = cout
            self.add_module(f"stage{stage}", nn.Sequential(blocks))
            self.stage_names.append(f"stage{stage}")

        preact = arch.block == "preact_bottleneck"
        self.post_norm = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.post_norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> ResNet:
    """Build the model a `model:` mapping describes (see senet.config.ModelConfig)."""
    cfg = parse_model_config(cfg)
    return ResNet(ARCHS[cfg.arch], cfg.num_classes, cfg.se, cfg.arch, cfg.stride_in)


def se_blocks(model: nn.Module) -> dict[str, SqueezeExcitation]:
    """Every SE block by module name, in forward order, e.g. {'stage2.block1.se': ...}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SqueezeExcitation)}
