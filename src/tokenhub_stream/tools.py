"""Tools the model can call: registration, JSON schema, and the tool loop's events.

```python
from tokenhub_stream.tools import tool

@tool
def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
    \"\"\"The current weather in a city.

    Args:
        city: the city name, e.g. "Paris".
        unit: the temperature unit.
    \"\"\"
    return f"18 degrees {unit} and sunny in {city}"

get_weather.to_openai()  # {"type": "function", "function": {"name", "description", "parameters"}}
```

The schema comes from the type hints and the Google-style docstring, without pydantic:
`str`, `int`, `float`, `bool`, `None`, `X | None` and other unions, `list[X]`,
`Sequence[X]`, `dict[str, X]`, `Mapping[str, X]`, `Literal[...]`, `Enum`, dataclasses,
`TypedDict`, `Annotated[X, "description"]`, and `Any`/`object` (any JSON value). Anything
else is a `TypeError` when the tool is registered, not when the model calls it. A
hand-written `schema=` is used as given.

When the model calls a tool, its JSON arguments are decoded and, where the annotation asks
for it, converted: `Enum` members, dataclass instances, `float` from JSON integers (also
inside lists, dicts and `X | None`). Other values reach the function as JSON decoded them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import (
    Annotated,
    Generic,
    Literal,
    NotRequired,
    ParamSpec,
    Required,
    TypeAlias,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
    overload,
)

from ._exceptions import TokenHubError
from ._models import ChatMessage, ContentDelta, ReasoningDelta, ToolCall, Usage

__all__ = [
    "MaxTurnsExceeded",
    "Tool",
    "ToolCallStarted",
    "ToolLoopEvent",
    "ToolResult",
    "ToolSet",
    "ToolsTypes",
    "TurnFinished",
    "tool",
]

P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)
_P = ParamSpec("_P")
_R = TypeVar("_R")

# OpenAI's rule for function names; other providers accept a subset of it or the same.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
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


@dataclass(frozen=True, slots=True)
class Tool(Generic[P, R_co]):
    """A Python function the model can call, with its name, description and JSON schema.

    Build one with `tool()` (or `ToolSet.register`) rather than directly; calling the
    `Tool` calls the function.

    ```python
    weather = tool(get_weather, description="Weather now.")
    weather.name, weather.parameters["required"]  # ("get_weather", ["city"])
    weather("Paris")                              # calls get_weather("Paris")
    ```

    Attributes:
        name: the function name the model uses (`[A-Za-z0-9_-]{1,64}`).
        description: what the tool does, for the model.
        parameters: the JSON schema of the arguments object.
        fn: the function, called with the arguments as keywords.
        is_async: whether `fn` is a coroutine function (derived from `fn`).
    """

    name: str
    description: str
    parameters: Mapping[str, object]
    fn: Callable[P, R_co] = field(repr=False)
    is_async: bool = field(init=False)
    # Parameter annotations, to convert JSON arguments (Enum, dataclass); empty when the
    # schema was hand-written.
    hints: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'; "
                "pass name= to choose one"
            )
        if not isinstance(self.parameters, Mapping):
            raise TypeError(f"parameters of tool {self.name!r} must be a JSON schema mapping")
        if not callable(self.fn):
            raise TypeError(f"tool {self.name!r}: fn is not callable")
        object.__setattr__(self, "is_async", _is_coroutine_function(self.fn))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        return self.fn(*args, **kwargs)

    def to_openai(self) -> dict[str, object]:
        """The entry of this tool in a request's `tools` list (OpenAI shape)."""
        function: dict[str, object] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def parse_arguments(self, text: str) -> dict[str, object]:
        """Decode a call's JSON arguments into keyword arguments for `fn`.

        An empty string means no arguments. Enum, dataclass and float parameters are
        converted from their JSON form.

        Args:
            text: the arguments JSON the model wrote.

        Returns:
            The keyword arguments.

        Raises:
            ValueError: the text is not JSON, not a JSON object, or a value cannot be
                converted (e.g. not a member of the Enum).
        """
        if not text.strip():
            return {}
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the arguments are not valid JSON ({exc})") from None
        if not isinstance(decoded, dict):
            raise ValueError(f"the arguments must be a JSON object, not {type(decoded).__name__}")
        return {
            key: _convert(value, self.hints[key]) if key in self.hints else value
            for key, value in decoded.items()
        }


@overload
def tool(
    fn: Callable[_P, _R],
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    schema: Mapping[str, object] | None = None,
) -> Tool[_P, _R]: ...


