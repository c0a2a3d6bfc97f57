"""tools.tool(): JSON schema from type hints and docstrings, ToolSet, argument decoding.

Since #19 the schema is pydantic's in strict form (every property required, the optional
ones nullable, enums and models as `$defs`), and the arguments are validated by pydantic.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NotRequired, Required

import pytest

# pydantic validates typing_extensions' TypedDict only, before Python 3.12.
from typing_extensions import TypedDict

from tokenhub_stream.tools import Tool, ToolSet, tool


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Point:
    """A point on the map.

    Attributes:
        x: the longitude.
        y: the latitude.
    """

    x: float
    y: float = 0.0
    tags: list[str] = field(default_factory=list)


@dataclass
class Bare:
    value: int
    derived: int = field(init=False, default=0)  # not an argument: not in the schema


@dataclass
class Node:
    child: Node | None = None


class Options(TypedDict):
    verbose: bool
    depth: NotRequired[int]


class Partial(TypedDict, total=False):
    name: Required[str]
    note: str


class Opaque:
    pass


@dataclass
class DayUnit:
    day: str
    unit: Unit


def _inline(schema: object, defs: Mapping[str, object]) -> object:
    """`schema` with each `$ref` to `defs` replaced by its target (types that do not recur)."""
    if isinstance(schema, dict):
        if set(schema) == {"$ref"}:
            return _inline(defs[str(schema["$ref"]).rpartition("/")[2]], defs)
        return {k: _inline(v, defs) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def _param(fn: Tool[..., object], name: str) -> object:
    properties = fn.parameters["properties"]
    assert isinstance(properties, dict)
    defs = fn.parameters.get("$defs", {})
    assert isinstance(defs, dict)
    return _inline(properties[name], defs)


def _schema_of(annotation: object) -> object:
    def f(x: int) -> None:
        pass

    f.__annotations__ = {"x": annotation, "return": None}
    return _param(tool(f), "x")


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (str, {"type": "string"}),
        (int, {"type": "integer"}),
        (float, {"type": "number"}),
        (bool, {"type": "boolean"}),
        (None, {"type": "null"}),
        (type(None), {"type": "null"}),
        (str | None, {"anyOf": [{"type": "string"}, {"type": "null"}]}),
        (int | str, {"anyOf": [{"type": "integer"}, {"type": "string"}]}),
        (list[int], {"type": "array", "items": {"type": "integer"}}),
        (Sequence[str], {"type": "array", "items": {"type": "string"}}),
        (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}),
        (Literal[1, 2], {"type": "integer", "enum": [1, 2]}),
        (Literal["a", 1], {"enum": ["a", 1]}),
        (Literal[b"x"], {"type": "string", "enum": ["x"]}),
        (Unit, {"type": "string", "enum": ["celsius", "fahrenheit"]}),
        (Level, {"type": "integer", "enum": [1, 2]}),
        (Annotated[int, "how many"], {"type": "integer", "description": "how many"}),
        (
            list[Unit] | None,
            {
                "anyOf": [
                    {
                        "type": "array",
                        "items": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    {"type": "null"},
                ]
            },
        ),
    ],
)
def test_schema_type(annotation: object, expected: object) -> None:
    assert _schema_of(annotation) == expected


def test_schema_dataclass() -> None:
    # Strict form: every field required, the ones with a default nullable (a null the
    # model sends for them becomes the default again).
    assert _schema_of(Point) == {
        "type": "object",
        "description": "A point on the map.",
        "properties": {
            "x": {"type": "number", "description": "the longitude."},
            "y": {"description": "the latitude.", "anyOf": [{"type": "number"}, {"type": "null"}]},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        },
        "required": ["x", "y", "tags"],
        "additionalProperties": False,
    }


def test_schema_dataclass_without_docstring_has_no_description() -> None:
    # dataclass() writes "Bare(value: int)" as __doc__; that is not a description.
    assert _schema_of(Bare) == {
        "type": "object",
        "properties": {"value": {"type": "integer"}},
        "required": ["value"],
        "additionalProperties": False,
    }


def test_schema_typeddict_required_keys() -> None:
    assert _schema_of(Options) == {
        "type": "object",
        "properties": {
            "verbose": {"type": "boolean"},
            "depth": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "required": ["verbose", "depth"],
        "additionalProperties": False,
    }
    partial = _schema_of(Partial)
    assert isinstance(partial, dict)
    assert partial["properties"]["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}

    @tool
    def f(options: Options) -> None:
        pass

    # A null for a key that is not required leaves it out.
    assert f.parse_arguments('{"options": {"verbose": true, "depth": null}}') == {
        "options": {"verbose": True}
    }


def test_schema_recursive_dataclass_is_a_ref() -> None:
    @tool
    def f(x: Node) -> None:
        pass

    child = {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}
    assert f.parameters["$defs"] == {
        "Node": {
            "type": "object",
            "properties": {"child": child},
            "required": ["child"],
            "additionalProperties": False,
        }
    }
    kwargs = f.parse_arguments('{"x": {"child": {"child": null}}}')
    assert kwargs == {"x": Node(child=Node(child=None))}


@pytest.mark.parametrize(
    ("annotation", "match"),
    [
        (set[int], "'uniqueItems' at \\$.x cannot be expressed in a strict schema"),
        (tuple[int, int], "'prefixItems' at \\$.x"),
        (dict[int, str], "an object without properties at \\$.x"),
        (dict[str, float], "an object without properties at \\$.x"),
        (Mapping[str, bool], "an object without properties"),
        (dict, "an object without properties"),
        (list, "a schema without a type at \\$.x\\[\\]"),
        (Any, "a schema without a type at \\$.x"),
        (object, "a schema without a type"),
        (Opaque, "pydantic cannot validate"),
    ],
)
def test_schema_unsupported_annotation_is_a_type_error(annotation: object, match: str) -> None:
    with pytest.raises(TypeError, match=match) as info:
        _schema_of(annotation)
    assert str(info.value).startswith("tool 'f'")


def test_tool_docstring_gives_description_and_argument_texts() -> None:
    @tool
    def get_weather(city: str, unit: Unit = Unit.C, days: int = 1) -> str:
        """The current weather in a city.

        Uses the national weather service,
        cached for ten minutes.

        Args:
            city (str): the city name,
                e.g. "Paris".
            unit: the temperature unit.

        Returns:
            A sentence about the weather.

        Raises:
            KeyError: unknown city.
        """
        return ""

    assert get_weather.name == "get_weather"
    assert get_weather.description == (
        "The current weather in a city.\n\n"
        "Uses the national weather service, cached for ten minutes."
    )
    assert get_weather.to_openai() == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": get_weather.description,
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": 'the city name, e.g. "Paris".'},
                    "unit": {  # a $ref with a description next to it is inlined
                        "description": "the temperature unit.",
                        "anyOf": [
                            {"type": "string", "enum": ["celsius", "fahrenheit"]},
                            {"type": "null"},
                        ],
                    },
                    "days": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                },
                "required": ["city", "unit", "days"],
                "additionalProperties": False,
                "$defs": {"Unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            },
            "strict": True,
        },
    }
    assert "strict" not in get_weather.to_openai(strict=False)["function"]  # type: ignore[operator]


def test_tool_without_docstring_or_parameters() -> None:
    def ping() -> str:
        return "pong"

    made = tool(ping)
    assert made.description == ""
    assert made.to_openai() == {
        "type": "function",
        "function": {
            "name": "ping",
            "parameters": {
                "type": "object",
                "properties": {},
                "required": [],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }


def test_tool_name_and_description_overrides() -> None:
    @tool(name="lookup-order", description="Find an order.")
    def lookup(order_id: str) -> str:
        """Ignored."""
        return order_id

    assert (lookup.name, lookup.description) == ("lookup-order", "Find an order.")
    renamed = tool(lookup, name="find_order")
    assert renamed.name == "find_order"
    assert renamed.description == "Find an order."
    assert renamed.parameters == lookup.parameters


def test_tool_hand_written_schema_is_used_as_given() -> None:
    schema: dict[str, object] = {
        "type": "object",
        "properties": {"q": {"type": "string", "minLength": 2}},
        "required": ["q"],
    }

    def search(q: Opaque) -> str:  # the annotation is not read when a schema is given
        return ""

    made = tool(search, schema=schema)
    assert made.parameters is schema
    assert made.parse_arguments('{"q": "ab"}') == {"q": "ab"}
    # Not in strict form (minLength, no additionalProperties): sent without `strict`.
    assert not made.strict_ready
    assert "strict" not in made.to_openai()["function"]  # type: ignore[operator]
    ready: dict[str, object] = {
        "type": "object",
        "properties": {"q": {"type": "string"}},
        "required": ["q"],
        "additionalProperties": False,
    }
    assert tool(search, schema=ready).to_openai()["function"]["strict"] is True  # type: ignore[index]
    with pytest.raises(TypeError, match="schema must be a mapping"):
        tool(search, schema="{}")  # type: ignore[call-overload]
    rewritten = tool(tool(lambda q: q, name="echo", schema=schema), schema={"type": "object"})
    assert rewritten.parameters == {"type": "object"}


def test_tool_call_passes_through_to_the_function() -> None:
    @tool
    def add(a: int, b: int = 2) -> int:
        return a + b

    assert add(1) == 3
    assert add(a=1, b=5) == 6
    assert not add.is_async


def test_tool_is_async_for_coroutine_callables() -> None:
    async def fetch(url: str) -> str:
        return url

    class Fetcher:
        async def __call__(self, url: str) -> str:
            return url

    class SyncFetcher:
        def __call__(self, url: str) -> str:
            return url

    assert tool(fetch).is_async
    assert tool(Fetcher(), name="fetch").is_async
    assert not tool(SyncFetcher(), name="fetch").is_async
    bound = tool(functools.partial(fetch), name="fetch")
    assert bound.is_async
    assert _param(bound, "url") == {"type": "string"}


def test_tool_from_partial_and_bound_method() -> None:
    def scale(value: float, factor: float) -> float:
        return value * factor

    double = tool(functools.partial(scale, factor=2.0), name="double")
    assert double.parameters["required"] == ["value", "factor"]  # strict: all of them
    assert double.parse_arguments('{"value": 3, "factor": null}') == {"value": 3.0}

    class Store:
        def get(self, key: str) -> str:
            """Read a key."""
            return key

    method = tool(Store().get)
    assert method.parameters["required"] == ["key"]
    assert method.description == "Read a key."


def test_tool_missing_annotation_is_a_type_error() -> None:
    def f(x, y: int) -> None:  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(TypeError, match="parameter 'x' has no type annotation"):
        tool(f)


@pytest.mark.parametrize("kind", ["args", "kwargs", "positional"])
def test_tool_parameters_not_passable_by_name_are_a_type_error(kind: str) -> None:
    def star(*args: int) -> None:
        pass

    def double_star(**kwargs: int) -> None:
        pass

    def positional(x: int, /) -> None:
        pass

    fns: dict[str, Callable[..., None]] = {
        "args": star,
        "kwargs": double_star,
        "positional": positional,
    }
    fn = fns[kind]
    with pytest.raises(TypeError, match="cannot be passed by name"):
        tool(fn)


def test_tool_unresolvable_annotation_is_a_type_error() -> None:
    def f(x: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    with pytest.raises(TypeError, match="cannot resolve the type annotations"):
        tool(f)


def test_tool_signature_unreadable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="cannot read the signature"):
        tool(range)  # a builtin without a signature


def test_tool_not_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="needs a function"):
        tool(42)  # type: ignore[call-overload]


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "dot.ted"])
def test_tool_bad_name_is_a_value_error(name: str) -> None:
    def f() -> None:
        pass

    with pytest.raises(ValueError, match="must be 1-64 letters"):
        tool(f, name=name)


def test_tool_lambda_needs_a_name() -> None:
    with pytest.raises(ValueError, match="pass name="):
        tool(lambda: None)


def test_tool_direct_construction_is_checked() -> None:
    with pytest.raises(TypeError, match="must be a JSON schema mapping"):
        Tool("f", "", [], print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn is not callable"):
        Tool("f", "", {}, 3)  # type: ignore[arg-type]


def test_parse_arguments_converts_by_annotation() -> None:
    @tool
    def plan(
        where: Point,
        unit: Unit,
        levels: list[Level],
        by_day: list[DayUnit],
        maybe: Unit | None = None,
        scale: float = 1.0,
        count: int | float = 0,
        note: Annotated[str, "free text"] = "",
    ) -> None:
        pass

    required = (
        '"where": {"x": 1, "y": null, "tags": ["a"]}, "unit": "celsius", "levels": [1, 2],'
        ' "by_day": [{"day": "mon", "unit": "fahrenheit"}]'
    )
    kwargs = plan.parse_arguments(
        "{" + required + ', "maybe": "celsius", "scale": 2, "count": 3, "note": "hi"}'
    )
    assert kwargs == {
        "where": Point(x=1.0, tags=["a"]),
        "unit": Unit.C,
        "levels": [Level.LOW, Level.HIGH],
        "by_day": [DayUnit(day="mon", unit=Unit.F)],
        "maybe": Unit.C,
        "scale": 2.0,
        "count": 3,
        "note": "hi",
    }
    assert isinstance(kwargs["scale"], float)
    assert isinstance(kwargs["count"], int)
    assert isinstance(kwargs["where"], Point) and isinstance(kwargs["where"].x, float)
    # A null for a parameter with a default leaves it to the default (strict sends null).
    assert plan.parse_arguments("{" + required + ', "maybe": null, "scale": null}') == {
        key: kwargs[key] for key in ("where", "unit", "levels", "by_day")
    }
    with pytest.raises(ValueError, match="extra: Extra inputs are not permitted"):
        # The schema says additionalProperties: false.
        plan.parse_arguments("{" + required + ', "extra": [1]}')


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"unit": "kelvin"}', "unit: Input should be 'celsius' or 'fahrenheit'"),
        ('{"where": 3}', "where: Input should be a dictionary or an instance of Point"),
        ('{"city": ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object, not list"),
    ],
)
def test_parse_arguments_errors_are_value_errors(text: str, match: str) -> None:
    @tool
    def f(unit: Unit = Unit.C, where: Point | None = None) -> None:
        pass

    with pytest.raises(ValueError, match=match):
        f.parse_arguments(text)


def test_parse_arguments_unions() -> None:
    @tool
    def f(a: Unit | list[int], b: Unit | Point | None = None) -> None:
        pass

    # Values are validated (#19): "x" is neither a Unit nor a list of ints.
    with pytest.raises(ValueError, match="validation error"):
        f.parse_arguments('{"a": "x"}')
    assert f.parse_arguments('{"a": [1], "b": null}') == {"a": [1]}
    assert f.parse_arguments('{"a": "celsius", "b": {"x": 1}}') == {"a": Unit.C, "b": Point(1.0)}
    with pytest.raises(ValueError, match="a: Field required"):
        f.parse_arguments('{"b": 3}')


def test_schema_default_not_json_is_left_out() -> None:
    def f(tags: Sequence[str] = ()) -> None:
        pass

    made = tool(f)
    assert _param(made, "tags") == {
        "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]
    }
    assert made.parse_arguments('{"tags": null}') == {}


def test_parse_arguments_empty_means_no_arguments() -> None:
    @tool
    def ping() -> str:
        return "pong"

    assert ping.parse_arguments("") == {}
    assert ping.parse_arguments("  ") == {}


def test_toolset_mapping_and_openai_list() -> None:
    def a(x: int) -> int:
        return x

    @tool
    def b() -> None:
        pass

    tools = ToolSet([a, b])
    assert list(tools) == ["a", "b"]
    assert len(tools) == 2
    assert tools["b"] is b
    assert "a" in tools
    assert tools.to_openai() == [tools["a"].to_openai(), b.to_openai()]
    assert repr(tools) == "ToolSet(['a', 'b'])"
    assert ToolSet.coerce(tools) is tools
    assert list(ToolSet.coerce([a])) == ["a"]
    assert list(ToolSet({"renamed": b})) == ["b"]


def test_toolset_register_decorator() -> None:
    tools = ToolSet()

    @tools.register
    def first(x: int) -> int:
        return x

    @tools.register(name="second_tool", description="The second.")
    async def second() -> None:
        pass

    assert isinstance(first, Tool) and first(2) == 2
    assert list(tools) == ["first", "second_tool"]
    assert tools["second_tool"].description == "The second."
    assert tools["second_tool"].is_async


def test_toolset_duplicate_name_is_a_value_error() -> None:
    def a() -> None:
        pass

    with pytest.raises(ValueError, match="two tools are named 'a'"):
        ToolSet([a, tool(a)])


def test_toolset_needs_an_iterable() -> None:
    def a() -> None:
        pass

    with pytest.raises(TypeError, match="iterable of tools"):
        ToolSet(tool(a))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable of tools"):
        ToolSet(a)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a function"):
        ToolSet(["a"])  # type: ignore[list-item]
