"""experiments.yaml as a validated schema, and its expansion into runnable cells.

A file holds `defaults`, named `grids` (axes to sweep, plus overrides) and named
`presets` (e.g. a smoke test). One cell's config is resolved in layers, each
later one winning:

    defaults < grid overrides < preset < --set items < the variant's axis values

Dicts merge deeply; lists and scalars replace. Every problem surfaces as a
one-line ConfigError that starts with where it came from, e.g.
`grids.reduction.axes.model.se.reduction[4]: r=32 is too large for ...`, and
does so at load time: every cell's model is built on the meta device first.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, get_args

import torch
import yaml
from torch.overrides import TorchFunctionMode
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from senet import build_model
from senet.config import ModelConfig, format_validation_error, short_repr

SECTIONS = ("dataset", "model", "train")  # the keys overrides, axes and --set may touch


class ConfigError(ValueError):
    """A bad experiments file or command line; the message is one line, '<path>: <problem>'."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " "))


# ----------------------------------------------------------------------------- schema


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
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device supports it
    channels_last: Literal["auto"] | bool = "auto"
    compile: bool = False
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


class Preset(_Strict):
    dataset: Overrides = {}
    model: Overrides = {}
    train: Overrides = {}
    seeds: Seeds | None = None


class ExperimentsFile(_Strict):
    defaults: Defaults = Defaults()
    grids: Annotated[dict[str, GridConfig], Field(min_length=1)]
    presets: dict[str, Preset] = {}


# ----------------------------------------------------------------------------- cells


# Not part of what was run: where the data lives, and how often a cell saves its progress.
NOT_IN_ID = {"dataset": {"root", "download"}, "train": {"checkpoint_every"}}


def config_id(cfg: ExperimentConfig) -> str:
    """16 hex digits naming a config: same config, same id, on any machine (NOT_IN_ID left out)."""
    data = cfg.model_dump(mode="json", exclude=NOT_IN_ID)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    grid: str
    variant: str  # e.g. 'r=16', 'squeeze=max, r=8', 'baseline'
    seed: int
    config: ExperimentConfig
    axes: dict[str, Any]  # this variant's axis values ({} for baseline)
    preset: str | None = None  # the --preset it was resolved with: reports keep preset runs apart

    @property
    def cell_id(self) -> str:
        return config_id(self.config)


# ----------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class _Layer:
    """One source of overrides, and how to point at it in an error message."""

    path: str  # 'defaults', 'grids.x', 'presets.smoke', '--set train.lr=0.1', 'grids.x.axes.K[i]'
    data: dict[str, Any]  # nested override
    key: str | None = None  # the dotted key a --set item or axis value sets
    attach: bool = False  # write a deeper error path onto `path` (axis values) rather than quote it


class _Problem(Exception):
    def __init__(self, loc: str, detail: str) -> None:
        super().__init__(f"{loc}: {detail}")
        self.loc, self.detail = loc, detail


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _nest(key: str, value: Any) -> dict[str, Any]:
    """'model.se.reduction', 8 -> {'model': {'se': {'reduction': 8}}}"""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _sets(data: Any, loc: str) -> bool:
    """Whether a nested override spells out the path `loc` (e.g. 'train.milestones[1]')."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", loc):
        if part.startswith("[") and isinstance(data, list) and int(part[1:-1]) < len(data):
            data = data[int(part[1:-1])]
        elif isinstance(data, Mapping) and part in data:
            data = data[part]
        else:
            return False
    return True


def _overlaps(key: str, loc: str) -> bool:
    return loc == key or loc.startswith((key + ".", key + "[")) or key.startswith(loc + ".")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind a field type (unwrapping `X | None`), if any."""
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _known_key(key: str) -> bool:
    """Whether a dotted key names a field of dataset/model/train (e.g. model.se.reduction)."""
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        return False
    model: type[BaseModel] | None = ExperimentConfig
    for part in parts:
        if model is None or part not in model.model_fields:
            return False
        model = _submodel(model.model_fields[part].annotation)
    return True


class _SkipInit(TorchFunctionMode):
    """Meta tensors hold no values, so weight init is pure overhead (seconds per grid on CPU)."""

    _INIT = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in self._INIT:
            return args[0]
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=None)
def _build_problem(model_json: str) -> str | None:
    """Build the model on the meta device (no memory, no compute) and return its complaint."""
    try:
        with torch.device("meta"), _SkipInit():
            build_model(ModelConfig.model_validate_json(model_json))
    except ValueError as exc:
        return str(exc)
    return None


