"""The `model:` mapping of experiments.yaml, as a validated schema.

One schema serves both `senet.build_model` and the harness's experiments-file
schema, so a key is spelled, typed and checked in exactly one place.
"""

from __future__ import annotations

import reprlib
from typing import Any, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError, field_validator

from senet.archs import ARCHS

Squeeze = Literal["avg", "max", "none"]
Excitation = Literal["sigmoid", "tanh", "relu", "hardsigmoid"]
Integration = Literal["standard", "pre", "post", "identity"]
Position = Literal["output", "3x3"]
StrideIn = Literal["1x1", "3x3"]


class _Strict(BaseModel):
    # strict: `reduction: true` or `reduction: "16"` is a mistake, not 1 or 16
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SEConfig(_Strict):
    """Options of the SE block and where it goes (paper Section 6)."""

    reduction: PositiveInt = 16
    squeeze: Squeeze = "avg"
    excitation: Excitation = "sigmoid"
    stages: Union[Literal["all"], list[PositiveInt]] = "all"
    integration: Integration = "standard"
    position: Position = "output"
    bias: bool = True

    @field_validator("stages")
    @classmethod
    def _stages_nonempty_unique(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must list at least one stage, or be 'all'")
            if len(set(v)) != len(v):
                raise ValueError(f"{v} repeats a stage")
            v = sorted(v)
        return v


class ModelConfig(_Strict):
    """The `model:` mapping. `se: null` (or absent) gives the plain backbone."""

    arch: str = "resnet50"
    num_classes: PositiveInt = 1000
    se: SEConfig | None = None
    # Where a downsampling bottleneck puts its stride; None means the arch's own
    # paper ("1x1" for ResNet, "3x3" for ResNeXt). "3x3" on ResNet is torchvision's v1.5.
    stride_in: StrideIn | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCHS:
            raise ValueError(f"{v!r} is not one of {', '.join(ARCHS)}")
        return v


def format_loc(loc: tuple[Any, ...], prefix: str = "") -> str:
    """('se', 'stages', 2) -> 'se.stages[2]' (with an optional dotted prefix)."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 1, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def short_repr(value: Any) -> str:
    """A bounded repr: a value built from YAML aliases can hold billions of elements."""
    return _SHORT.repr(value)


def _describe(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    # pydantic wraps our own ValueErrors as "Value error, ..."; the prefix is noise.
    msg = msg.removeprefix("Value error, ")
    if err["type"] in ("extra_forbidden",):
        return "unknown key"
    value = err.get("input")
    if err["type"] in ("int_type", "float_type") and isinstance(value, bool):  # strict: YAML's true is no number
        return f"{str(value).lower()}: a boolean, not a number"
    if err["type"] == "int_type" and isinstance(value, str):
        return f"{value!r}: a string, not an integer (write the number without quotes)"
    if err["type"] not in ("missing",) and "input" in err:
        return f"{short_repr(err['input'])}: {msg}"
    return msg


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """The first problem of a pydantic error as one line: 'path: value: reason'.

    Union types report one error per branch; the most specific (longest loc)
    branch is the one a reader needs.
    """
    errors = exc.errors()
    first = max(errors, key=lambda e: len(e["loc"]))
    # Drop pydantic's union-branch tags (e.g. 'list[...]', "literal['all']") from the path.
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or "(" in p)))
    return f"{format_loc(loc, prefix)}: {_describe(first)}"


def parse_model_config(cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """Validate a `model:` mapping; raise ValueError naming the key on bad input."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ValueError(f"model: expected a mapping, got {type(cfg).__name__}")
    try:
        return ModelConfig.model_validate(dict(cfg))
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, "model")) from None


__all__ = [
    "SEConfig",
    "ModelConfig",
    "parse_model_config",
    "format_validation_error",
    "format_loc",
    "short_repr",
]
