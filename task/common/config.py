"""Typed, validated configuration: a schema of defaults, a YAML file, and dotted ``KEY=VALUE`` overrides.

The schema is plain data: nested dicts whose leaves are ``Field``s. Loading checks every key and type and
raises ``UserError`` with one line naming the key and the valid choices.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from task.common.errors import UserError


@dataclass(frozen=True)
class Field:
    """A config leaf: allowed types, default, optional choices, length for lists, and a numeric range.

    ``min``/``max`` (inclusive unless ``min_exclusive``/``max_exclusive``) and ``multiple_of`` apply to a number,
    or to every item of a list. Floats must be finite.
    """

    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    length: int | None = None
    item_type: type | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    multiple_of: int | None = None
    help: str = ""

    def check(self, key: str, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise UserError(f"config key {key} must not be null; default is {self.default!r}")
        if float in self.types and str not in self.types:
            value = _as_float(value)
        if isinstance(value, bool) and bool not in self.types:
            raise UserError(f"config key {key} expects {self.type_names()}, got {value!r}")
        if not isinstance(value, self.types):
            raise UserError(f"config key {key} expects {self.type_names()}, got {value!r} ({type(value).__name__})")
        if self.choices is not None and value not in self.choices:
            raise UserError(f"config key {key} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                raise UserError(f"config key {key} expects a list of {self.length} items, got {value!r}")
            if self.item_type is not None:
                value = [_as_float(v) for v in value] if self.item_type is float else value
                if not all(isinstance(v, self.item_type) and not isinstance(v, bool) for v in value):
                    raise UserError(f"config key {key} expects a list of {self.item_type.__name__}, got {value!r}")
        for number in value if isinstance(value, list) else [value]:
            self._check_range(key, number)
        return value

    def _check_range(self, key: str, number: Any) -> None:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            return
        if isinstance(number, float) and not math.isfinite(number):
            raise UserError(f"config key {key} must be a finite number, got {number!r}; default is {self.default!r}")
        low = self.min is not None and (number <= self.min if self.min_exclusive else number < self.min)
        high = self.max is not None and (number >= self.max if self.max_exclusive else number > self.max)
        if low or high or (self.multiple_of is not None and number % self.multiple_of):
            raise UserError(f"config key {key} must be {self.range_text()}, got {number!r}; default is {self.default!r}")

    def range_text(self) -> str:
        """E.g. '> 0', '>= 1', 'in [0, 1)', 'a multiple of 32 and >= 64'."""
        parts = []
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        if self.min is not None and self.max is not None:
            parts.append(f"in {'(' if self.min_exclusive else '['}{self.min:g}, {self.max:g}{')' if self.max_exclusive else ']'}")
        elif self.min is not None:
            parts.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        elif self.max is not None:
            parts.append(f"{'<' if self.max_exclusive else '<='} {self.max:g}")
        return " and ".join(parts)

    def type_names(self) -> str:
        names = [t.__name__ for t in self.types] + (["null"] if self.nullable else [])
        return " or ".join(names)


def _as_float(value: Any) -> Any:
    """ints and numeric strings as float: YAML 1.1 reads ``1e-4`` (no dot) as a string; other values unchanged."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def F(types: type | tuple[type, ...], default: Any, **kwargs: Any) -> Field:
    return Field(types if isinstance(types, tuple) else (types,), default, **kwargs)


Schema = dict[str, Any]


@dataclass
class Config:
    """Attribute access to a validated nested dict: ``cfg.MODEL.backbone``; ``cfg.to_dict()`` for saving."""

    _data: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(name) from None
        return Config(value) if isinstance(value, dict) else value

    def __getitem__(self, name: str) -> Any:
        return self.__getattr__(name)

    def get(self, dotted: str) -> Any:
        node: Any = self._data
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)


def defaults(schema: Schema) -> dict[str, Any]:
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def _unknown_key(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UserError(f"unknown config key {key}{hint}; valid keys here: {', '.join(valid)}")


def _merge(schema: Schema, target: dict[str, Any], source: Any, prefix: str) -> None:
    if not isinstance(source, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping, got {source!r}")
    for key, value in source.items():
        key = str(key)
        dotted = prefix + key
        if key not in schema:
            raise _unknown_key(dotted, list(schema))
        spec = schema[key]
        if isinstance(spec, dict):
            _merge(spec, target[key], value if value is not None else {}, dotted + ".")
        else:
            target[key] = spec.check(dotted, value)


def parse_override(text: str) -> tuple[str, Any]:
    """``A.b=VALUE`` -> ("A.b", yaml value). Values are parsed with ``yaml.safe_load`` (numbers, lists, bools)."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not KEY=VALUE; e.g. DATASET.target=carpet")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UserError(f"override {key} has a value that is not valid YAML: {raw!r}") from None
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}; pass --yaml_config with a path such as configs/anomaly/unsupervised/dmad/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise UserError(f"YAML syntax error in {path}{where}: {problem}; fix the file and rerun") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    return data or {}


def load_config(schema: Schema, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, each key checked against ``schema``."""
    data = defaults(schema)
    if path is not None:
        _merge(schema, data, read_yaml(path), "")
    for text in overrides or []:
        key, value = parse_override(text)
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _merge(schema, data, nested, "")
    return Config(data)
