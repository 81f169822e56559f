"""Command-line overrides: --set items and --seeds parsed, and the checks that each --set item reaches a cell."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import yaml

from ablations.config.layers import Layer, known_key, merge, nest
from ablations.config.schema import ConfigError, ExperimentConfig
from senet.config import short_repr


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


def set_layer(item: str) -> Layer:
    """A --set item as the layer it adds (after the preset, before the variant's axis values)."""
    key, value = parse_set(item)
    if not known_key(key):
        hint = " (use --seeds)" if key in ("seed", "seeds") else ""
        raise ConfigError(f"--set {item}: unknown key{hint}")
    return Layer(f"--set {item}", nest(key, value), key=key)


def check_seeds(seeds: Sequence[Any], where: str) -> list[int]:
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


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    seeds: list[int] = []
    for part in text.split(","):
        try:
            seeds.append(int(part.strip()))
        except ValueError:
            raise ConfigError(f"--seeds: {part.strip()!r} is not an integer (expected e.g. 0,1,2)") from None
    return check_seeds(seeds, "--seeds")


# ----------------------------------------------------------------------------- does each --set item reach a cell?


class _Probe:
    """Stands in for a --set value, to see whether it reaches the config or a later layer replaces it."""

    def __deepcopy__(self, memo: dict) -> "_Probe":
        return self  # merge deep-copies values; the probe must stay itself


def _holds(data: Any, probe: _Probe) -> bool:
    if data is probe:
        return True
    if isinstance(data, Mapping):
        return any(_holds(v, probe) for v in data.values())
    return isinstance(data, list) and any(_holds(v, probe) for v in data)


def _probed(value: Any, probe: _Probe) -> Any:
    """The value with a probe at each leaf: a later --set of one sub-key merges into a mapping and
    replaces that key only, so the mapping reaches the config while any of its keys does."""
    if isinstance(value, Mapping) and value:
        return {k: _probed(v, probe) for k, v in value.items()}
    return probe


def _replaced_by(layers: Sequence[Layer], i: int) -> Layer | None:
    """The later layer that replaces the last of the values layers[i] sets, or None when one reaches the config."""
    probe = _Probe()
    data: dict[str, Any] = {}
    for layer in layers[:i]:
        data = merge(data, layer.data)
    data = merge(data, _probed(layers[i].data, probe))
    for layer in layers[i + 1:]:
        data = merge(data, layer.data)
        if not _holds(data, probe):
            return layer
    return None


def _why_unused(layer: Layer, grid: str) -> str:
    if layer.path.startswith("--set "):
        return f"the later {layer.path} replaces it"
    if layer.path.endswith(".baseline"):
        return f"grid {grid} has only its baseline, which has no SE block"
    return f"grid {grid} sweeps {layer.key}, so every variant sets its own value"


def check_sets_used(name: str, base: Sequence[Layer], variant_layers: Sequence[Sequence[Layer]]) -> None:
    """A --set item that every variant overrides has no effect: say so rather than run without it."""
    for i, layer in enumerate(base):
        if not layer.path.startswith("--set "):
            continue
        replaced = [_replaced_by([*base, *more], i) for more in variant_layers]
        if all(r is not None for r in replaced):
            raise ConfigError(f"{layer.path}: no cell of grid {name} uses it: {_why_unused(replaced[0], name)}")


# Keys that only one value of another key reads: set for no cell that has it, they change the cell_id only.
_READ_ONLY_WITH = {"train.milestones": ("train.schedule", "multistep"), "train.gamma": ("train.schedule", "multistep")}


def check_sets_read(name: str, base: Sequence[Layer], configs: Sequence[ExperimentConfig]) -> None:
    """A --set item that only some other setting reads, which no cell has, changes nothing but the cell ids."""
    for layer in base:
        if not layer.path.startswith("--set ") or layer.key not in _READ_ONLY_WITH:
            continue
        other, value = _READ_ONLY_WITH[layer.key]
        section, field = other.split(".")
        seen = sorted({str(getattr(getattr(c, section), field)) for c in configs})
        if value not in seen:
            raise ConfigError(f"{layer.path}: no cell of grid {name} uses it: only {other} {value} reads "
                              f"{layer.key}, and every cell has {other} {' or '.join(seen)}")
