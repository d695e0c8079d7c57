"""Checks that a value can be stored exactly as it is, on SQLite and on PostgreSQL alike.

PostgreSQL refuses text holding a NUL character, JSON holding NaN, Infinity or `\\u0000`, integers wider than
their column and strings longer than their VARCHAR; Python cannot even encode a lone UTF-16 surrogate, or a
JSON value nested past its recursion limit (or one that contains itself). SQLite would store some of these
and hand back rows that other readers choke on, so both backends refuse the same values, before the
database sees them. Every check returns None or a message that names the field and says what to do.

The checks are written for the common case: a clean ASCII string costs two C-level scans, a JSON value one
visit per container and per string, nothing per character in Python.
"""

from __future__ import annotations

import math
import re
import sys
from datetime import datetime
from typing import Any

INT4_MAX = 2**31 - 1
"""Largest value of the recorder's integer columns (indexes, versions, counts are 32-bit INTEGERs)."""

JSON_INT_MIN, JSON_INT_MAX = -(2**63), 2**63 - 1
"""JSON integers must fit in 64 bits: SQLite's JSON functions and most readers hold no more."""

MAX_JSON_DEPTH = 100
"""Deepest nesting of lists and objects in a JSON field. Real records nest a few levels; Python's encoder
fails near 1000 (and on a structure that contains itself)."""

_FLOAT_MAX = sys.float_info.max
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def short(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters, for messages about values that may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _char_problem(name: str, value: str) -> str | None:
    bad = _UNSTORABLE.search(value)
    if bad is None:
        return None
    if bad.group() == "\x00":
        return (
            f"{name} contains a NUL character (at index {bad.start()}), which PostgreSQL cannot store in text "
            "or JSON; strip it or escape it before recording"
        )
    return (
        f"{name} contains a lone UTF-16 surrogate U+{ord(bad.group()):04X} (at index {bad.start()}), which is "
        "not valid Unicode; decode the source with errors='replace' before recording"
    )


def storable_text(value: str) -> bool:
    """True if `value` (a str) has no character the databases refuse: the fast path's check."""
    if value.isascii():
        return "\x00" not in value
    return _UNSTORABLE.search(value) is None


def text_problem(
    name: str, value: object, max_length: int | None = None, *, empty: bool = False, null: bool = False
) -> str | None:
    """A string field: a str (not bytes), at most `max_length` characters, without NULs or lone surrogates.
    `empty`: "" is allowed; `null`: None is allowed."""
    if value is None:
        return None if null else f"{name} must be a string, got None"
    if not isinstance(value, str):
        return f"{name} must be a string, got {type(value).__name__}" + (
            " (decode bytes to text first)" if isinstance(value, bytes | bytearray) else ""
        )
    if not value and not empty:
        return f"{name} must be a non-empty string"
    if max_length is not None and len(value) > max_length:
        return f"{name} must be at most {max_length} characters (its column's width), got {len(value)}"
    return None if storable_text(value) else _char_problem(name, value)


def index_problem(name: str, value: object) -> str | None:
    """A non-negative integer that fits the 32-bit integer columns."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return f"{name} must be an integer >= 0, got {short(value)}"
    if value > INT4_MAX:
        return f"{name} must be at most {INT4_MAX} (its column is a 32-bit integer), got {value}"
    return None


def number_problem(name: str, value: object, optional: bool = False) -> str | None:
    """A finite number that fits a double (an int of 400 digits does not)."""
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"{name} must be a number, got {type(value).__name__}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be finite, got {value!r}"
    if not -_FLOAT_MAX <= value <= _FLOAT_MAX:
        return f"{name} must be finite and fit a double, got an integer of {len(str(abs(value)))} digits"
    return None


def plain_number(value: object) -> bool:
    """The fast path's `number_problem(...) is None` for the common exact types."""
    kind = type(value)
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    return kind is int and -_FLOAT_MAX <= value <= _FLOAT_MAX  # type: ignore[operator]


def plain_index(value: object) -> bool:
    """The fast path's `index_problem(...) is None`."""
    return type(value) is int and 0 <= value <= INT4_MAX


def datetime_problem(name: str, value: object) -> str | None:
    if value is None or isinstance(value, datetime):
        return None
    return f"{name} must be a datetime or None, got {type(value).__name__}"


def _where(name: str, path: tuple[Any, ...]) -> str:
    return name + "".join(f"[{short(step, 40)}]" for step in path)


def _flat_and_clean(value: dict[Any, Any]) -> bool:
    """True for a dict of clean scalars (most actions and sampling params): the walk below, without its cost."""
    for key, item in value.items():
        if type(key) is not str or not (key.isascii() and "\x00" not in key):
            return False
        kind = type(item)
        if kind is str:
            if not (item.isascii() and "\x00" not in item) and _UNSTORABLE.search(item) is not None:
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif kind is int:
            if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                return False
        elif item is not None and kind is not bool:
            return False
    return True


def json_problem(name: str, value: object, kind: type | None = None, nullable: bool = True) -> str | None:
    """A JSON field: dicts with string keys, lists, strings, finite numbers, bools and None, nested at most
    MAX_JSON_DEPTH deep. `kind`: the top level must be this type (dict or list); `nullable`: or None."""
    if value is None:
        return None if nullable else f"{name} must be a {(kind or dict).__name__}, got None"
    if type(value) is dict and _flat_and_clean(value):
        return None if kind in (None, dict) else f"{name} must be a {kind.__name__} or None, got dict"
    if kind is not None and not isinstance(value, kind):
        return f"{name} must be a {kind.__name__} or None, got {type(value).__name__}"
    # Iterative, so that a value nested far too deep (or containing itself) is refused, not a RecursionError.
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        item_kind = type(item)
        if item_kind is str or isinstance(item, str):
            if not storable_text(item):
                return _char_problem(_where(name, path), item)
        elif isinstance(item, dict):
            if len(path) >= MAX_JSON_DEPTH:
                return f"{_where(name, ())} is nested more than {MAX_JSON_DEPTH} levels deep (or contains itself)"
            for key, child in item.items():
                if not isinstance(key, str):
                    return (
                        f"{_where(name, path)} has the key {short(key)} ({type(key).__name__}); JSON object keys "
                        "must be strings (convert them, e.g. str(key), before recording)"
                    )
                if not storable_text(key):
                    return _char_problem(f"a key of {_where(name, path)}", key)
                stack.append((child, (*path, key)))
        elif isinstance(item, list | tuple):
            if len(path) >= MAX_JSON_DEPTH:
                return f"{_where(name, ())} is nested more than {MAX_JSON_DEPTH} levels deep (or contains itself)"
            stack.extend((child, (*path, index)) for index, child in enumerate(item))
        elif item is None or item_kind is bool:
            continue
        elif isinstance(item, int):
            if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                return f"{_where(name, path)} is an integer beyond 64 bits; record it as a string or a float"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{_where(name, path)} is {item!r}, which JSON cannot hold; record None or a finite number"
        else:
            return (
                f"{_where(name, path)} is a {item_kind.__name__}, which is not JSON; use dict, list, str, int, "
                "float, bool or None"
            )
    return None
