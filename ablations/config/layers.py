"""One cell's config resolved from ordered override layers, with a bad value blamed on the layer that set it.

    defaults < grid overrides < preset < --set items < the variant's axis values

(a preset: its own values < its values for the grid < its values for the cell's dataset, by name)

Dicts merge deeply; lists and scalars replace. The merged config is validated, then its model is
built on the meta device; a problem becomes a one-line ConfigError that starts with the path of
the layer at fault (e.g. `grids.reduction.axes.model.se.reduction[4]: ...`).
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, get_args

import torch
from pydantic import BaseModel, ValidationError
from torch.overrides import TorchFunctionMode

from ablations.config.schema import SECTIONS, ConfigError, DatasetConfig, ExperimentConfig, ExperimentsFile
from senet import build_model
from senet.config import ModelConfig, format_validation_error


@dataclass(frozen=True)
class Layer:
    """One source of overrides, and how to point at it in an error message."""

    path: str  # 'defaults', 'grids.x', 'presets.smoke', '--set train.lr=0.1', 'grids.x.axes.K[i]'
    data: dict[str, Any]  # nested override
    key: str | None = None  # the dotted key a --set item or axis value sets
    attach: bool = False  # write a deeper error path onto `path` (axis values) rather than quote it
    for_dataset: str | None = None  # applies only to cells whose dataset has this name (a preset's `datasets:`)


class _Problem(Exception):
    def __init__(self, loc: str, detail: str) -> None:
        super().__init__(f"{loc}: {detail}")
        self.loc, self.detail = loc, detail


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def nest(key: str, value: Any) -> dict[str, Any]:
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


def known_key(key: str) -> bool:
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


def _try_resolve(layers: Sequence[Layer], seed: int) -> ExperimentConfig:
    """Merge layers into one config, validate it and build its model; raise _Problem if bad."""
    data: dict[str, Any] = {"dataset": {}, "model": {}, "train": {}, "seed": seed}
    for layer in layers:
        data = merge(data, layer.data)
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


def _blame(layers: Sequence[Layer], loc: str, seed: int) -> Layer:
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


def _locate(layer: Layer, loc: str, detail: str) -> str:
    if not loc:
        return f"{layer.path}: {detail}"
    if layer.key is None:  # a file section: point into it when it spells out the path itself
        # a preset's `datasets.<name>` holds the dataset section's fields themselves
        inner = loc.removeprefix("dataset.") if layer.for_dataset is not None else loc
        return f"{layer.path}.{inner}: {detail}" if _sets(layer.data, loc) else f"{layer.path}: {loc}: {detail}"
    if loc == layer.key:
        return f"{layer.path}: {detail}"
    if layer.attach and loc.startswith((layer.key + ".", layer.key + "[")):
        return f"{layer.path}{loc[len(layer.key):]}: {detail}"
    return f"{layer.path}: {loc}: {detail}"


def resolve(layers: Sequence[Layer], seed: int) -> ExperimentConfig:
    """The config the layers resolve to, its model checked on meta; else a ConfigError naming the layer at fault."""
    try:
        return _try_resolve(layers, seed)
    except _Problem as p:
        raise ConfigError(_locate(_blame(layers, p.loc, seed), p.loc, p.detail)) from None


def dataset_layer(path: str, name: str, values: Mapping[str, Any]) -> Layer:
    """A preset's values for the cells of one dataset (`presets.P.datasets.<name>`)."""
    return Layer(path, {"dataset": dict(values)}, for_dataset=name)


def for_cell(layers: Sequence[Layer]) -> list[Layer]:
    """The layers one cell resolves from: a layer for one dataset only where the cell's dataset has that
    name, as every other layer (axis values and --set items included) leaves it."""
    data: dict[str, Any] = {}
    for layer in layers:
        if layer.for_dataset is None:
            data = merge(data, layer.data)
    section = data.get("dataset")
    name = section.get("name", DatasetConfig.model_fields["name"].default) if isinstance(section, Mapping) else None
    return [layer for layer in layers if layer.for_dataset in (None, name)]


def defaults_layer(exps: ExperimentsFile) -> Layer:
    # Only what the file spelled out, so error paths point at real lines; the schema fills the rest.
    return Layer("defaults", exps.defaults.model_dump(exclude_unset=True, exclude={"seeds"}))


def section_layer(path: str, section: BaseModel) -> Layer:
    return Layer(path, {k: getattr(section, k) for k in SECTIONS if getattr(section, k)})