def _try_resolve(layers: Sequence[_Layer], seed: int) -> ExperimentConfig:
    """Merge layers into one config, validate it and build its model; raise _Problem if bad."""
    data: dict[str, Any] = {"dataset": {}, "model": {}, "train": {}, "seed": seed}
    for layer in layers:
        data = _merge(data, layer.data)
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        loc, _, detail = format_validation_error(exc).partition(": ")
        raise _Problem(loc, detail) from None
    problem = _build_problem(cfg.model.model_dump_json())
    if problem is not None:
        head, sep, detail = problem.partition(": ")
        if sep and re.fullmatch(r"[\w.\[\]]+", head):
            raise _Problem(head, detail)
        raise _Problem("model", problem)
    return cfg


def _blame(layers: Sequence[_Layer], loc: str, seed: int) -> _Layer:
    """The layer that caused a problem at `loc`."""
    # An axis value or --set item that sets the key has the last word on it.
    for layer in reversed(layers):
        if layer.key is not None and _overlaps(layer.key, loc):
            return layer
    # Otherwise (e.g. a preset's epochs vs the defaults' warmup): the first layer that makes it appear.
    for k in range(1, len(layers) + 1):
        try:
            _try_resolve(layers[:k], seed)
        except _Problem as p:
            if p.loc == loc:
                return layers[k - 1]
    return layers[-1]


def _locate(layer: _Layer, loc: str, detail: str) -> str:
    if not loc:
        return f"{layer.path}: {detail}"
    if layer.key is None:  # a file section: point into it when it spells out the path itself
        return f"{layer.path}.{loc}: {detail}" if _sets(layer.data, loc) else f"{layer.path}: {loc}: {detail}"
    if loc == layer.key:
        return f"{layer.path}: {detail}"
    if layer.attach and loc.startswith((layer.key + ".", layer.key + "[")):
        return f"{layer.path}{loc[len(layer.key):]}: {detail}"
    return f"{layer.path}: {loc}: {detail}"


def _resolve(layers: Sequence[_Layer], seed: int) -> ExperimentConfig:
    try:
        return _try_resolve(layers, seed)
    except _Problem as p:
        raise ConfigError(_locate(_blame(layers, p.loc, seed), p.loc, p.detail)) from None


# ----------------------------------------------------------------------------- grids


