"""A grid's expansion into runnable cells (variant x seed): their variant names and content-hashed ids.

A cell id hashes the config as trained (`model.num_classes` filled in from the dataset), so the
config `--dry-run --json` prints names the same cell when written back, and two grids that reach
the same config share the cell. Cells named by the rule before that (`legacy_id`) stay theirs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from ablations.config.classes import as_trained
from ablations.config.layers import Layer, dataset_layer, defaults_layer, for_cell, known_key, nest, resolve, section_layer
from ablations.config.overrides import check_seeds, check_sets_read, check_sets_used, set_layer
from ablations.config.schema import ConfigError, ExperimentConfig, ExperimentsFile, GridConfig, Preset
from senet.config import short_repr

# Not part of what was run: where the data lives, and how often a cell saves its progress.
NOT_IN_ID = {"dataset": {"root", "download"}, "train": {"checkpoint_every"}}
# Options that enter the id only when they differ from the value listed here: adding one (at that
# value as its default) renames no cell. A field missing from the schema is skipped.
ID_IF_SET: dict[str, dict[str, Any]] = {"train": {"eval_flip": False, "compile": False}}
# Fields the legacy rule never saw (added since); a cell that sets one has no legacy id.
NOT_IN_LEGACY = {"train": {"eval_flip": False}}


def _digest(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _drop_at(data: dict[str, Any], listed: Mapping[str, Mapping[str, Any]]) -> bool:
    """Remove from `data` the listed fields at their listed value; whether every listed field present was."""
    all_at = True
    for section, fields in listed.items():
        part = data.get(section)
        if not isinstance(part, dict):
            continue
        for name, value in fields.items():
            if name in part:
                if part[name] == value:
                    del part[name]
                else:
                    all_at = False
    return all_at


def config_id(cfg: ExperimentConfig) -> str:
    """16 hex digits naming a config: same config, same id, on any machine (NOT_IN_ID left out,
    ID_IF_SET fields left out at their listed value). Hash the config as trained (`as_trained`)."""
    data = cfg.model_dump(mode="json", exclude=NOT_IN_ID)
    _drop_at(data, ID_IF_SET)
    return _digest(data)


def legacy_config_id(cfg: ExperimentConfig) -> str | None:
    """The id the rule before this one gave `cfg` (as resolved, before the class count was filled
    in; every field but NOT_IN_ID), or None when the cell sets an option that rule never saw."""
    data = cfg.model_dump(mode="json", exclude=NOT_IN_ID)
    if not _drop_at(data, NOT_IN_LEGACY):
        return None
    return _digest(data)


@dataclass(frozen=True)
class Cell:
    grid: str
    variant: str  # e.g. 'r=16', 'squeeze=max, r=8', 'baseline'
    seed: int
    config: ExperimentConfig  # as trained: model.num_classes filled in from the dataset
    axes: dict[str, Any]  # this variant's axis values ({} for baseline)
    preset: str | None = None  # the --preset it was resolved with: reports keep preset runs apart
    legacy_id: str | None = None  # its id under the rule before (runs, checkpoints of older stores)

    @property
    def cell_id(self) -> str:
        return config_id(self.config)

    @property
    def ids(self) -> tuple[str, ...]:
        """Every id this cell's runs and checkpoints may carry: its own first, then its legacy one."""
        own = self.cell_id
        return (own,) if self.legacy_id in (None, own) else (own, self.legacy_id)


# ----------------------------------------------------------------------------- variant names


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


# ----------------------------------------------------------------------------- grids


def _check_axes(name: str, grid: GridConfig) -> None:
    keys = list(grid.axes)
    for key, values in grid.axes.items():
        path = f"grids.{name}.axes.{key}"
        if not known_key(key):
            hint = " (seeds are set with `seeds:`)" if key in ("seed", "seeds") else ""
            raise ConfigError(f"{path}: unknown key{hint}")
        for other in keys:
            if other.startswith(key + "."):
                raise ConfigError(f"{path}: overlaps axis {other!r}; sweep one or the other")
        for i, v in enumerate(values):
            j = next((j for j in range(i) if values[j] == v), None)
            if j is not None:
                raise ConfigError(f"{path}[{i}]: {short_repr(v)}: duplicate value (same as [{j}])")


