"""JSON schema from type hints and Google-style docstrings, and JSON arguments back to
Python values: the machinery behind `tool()`, without pydantic.

Internal interface, used by `tools/_tool.py` only: `is_coroutine_function`,
`function_schema`, `parse_docstring`, `convert`. (Issue #19 replaces the schema half with
pydantic; this module was moved here as it was, not polished.)
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import (
    Annotated,
    Literal,
    NotRequired,
    Required,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

__all__ = ["convert", "function_schema", "is_coroutine_function", "parse_docstring"]

_PRIMITIVES: dict[object, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
    None: "null",
}
_SEQUENCES = (list, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)
_SUPPORTED = (
    "str, int, float, bool, None, X | None, list[X], Sequence[X], dict[str, X], "
    "Mapping[str, X], Literal[...], Enum, a dataclass, a TypedDict, Annotated[X, ...], Any"
)


def is_coroutine_function(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, functools.partial):
        return False
    # An instance whose class defines `async def __call__`.
    return inspect.iscoroutinefunction(type(fn).__call__)


def _hint_source(fn: object) -> object:
    if isinstance(fn, functools.partial):
        return _hint_source(fn.func)
    if inspect.isroutine(fn):
        return inspect.unwrap(fn)
    return type(fn).__call__


def _resolve_hints(obj: object, where: str) -> dict[str, object]:
    try:
        return get_type_hints(obj, include_extras=True)
    except Exception as exc:  # NameError for a name not importable where obj was defined
        raise TypeError(f"{where}: cannot resolve the type annotations ({exc})") from exc


def function_schema(
    fn: Callable[..., object], name: str, arg_docs: Mapping[str, str]
) -> tuple[dict[str, object], dict[str, object]]:
    where = f"tool {name!r}"
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where}: cannot read the signature ({exc}); pass schema=") from exc
    hints = _resolve_hints(_hint_source(fn), where)
    properties: dict[str, object] = {}
    required: list[str] = []
    kept: dict[str, object] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(
                f"{where}: parameter {param.name!r} cannot be passed by name from JSON "
                "(no *args, **kwargs or positional-only parameters); pass schema="
            )
        if param.name not in hints:
            raise TypeError(f"{where}: parameter {param.name!r} has no type annotation")
        annotation = hints[param.name]
        prop = _schema(annotation, f"{where}, parameter {param.name!r}", ())
        if param.name in arg_docs and "description" not in prop:
            prop["description"] = arg_docs[param.name]
        if param.default is param.empty:
            required.append(param.name)
        else:
            _add_default(prop, param.default)
        properties[param.name] = prop
        kept[param.name] = annotation
    return _object(properties, required), kept


def _object(properties: Mapping[str, object], required: list[str]) -> dict[str, object]:
    schema: dict[str, object] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def _add_default(prop: dict[str, object], default: object) -> None:
    if isinstance(default, enum.Enum):
        default = default.value
    if default is None or isinstance(default, str | int | float | bool):
        prop["default"] = default


def _schema(tp: object, where: str, seen: tuple[type, ...]) -> dict[str, object]:
    if tp is typing.Any or tp is object:
        return {}
    if tp in _PRIMITIVES:
        return {"type": _PRIMITIVES[tp]}
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        inner = _schema(args[0], where, seen)
        notes = [note for note in args[1:] if isinstance(note, str)]
        if notes:
            inner["description"] = " ".join(notes)
        return inner
    if origin is Union or origin is types.UnionType:
        return _union([_schema(arg, where, seen) for arg in args])
    if origin is Literal:
        return _enum(list(args), where)
    if tp in (list, collections.abc.Sequence):
        return {"type": "array"}
    if origin in _SEQUENCES:
        return {"type": "array", "items": _schema(args[0], where, seen)}
    if tp in (dict, collections.abc.Mapping):
        return {"type": "object"}
    if origin in _MAPPINGS:
        if args[0] is not str:
            raise TypeError(f"{where}: JSON object keys are strings, not {args[0]!r}")
        return {"type": "object", "additionalProperties": _schema(args[1], where, seen)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum([member.value for member in tp], where)
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or is_typeddict(tp)):
        if tp in seen:
            raise TypeError(f"{where}: recursive type {tp.__name__} is not supported")
        return _class_schema(tp, where, (*seen, tp))
    raise TypeError(f"{where}: unsupported type annotation {tp!r}; supported: {_SUPPORTED}")


def _union(members: list[dict[str, object]]) -> dict[str, object]:
    kinds: list[object] = []
    for member in members:
        kind = member.get("type")
        if set(member) != {"type"} or not isinstance(kind, str):
            return {"anyOf": members}
        if kind not in kinds:
            kinds.append(kind)
    return {"type": kinds[0] if len(kinds) == 1 else kinds}


def _json_kind(value: object) -> str | None:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, kind):
            return name
    return None


def _enum(values: list[object], where: str) -> dict[str, object]:
    values = [v.value if isinstance(v, enum.Enum) else v for v in values]
    kinds = {_json_kind(v) for v in values}
    if None in kinds:
        raise TypeError(f"{where}: Literal and Enum values must be str, int, float, bool or None")
    schema: dict[str, object] = {"type": kinds.pop()} if len(kinds) == 1 else {}
    schema["enum"] = values
    return schema


def _class_schema(cls: type, where: str, seen: tuple[type, ...]) -> dict[str, object]:
    hints = _resolve_hints(cls, where)
    doc = cls.__doc__
    if dataclasses.is_dataclass(cls) and doc and doc.startswith(f"{cls.__name__}("):
        doc = None  # the signature dataclass() writes when there is no docstring
    summary, field_docs = parse_docstring(inspect.cleandoc(doc) if doc else None)
    properties: dict[str, dict[str, object]] = {}
    required: list[str] = []
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            prop = _schema(hints[f.name], f"{where}, field {f.name!r}", seen)
            properties[f.name] = prop
            if f.default is not dataclasses.MISSING:
                _add_default(prop, f.default)
            elif f.default_factory is dataclasses.MISSING:
                required.append(f.name)
    else:
        required_keys: frozenset[str] = getattr(cls, "__required_keys__", frozenset())
        for key, annotation in hints.items():
            wrapper = get_origin(annotation)
            if wrapper is Required or wrapper is NotRequired:
                annotation = get_args(annotation)[0]
            properties[key] = _schema(annotation, f"{where}, key {key!r}", seen)
            # `from __future__ import annotations` hides NotRequired from
            # __required_keys__ on Python 3.11, so the resolved hint decides too.
            if wrapper is Required or (key in required_keys and wrapper is not NotRequired):
                required.append(key)
    for key, entry in properties.items():
        if key in field_docs and "description" not in entry:
            entry["description"] = field_docs[key]
    schema = _object(properties, required)
    if summary:
        schema = {"description": summary, **schema}
    return schema


# --- docstrings --------------------------------------------------------------------------

_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
_PARAM_SECTIONS = {"args", "arguments", "parameters", "params", "attributes", "keyword args"}
_ENTRY = re.compile(r"^\*{0,2}(?P<name>\w+)\s*(?:\([^)]*\))?\s*:\s*(?P<text>.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The text before the first Google-style section, and the Args/Attributes entries."""
    if not doc:
        return "", {}
    lines = doc.splitlines()
    intro: list[str] = []
    entries: dict[str, str] = {}
    section: str | None = None
    entry_indent: int | None = None
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        header = _SECTION.match(line)  # sections start at column 0 of the cleaned docstring
        if header:
            section, entry_indent, current = header[1].lower(), None, None
            continue
        if section is None:
            intro.append(stripped)
            continue
        if section not in _PARAM_SECTIONS or not stripped:
            continue
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.match(stripped) if indent <= entry_indent else None
        if match:
            current = match["name"]
            entries[current] = match["text"].strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {stripped}".strip()
    paragraphs = " ".join(s if s else "\n\n" for s in intro).split("\n\n")
    summary = "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
    return summary, entries


# --- JSON arguments to Python values ---------------------------------------------------


def _is_plain(value: object, tp: object) -> bool:
    return tp in (str, int, float, bool) and type(value) is tp


def convert(value: object, tp: object) -> object:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return convert(value, args[0])
    if origin is Union or origin is types.UnionType:
        if value is None or any(_is_plain(value, arg) for arg in args):
            return value
        error: Exception | None = None
        accepted = False  # some member takes the value as it is
        for arg in args:
            if arg is type(None):
                continue
            try:
                converted = convert(value, arg)
            except (TypeError, ValueError) as exc:
                error = error or exc
                continue
            if converted is not value:
                return converted
            accepted = True
        if error is not None and not accepted:
            raise error
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in _SEQUENCES and args and isinstance(value, list):
        return [convert(item, args[0]) for item in value]
    if origin in _MAPPINGS and len(args) == 2 and isinstance(value, dict):
        return {key: convert(item, args[1]) for key, item in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value if isinstance(value, tp) else tp(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object for {tp.__name__}")
        hints = get_type_hints(tp, include_extras=True)
        fields = {key: convert(item, hints.get(key, object)) for key, item in value.items()}
        return tp(**fields)
    return value
