"""Typed, validated configuration: a schema of defaults, a YAML file, and dotted ``KEY=VALUE`` overrides.

The schema is plain data: nested dicts whose leaves are ``Field``s. Loading checks every key and type and
raises ``UserError`` with one line naming the key and the valid choices.

Configs are untrusted input. YAML is read with a safe loader that also refuses anchors and aliases (a few hundred
bytes of nested aliases, the "billion laughs", expand to gigabytes), duplicate keys (the last one would silently
win), nesting deeper than ``MAX_YAML_DEPTH`` and files over ``MAX_CONFIG_BYTES``. Every value quoted in a message
goes through ``short_repr``, so a huge value cannot flood the terminal. Data that did not come through YAML (the
config stored in a checkpoint) is checked with ``validate_plain_data`` before anything prints or merges it.
"""

from __future__ import annotations

import copy
import difflib
import math
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from task.common.errors import UserError, short_repr, short_text

MAX_CONFIG_BYTES = 64 << 10  # configs are ~2 KB; the pure-Python parser needs seconds for 64 KB of worst-case YAML
MAX_YAML_DEPTH = 32  # sections, lists and mappings in values: real configs nest 3 deep


@dataclass(frozen=True)
class Field:
    """A config leaf: allowed types, default, optional choices, length for lists, and a numeric range.

    ``min``/``max`` (inclusive unless ``min_exclusive``/``max_exclusive``) and ``multiple_of`` apply to a number,
    or to every item of a list. Floats must be finite. ``reason`` says why the range exists; range errors quote it,
    e.g. "config key MODEL.sigma must be in [0.1, 64] (a smaller kernel ...), got 1e-200".
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
    reason: str = ""

    def check(self, key: str, value: Any) -> Any:
        """``value`` converted (ints and numeric strings to float where a float is expected) and checked."""
        if value is None:
            if self.nullable:
                return None
            raise UserError(f"config key {key} must not be null; default is {short_repr(self.default)}")
        if float in self.types and str not in self.types:
            value = _as_float(value)
        if isinstance(value, bool) and bool not in self.types:
            raise UserError(f"config key {key} expects {self.type_names()}, got {short_repr(value)}")
        if not isinstance(value, self.types):
            raise UserError(
                f"config key {key} expects {self.type_names()}, got {short_repr(value)} ({type(value).__name__})"
            )
        if self.choices is not None and value not in self.choices:
            raise UserError(
                f"config key {key} must be one of {', '.join(map(str, self.choices))}; got {short_repr(value)}"
            )
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                raise UserError(f"config key {key} expects a list of {self.length} items, got {short_repr(value)}")
            if self.item_type is not None:
                value = [_as_float(v) for v in value] if self.item_type is float else value
                if not all(isinstance(v, self.item_type) and not isinstance(v, bool) for v in value):
                    raise UserError(
                        f"config key {key} expects a list of {self.item_type.__name__}, got {short_repr(value)}"
                    )
        for number in value if isinstance(value, list) else [value]:
            self._check_range(key, number)
        return value

    def _check_range(self, key: str, number: Any) -> None:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            return
        if isinstance(number, float) and not math.isfinite(number):
            raise UserError(
                f"config key {key} must be a finite number, got {number!r}; default is {short_repr(self.default)}"
            )
        low = self.min is not None and (number <= self.min if self.min_exclusive else number < self.min)
        high = self.max is not None and (number >= self.max if self.max_exclusive else number > self.max)
        if low or high or (self.multiple_of is not None and number % self.multiple_of):
            why = f" ({self.reason})" if self.reason else ""
            raise UserError(
                f"config key {key} must be {self.range_text()}{why}, got {short_repr(number)}; default is "
                f"{short_repr(self.default)}"
            )

    def range_text(self) -> str:
        """E.g. '> 0', '>= 1', 'in [0, 1)', 'a multiple of 32 and >= 64'."""
        parts = []
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        if self.min is not None and self.max is not None:
            parts.append(
                f"in {'(' if self.min_exclusive else '['}{_number(self.min)}, "
                f"{_number(self.max)}{')' if self.max_exclusive else ']'}"
            )
        elif self.min is not None:
            parts.append(f"{'>' if self.min_exclusive else '>='} {_number(self.min)}")
        elif self.max is not None:
            parts.append(f"{'<' if self.max_exclusive else '<='} {_number(self.max)}")
        return " and ".join(parts)

    def type_names(self) -> str:
        names = [t.__name__ for t in self.types] + (["null"] if self.nullable else [])
        return " or ".join(names)


def _number(limit: float) -> str:
    """A range limit as written: whole numbers exactly (2**32 - 1 as 4294967295, not 4.29497e+09), others via %g."""
    return str(int(limit)) if float(limit).is_integer() and abs(limit) < 1e16 else f"{limit:g}"


def _as_float(value: Any) -> Any:
    """ints and numeric strings as float: YAML 1.1 reads ``1e-4`` (no dot) as a string; other values unchanged."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # beyond 1.8e308: left an int, so the type check reports it
            return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def F(types: type | tuple[type, ...], default: Any, **kwargs: Any) -> Field:
    """Shorthand for ``Field``: ``F(int, 8, min=1)`` or ``F((int, str), ...)``."""
    return Field(types if isinstance(types, tuple) else (types,), default, **kwargs)


