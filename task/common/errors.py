"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback.

Values and paths put into a message go through ``short_repr`` / ``short_text``: both are bounded in time and
memory whatever the input (a 1 GB string, a list nested 10,000 deep, a cyclic or heavily shared structure, an
integer of a million digits), escape control characters, and cut the result, so one message stays one short line.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, paths).

    ``main.py`` prints ``error: <message>`` on one line and exits with code 2.
    Messages should name the offending thing and say how to fix it.
    """

    exit_code = 2


_ELLIPSIS = "..."


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to at most ``limit`` characters (ending in '...') and computed in O(limit) work.

    Containers are walked only as far as the output reaches, so shared or cyclic structures cost nothing extra;
    strings and bytes are sliced before ``repr``; huge integers are described by their size (their decimal form
    is quadratic to compute and refused by Python above 4300 digits).
    """
    parts: list[str] = []
    _emit(value, parts, [limit + 1])
    text = "".join(parts)
    return text if len(text) <= limit else text[: max(limit - len(_ELLIPSIS), 0)] + _ELLIPSIS


def short_text(text: str, limit: int = 80) -> str:
    """``text`` (e.g. a path or a key) for a one-line message: control characters escaped, long text cut in the middle.

    The middle is cut rather than the end because the end of a path (the file name) is what identifies it.
    """
    if len(text) > 4 * limit:  # escaping only lengthens text, so its two ends are all that can be shown
        text = text[: 2 * limit] + text[-2 * limit :]
    shown = text if text.isprintable() else repr(text)[1:-1]
    if len(shown) <= limit:
        return shown
    head = (limit - len(_ELLIPSIS) + 1) // 2
    tail = limit - len(_ELLIPSIS) - head
    return shown[:head] + _ELLIPSIS + (shown[len(shown) - tail :] if tail > 0 else "")


def _emit(value: Any, out: list[str], budget: list[int]) -> None:
    """Append the repr of ``value`` to ``out`` until ``budget[0]`` characters have been written."""
    if budget[0] <= 0:
        return
    if isinstance(value, (list, tuple, set, frozenset, dict)) and type(value) in _BRACKETS:
        opening, closing = _BRACKETS[type(value)]
        if not value:
            _put(
                out,
                budget,
                "set()"
                if isinstance(value, set)
                else "frozenset()"
                if isinstance(value, frozenset)
                else opening + closing,
            )
            return
        _put(out, budget, opening)
        items = value.items() if isinstance(value, dict) else value
        for i, item in enumerate(items):
            if budget[0] <= 0:
                return
            if i:
                _put(out, budget, ", ")
            if isinstance(value, dict):
                _emit(item[0], out, budget)
                _put(out, budget, ": ")
                _emit(item[1], out, budget)
            else:
                _emit(item, out, budget)
        _put(out, budget, ",)" if isinstance(value, tuple) and len(value) == 1 else closing)
    elif isinstance(value, (str, bytes, bytearray)):
        _put(out, budget, repr(value[: budget[0]]))
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1024:  # > 308 digits
        _put(out, budget, f"<int of {value.bit_length()} bits>")
    else:
        _put(out, budget, repr(value)[: budget[0]])


_BRACKETS: dict[type, tuple[str, str]] = {
    list: ("[", "]"),
    tuple: ("(", ")"),
    dict: ("{", "}"),
    set: ("{", "}"),
    frozenset: ("frozenset({", "})"),
}


def _put(out: list[str], budget: list[int], text: str) -> None:
    out.append(text[: max(budget[0], 0)])
    budget[0] -= len(text)
