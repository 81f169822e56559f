"""Squeeze-and-Excitation networks: the SE block, SE-ResNets and complexity counts."""

from senet.complexity import Complexity, complexity
from senet.config import ModelConfig, SEConfig, parse_model_config
from senet.resnet import ARCHS, ResNet, build_model, se_blocks
from senet.se import SqueezeExcitation

__all__ = [
    "ARCHS",
    "Complexity",
    "ModelConfig",
    "ResNet",
    "SEConfig",
    "SqueezeExcitation",
    "build_model",
    "complexity",
    "parse_model_config",
    "se_blocks",
]