@overload
def tool(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    schema: Mapping[str, object] | None = None,
) -> Callable[[Callable[_P, _R]], Tool[_P, _R]]: ...


def tool(
    fn: Callable[_P, _R] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    schema: Mapping[str, object] | None = None,
) -> Tool[_P, _R] | Callable[[Callable[_P, _R]], Tool[_P, _R]]:
    """Make a `Tool` of a plain function, sync or async; usable as a decorator.

    ```python
    @tool
    async def get_weather(city: str) -> str:
        \"\"\"The current weather in a city.\"\"\"

    lookup = tool(db.lookup, name="lookup_order", schema={"type": "object", ...})
    ```

    Args:
        fn: the function; without it, `tool(...)` returns a decorator.
        name: the name the model sees; default the function's `__name__`.
        description: default the docstring's text before its first section.
        schema: a hand-written JSON schema of the arguments, used as given (the
            annotations are then not read).

    Returns:
        The `Tool` (or a decorator making one).

    Raises:
        TypeError: a parameter has no annotation or an unsupported one, is
            positional-only or `*args`/`**kwargs`; `fn` is not callable.
        ValueError: the name is not 1-64 letters, digits, `_` or `-`.
    """
    if fn is None:

        def decorate(function: Callable[_P, _R]) -> Tool[_P, _R]:
            return _make_tool(function, name, description, schema)

        return decorate
    return _make_tool(fn, name, description, schema)


def _make_tool(
    fn: Callable[_P, _R],
    name: str | None,
    description: str | None,
    schema: Mapping[str, object] | None,
) -> Tool[_P, _R]:
    if isinstance(fn, Tool):
        return Tool(
            name=fn.name if name is None else name,
            description=fn.description if description is None else description,
            parameters=fn.parameters if schema is None else schema,
            fn=fn.fn,
            hints=fn.hints if schema is None else {},
        )
    if not callable(fn):
        raise TypeError(f"tool() needs a function, got {type(fn).__name__}")
    tool_name = name if name is not None else getattr(fn, "__name__", "")
    summary, arg_docs = _parse_docstring(inspect.getdoc(fn))
    if schema is not None:
        if not isinstance(schema, Mapping):
            raise TypeError("schema must be a mapping (a JSON schema object)")
        parameters: Mapping[str, object] = schema
        hints: dict[str, object] = {}
    else:
        parameters, hints = _function_schema(fn, tool_name, arg_docs)
    text = summary if description is None else description
    return Tool(name=tool_name, description=text, parameters=parameters, fn=fn, hints=hints)


class ToolSet(Mapping[str, Tool[..., object]]):
    """Several tools by name: what the tool loop takes as `tools=`.

    ```python
    tools = ToolSet([get_weather, get_time])  # functions or Tools

    @tools.register
    def convert(amount: float, currency: str) -> float: ...

    tools["convert"].to_openai(); tools.to_openai()  # one entry / the whole list
    ```

    Args:
        tools: functions (made into tools with `tool()`) or `Tool`s, or a mapping
            whose values are `Tool`s (the keys are not used: each tool has its name).

    Raises:
        ValueError: two tools share a name.
        TypeError: an item is not callable, or a function cannot be made a tool.
    """

    def __init__(
        self,
        tools: Iterable[Tool[..., object] | Callable[..., object]]
        | Mapping[str, Tool[..., object]] = (),
    ) -> None:
        self._tools: dict[str, Tool[..., object]] = {}
        if isinstance(tools, Tool) or not isinstance(tools, Iterable):
            raise TypeError("ToolSet takes an iterable of tools or functions, e.g. a list")
        for item in tools.values() if isinstance(tools, Mapping) else tools:
            self.add(item)

    @classmethod
    def coerce(cls, tools: ToolsTypes) -> ToolSet:
        """Return `tools` if it is a `ToolSet`, else a new `ToolSet` of its items."""
        return tools if isinstance(tools, ToolSet) else cls(tools)

    def add(self, item: Tool[..., object] | Callable[..., object]) -> Tool[..., object]:
        """Add a `Tool`, or a function made into one with `tool()`; return the `Tool`.

        Raises:
            ValueError: a tool with that name is already in the set.
            TypeError: `item` is not callable or cannot be made a tool.
        """
        made = item if isinstance(item, Tool) else tool(item)
        if made.name in self._tools:
            raise ValueError(f"two tools are named {made.name!r}")
        self._tools[made.name] = made
        return made

    @overload
    def register(
        self,
        fn: Callable[_P, _R],
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        schema: Mapping[str, object] | None = None,
    ) -> Tool[_P, _R]: ...

    @overload
    def register(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        schema: Mapping[str, object] | None = None,
    ) -> Callable[[Callable[_P, _R]], Tool[_P, _R]]: ...

    def register(
        self,
        fn: Callable[_P, _R] | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        schema: Mapping[str, object] | None = None,
    ) -> Tool[_P, _R] | Callable[[Callable[_P, _R]], Tool[_P, _R]]:
        """`tool()` that also adds the tool to this set; usable as a decorator.

        Raises:
            TypeError, ValueError: as `tool()` and `add()`.
        """

        def decorate(function: Callable[_P, _R]) -> Tool[_P, _R]:
            made = tool(function, name=name, description=description, schema=schema)
            self.add(made)
            return made

        return decorate if fn is None else decorate(fn)

    def to_openai(self) -> list[dict[str, object]]:
        """The request's `tools` list (OpenAI shape), in registration order."""
        return [item.to_openai() for item in self._tools.values()]

    def __getitem__(self, name: str) -> Tool[..., object]:
        return self._tools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def __repr__(self) -> str:
        return f"ToolSet({list(self._tools)!r})"


