"""Structured outputs (#19): what `response_format=` sends, and the state of one stream's
structured output, fed its text deltas. Sans-I/O.

`response_format=` takes:

- a type pydantic's `TypeAdapter` accepts (a model, a dataclass, a TypedDict,
  `list[Model]`, ...): pydantic makes its JSON schema, `_strict.py` its strict form, and
  pydantic validates the answer back into the type. A root that is not an object (a list,
  a union, a number) is wrapped in one, as `json_schema` requires: `{"items": [...]}` for
  a list, `{"value": ...}` otherwise, and unwrapped again;
- a JSON schema (a mapping): sent in its strict form (wrapped the same way); the answer is
  the decoded JSON (nothing validates it against the schema but the server);
- an OpenAI `response_format` object (`{"type": "json_schema", ...}`, `json_object` or
  `text`): sent as given, the escape hatch for schemas the strict form refuses; the
  answer is the decoded JSON (no structured output for `text`).

`StructuredOutput` keeps the partial value (a `PartialJSON`, linear in the text), hands
out the completed elements of a list output, validated, and the final value; the stream
classes call it from `_stream.py`.

Internal interface, used by `_base.py` (`output_spec`), `_stream.py` and the shells
(`OutputSpec`, `StructuredOutput`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Annotated, get_args, get_origin

from ._exceptions import IncompleteOutputError, OutputRefusedError, OutputValidationError
from ._partial_json import PartialJSON, PartialJSONError
from ._pydantic import TypeCheck, type_check
from ._strict import StrictSchema, resolve_ref, strict_schema, wrap_root

__all__ = ["OutputSpec", "StructuredOutput", "output_spec"]

_RAW_TYPES = ("json_schema", "json_object", "text")
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_-]+")
_INCOMPLETE = ("length", "content_filter")
_TextFeed = Callable[[bytes], list[str]]  # a chunk parser's text deltas
_Feed = Callable[[bytes], list[object]]


class OutputSpec:
    """A `response_format=`, ready to send and to read the answer with (see the module
    docstring). Made by `output_spec`; shared by every stream of the same type.

    Attributes:
        name: the `json_schema.name` sent.
        structured: whether the answer is JSON (False for a raw `{"type": "text"}`).
        unwrap: the key a non-object root was wrapped under, or None.
        is_list: whether the output is a list (`elements()` applies).
    """

    __slots__ = (
        "check",
        "element_check",
        "element_schema",
        "is_list",
        "name",
        "raw",
        "strict",
        "structured",
        "unwrap",
    )

    def __init__(
        self,
        name: str,
        *,
        raw: Mapping[str, object] | None = None,
        strict: StrictSchema | None = None,
        check: TypeCheck | None = None,
        element_check: TypeCheck | None = None,
        unwrap: str | None = None,
        is_list: bool = False,
    ) -> None:
        self.name = name
        self.raw = raw
        self.strict = strict
        self.check = check
        self.element_check = element_check
        self.unwrap = unwrap
        self.is_list = is_list
        self.structured = raw is None or raw.get("type") != "text"
        self.element_schema: object = None
        if strict is not None and is_list and unwrap is not None:
            properties = strict.schema["properties"]
            assert isinstance(properties, dict)
            wrapper = properties[unwrap]
            self.element_schema = wrapper.get("items") if isinstance(wrapper, dict) else None

    def request(self, strict: bool) -> dict[str, object]:
        """The body's `response_format`; `strict: true` in it when `strict`."""
        if self.raw is not None:
            return dict(self.raw)
        assert self.strict is not None
        spec: dict[str, object] = {"name": self.name, "schema": self.strict.schema}
        if strict:
            spec["strict"] = True
        return {"type": "json_schema", "json_schema": spec}

    def final(self, decoded: object, text: str) -> object:
        """The final value of the decoded answer: unwrapped, each null sent for an optional
        field made its default, validated.

        Raises:
            OutputValidationError: it does not fit.
        """
        fill = self.check is None  # no pydantic to fill in defaults: the schema's `default`
        if self.strict is not None:
            decoded = self.strict.restore_defaults(decoded, fill=fill)
        if self.unwrap is not None:
            if not isinstance(decoded, dict) or self.unwrap not in decoded:
                raise OutputValidationError(
                    f"{self.name}: expected an object with {self.unwrap!r}, as the schema says",
                    text=text,
                )
            decoded = decoded[self.unwrap]
        return decoded if self.check is None else self.check.validate(decoded, text=text)

    def element(self, raw: object, text: str, index: int) -> object:
        """A completed element of a list output, validated (`final` for one element;
        `index`, its place in the list, leads the `loc` of its errors).

        Raises:
            OutputValidationError: it does not fit the element type.
        """
        if self.strict is not None and self.element_schema is not None:
            fill = self.element_check is None
            raw = self.strict.restore_defaults(raw, fill=fill, at=self.element_schema)
        check = self.element_check
        return raw if check is None else check.validate(raw, text=text, at=(index,))


