"""The local upstream's JSON answer to a request with `response_format` (#19): a value of
the schema made from the user's words, streamed in small deltas. The rule is spelled out in
`FakeChatUpstream`'s docstring.

Documented internal interface: `json_deltas` is used by `_rules.py` (the unscripted
answer), `resolved` by its tool-call rule too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

__all__ = ["json_deltas", "resolved"]

_TEXT_WORDS = re.compile(r"\w+")
_NUMBERS = re.compile(r"-?\d+(?:\.\d+)?")
_LONG_TEXT = {"description", "summary", "text", "body", "content", "details", "notes"}
_FORMATS = {
    "date": "2025-01-01",
    "date-time": "2025-01-01T12:00:00Z",
    "time": "12:00:00",
    "duration": "P1D",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
_PIECES = (3, 5, 8, 4, 6, 7)  # delta sizes, in turn
_LONG_NOTE = "notes from the local upstream, streamed a few characters at a time."


def resolved(schema: object, root: object) -> object:
    """`schema`, a local `$ref` (`#/$defs/Name`) followed to its target in `root`."""
    for _ in range(16):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        schema = root
        for part in ref[2:].split("/"):
            schema = schema.get(part) if isinstance(schema, dict) else None
    return schema


def json_deltas(body: Mapping[str, object], said: str, reply: str) -> list[str] | None:
    """The deltas of a JSON answer when the request asks for one, else None.

    Args:
        body: the request body.
        said: the last user message's text.
        reply: the plain reply, for `{"type": "json_object"}`.
    """
    spec = body.get("response_format")
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_object":
        value: object = {"answer": reply}
    elif kind == "json_schema":
        assert isinstance(spec, dict)
        inner = spec.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
        value = _JSONFiller(schema, said).fill(schema, "", 0, 0)
    else:
        return None
    text = json.dumps(value, ensure_ascii=False)
    pieces: list[str] = []
    i = 0
    while i < len(text):
        size = _PIECES[len(pieces) % len(_PIECES)]
        pieces.append(text[i : i + size])
        i += size
    return pieces


class _JSONFiller:
    """Fills a JSON schema with a value made of the user's words (see FakeChatUpstream)."""

    def __init__(self, root: object, said: str) -> None:
        self.root = root
        words = _TEXT_WORDS.findall(said)
        self.words = [w for w in words if len(w) > 3 and not w.isdigit()] or words or ["text"]
        numbers = _NUMBERS.findall(said)
        self.length = min(10, max(1, int(float(numbers[0])))) if numbers else 3

    def fill(self, schema: object, name: str, n: int, depth: int) -> object:
        schema = resolved(schema, self.root)
        if not isinstance(schema, dict) or depth > 8:
            return None
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[n % len(enum)]
        if "const" in schema:
            return schema["const"]
        kind = schema.get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        options = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(options, list) and options:
            usable = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            if not usable or (depth > 4 and len(usable) < len(options)):
                return None  # deep in a recursive type: stop where null is allowed
            return self.fill(usable[0], name, n, depth + 1)
        word = self.words[n % len(self.words)]
        if "string" in kinds:
            fmt = schema.get("format")
            if fmt == "email":
                return f"{word.lower()}@example.com"
            if isinstance(fmt, str) and fmt in _FORMATS:
                return _FORMATS[fmt]
            if name.lower() in _LONG_TEXT:
                return f"{word}: {_LONG_NOTE}"
            return word
        if "integer" in kinds or "number" in kinds:
            low, high = schema.get("minimum"), schema.get("maximum")
            value: float = n + 1 if "integer" in kinds else n + 1.5
            if isinstance(low, int | float) and value < low:
                value = low
            if isinstance(high, int | float) and value > high:
                value = high
            return int(value) if "integer" in kinds else value
        if "boolean" in kinds:
            return n % 2 == 0
        if "array" in kinds:
            count = self.length if depth <= 2 else 2
            low, high = schema.get("minItems"), schema.get("maxItems")
            if isinstance(low, int):
                count = max(count, low)
            if isinstance(high, int):
                count = min(count, high)
            items = schema.get("items")
            return [self.fill(items, name, i, depth + 1) for i in range(count)]
        if "object" in kinds or "properties" in schema:
            properties = schema.get("properties")
            if not isinstance(properties, dict):
                return {}
            return {key: self.fill(sub, key, n, depth + 1) for key, sub in properties.items()}
        return None