def _fmt(value: Any) -> str:
    """An axis value as it reads in a variant name: [2, 3] -> '2+3', None -> 'none'."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return "{" + " ".join(f"{k}:{_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _label(key: str) -> str:
    return "r" if key == "model.se.reduction" else key.rsplit(".", 1)[-1]


def variant_name(axes: Mapping[str, Any]) -> str:
    return ", ".join(f"{_label(k)}={_fmt(v)}" for k, v in axes.items()) or "baseline"


def _check_axes(name: str, grid: GridConfig) -> None:
    keys = list(grid.axes)
    for key, values in grid.axes.items():
        path = f"grids.{name}.axes.{key}"
        if not _known_key(key):
            hint = " (seeds are set with `seeds:`)" if key in ("seed", "seeds") else ""
            raise ConfigError(f"{path}: unknown key{hint}")
        for other in keys:
            if other.startswith(key + "."):
                raise ConfigError(f"{path}: overlaps axis {other!r}; sweep one or the other")
        for i, v in enumerate(values):
            j = next((j for j in range(i) if values[j] == v), None)
            if j is not None:
                raise ConfigError(f"{path}[{i}]: {short_repr(v)}: duplicate value (same as [{j}])")


def _check_seeds(seeds: Sequence[Any], where: str) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not seeds:
        raise ConfigError(f"{where}: expected at least one seed, e.g. 0,1,2")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError(f"{where}: {short_repr(s)} is not an integer")
        if s < 0:
            raise ConfigError(f"{where}: {s} is negative")
    dup = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if dup is not None:
        raise ConfigError(f"{where}: {dup} repeats")
    return list(seeds)


def _defaults_layer(exps: ExperimentsFile) -> _Layer:
    # Only what the file spelled out, so error paths point at real lines; the schema fills the rest.
    return _Layer("defaults", exps.defaults.model_dump(exclude_unset=True, exclude={"seeds"}))


def _section_layer(path: str, section: BaseModel) -> _Layer:
    return _Layer(path, {k: getattr(section, k) for k in SECTIONS if getattr(section, k)})


class _Probe:
    """Stands in for a --set value, to see whether it reaches the config or a later layer replaces it."""

    def __deepcopy__(self, memo: dict) -> "_Probe":
        return self  # _merge deep-copies values; the probe must stay itself


def _holds(data: Any, probe: _Probe) -> bool:
    if data is probe:
        return True
    if isinstance(data, Mapping):
        return any(_holds(v, probe) for v in data.values())
    return isinstance(data, list) and any(_holds(v, probe) for v in data)


def _replaced_by(layers: Sequence[_Layer], i: int) -> _Layer | None:
    """The later layer that replaces the value layers[i] sets, or None when the value reaches the config."""
    probe = _Probe()
    data: dict[str, Any] = {}
    for layer in layers[:i]:
        data = _merge(data, layer.data)
    data = _merge(data, _nest(layers[i].key or "", probe))
    for layer in layers[i + 1:]:
        data = _merge(data, layer.data)
        if not _holds(data, probe):
            return layer
    return None


def _why_unused(layer: _Layer, grid: str) -> str:
    if layer.path.startswith("--set "):
        return f"the later {layer.path} replaces it"
    if layer.path.endswith(".baseline"):
        return f"grid {grid} has only its baseline, which has no SE block"
    return f"grid {grid} sweeps {layer.key}, so every variant sets its own value"


def _check_sets_used(name: str, base: Sequence[_Layer], variant_layers: Sequence[Sequence[_Layer]]) -> None:
    """A --set item that every variant overrides has no effect: say so rather than run without it."""
    for i, layer in enumerate(base):
        if not layer.path.startswith("--set "):
            continue
        replaced = [_replaced_by([*base, *more], i) for more in variant_layers]
        if all(r is not None for r in replaced):
            raise ConfigError(f"{layer.path}: no cell of grid {name} uses it: {_why_unused(replaced[0], name)}")


# Keys that only one value of another key reads: set for no cell that has it, they change the cell_id only.
_READ_ONLY_WITH = {"train.milestones": ("train.schedule", "multistep"), "train.gamma": ("train.schedule", "multistep")}


def _check_sets_read(name: str, base: Sequence[_Layer], configs: Sequence[ExperimentConfig]) -> None:
    for layer in base:
        if not layer.path.startswith("--set ") or layer.key not in _READ_ONLY_WITH:
            continue
        other, value = _READ_ONLY_WITH[layer.key]
        section, field = other.split(".")
        seen = sorted({str(getattr(getattr(c, section), field)) for c in configs})
        if value not in seen:
            raise ConfigError(f"{layer.path}: no cell of grid {name} uses it: only {other} {value} reads "
                              f"{layer.key}, and every cell has {other} {' or '.join(seen)}")


def _expand(exps: ExperimentsFile, name: str, extra: Sequence[_Layer], seeds: Sequence[int]) -> list[Cell]:
    """Every variant x seed of one grid; extra = the preset and --set layers."""
    grid = exps.grids[name]
    _check_axes(name, grid)
    base = [_defaults_layer(exps), _section_layer(f"grids.{name}", grid), *extra]

    variants: list[tuple[str, dict[str, Any], ExperimentConfig]] = []
    variant_layers: list[list[_Layer]] = []  # each variant's layers after `base`
    if grid.baseline:  # the plain backbone: same recipe, no SE blocks anywhere
        no_se = _Layer(f"grids.{name}.baseline", {"model": {"se": None}}, key="model.se")
        variant_layers.append([no_se])
    indexed = [list(enumerate(values)) for values in grid.axes.values()]
    for combo in itertools.product(*indexed):
        layers = [
            _Layer(f"grids.{name}.axes.{key}[{i}]", _nest(key, value), key=key, attach=True)
            for key, (i, value) in zip(grid.axes, combo)
        ]
        variant_layers.append(layers)
    _check_sets_used(name, base, variant_layers)
    if grid.baseline:
        variants.append(("baseline", {}, _resolve([*base, no_se], seeds[0])))
    for combo, layers in zip(itertools.product(*indexed), variant_layers[1 if grid.baseline else 0:]):
        axes = {key: value for key, (_, value) in zip(grid.axes, combo)}
        cfg = _resolve([*base, *layers], seeds[0])  # first: a bad value's name could be a huge alias bomb
        variants.append((variant_name(axes), axes, cfg))
    _check_sets_read(name, base, [cfg for _, _, cfg in variants])

    names: set[str] = set()
    by_id: dict[str, str] = {}  # config id -> variant name
    for variant, _, cfg in variants:
        if variant in names:
            raise ConfigError(f"grids.{name}.axes: two variants are named {variant!r}; spell their values apart")
        other = by_id.setdefault(config_id(cfg), variant)
        if other != variant:
            raise ConfigError(f"grids.{name}: variants {other!r} and {variant!r} resolve to the same config")
        names.add(variant)

    # Seed-major: after the first pass over the variants there is a complete table to look at.
    return [
        Cell(name, variant, seed, cfg.model_copy(update={"seed": seed}), dict(axes))
        for seed in seeds
        for variant, axes, cfg in variants
    ]


# ----------------------------------------------------------------------------- public API


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a repeated grid name should be an error instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
                          "save the file as UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def load_experiments(path: str | Path) -> ExperimentsFile:
    """Parse and validate an experiments file, down to building every cell's model on meta."""
    path = Path(path)
    raw = _read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: empty file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping (defaults, grids, presets), got {type(raw).__name__}")
    try:
        exps = ExperimentsFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    for name, preset in exps.presets.items():
        _resolve([_defaults_layer(exps), _section_layer(f"presets.{name}", preset)], exps.defaults.seeds[0])
    for name, grid in exps.grids.items():
        _expand(exps, name, (), grid.seeds or exps.defaults.seeds)
    return exps


