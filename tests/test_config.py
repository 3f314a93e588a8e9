"""Hostile configs: YAML bombs, duplicate keys, odd top levels, unreadable files, huge values, shared structures.

Every mistake must be one ``UserError`` line naming the problem (file, line, key) and the fix; nothing may grow
memory with the input's expanded size. A small local schema keeps these tests independent of the method schemas.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

from task.common.config import MAX_CONFIG_BYTES, Config, F, load_config, parse_override, read_yaml, validate_plain_data
from task.common.errors import UserError, short_repr, short_text
from task.common.io import load_checkpoint

SCHEMA = {
    "DATASET": {
        "target": F(str, "bottle"),
        "resize": F(list, [256, 256], length=2, item_type=int, min=64, multiple_of=32),
    },
    "MODEL": {
        "sigma": F(float, 4.0, min=0.1, max=64, reason="below 0.1 the kernel is a no-op"),
        "vq_beta": F(float, 0.25, min=0),
    },
    "SEED": F(int, 0, min=0, max=2**32 - 1, reason="32-bit"),
}

# The classic "billion laughs": 9 levels of 9 aliases, a few hundred bytes that expand to 9**9 strings.
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


def one_line(exc: pytest.ExceptionInfo[UserError], *fragments: str) -> str:
    """The message, checked to be one line holding every fragment."""
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------- YAML files

YAML_ERRORS: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "billion-laughs": (BILLION_LAUGHS.encode(), ("bad.yaml line 1", "anchors and aliases", "write the values out")),
    "alias-only-later": (b"DATASET:\n  target: x\nMODEL: *m\n", ("bad.yaml line 3", "anchors and aliases")),
    "anchor-without-alias": (b"DATASET: &d\n  target: x\n", ("bad.yaml line 1", "anchors and aliases")),
    "duplicate-section": (
        b"DATASET:\n  target: a\nSEED: 1\nDATASET:\n  target: b\n",
        ("duplicate key 'DATASET'", "lines 1 and 4", "keep only one"),
    ),
    "duplicate-nested": (
        b"DATASET:\n  resize: [64, 64]\n  resize: [96, 96]\n",
        ("duplicate key 'resize'", "lines 2 and 3"),
    ),
    "duplicate-flow": (b"MODEL: {sigma: 1, sigma: 2}\n", ("duplicate key 'sigma'", "lines 1 and 1")),
    "top-zero": (b"0\n", ("must hold a mapping of sections", "got 0 (int)")),
    "top-list": (b"[]\n", ("must hold a mapping of sections", "got [] (list)")),
    "top-string": (b"hello\n", ("must hold a mapping of sections", "got 'hello' (str)")),
    "top-false": (b"false\n", ("must hold a mapping of sections", "got False (bool)")),
    "invalid-utf8": (
        b"DATASET:\n  target: caf\xe9\n",
        ("is not UTF-8 text", "byte 0xe9 at line 2", "save it as UTF-8"),
    ),
    "nul-character": (b"DATASET:\n  target: a\x00b\n", ("YAML syntax error", "line 2", "'\\x00' is not allowed")),
    "huge-integer": (b"SEED: " + b"9" * 5000 + b"\n", ("bad.yaml line 1", "integer of 5000 digits", "too large")),
    "deep-nesting": (b"SEED: " + b"[" * 200 + b"]" * 200 + b"\n", ("bad.yaml line 1", "nested more than 32 levels")),
    "python-tag": (
        b"SEED: !!python/object/apply:os.system ['true']\n",
        ("YAML syntax error", "line 1", "could not determine a constructor"),
    ),
    "two-documents": (b"SEED: 1\n---\nSEED: 2\n", ("YAML syntax error", "line 2", "but found another document")),
    "syntax": (b"DATASET:\n  resize: [64, 64\n", ("YAML syntax error", "bad.yaml", "line 3")),
}


@pytest.mark.parametrize("name", list(YAML_ERRORS))
def test_bad_yaml_file_is_one_line_error(name: str, tmp_path: Path) -> None:
    content, fragments = YAML_ERRORS[name]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_config(SCHEMA, path)
    one_line(info, *fragments)


def test_billion_laughs_costs_no_memory(tmp_path: Path) -> None:
    """The bomb is refused at the first anchor: parsing it allocates next to nothing."""
    path = tmp_path / "lol.yaml"
    path.write_text(BILLION_LAUGHS)
    assert path.stat().st_size < 500
    tracemalloc.start()
    try:
        with pytest.raises(UserError):
            read_yaml(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # expanded, it would be 9**9 strings: gigabytes


@pytest.mark.parametrize("content", [b"", b"\n# only a comment\n", b"null\n", b"~\n", b"{}\n"])
def test_empty_yaml_means_defaults(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_bytes(content)
    assert read_yaml(path) == {}
    assert load_config(SCHEMA, path).to_dict() == load_config(SCHEMA).to_dict()


def test_valid_yaml_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("DATASET:\n  target: carpet\n  resize: [64, 96]\nMODEL:\n  sigma: 2\nSEED: 7\n")
    cfg = load_config(SCHEMA, path)
    assert (cfg.DATASET.target, cfg.DATASET.resize, cfg.MODEL.sigma, cfg.SEED) == ("carpet", [64, 96], 2.0, 7)


def _unreadable(kind: str, tmp: Path) -> Path:
    """A config path that cannot be read as a file, of the given kind."""
    if kind == "directory":
        (tmp / "configs").mkdir()
        return tmp / "configs"
    if kind == "missing":
        return tmp / "nope.yaml"
    if kind == "nul-in-path":
        return tmp / "a\0b.yaml"
    if kind == "fifo":
        os.mkfifo(tmp / "pipe.yaml")
        return tmp / "pipe.yaml"
    if kind == "too-big":
        (tmp / "big.yaml").write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
        return tmp / "big.yaml"
    if kind == "no-permission":
        (tmp / "secret.yaml").write_text("SEED: 1\n")
        (tmp / "secret.yaml").chmod(0)
        if os.access(tmp / "secret.yaml", os.R_OK):
            pytest.skip("running as root: chmod 0 does not stop reading")
        return tmp / "secret.yaml"
    raise AssertionError(kind)


UNREADABLE = {
    "directory": ("configs", "is a directory", "--yaml_config"),
    "missing": ("config file not found", "nope.yaml", "--yaml_config"),
    "nul-in-path": ("contains a NUL byte", "a\\x00b.yaml"),
    "fifo": ("pipe.yaml", "not a regular file"),
    "too-big": ("big.yaml", "over the 64 KiB limit", "pass the right file"),
    "no-permission": ("cannot read config file", "secret.yaml", "Permission denied", "permissions"),
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_unreadable_yaml_is_one_line_error(kind: str, tmp_path: Path) -> None:
    path = _unreadable(kind, tmp_path)
    with pytest.raises(UserError) as info:
        read_yaml(path)
    one_line(info, *UNREADABLE[kind])


# --------------------------------------------------------------------------- KEY=VALUE overrides

OVERRIDE_ERRORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "anchor": ("MODEL.sigma=&x 2", ("override MODEL.sigma line 1", "anchors and aliases")),
    "alias": ("DATASET.resize=[*a, 64]", ("override DATASET.resize line 1", "anchors and aliases")),
    "duplicate": ("DATASET={target: a, target: b}", ("duplicate key 'target'", "override DATASET")),
    "syntax": ("DATASET.resize=[64, 64", ("override DATASET.resize", "not valid YAML", "line 1", "'[64, 64'")),
    "no-equals": ("DATASET.resize", ("'DATASET.resize' is not KEY=VALUE",)),
    "empty-key": ("=3", ("no valid dotted key", "'=3'")),
    "empty-part": ("DATASET..target=x", ("no valid dotted key", "'DATASET..target=x'")),
    "huge-integer": ("SEED=" + "9" * 5000, ("override SEED line 1", "integer of 5000 digits")),
    "deep": ("SEED=" + "[" * 100 + "]" * 100, ("override SEED line 1", "nested more than 32 levels")),
    "wrong-type-truncated": (
        "DATASET.target=[" + "1, " * 5000 + "1]",
        ("DATASET.target expects str, got [1, 1, 1", "..."),
    ),
    "range-with-reason": (
        "MODEL.sigma=1e-200",
        ("MODEL.sigma must be in [0.1, 64] (below 0.1 the kernel is a no-op)", "got 1e-200", "default is 4.0"),
    ),
    "range-without-reason": ("MODEL.vq_beta=-1", ("MODEL.vq_beta must be >= 0, got -1.0; default is 0.25",)),
    "range-whole-limit": ("SEED=" + "9" * 20, ("SEED must be in [0, 4294967295] (32-bit)", "got 99999999999999999999")),
    "float-overflow": ("MODEL.sigma=" + "1" * 400, ("MODEL.sigma expects float", "<int of")),
    "unknown-long-key": (
        "DATASET." + "x" * 500 + "=1",
        ("unknown config key DATASET.xxx", "...", "valid keys here: target, resize"),
    ),
}


@pytest.mark.parametrize("name", list(OVERRIDE_ERRORS))
def test_bad_override_is_one_short_line(name: str) -> None:
    text, fragments = OVERRIDE_ERRORS[name]
    with pytest.raises(UserError) as info:
        load_config(SCHEMA, None, [text])
    assert len(one_line(info, *fragments)) < 400  # values and keys are quoted cut, never whole


@pytest.mark.parametrize(
    "text, expected",
    [
        ("MODEL.sigma=2", ("MODEL.sigma", 2)),
        ("DATASET.resize=[64, 96]", ("DATASET.resize", [64, 96])),
        ("SEED=", ("SEED", None)),
        (" DATASET.target = a=b", ("DATASET.target", "a=b")),
    ],
)
def test_override_parsing(text: str, expected: tuple[str, Any]) -> None:
    assert parse_override(text) == expected


# --------------------------------------------------------------------------- Field reason, Config.get


def test_field_reason_is_optional_and_last() -> None:
    """``reason`` is a new keyword at the end: positional construction of existing Fields is unchanged."""
    assert F(int, 1).reason == ""
    assert F(float, 4.0, min=0.1, reason="why").reason == "why"


CFG = Config({"MODEL": {"sigma": 4.0, "vq": False}, "SEED": 0})


@pytest.mark.parametrize(
    "dotted, default, expected",
    [
        ("MODEL.sigma", None, 4.0),
        ("MODEL.vq", True, False),
        ("MODEL.vq_num_embeddings", 200, 200),
        ("LOG.wandb", None, None),
        ("SEED.x", "d", "d"),
        ("MODEL", None, {"sigma": 4.0, "vq": False}),
    ],
)
def test_config_get_with_default(dotted: str, default: Any, expected: Any) -> None:
    assert CFG.get(dotted, default) == expected


@pytest.mark.parametrize(
    "dotted, fragments",
    [
        (
            "MODEL.vq_num_embeddings",
            ("config key MODEL.vq_num_embeddings is missing", "no vq_num_embeddings under MODEL", "older version"),
        ),
        ("LOG.wandb", ("config key LOG.wandb is missing", "no LOG under the top level")),
        ("SEED.x", ("config key SEED.x is missing", "no x under SEED")),
    ],
)
def test_config_get_missing_is_user_error(dotted: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(UserError) as info:
        CFG.get(dotted)
    one_line(info, *fragments)


def test_config_attribute_access_unchanged() -> None:
    assert CFG.MODEL.sigma == 4.0 and CFG["SEED"] == 0
    with pytest.raises(AttributeError):
        CFG.MODEL.missing


# --------------------------------------------------------------------------- plain data from checkpoints


def _shared_lists(levels: int) -> list:
    """A list that prints as 2**levels leaves but holds ``levels`` objects: each level references the previous twice."""
    node: list = []
    for _ in range(levels):
        node = [node, node]
    return node


def _cycle() -> dict:
    node: dict = {"a": 1}
    node["self"] = node
    return node


def _nested(levels: int) -> list:
    node: list = []
    for _ in range(levels):
        node = [node]
    return node


class _Opaque:
    """Not plain data: its repr and copy could do anything."""


PLAIN_ERRORS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "shared-lists": ({"MODEL": {"a": _shared_lists(20)}}, ("same list referenced again", "first at MODEL.a[1]")),
    "cycle": ({"MODEL": _cycle()}, ("same dict referenced again", "first at MODEL")),
    "too-deep": ({"A": _nested(40)}, ("nesting deeper than 32 levels", "at A[0][0]")),
    "too-many-items": ({"A": list(range(20_000))}, ("more than 10000 items", "at A")),
    "long-string": ({"A": {"b": "x" * 5000}}, ("a string of 5000 characters (limit 4096)", "at A.b")),
    "huge-int": ({"SEED": 10**30}, ("an integer of 100 bits (limit 64)", "at SEED")),
    "int-key": ({"A": {1: 2}}, ("the key 1 (not a short string)", "at A")),
    "tensor": ({"A": torch.zeros(2)}, ("a value of type Tensor", "at A")),
    "object": ({"A": [_Opaque()]}, ("a value of type _Opaque", "at A[0]")),
    "set": ({"A": {1, 2}}, ("a value of type set", "at A")),
    "top-level-list": (_shared_lists(3), ("same list referenced again", "first at [1]")),
}


@pytest.mark.parametrize("name", list(PLAIN_ERRORS))
def test_validate_plain_data_refuses(name: str) -> None:
    obj, fragments = PLAIN_ERRORS[name]
    with pytest.raises(UserError) as info:
        validate_plain_data(obj, "the config stored in checkpoint m.pt")
    one_line(info, "the config stored in checkpoint m.pt is not plain config data", *fragments, "re-create the file")


@pytest.mark.parametrize(
    "obj",
    [
        load_config(SCHEMA).to_dict(),
        {},
        {"a": (), "b": (), "c": [], "d": []},
        {"a": [1.5, None, True, "s", (1, 2)]},
        {"k": 2**63},
    ],
)
def test_validate_plain_data_accepts_configs(obj: Any) -> None:
    """Real configs pass, including empty containers that pickle shares (the empty tuple is a singleton)."""
    validate_plain_data(obj, "config")


def test_validate_plain_data_limits_are_parameters() -> None:
    validate_plain_data({"a": list(range(50))}, "config", max_items=51)
    with pytest.raises(UserError, match="more than 10 items"):
        validate_plain_data({"a": list(range(50))}, "config", max_items=10)
    with pytest.raises(UserError, match="deeper than 2 levels"):
        validate_plain_data({"a": {"b": {"c": 1}}}, "config", max_depth=2)


def test_checkpoint_config_of_shared_lists_is_refused_cheaply(tmp_path: Path) -> None:
    """A 1.6 KB checkpoint whose config prints as 2**40 items: loading is fine (weights_only keeps the sharing),
    validating refuses it at once and with almost no memory."""
    path = tmp_path / "bomb.pt"
    torch.save({"format": "tnvision-dmad", "config": {"MODEL": {"a": _shared_lists(40)}}, "state_dict": {}}, path)
    assert path.stat().st_size < 2048
    state = load_checkpoint(path)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(UserError) as info:
            validate_plain_data(state["config"], f"the config stored in checkpoint {path}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line(info, "bomb.pt", "not plain config data")
    assert peak < 1 << 20 and time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- short_repr / short_text

REPRS: list[tuple[Any, str]] = [
    ("four", "'four'"),
    ([96, 96], "[96, 96]"),
    ((1,), "(1,)"),
    ({"a": (1, 2)}, "{'a': (1, 2)}"),
    (set(), "set()"),
    (frozenset({2}), "frozenset({2})"),
    (1e-200, "1e-200"),
    (None, "None"),
    (True, "True"),
    (b"ab", "b'ab'"),
    ("a\nb", "'a\\nb'"),
    ("x" * 1000, "'" + "x" * 76 + "..."),
    (list(range(1000)), "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21..."),
    (10**5000, "<int of 16610 bits>"),
    (_shared_lists(100), "[" * 77 + "..."),
    (_cycle(), "{'a': 1, 'self': {'a': 1, 'self': {'a': 1, 'self': {'a': 1, 'self': {'a': 1, ..."),
]


@pytest.mark.parametrize("value, expected", REPRS, ids=[f"repr{i}" for i in range(len(REPRS))])
def test_short_repr(value: Any, expected: str) -> None:
    assert short_repr(value) == expected
    assert len(short_repr(value, limit=20)) <= 20


@pytest.mark.parametrize(
    "text, limit, expected",
    [
        ("runs/dmad/bottle", 80, "runs/dmad/bottle"),
        ("a\nb\x00c", 80, "a\\nb\\x00c"),
        ("/d/" + "x" * 200 + "/model.pt", 30, "/d/xxxxxxxxxxx...xxxx/model.pt"),
        ("é-ok", 80, "é-ok"),
        ("y" * 10**6, 9, "yyy...yyy"),
    ],
    ids=["plain", "control", "long-path", "unicode", "huge"],
)
def test_short_text_cuts_the_middle_and_escapes(text: str, limit: int, expected: str) -> None:
    assert short_text(text, limit) == expected