def output_spec(response_format: object) -> OutputSpec:
    """The `OutputSpec` of a `response_format=` argument (see the module docstring).

    Raises:
        ImportError: a type was given and pydantic is not installed.
        TypeError: pydantic cannot handle the type, or its schema cannot be made strict.
    """
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind in _RAW_TYPES:
            return OutputSpec(str(kind), raw=response_format)
        return _schema_spec(response_format)
    try:
        return _cached_type_spec(response_format)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
    return _type_spec(response_format)


def _schema_spec(schema: Mapping[str, object]) -> OutputSpec:
    title = schema.get("title")
    name = _name(title) if isinstance(title, str) else "response"
    where = f"response_format {name!r}"
    wrapped, unwrap, is_list = _wrapped(schema)
    return OutputSpec(
        name, strict=strict_schema(wrapped, where=where), unwrap=unwrap, is_list=is_list
    )


@functools.lru_cache(maxsize=256)
def _cached_type_spec(tp: object) -> OutputSpec:
    return _type_spec(tp)


def _type_spec(tp: object) -> OutputSpec:
    name = _type_name(tp)
    check = type_check(tp, f"response_format {name}")
    wrapped, unwrap, is_list = _wrapped(check.json_schema())
    element_check = None
    if is_list:
        element = _element_type(tp)
        if element is not None:
            element_check = type_check(element, f"an element of response_format {name}")
    return OutputSpec(
        name,
        strict=strict_schema(wrapped, where=check.where),
        check=check,
        element_check=element_check,
        unwrap=unwrap,
        is_list=is_list,
    )


def _wrapped(schema: Mapping[str, object]) -> tuple[Mapping[str, object], str | None, bool]:
    """The schema with an object at its root, the key it was wrapped under, and whether
    the output is a list."""
    root: object = schema
    if "$ref" in schema:
        root = resolve_ref(schema, schema["$ref"])
    kind = root.get("type") if isinstance(root, Mapping) else None
    if kind == "object":
        return schema, None, False
    key = "items" if kind == "array" else "value"
    return wrap_root(schema, key), key, kind == "array"


def _element_type(tp: object) -> object:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    args = get_args(tp)
    return args[0] if len(args) == 1 else None


def _type_name(tp: object) -> str:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    origin, args = get_origin(tp), get_args(tp)
    if origin is None or not args:
        return _name(getattr(tp, "__name__", None) or repr(tp))
    base = getattr(origin, "__name__", None) or "union"
    parts = [_type_name(arg) for arg in args if arg is not type(None) and arg is not Ellipsis]
    return _name(
        "_".join([base, *parts]) if base not in ("Union", "UnionType") else "_or_".join(parts)
    )


def _name(text: str) -> str:
    # json_schema.name: letters, digits, '_' and '-', at most 64 characters.
    return _NOT_A_NAME.sub("_", text).strip("_")[:64] or "response"


