"""Parameter schemas: dataclass fields whose metadata states the allowed values, and the one
validator that turns a wrong value into a one-line `ConfigError` naming the key.

Every config block (the fixed groups in `advpure.config.compose`, and the per-kind blocks of purifiers and
attacks registered in `advpure.core.registry`) is a dataclass built from these helpers:

    @dataclass
    class Params:
        steps: int = at_least(10, 1)                      # an int >= 1
        sigma: float = at_least(0.25, 0.0)                # a finite float >= 0
        noise: str = choice("gaussian", "gaussian", "rademacher")
        eps: float = between(0.03, 0.0, 1.0, hint="images are in [0, 1]; did you mean 8/255?")

Floats must always be finite: a NaN or an infinity anywhere in a config is an error (a NaN
screening sigma would otherwise run and report 0% everywhere).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from advpure.core.errors import ConfigError


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices`. A single callable choice is evaluated when the
    value is checked (choices that come from a registry: `choice("dsm", field_names)`)."""
    return field(default=default, metadata={"choices": choices})


def allowed_choices(meta: Any) -> tuple:
    """The allowed values of a `choice` field's metadata (a lazy callable expanded)."""
    choices = meta["choices"]
    if len(choices) == 1 and callable(choices[0]):
        return tuple(choices[0]())
    return tuple(choices)


def at_least(default: Any, lo: float, strict: bool = False) -> Any:
    """A number >= lo (> lo when `strict`); None is allowed when the default is None."""
    return field(default=default, metadata={"min": lo, "strict": strict})


def between(default: Any, lo: float, hi: float, hint: str | None = None, strict: bool = False) -> Any:
    """A number in [lo, hi] ((lo, hi] when `strict`); None is allowed when the default is None.
    `hint` is appended to the error (e.g. a likely unit mistake)."""
    return field(default=default, metadata={"min": lo, "max": hi, "hint": hint, "strict": strict})


def check_value(path: str, f: dataclasses.Field, value: Any) -> None:
    """Raise a one-line ConfigError if `value` breaks the constraints in `f.metadata`."""
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value}")
    if "choices" in meta and value not in allowed_choices(meta):
        allowed = ", ".join(str(c) for c in allowed_choices(meta))
        raise ConfigError(f"{path}: unknown value {value!r}; allowed: {allowed}")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    hint = f" ({meta['hint']})" if meta.get("hint") else ""
    if "min" in meta:
        lo, strict = meta["min"], meta.get("strict", False)
        if value < lo or (strict and value == lo):
            raise ConfigError(f"{path}: must be {'>' if strict else '>='} {lo}, got {value}{hint}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{path}: must be <= {meta['max']}, got {value}{hint}")


def check_finite_tree(node: Any, path: str) -> None:
    """Every float anywhere below `node` (dicts/lists, e.g. an untyped list of sigmas) is finite."""
    if isinstance(node, float):
        if not math.isfinite(node):
            raise ConfigError(f"{path}: must be a finite number, got {node}")
    elif isinstance(node, dict):
        for k, v in node.items():
            check_finite_tree(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_finite_tree(v, f"{path}[{i}]")


def validate(node: Any, schema: type, prefix: str = "") -> None:
    """Check every field of dataclass `schema` in `node` (a DictConfig or an instance), recursing
    into nested dataclass fields. Raises ConfigError naming `prefix + field`."""
    for f in dataclasses.fields(schema):
        value = node[f.name] if hasattr(node, "__getitem__") else getattr(node, f.name)
        sub = _dataclass_type(f)
        if sub is not None and value is not None and not isinstance(value, (int, float, str)):
            validate(value, sub, f"{prefix}{f.name}.")
        else:
            check_value(f"{prefix}{f.name}", f, value)


def _dataclass_type(f: dataclasses.Field) -> type | None:
    t = f.type
    if isinstance(t, str):  # `from __future__ import annotations`: look the name up
        t = _SCHEMA_TYPES.get(t)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


_SCHEMA_TYPES: dict[str, type] = {}


def schema(cls: type) -> type:
    """Class decorator: a dataclass usable as a nested field type of other schemas (by name)."""
    _SCHEMA_TYPES[cls.__name__] = cls
    return cls


__all__ = [
    "allowed_choices",
    "at_least",
    "between",
    "check_finite_tree",
    "check_value",
    "choice",
    "schema",
    "validate",
]
