"""JSON for the whole package: the parser backend (orjson when the `fast` extra is
installed, else the stdlib) and the redaction of parsed JSON; no I/O."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["JSON_BACKEND", "Redact", "loads", "redact_json"]

#: A function that hides secrets (the API key) in a string.
Redact = Callable[[str], str]


def _pick_loads() -> tuple[str, Callable[[str | bytes], Any]]:
    choice = os.environ.get("TOKENHUB_STREAM_JSON", "auto").lower()
    if choice != "stdlib":
        try:
            import orjson
        except ImportError:
            if choice == "orjson":
                raise
        else:
            return "orjson", orjson.loads
    return "stdlib", json.loads


#: "orjson" when the optional `fast` extra is installed, else "stdlib"
#: (`TOKENHUB_STREAM_JSON=stdlib|orjson` forces one).
JSON_BACKEND, loads = _pick_loads()


_MAX_JSON_DEPTH = 64


def redact_json(obj: Mapping[str, object], redact: Redact | None) -> dict[str, object]:
    """A copy of a parsed JSON object with `redact` applied to every string in it, object
    keys included (a key echoed anywhere in an error stays out of what we pass on).

    Raises:
        ValueError: the object nests deeper than 64 levels (no error needs that, and a
            recursive walk must not meet Python's recursion limit).
    """
    return _redact_object(obj, redact, 0)


def _redact_object(
    obj: Mapping[str, object], redact: Redact | None, depth: int
) -> dict[str, object]:
    if depth > _MAX_JSON_DEPTH:
        raise ValueError("JSON nested too deep")
    out: dict[str, object] = {}
    for key, value in obj.items():
        out[redact(key) if redact is not None else key] = _redact_value(value, redact, depth)
    return out


def _redact_value(value: object, redact: Redact | None, depth: int) -> object:
    if isinstance(value, str):
        return redact(value) if redact is not None else value
    if isinstance(value, dict):
        return _redact_object(value, redact, depth + 1)
    if isinstance(value, list):
        if depth > _MAX_JSON_DEPTH:
            raise ValueError("JSON nested too deep")
        return [_redact_value(item, redact, depth + 1) for item in value]
    return value