class StructuredOutput:
    """The structured output of one stream: fed the text deltas, it keeps the partial
    value, the completed elements (validated) and, at the end, the validated value.

    Args:
        spec: what was asked for.
    """

    __slots__ = ("_elements", "_json", "_result", "_texts", "spec")

    def __init__(self, spec: OutputSpec) -> None:
        self.spec = spec
        elements_at = (spec.unwrap,) if spec.is_list and spec.unwrap else None
        self._json = PartialJSON(elements_at=elements_at)
        self._texts: list[str] = []
        self._elements = 0  # completed elements handed out
        self._result: tuple[object, BaseException | None] | None = None

    @property
    def text(self) -> str:
        """The text fed so far."""
        return "".join(self._texts)

    def feed(self, text: str) -> bool:
        """Parse the next text delta; whether the (unwrapped) partial value changed.

        Raises:
            PartialJSONError: the text is not JSON (`.text` set to the text so far).
        """
        self._texts.append(text)
        try:
            changed = self._json.feed(text)
        except PartialJSONError as exc:
            exc.text = self.text
            raise
        if not changed or self.spec.unwrap is None:
            return changed
        value = self._json.value
        return isinstance(value, dict) and self.spec.unwrap in value

    @property
    def partial(self) -> object:
        """The partial value (unwrapped), grown in place; None before any of it shows."""
        value = self._json.value
        key = self.spec.unwrap
        if key is None:
            return value
        return value.get(key) if isinstance(value, dict) else None

    def elements(self) -> list[object]:
        """The elements of a list output completed since the last call, validated.

        Raises:
            OutputValidationError: an element does not fit the element type.
        """
        out = []
        for raw in self._json.completed_elements():
            out.append(self.spec.element(raw, self.text, self._elements))
            self._elements += 1
        return out

    def finish(self, finish_reason: str | None, refusal: str | None = None) -> object:
        """The final value, validated (the same value, or error, on every call).

        Args:
            finish_reason: the stream's finish_reason.
            refusal: the model's refusal (`message.refusal`), if it refused: then there is
                no output, whatever text came besides and however it ended.

        Raises:
            OutputRefusedError: the model refused (`refusal` given).
            IncompleteOutputError: `finish_reason` is `length` or `content_filter`.
            OutputValidationError: not valid JSON (`PartialJSONError`), or not the type.
        """
        if self._result is None:
            try:
                if refusal is not None:
                    raise OutputRefusedError(refusal, text=self.text)
                if finish_reason in _INCOMPLETE:
                    assert finish_reason is not None
                    raise IncompleteOutputError(finish_reason, self.partial, self.text)
                try:
                    decoded = self._json.finish()
                except PartialJSONError as exc:
                    exc.text = self.text
                    raise
                self._result = (self.spec.final(decoded, self.text), None)
            except (OutputValidationError, IncompleteOutputError) as exc:
                self._result = (None, exc)
        value, error = self._result
        if error is not None:
            raise error
        return value

    def finish_text(
        self, text: str, finish_reason: str | None, refusal: str | None = None
    ) -> object:
        """`finish` for an output whose text was not fed delta by delta (read whole)."""
        if refusal is not None and self._result is None:
            self._texts = [text]  # the refusal's `.text`; the text is not parsed
            return self.finish(finish_reason, refusal)
        if not self._texts and self._result is None:
            try:
                self.feed(text)
            except PartialJSONError as exc:
                self._result = (None, exc)
        return self.finish(finish_reason)

    def partials_feed(
        self, feed_text: Callable[[bytes], list[str]]
    ) -> Callable[[bytes], list[object]]:
        """A chunk feed (bytes in, items out) that yields the partial value each time a
        text delta changed it; `feed_text` is the stream parser's."""

        def feed(chunk: bytes) -> list[object]:
            out: list[object] = []
            for text in feed_text(chunk):
                if self.feed(text):
                    out.append(self.partial)
            return out

        return feed

    def elements_feed(
        self, feed_text: Callable[[bytes], list[str]]
    ) -> Callable[[bytes], list[object]]:
        """A chunk feed that yields each element of a list output once it is complete and
        validated."""

        def feed(chunk: bytes) -> list[object]:
            out: list[object] = []
            for text in feed_text(chunk):
                self.feed(text)
                out += self.elements()
            return out

        return feed