def expand(exps: ExperimentsFile, name: str, extra: Sequence[Layer], seeds: Sequence[int]) -> list[Cell]:
    """Every variant x seed of one grid; extra = the preset and --set layers (a layer for one dataset
    applies to the cells of that dataset only)."""
    grid = exps.grids[name]
    _check_axes(name, grid)
    base = [defaults_layer(exps), section_layer(f"grids.{name}", grid), *extra]

    variants: list[tuple[str, dict[str, Any], ExperimentConfig]] = []
    variant_layers: list[list[Layer]] = []  # each variant's layers after `base`
    if grid.baseline:  # the plain backbone: same recipe, no SE blocks anywhere
        no_se = Layer(f"grids.{name}.baseline", {"model": {"se": None}}, key="model.se")
        variant_layers.append([no_se])
    indexed = [list(enumerate(values)) for values in grid.axes.values()]
    for combo in itertools.product(*indexed):
        layers = [
            Layer(f"grids.{name}.axes.{key}[{i}]", nest(key, value), key=key, attach=True)
            for key, (i, value) in zip(grid.axes, combo)
        ]
        variant_layers.append(layers)
    check_sets_used(name, base, variant_layers)
    if grid.baseline:
        variants.append(("baseline", {}, resolve(for_cell([*base, no_se]), seeds[0])))
    for combo, layers in zip(itertools.product(*indexed), variant_layers[1 if grid.baseline else 0:]):
        axes = {key: value for key, (_, value) in zip(grid.axes, combo)}
        cfg = resolve(for_cell([*base, *layers]), seeds[0])  # first: a bad value's name could be a huge alias bomb
        variants.append((variant_name(axes), axes, cfg))
    check_sets_read(name, base, [cfg for _, _, cfg in variants])

    # Named as trained: the class count its dataset implies enters the id (legacy: as resolved).
    named = [(variant, axes, as_trained(cfg), cfg) for variant, axes, cfg in variants]
    names: set[str] = set()
    by_id: dict[str, str] = {}  # config id -> variant name
    for variant, _, cfg, _ in named:
        if variant in names:
            raise ConfigError(f"grids.{name}.axes: two variants are named {variant!r}; spell their values apart")
        other = by_id.setdefault(config_id(cfg), variant)
        if other != variant:
            raise ConfigError(f"grids.{name}: variants {other!r} and {variant!r} resolve to the same config")
        names.add(variant)

    # Seed-major: after the first pass over the variants there is a complete table to look at.
    return [
        Cell(name, variant, seed, cfg.model_copy(update={"seed": seed}), dict(axes),
             legacy_id=legacy_config_id(resolved.model_copy(update={"seed": seed})))
        for seed in seeds
        for variant, axes, cfg, resolved in named
    ]


def preset_layers(name: str, preset: Preset, grid: str) -> list[Layer]:
    """A preset's layers for one grid: its own values < its values for the grid < its values for a dataset."""
    layers = [section_layer(f"presets.{name}", preset)]
    if grid in preset.grids:
        layers.append(section_layer(f"presets.{name}.grids.{grid}", preset.grids[grid]))
    layers.extend(dataset_layer(f"presets.{name}.datasets.{dataset}", dataset, values)
                  for dataset, values in preset.datasets.items())
    return layers


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
    extra: list[Layer] = []
    chosen = g.seeds or exps.defaults.seeds
    if preset is not None:
        if preset not in exps.presets:
            have = ", ".join(exps.presets) or "none"
            raise ConfigError(f"--preset {preset}: no such preset (have: {have})")
        p = exps.presets[preset]
        extra.extend(preset_layers(preset, p, grid))
        chosen = p.seeds or chosen
        if grid in p.grids:
            chosen = p.grids[grid].seeds or chosen
    extra.extend(set_layer(item) for item in sets)
    if seeds is not None:
        chosen = check_seeds(list(seeds), "--seeds")
    cells = expand(exps, grid, extra, chosen)
    return [replace(c, preset=preset) for c in cells] if preset is not None else cells
