"""pydantic, imported only when a feature needs it (#19): `response_format=` with a type,
and `tool()` building a schema from type hints. The plain streaming client never imports
it; it comes with the `structured` extra (`pip install 'tokenhub_stream[structured]'`).

`TypeCheck` is one type seen through a pydantic `TypeAdapter`: its JSON schema (with the
descriptions of Google-style docstrings: a class's summary, and its `Attributes:` entries
for fields that have no description of their own) and validation into the type, a failure
raised as `OutputValidationError` with pydantic's errors.

Internal interface, used by `_structured.py` and `tools/_schema.py`: `EXTRA`,
`require_pydantic`, `summary`, `TypeCheck`, `type_check`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from ._docstrings import parse_docstring
from ._exceptions import OutputValidationError

if TYPE_CHECKING:
    from pydantic import TypeAdapter

__all__ = ["EXTRA", "TypeCheck", "require_pydantic", "summary", "type_check"]

#: The extra that installs pydantic.
EXTRA = "structured"
_MAX_LISTED_ERRORS = 5


def require_pydantic(what: str) -> ModuleType:
    """Import pydantic (2.6 or later), or raise an ImportError naming the extra.

    Args:
        what: the feature that needs it, for the message (`"response_format="`).

    Raises:
        ImportError: pydantic is missing or older than 2.6.
    """
    hint = f"{what} needs pydantic 2.6 or later: pip install 'tokenhub_stream[{EXTRA}]'"
    try:
        import pydantic
    except ImportError as exc:
        raise ImportError(hint) from exc
    major, minor = (int(part) for part in pydantic.VERSION.split(".")[:2])
    if (major, minor) < (2, 6):
        raise ImportError(f"{hint} (found {pydantic.VERSION})")
    return pydantic


class TypeCheck:
    """One type through a pydantic `TypeAdapter`: its JSON schema, and validation.

    Args:
        tp: anything `TypeAdapter` accepts (a model, a dataclass, a TypedDict,
            `list[Model]`, `int | None`, ...).
        where: what the type is for, for error messages.

    Raises:
        ImportError: pydantic is not installed.
        TypeError: pydantic cannot validate the type, or make a JSON schema of it.
    """

    def __init__(self, tp: object, where: str) -> None:
        pydantic = require_pydantic(where)
        self.type = tp
        self.where = where
        try:
            self._adapter: TypeAdapter[object] = pydantic.TypeAdapter(tp)
        except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError) as exc:
            raise TypeError(f"{where}: pydantic cannot validate {tp!r}: {exc}") from None
        self._schema: dict[str, object] | None = None

    def json_schema(self) -> dict[str, object]:
        """The type's JSON schema (pydantic's, descriptions from docstrings); a new dict.

        Raises:
            TypeError: the type has no JSON schema (a callable, an arbitrary class).
        """
        if self._schema is None:
            from pydantic.errors import PydanticInvalidForJsonSchema, PydanticUserError

            try:
                self._schema = self._adapter.json_schema(schema_generator=_generator())
            except (PydanticInvalidForJsonSchema, PydanticUserError) as exc:
                raise TypeError(f"{self.where}: no JSON schema for {self.type!r}: {exc}") from None
        return copy.deepcopy(self._schema)

    def validate(self, value: object, *, text: str = "", at: tuple[int | str, ...] = ()) -> object:
        """`value` (decoded JSON) validated into the type.

        Args:
            value: the decoded JSON.
            text: the JSON text, for the error.
            at: where `value` is in the whole output (an element's index), put before the
                errors' `loc`.

        Raises:
            OutputValidationError: the value does not fit, with pydantic's errors.
        """
        from pydantic import ValidationError

        try:
            return self._adapter.validate_python(value)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if at:
                errors = [{**error, "loc": (*at, *error["loc"])} for error in errors]
            raise OutputValidationError(
                f"{self.where}: {summary(errors)}", text=text, errors=errors
            ) from None


def summary(errors: Sequence[Mapping[str, object]]) -> str:
    """pydantic's errors on one line: `2 validation errors: city: Field required; ...`."""
    count = len(errors)
    parts = []
    for error in errors[:_MAX_LISTED_ERRORS]:
        loc = error.get("loc")
        where = ".".join(str(p) for p in loc) if isinstance(loc, tuple | list) and loc else "value"
        parts.append(f"{where}: {error.get('msg')}")
    more = f" (and {count - _MAX_LISTED_ERRORS} more)" if count > _MAX_LISTED_ERRORS else ""
    noun = "error" if count == 1 else "errors"
    return f"{count} validation {noun}: " + "; ".join(parts) + more


@functools.lru_cache(maxsize=256)
def _cached(tp: object, where: str) -> TypeCheck:
    return TypeCheck(tp, where)


def type_check(tp: object, where: str) -> TypeCheck:
    """`TypeCheck(tp, where)`, reused for a type seen before (when `tp` is hashable)."""
    try:
        return _cached(tp, where)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
    return TypeCheck(tp, where)


def _describe(schema: dict[str, object]) -> dict[str, object]:
    """A class's schema with its Google-style docstring read: the summary as the
    description, the `Attributes:` entries for fields without a description."""
    doc = schema.get("description")
    if not isinstance(doc, str):
        return schema
    summary, entries = parse_docstring(doc)
    if summary:
        schema["description"] = summary
    else:
        del schema["description"]
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for name, text in entries.items():
            prop = properties.get(name)
            if isinstance(prop, dict) and "description" not in prop and text:
                prop["description"] = text
    return schema


@functools.cache
def _generator() -> type:
    from pydantic import json_schema
    from pydantic_core import core_schema

    class _Generator(json_schema.GenerateJsonSchema):
        def model_schema(self, schema: core_schema.ModelSchema) -> json_schema.JsonSchemaValue:
            return _describe(super().model_schema(schema))

        def dataclass_schema(
            self, schema: core_schema.DataclassSchema
        ) -> json_schema.JsonSchemaValue:
            return _describe(super().dataclass_schema(schema))

        def typed_dict_schema(
            self, schema: core_schema.TypedDictSchema
        ) -> json_schema.JsonSchemaValue:
            return _describe(super().typed_dict_schema(schema))

        def dataclass_args_schema(
            self, schema: core_schema.DataclassArgsSchema
        ) -> json_schema.JsonSchemaValue:
            # A field with init=False is no argument: validation refuses it, so the model
            # is not asked for it (pydantic's schema lists it).
            fields = [f for f in schema["fields"] if f.get("init") is not False]
            return super().dataclass_args_schema({**schema, "fields": fields})

    return _Generator
