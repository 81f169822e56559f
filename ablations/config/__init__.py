"""experiments.yaml as a validated schema, and its expansion into runnable cells (the package's public API).

A file holds `defaults`, named `grids` (axes to sweep, plus overrides) and named
`presets` (e.g. a smoke test). One cell's config is resolved in layers, each
later one winning:

    defaults < grid overrides < preset < --set items < the variant's axis values

(a preset: its own values < its values for the grid < its values for the cell's dataset, by name)

Dicts merge deeply; lists and scalars replace. Every problem surfaces as a
one-line ConfigError that starts with where it came from, e.g.
`grids.reduction.axes.model.se.reduction[4]: r=32 is too large for ...`, and
does so at load time: every cell's model is built on the meta device first.

The modules, in import order: `schema` (the sections and ConfigError), `classes` (the class
count and input size a dataset section implies), `layers` (one config
resolved from its layers, errors blamed on the layer at fault), `overrides` (--set and --seeds,
and the checks that each --set item reaches a cell), `cells` (a grid's variants x seeds, cell
ids), `load` (reading the file).
"""

from ablations.config.cells import (ID_IF_SET, NOT_IN_ID, Cell, config_id, legacy_config_id, resolve_cells,
                                    variant_name)
from ablations.config.classes import as_trained, expected_image_size, expected_num_classes, with_num_classes
from ablations.config.load import load_experiments
from ablations.config.overrides import parse_seeds, parse_set
from ablations.config.schema import (ConfigError, DatasetConfig, Defaults, ExperimentConfig, ExperimentsFile,
                                     GridConfig, Preset, TrainConfig)
from senet.config import ModelConfig  # a cell's model section, beside its dataset and train sections

__all__ = [
    "Cell",
    "ConfigError",
    "DatasetConfig",
    "Defaults",
    "ExperimentConfig",
    "ExperimentsFile",
    "GridConfig",
    "ModelConfig",
    "ID_IF_SET",
    "NOT_IN_ID",
    "Preset",
    "TrainConfig",
    "as_trained",
    "config_id",
    "expected_image_size",
    "expected_num_classes",
    "legacy_config_id",
    "load_experiments",
    "parse_seeds",
    "parse_set",
    "resolve_cells",
    "variant_name",
    "with_num_classes",
]
