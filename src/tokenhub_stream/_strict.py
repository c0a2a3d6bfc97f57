"""The strict-ready JSON schema of structured outputs and tools (#19): sans-I/O, stdlib only.

`strict_schema(schema, where=...)` turns a JSON schema (pydantic's, or one written by hand)
into one that a server in strict mode accepts (OpenAI's `strict: true` subset, which
Azure, Gemini's OpenAI endpoint and most gateways follow), or refuses it with a
`TypeError` that says where and why. Nothing is dropped that constrains the answer:

- every object gets `additionalProperties: false` and lists every property in `required`;
  a property that was optional becomes nullable (`anyOf: [..., {"type": "null"}]`), and
  `StrictSchema.restore_defaults` turns the `null` the model sends for it back into
  "absent" (so pydantic fills in the default) or, for a hand-written schema, its `default`;
- annotations are dropped, as strict servers refuse some of them (`default`) and the model
  needs none (`title`, `examples`, `$comment`, `deprecated`, `readOnly`, `writeOnly`,
  `$schema`, `$id`); `description` stays;
- rewritten to what strict accepts, with the same meaning: `const: x` to `enum: [x]`, an
  `allOf` of one schema merged in, a `$ref` with other keywords next to it inlined (the
  root's too, as the root must be an object), pydantic's discriminated `oneOf` to `anyOf`
  (the tags make its branches disjoint; the discriminator itself is dropped);
- kept: `type`, `properties`, `required`, `items`, `enum`, `anyOf`, `$ref`, `$defs` /
  `definitions`, `description`, and the constraints strict accepts: `pattern`, `format`
  (one of `FORMATS`), `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`,
  `multipleOf`, `minItems`, `maxItems`;
- refused: every other keyword (`minLength`/`maxLength`, `uniqueItems` (a `set`),
  `prefixItems` (a `tuple`), `patternProperties`, `not`, ...), an open object
  (`additionalProperties` other than false: `dict[str, X]`, `extra="allow"`), an object
  without `properties`, an array without `items` and a schema without a type (`Any`).

Internal interface, used by `_structured.py` (response formats) and `tools/_schema.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "FORMATS",
    "MISSING",
    "StrictSchema",
    "is_strict_ready",
    "resolve_ref",
    "strict_schema",
    "wrap_root",
]

#: The string formats strict mode accepts.
FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)

#: "No default": the property is left out when the model sends null for it.
MISSING: object = type("MissingType", (), {"__repr__": lambda self: "MISSING"})()

_ANNOTATIONS = frozenset(
    {
        "title",
        "default",
        "examples",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$schema",
        "$id",
        "discriminator",
    }
)
_KEPT = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "anyOf",
        "$ref",
        "$defs",
        "definitions",
        "description",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minItems",
        "maxItems",
    }
)
_HINTS = {
    "minLength": "a pattern such as '^.{2,}$' says the same",
    "maxLength": "a pattern such as '^.{0,80}$' says the same",
    "uniqueItems": "a set or frozenset: use a list",
    "prefixItems": "a tuple: use a list or a model",
    "additionalProperties": "an open mapping such as dict[str, X]: use a list of models",
    "patternProperties": "an open mapping: use a list of models",
}
# The order keys are written in, for schemas that read well in a request log.
_ORDER = (
    "type",
    "description",
    "enum",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "anyOf",
    "$ref",
)


@dataclass(frozen=True, slots=True, eq=False)
class StrictSchema:
    """A strict-ready schema and what it takes to read the model's answer back.

    Attributes:
        schema: the schema to send.
        optional: per object schema in `schema` (by `id`), its properties that were
            optional, each with its JSON `default` or `MISSING`.
    """

    schema: dict[str, object]
    optional: dict[int, dict[str, object]] = field(default_factory=dict, repr=False)

    def restore_defaults(self, value: object, *, fill: bool = False, at: object = None) -> object:
        """`value` (the decoded answer) with each `null` the model sent for a property
        that was optional taken back out: left out, so that pydantic fills in the default
        (`fill=False`), or replaced by the schema's `default` when it has one (`fill=True`,
        for hand-written schemas that nothing else fills in).

        Returns a new value (the containers the schema describes are copied; others are
        shared): partial values handed out before are never changed.

        Args:
            value: the decoded JSON.
            fill: put the schema's `default` in place of null (else leave the key out).
            at: the sub-schema of `schema` that describes `value` (default: the root).
        """
        return self._restore(value, self.schema if at is None else at, fill, 0)

    def _restore(self, value: object, schema: object, fill: bool, depth: int) -> object:
        schema = self._resolve(schema)
        if depth > 256 or not isinstance(schema, dict):
            return value
        if isinstance(value, dict):
            branch = self._branch(schema, value)
            if branch is None:
                return value
            properties = branch["properties"]
            optional = self.optional.get(id(branch), {})
            out: dict[str, object] = {}
            for key, item in value.items():
                if item is None and key in optional:
                    default = optional[key]
                    if fill and default is not MISSING:
                        out[key] = copy.deepcopy(default)
                    continue
                sub = properties.get(key) if isinstance(properties, dict) else None
                out[key] = item if sub is None else self._restore(item, sub, fill, depth + 1)
            return out
        if isinstance(value, list):
            items = self._items(schema)
            if items is None:
                return value
            return [self._restore(item, items, fill, depth + 1) for item in value]
        return value

    def _resolve(self, schema: object) -> object:
        for _ in range(64):  # a chain of $refs, bounded
            if not isinstance(schema, dict) or "$ref" not in schema:
                return schema
            schema = resolve_ref(self.schema, schema["$ref"])
        return schema

    def _branch(
        self, schema: dict[str, object], value: dict[str, object]
    ) -> dict[str, object] | None:
        if isinstance(schema.get("properties"), dict):
            return schema
        fallback = None
        options = schema.get("anyOf")
        for option in options if isinstance(options, list) else ():
            option = self._resolve(option)
            if isinstance(option, dict) and isinstance(option.get("properties"), dict):
                if _fits(option, value):
                    return option
                fallback = fallback or option
        return fallback

    def _items(self, schema: dict[str, object]) -> object:
        if "items" in schema:
            return schema["items"]
        options = schema.get("anyOf")
        for option in options if isinstance(options, list) else ():
            option = self._resolve(option)
            if isinstance(option, dict) and "items" in option:
                return option["items"]
        return None


def _fits(schema: dict[str, object], value: dict[str, object]) -> bool:
    properties = schema["properties"]
    assert isinstance(properties, dict)
    for key, item in value.items():
        sub = properties.get(key)
        if not isinstance(sub, dict):
            return False
        enum = sub.get("enum")
        if isinstance(enum, list) and item is not None and item not in enum:
            return False
    return True


def resolve_ref(root: Mapping[str, object], ref: object) -> object:
    """What the local `$ref` (`#/$defs/Name`, `#`) points at in `root`, or None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: object = root
    for part in ref[1:].split("/")[1:] if ref != "#" else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def wrap_root(schema: Mapping[str, object], key: str) -> dict[str, object]:
    """`{"type": "object", "properties": {key: schema}, ...}`: a root that is not an object
    (a list, a union, a number) in the object a `json_schema` response format needs; the
    `$defs` move up to the new root, where their `$ref`s point."""
    inner = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    wrapped: dict[str, object] = {
        "type": "object",
        "properties": {key: inner},
        "required": [key],
        "additionalProperties": False,
    }
    for defs in ("$defs", "definitions"):
        if defs in schema:
            wrapped[defs] = schema[defs]
    return wrapped