#: What `tools=` accepts: a `ToolSet`, an iterable of `Tool`s and plain functions, or a
#: mapping whose values are `Tool`s.
ToolsTypes: TypeAlias = (
    ToolSet | Iterable[Tool[..., object] | Callable[..., object]] | Mapping[str, Tool[..., object]]
)


# --- events of the tool loop -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    """The model's turn asked for this call; it runs next (show "calling name(args)")."""

    call: ToolCall
    turn: int


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool call's result, as sent back to the model in a `tool` message.

    `error` is True when the tool raised, the arguments were not valid JSON (or did not
    fit the function), or no tool has that name; `output` then holds the error text the
    model reads. `elapsed` is the tool's run time in seconds (0 if it did not run).
    """

    call: ToolCall
    output: str
    error: bool
    turn: int
    elapsed: float = 0.0

    def to_message(self) -> dict[str, object]:
        """The `{"role": "tool", "tool_call_id", "content"}` message for the next request."""
        return {"role": "tool", "tool_call_id": self.call.id, "content": self.output}


@dataclass(frozen=True, slots=True)
class TurnFinished:
    """One model response ended; `message` is the assembled assistant message.

    It is a tool turn when `message.tool_calls` is not empty, whatever
    `message.finish_reason` says (Gemini ends tool turns with "stop").
    """

    turn: int
    message: ChatMessage
    usage: Usage | None


ToolLoopEvent: TypeAlias = (
    ContentDelta | ReasoningDelta | ToolCallStarted | ToolResult | TurnFinished
)


class MaxTurnsExceeded(TokenHubError):
    """Raised when the model still asks for tools in the last turn `max_turns` allows.

    The unanswered calls are not run. `message` is that last assistant message; the
    loop's `messages` stop before it, so they can be sent again as they are (for example
    to a new loop with a higher `max_turns`).
    """

    def __init__(self, max_turns: int, message: ChatMessage) -> None:
        names = ", ".join(call.name for call in message.tool_calls)
        super().__init__(
            f"the model still asked for tools ({names}) after max_turns={max_turns} turns"
        )
        self.max_turns = max_turns
        self.message = message


# --- schema from annotations -----------------------------------------------------------


def _is_coroutine_function(fn: object) -> bool:
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


def _function_schema(
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
    summary, field_docs = _parse_docstring(inspect.cleandoc(doc) if doc else None)
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


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
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


def _convert(value: object, tp: object) -> object:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _convert(value, args[0])
    if origin is Union or origin is types.UnionType:
        if value is None or any(_is_plain(value, arg) for arg in args):
            return value
        error: Exception | None = None
        accepted = False  # some member takes the value as it is
        for arg in args:
            if arg is type(None):
                continue
            try:
                converted = _convert(value, arg)
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
        return [_convert(item, args[0]) for item in value]
    if origin in _MAPPINGS and len(args) == 2 and isinstance(value, dict):
        return {key: _convert(item, args[1]) for key, item in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value if isinstance(value, tp) else tp(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object for {tp.__name__}")
        hints = get_type_hints(tp, include_extras=True)
        fields = {key: _convert(item, hints.get(key, object)) for key, item in value.items()}
        return tp(**fields)
    return value