def parse_set(item: str) -> tuple[str, Any]:
    """'train.epochs=5' -> ('train.epochs', 5); the value is YAML, so 0.1, [2,3], null, true are typed."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. train.epochs=5")
    if not text.strip():
        raise ConfigError(f"--set {item}: missing value (write null for none)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {item}: invalid YAML value: {problem}") from None
    return key, value


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    seeds: list[int] = []
    for part in text.split(","):
        try:
            seeds.append(int(part.strip()))
        except ValueError:
            raise ConfigError(f"--seeds: {part.strip()!r} is not an integer (expected e.g. 0,1,2)") from None
    return _check_seeds(seeds, "--seeds")


def resolve_cells(
    exps: ExperimentsFile,
    grid: str,
    *,
    preset: str | None = None,
    sets: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
) -> list[Cell]:
    """The cells (variant x seed) of one grid, in run order, each model checked on meta."""
    if grid not in exps.grids:
        raise ConfigError(f"--grid {grid}: no such grid (have: {', '.join(exps.grids)})")
    g = exps.grids[grid]
    extra: list[_Layer] = []
    chosen = g.seeds or exps.defaults.seeds
    if preset is not None:
        if preset not in exps.presets:
            have = ", ".join(exps.presets) or "none"
            raise ConfigError(f"--preset {preset}: no such preset (have: {have})")
        p = exps.presets[preset]
        extra.append(_section_layer(f"presets.{preset}", p))
        chosen = p.seeds or chosen
    for item in sets:
        key, value = parse_set(item)
        if not _known_key(key):
            hint = " (use --seeds)" if key in ("seed", "seeds") else ""
            raise ConfigError(f"--set {item}: unknown key{hint}")
        extra.append(_Layer(f"--set {item}", _nest(key, value), key=key))
    if seeds is not None:
        chosen = _check_seeds(list(seeds), "--seeds")
    cells = _expand(exps, grid, extra, chosen)
    return [replace(c, preset=preset) for c in cells] if preset is not None else cells


__all__ = [
    "Cell",
    "ConfigError",
    "DatasetConfig",
    "Defaults",
    "ExperimentConfig",
    "ExperimentsFile",
    "GridConfig",
    "Preset",
    "TrainConfig",
    "config_id",
    "load_experiments",
    "parse_seeds",
    "parse_set",
    "resolve_cells",
    "variant_name",
]