def strict_schema(schema: Mapping[str, object], *, where: str) -> StrictSchema:
    """The strict-ready form of `schema` (see the module docstring); `schema` is not changed.

    Args:
        schema: a JSON schema (a mapping, JSON values only).
        where: what the schema is of, for error messages (`"tool 'f'"`).

    Raises:
        TypeError: the schema says something strict mode cannot express.
    """
    if not isinstance(schema, Mapping):
        raise TypeError(f"{where}: a JSON schema is a mapping, not {type(schema).__name__}")
    transform = _Transform(schema, where)
    result = transform.walk(schema, "$", root=True)
    return StrictSchema(result, transform.optional)


def is_strict_ready(schema: Mapping[str, object]) -> bool:
    """Whether `schema` is already in strict form (its strict form is itself)."""
    try:
        return strict_schema(schema, where="schema").schema == schema
    except TypeError:
        return False


class _Transform:
    def __init__(self, root: Mapping[str, object], where: str) -> None:
        self.root = root
        self.where = where
        self.optional: dict[int, dict[str, object]] = {}
        self.inlining: list[str] = []  # $refs being inlined, to stop a circle of them

    def refuse(self, path: str, what: str, hint: str = "") -> TypeError:
        more = f" ({hint})" if hint else ""
        return TypeError(
            f"{self.where}: {what} at {path} cannot be expressed in a strict schema{more}; "
            "see docs/structured.md#strict"
        )

    def walk(self, schema: object, path: str, root: bool = False) -> dict[str, object]:
        if not isinstance(schema, Mapping):
            raise self.refuse(path, f"{schema!r} as a schema", "a schema is an object")
        s = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
        all_of = s.pop("allOf", None)
        if all_of is not None:
            if not isinstance(all_of, list) or len(all_of) != 1:
                raise self.refuse(path, "allOf of several schemas")
            if not isinstance(all_of[0], Mapping):
                raise self.refuse(path, f"{all_of[0]!r} in allOf", "a schema is an object")
            merged = {**all_of[0], **s}
            s = {k: v for k, v in merged.items() if k not in _ANNOTATIONS}
        ref = s.get("$ref")
        if ref is not None and (root or len(s) > 1):
            return self.inline(s, path, root)
        if "const" in s:
            const = s.pop("const")
            if "enum" not in s:
                s["enum"] = [const]
        if "oneOf" in s:
            if "discriminator" not in schema:
                raise self.refuse(path, "oneOf", "use anyOf, or a discriminated union")
            s["anyOf"] = s.pop("oneOf")
        for key in s:
            if key not in _KEPT:
                raise self.refuse(path, f"{key!r}", _HINTS.get(key, ""))
        fmt = s.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise self.refuse(
                path, f"format {fmt!r}", "strict accepts " + ", ".join(sorted(FORMATS))
            )
        if not any(k in s for k in ("type", "enum", "anyOf", "$ref")):
            raise self.refuse(path, "a schema without a type", "such as Any or object: give it one")
        for defs in ("$defs", "definitions"):
            found = s.get(defs)
            if isinstance(found, Mapping):
                s[defs] = {name: self.walk(d, name) for name, d in found.items()}
        options = s.get("anyOf")
        if options is not None:
            if not isinstance(options, list) or not options:
                raise self.refuse(path, "anyOf", "anyOf is a non-empty list")
            s["anyOf"] = [self.walk(option, path) for option in options]
        kinds = s.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "items" in s:
            s["items"] = self.walk(s["items"], f"{path}[]")
        elif "array" in kinds:
            raise self.refuse(path, "an array without items", "such as a bare list: type it")
        if "object" in kinds or "properties" in s:
            self.object(s, path)
        return _ordered(s)

    def inline(self, s: dict[str, object], path: str, root: bool) -> dict[str, object]:
        ref = s.pop("$ref")
        if ref in self.inlining:
            raise self.refuse(path, f"$ref {ref!r} that refers to itself with other keywords")
        target = resolve_ref(self.root, ref)
        if not isinstance(target, Mapping):
            raise self.refuse(path, f"$ref {ref!r}", "only local refs such as '#/$defs/Name'")
        merged = {k: v for k, v in target.items() if k not in ("$defs", "definitions")}
        merged.update(s)  # the keywords next to the $ref win (a field's description)
        self.inlining.append(str(ref))
        try:
            return self.walk(merged, path, root=False)
        finally:
            self.inlining.pop()

    def object(self, s: dict[str, object], path: str) -> None:
        properties = s.get("properties")
        if not isinstance(properties, Mapping):
            raise self.refuse(path, "an object without properties", _HINTS["additionalProperties"])
        extra = s.get("additionalProperties", False)
        if extra is not False:
            raise self.refuse(path, "additionalProperties", _HINTS["additionalProperties"])
        required = s.get("required", [])
        if not isinstance(required, list):
            raise self.refuse(path, "required", "required is a list of names")
        out: dict[str, object] = {}
        optional: dict[str, object] = {}
        for name, sub in properties.items():
            strict = self.walk(sub, f"{path}.{name}")
            if name not in required:
                optional[name] = (
                    sub.get("default", MISSING) if isinstance(sub, Mapping) else MISSING
                )
                if not _nullable(strict):
                    strict = _nullable_form(strict)
            out[name] = strict
        s["properties"] = out
        s["required"] = list(out)
        s["additionalProperties"] = False
        if "type" not in s:
            s["type"] = "object"
        if optional:
            self.optional[id(s)] = optional


def _nullable(schema: Mapping[str, object]) -> bool:
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    enum = schema.get("enum")
    if isinstance(enum, list) and None in enum:
        return True
    options = schema.get("anyOf")
    return isinstance(options, list) and any(
        isinstance(o, Mapping) and _nullable(o) for o in options
    )


def _nullable_form(schema: dict[str, object]) -> dict[str, object]:
    # The schema itself stays the first option (its identity keys `optional`).
    description = schema.pop("description", None)
    options = schema.get("anyOf")
    if set(schema) == {"anyOf"} and isinstance(options, list):
        out: dict[str, object] = {"anyOf": [*options, {"type": "null"}]}
    else:
        out = {"anyOf": [schema, {"type": "null"}]}
    if description is not None:
        out = {"description": description, **out}
    return out


def _ordered(s: dict[str, object]) -> dict[str, object]:
    # In place: the identity of an object schema keys `optional`.
    items = [(k, s[k]) for k in _ORDER if k in s]
    items += [(k, v) for k, v in s.items() if k not in _ORDER]
    s.clear()
    s.update(items)
    return s
