"""`Tool`, `tool()` and `ToolSet`: plain functions made into tools the model can call."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, ParamSpec, TypeAlias, TypedDict, TypeVar, Unpack, overload

from ._schema import convert, function_schema, is_coroutine_function, parse_docstring

__all__ = ["Tool", "ToolOptions", "ToolSet", "ToolsTypes", "tool"]

P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)
_P = ParamSpec("_P")
_R = TypeVar("_R")

# OpenAI's rule for function names; other providers accept a subset of it or the same.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
        object.__setattr__(self, "is_async", is_coroutine_function(self.fn))

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
            key: convert(value, self.hints[key]) if key in self.hints else value
            for key, value in decoded.items()
        }


class ToolOptions(TypedDict, total=False):
    """The keyword arguments of `tool()` and `ToolSet.register()` (see `tool()`)."""

    name: str | None
    description: str | None
    schema: Mapping[str, object] | None


@overload
def tool(fn: Callable[_P, _R], /, **options: Unpack[ToolOptions]) -> Tool[_P, _R]: ...


@overload
def tool(
    fn: None = None, /, **options: Unpack[ToolOptions]
) -> Callable[[Callable[_P, _R]], Tool[_P, _R]]: ...


def tool(
    fn: Callable[_P, _R] | None = None, /, **options: Unpack[ToolOptions]
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
            return _make_tool(function, **options)

        return decorate
    return _make_tool(fn, **options)


def _make_tool(
    fn: Callable[_P, _R],
    *,
    name: str | None = None,
    description: str | None = None,
    schema: Mapping[str, object] | None = None,
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
    summary, arg_docs = parse_docstring(inspect.getdoc(fn))
    if schema is not None:
        if not isinstance(schema, Mapping):
            raise TypeError("schema must be a mapping (a JSON schema object)")
        parameters: Mapping[str, object] = schema
        hints: dict[str, object] = {}
    else:
        parameters, hints = function_schema(fn, tool_name, arg_docs)
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
    def register(self, fn: Callable[_P, _R], /, **options: Unpack[ToolOptions]) -> Tool[_P, _R]: ...

    @overload
    def register(
        self, fn: None = None, /, **options: Unpack[ToolOptions]
    ) -> Callable[[Callable[_P, _R]], Tool[_P, _R]]: ...

    def register(
        self, fn: Callable[_P, _R] | None = None, /, **options: Unpack[ToolOptions]
    ) -> Tool[_P, _R] | Callable[[Callable[_P, _R]], Tool[_P, _R]]:
        """`tool()` that also adds the tool to this set; usable as a decorator.

        Raises:
            TypeError, ValueError: as `tool()` and `add()`.
        """

        def decorate(function: Callable[_P, _R]) -> Tool[_P, _R]:
            made = _make_tool(function, **options)
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
