"""experiments.yaml's schema: the validated shape of every section, and ConfigError for what does not fit.

Every model is frozen and strict (see _Strict); cross-field checks that need more than one
section (a grid's axes, the models they build) live in layers.py and cells.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationInfo,
    field_validator,
)

from senet.config import ModelConfig

SECTIONS = ("dataset", "model", "train")  # the keys overrides, axes and --set may touch


class ConfigError(ValueError):
    """A bad experiments file or command line; the message is one line, '<path>: <problem>'."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " "))


class _Strict(BaseModel):
    # inf/nan would poison both training and the canonical JSON behind cell ids;
    # validate_default so cross-field checks also see defaults (e.g. nesterov with momentum 0);
    # strict: `epochs: true` or `epochs: "3"` is a mistake, not 1 or 3 (floats: see Float)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True,
                              strict=True)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml_float(v: Any) -> Any:
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it, and ints, but never a bool
    if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
        return float(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


Float = Annotated[float, BeforeValidator(_yaml_float)]


def _unique(v: list[Any]) -> list[Any]:
    if len(set(v)) != len(v):
        raise ValueError("repeats a value")
    return v


def _increasing(v: list[float]) -> list[float]:
    if any(b <= a for a, b in zip(v, v[1:])):
        raise ValueError("must be strictly increasing")
    return v


# Non-negative because numpy's seeding rejects negative seeds.
Seeds = Annotated[list[NonNegativeInt], Field(min_length=1), AfterValidator(_unique)]
Fraction = Annotated[Float, Field(gt=0, lt=1)]
Overrides = dict[str, Any]  # a partial section, validated once merged into a full config


class DatasetConfig(_Strict):
    # imagenette, imagewoof, imagenet: image-folder trees under their own name, so that runs, cell
    # ids and reports tell them apart (root is left out of cell ids: it is where, not what).
    name: Literal["cifar10", "cifar100", "imagefolder", "imagenette", "imagewoof", "imagenet", "synthetic"] = "cifar10"
    root: str = "data"
    # class names or indices, or the path of a class list file (one id per line, e.g. ImageNet-100)
    classes: Annotated[list[str | int], Field(min_length=1), AfterValidator(_unique)] | Annotated[
        str, Field(min_length=1)] | None = None
    train_size: PositiveInt | None = None  # a seeded random subset (subset_seed) when set
    test_size: PositiveInt | None = None
    subset_seed: int = 0
    image_size: PositiveInt | None = None  # None: the dataset's own size; image trees: the crop (128, 160, 224)
    download: bool = True


class TrainConfig(_Strict):
    """SGD recipe. Defaults: the usual CIFAR ResNet recipe (0.1 per 128 images, SGD+Nesterov,
    wd 5e-4, cosine) shortened to 30 epochs; experiments.yaml normally sets them all."""

    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    lr: Annotated[Float, Field(gt=0)] = 0.1  # peak learning rate
    momentum: Float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: Float = Field(5e-4, ge=0)
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    schedule: Literal["cosine", "onecycle", "multistep"] = "cosine"
    warmup_epochs: Float = Field(0.0, ge=0)  # linear warmup; may be fractional
    milestones: Annotated[list[Fraction], AfterValidator(_increasing)] = [0.5, 0.75]  # multistep: fractions of the run where lr *= gamma
    gamma: Float = Field(0.1, gt=0, le=1)
    # auto: what measured fastest on the device (bench/RESULTS.md): bf16 autocast on a GPU and on a CPU
    # with native bf16 (AVX512-BF16 or AMX), else fp32; channels_last with bf16; compile on a GPU only.
    # The run records what was chosen as its tags precision, channels_last and compile.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: Literal["auto"] | bool = "auto"
    compile: Literal["auto"] | bool = False
    eval_flip: bool = False  # test-time augmentation: each test image's logits plus its mirror image's
    eval_batch_size: PositiveInt | None = None  # None: twice batch_size (no gradients to hold)
    checkpoint_every: PositiveInt = 1  # epochs between checkpoints; not part of the cell id (NOT_IN_ID)

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("momentum") == 0:  # torch.optim.SGD refuses this at run time
            raise ValueError("needs momentum > 0")
        return v

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_shorter_than_run(cls, v: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")
        if epochs is not None and v >= epochs:
            raise ValueError(f"must be less than epochs ({epochs})")
        return v


class ExperimentConfig(_Strict):
    """One fully resolved cell: everything a training run needs."""

    dataset: DatasetConfig
    model: ModelConfig
    train: TrainConfig
    seed: NonNegativeInt


class Defaults(_Strict):
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    seeds: Seeds = [0]


class GridConfig(_Strict):
    description: str
    paper_table: int | None = None
    # axis key (dotted, e.g. model.se.reduction) -> the values it takes, swept as a cartesian product
    axes: Annotated[dict[str, Annotated[list[Any], Field(min_length=1)]], Field(min_length=1)]
    baseline: bool = False  # add a 'baseline' variant without SE blocks
    dataset: Overrides = {}
    model: Overrides = {}
    train: Overrides = {}
    seeds: Seeds | None = None


class PresetGrid(_Strict):
    """A preset's values for one grid (e.g. the grid's own backbone), applied after the preset's own."""

    dataset: Overrides = {}
    model: Overrides = {}
    train: Overrides = {}
    seeds: Seeds | None = None


class Preset(_Strict):
    # A preset that makes real results names its study, e.g. "CPU-scale study (...)": reports carry that
    # label (never "<name> preset", which marks a pipeline check) and go beside the other real results.
    study: str | None = None
    dataset: Overrides = {}
    model: Overrides = {}
    train: Overrides = {}
    seeds: Seeds | None = None
    grids: dict[str, PresetGrid] = {}
    # Dataset values for the cells of one dataset (by its name), over `dataset:` and `grids:` above: a
    # preset's sizes made for CIFAR may ask more images than a smaller dataset has (e.g. the Imagenette sample).
    datasets: dict[str, Overrides] = {}


class ExperimentsFile(_Strict):
    defaults: Defaults = Defaults()
    grids: Annotated[dict[str, GridConfig], Field(min_length=1)]
    presets: dict[str, Preset] = {}