Schema = dict[str, Any]

_MISSING: Any = object()  # Config.get's "no default given" marker (None is a valid default)


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

    def get(self, dotted: str, default: Any = _MISSING) -> Any:
        """The value at ``A.b.c``; ``default`` when a part is missing, or a UserError naming it without a default.

        Configs saved by older versions (inside checkpoints) may lack keys added since: pass a default to read them.
        """
        node: Any = self._data
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                if default is not _MISSING:
                    return default
                parent = ".".join(parts[:depth]) or "the top level"
                raise UserError(
                    f"config key {short_text(dotted)} is missing (no {short_text(part)} under {short_text(parent)}); "
                    "the config was probably saved by an older version of this toolkit: re-create that file with this "
                    "version"
                )
            node = node[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)


def defaults(schema: Schema) -> dict[str, Any]:
    """The schema's default values as a nested dict (fresh copies: callers may mutate it)."""
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def _unknown_key(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UserError(f"unknown config key {short_text(key)}{hint}; valid keys here: {', '.join(valid)}")


def _merge(schema: Schema, target: dict[str, Any], source: Any, prefix: str) -> None:
    if not isinstance(source, dict):
        raise UserError(
            f"config section {short_text(prefix.rstrip('.')) or '<top>'} must be a mapping, got {short_repr(source)}"
        )
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


# --------------------------------------------------------------------------- hardened YAML


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors/aliases, duplicate keys, deep nesting and unreadable integers.

    The pure-Python loader is used on purpose: the libyaml one composes in C, where none of these checks can hook in.
    ``source`` names the text in messages (a file path, or "override KEY").
    """

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise UserError(
                f"{self.source} line {event.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                "allowed "
                "in configs; write the values out"
            )
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise UserError(
                f"{self.source} line {event.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep; a "
                "config nests 3"
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # unhashable keys are refused by the base class; '<<' merges are not keys
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(
                    f"duplicate key {short_repr(key)} in {self.source} at lines {seen[key]} and {line}; keep only one "
                    "of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses int() of more than 4300 digits
            raise UserError(
                f"{self.source} line {node.start_mark.line + 1}: an integer of {len(node.value)} digits is too large "
                "for a config value"
            ) from None


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def _load_yaml(text: str, source: str) -> Any:
    """``text`` parsed as one YAML document under ``_ConfigLoader``'s rules; syntax errors stay ``yaml.YAMLError``."""
    loader = _ConfigLoader(text, source)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """' at line L, column C: problem' for a parse error (ReaderError carries a character offset, not a mark)."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return f" at line {line}: character {chr(exc.character)!r} is not allowed in YAML"  # .character is a code point
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {short_text(getattr(exc, 'problem', None) or 'syntax error', 120)}"


def parse_override(text: str) -> tuple[str, Any]:
    """``A.b=VALUE`` -> ("A.b", yaml value). Values are parsed as YAML (numbers, lists, bools) under the file rules."""
    if "=" not in text:
        raise UserError(f"override {short_repr(text)} is not KEY=VALUE; e.g. DATASET.target=carpet")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not all(key.split(".")):
        raise UserError(f"override {short_repr(text)} has no valid dotted key before '='; e.g. DATASET.target=carpet")
    try:
        value = _load_yaml(raw, f"override {short_text(key)}") if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(
            f"override {short_text(key)} has a value that is not valid YAML{_yaml_problem(exc, raw)}: {short_repr(raw)}"
        ) from None
    return key, value


def _read_config_text(path: Path) -> str:
    """The file's text, or a one-line UserError for each way reading it can fail."""
    shown = short_text(str(path), 160)
    if "\0" in str(path):
        raise UserError(f"config path {shown} contains a NUL byte; pass --yaml_config with a plain file path")
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"config file {shown} is a directory; pass --yaml_config with a YAML file inside it")
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block forever, /dev/zero would never end
            raise UserError(f"config file {shown} is not a regular file; pass --yaml_config with a YAML file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)  # st_size cannot be trusted (/proc files report 0)
    except FileNotFoundError:
        raise UserError(
            f"config file not found: {shown}; pass --yaml_config with a path such as "
            "configs/anomaly/unsupervised/dmad/demo.yaml"
        ) from None
    except OSError as exc:
        raise UserError(
            f"cannot read config file {shown} ({exc.strerror or type(exc).__name__}); check the path and its "
            "permissions"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(
            f"config file {shown} is over the {MAX_CONFIG_BYTES >> 10} KiB limit for a config (configs are a few KB); "
            "pass the right file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"config file {shown} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); save it as UTF-8"
        ) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a dict of sections: empty (or ``null``) gives ``{}``; any other non-mapping is a UserError."""
    path = Path(path)
    text = _read_config_text(path)
    shown = short_text(str(path), 160)
    try:
        data = _load_yaml(text, shown)
    except yaml.YAMLError as exc:
        raise UserError(f"YAML syntax error in {shown}{_yaml_problem(exc, text)}; fix the file and rerun") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file {shown} must hold a mapping of sections such as 'DATASET:', got {short_repr(data)} "
            f"({type(data).__name__}); fix the file and rerun"
        )
    return data


def validate_plain_data(
    obj: Any, what: str, max_items: int = 10_000, max_depth: int = 32, max_chars: int = 4096
) -> None:
    """Refuse data that is not a small tree of plain values, before anything prints, copies or merges it.

    Allowed: dicts with str keys, lists and tuples, str (at most ``max_chars``), int (at most 64 bits), float,
    bool and None; at most ``max_items`` container entries in all and ``max_depth`` levels of nesting. A container
    reached twice (a shared or cyclic reference, which pickle's memo makes cheap to store) is refused: a 1.6 KB
    checkpoint can hold a list that prints as 2**40 items. The walk stops at the first problem, so its cost is
    bounded by ``max_items`` whatever ``obj`` is. ``what`` names the data in the message, e.g.
    "the config stored in checkpoint runs/x/model.pt".
    """
    seen: dict[int, str] = {}
    items = 0
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        problem = ""
        if type(value) in (dict, list, tuple):  # exact types: subclasses may print or copy themselves any way
            if depth >= max_depth:
                problem = f"nesting deeper than {max_depth} levels"
            elif value and id(value) in seen:  # empty containers may be shared singletons, e.g. ()
                problem = f"the same {type(value).__name__} referenced again (first at {seen[id(value)] or 'the top'})"
            else:
                items += len(value)
                if items > max_items:
                    problem = f"more than {max_items} items"
        elif isinstance(value, str):
            problem = f"a string of {len(value)} characters (limit {max_chars})" if len(value) > max_chars else ""
        elif isinstance(value, int) and not isinstance(value, bool):
            problem = f"an integer of {value.bit_length()} bits (limit 64)" if value.bit_length() > 64 else ""
        elif not (value is None or isinstance(value, (bool, float))):
            problem = f"a value of type {type(value).__name__}"
        if isinstance(value, dict) and not problem:
            bad_keys = [k for k in value if not isinstance(k, str) or len(k) > max_chars][:1]
            problem = f"the key {short_repr(bad_keys[0])} (not a short string)" if bad_keys else ""
        if problem:
            raise UserError(
                f"{what} is not plain config data: {problem} at {short_text(where or 'the top')}; "
                "re-create the file with this toolkit or pass another one"
            )
        if isinstance(value, dict):
            seen[id(value)] = where
            stack.extend((child, f"{where}.{key}" if where else key, depth + 1) for key, child in value.items())
        elif isinstance(value, (list, tuple)):
            seen[id(value)] = where
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(value))


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
