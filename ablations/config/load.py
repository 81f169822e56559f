"""Reading an experiments file: YAML that refuses repeated keys, one-line errors, every grid and preset validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from ablations.config.cells import expand, preset_layers
from ablations.config.layers import Layer, dataset_layer, defaults_layer, resolve, section_layer
from ablations.config.schema import ConfigError, DatasetConfig, ExperimentsFile
from senet.config import format_validation_error


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


def _check_dataset_values(exps: ExperimentsFile, preset: str, dataset: str, values: dict[str, Any]) -> None:
    """A preset's values for one dataset: a dataset's name as key, and the dataset section's fields."""
    path = f"presets.{preset}.datasets.{dataset}"
    names = get_args(DatasetConfig.model_fields["name"].annotation)
    if dataset not in names:
        raise ConfigError(f"{path}: no such dataset (have: {', '.join(names)})")
    if "name" in values:
        raise ConfigError(f"{path}.name: the key {dataset} names the dataset these values are for; leave name out")
    # on the defaults, as if the cell's dataset had that name (the values only reach such cells)
    named = Layer(path, {"dataset": {"name": dataset}})
    resolve([defaults_layer(exps), section_layer(f"presets.{preset}", exps.presets[preset]), named,
             dataset_layer(path, dataset, values)], exps.defaults.seeds[0])


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
        resolve([defaults_layer(exps), section_layer(f"presets.{name}", preset)], exps.defaults.seeds[0])
        for dataset, values in preset.datasets.items():
            _check_dataset_values(exps, name, dataset, values)
        for grid, values in preset.grids.items():
            if grid not in exps.grids:
                raise ConfigError(f"presets.{name}.grids.{grid}: no such grid (have: {', '.join(exps.grids)})")
            expand(exps, grid, preset_layers(name, preset, grid),
                   values.seeds or preset.seeds or exps.grids[grid].seeds or exps.defaults.seeds)
    for name, grid in exps.grids.items():
        expand(exps, name, (), grid.seeds or exps.defaults.seeds)
    return exps
