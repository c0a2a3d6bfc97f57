"""`Tool`, `tool()` and `ToolSet`: plain functions made into tools the model can call."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, ParamSpec, TypeAlias, TypedDict, TypeVar, Unpack, overload

from .._docstrings import parse_docstring
from .._strict import is_strict_ready
from ._schema import ArgumentsCheck, is_coroutine_function

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
        parameters: the JSON schema of the arguments object (strict-ready when made
            from the type hints; a hand-written one as given).
        fn: the function, called with the arguments as keywords.
        is_async: whether `fn` is a coroutine function (derived from `fn`).
        strict_ready: whether `parameters` is in strict form, so `to_openai()` may say
            `strict: true` (derived: always for a schema made from the hints).
        check: validates the model's arguments into the parameters' types; None for a
            hand-written schema (the arguments are then only decoded).
    """

    name: str
    description: str
    parameters: Mapping[str, object]
    fn: Callable[P, R_co] = field(repr=False)
    is_async: bool = field(init=False)
    check: ArgumentsCheck | None = field(default=None, repr=False, compare=False)
    strict_ready: bool = field(init=False, repr=False, compare=False)

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
        ready = self.check is not None or is_strict_ready(self.parameters)
        object.__setattr__(self, "strict_ready", ready)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        return self.fn(*args, **kwargs)

    def to_openai(self, strict: bool = True) -> dict[str, object]:
        """The entry of this tool in a request's `tools` list (OpenAI shape).

        Args:
            strict: say `strict: true` (when `parameters` is strict-ready); the clients
                pass their `strict_schemas` setting.
        """
        function: dict[str, object] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        if strict and self.strict_ready:
            function["strict"] = True
        return {"type": "function", "function": function}

    def parse_arguments(self, text: str) -> dict[str, object]:
        """Decode a call's JSON arguments into keyword arguments for `fn`.

        An empty string means no arguments. With a schema made from the type hints, the
        arguments are validated into the parameters' types by pydantic (models,
        dataclasses, Enums, ...), and a null for a parameter with a default leaves it
        to the default; a hand-written schema's arguments are only decoded.

        Args:
            text: the arguments JSON the model wrote.

        Returns:
            The keyword arguments.

        Raises:
            ValueError: the text is not JSON, not a JSON object, or the arguments do not
                fit the parameters (pydantic's errors, summed up).
        """
        if not text.strip():
            return {}
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the arguments are not valid JSON ({exc})") from None
        if not isinstance(decoded, dict):
            raise ValueError(f"the arguments must be a JSON object, not {type(decoded).__name__}")
        return decoded if self.check is None else self.check.parse(decoded)


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
        TypeError: a parameter has no annotation, one pydantic cannot validate or a
            strict schema cannot express (`dict[str, X]`, `Any`, a `set`, ...), is
            positional-only or `*args`/`**kwargs`; `fn` is not callable.
        ValueError: the name is not 1-64 letters, digits, `_` or `-`.
        ImportError: pydantic is not installed (the `structured` extra), unless `schema=`
            is given.
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
            check=fn.check if schema is None else None,
        )
    if not callable(fn):
        raise TypeError(f"tool() needs a function, got {type(fn).__name__}")
    tool_name = name if name is not None else getattr(fn, "__name__", "")
    summary, arg_docs = parse_docstring(inspect.getdoc(fn))
    if schema is not None:
        if not isinstance(schema, Mapping):
            raise TypeError("schema must be a mapping (a JSON schema object)")
        parameters: Mapping[str, object] = schema
        check = None
    else:
        check = ArgumentsCheck(fn, tool_name, arg_docs)
        parameters = check.schema
    text = summary if description is None else description
    return Tool(name=tool_name, description=text, parameters=parameters, fn=fn, check=check)


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

    def to_openai(self, strict: bool = True) -> list[dict[str, object]]:
        """The request's `tools` list (OpenAI shape), in registration order.

        Args:
            strict: say `strict: true` for each strict-ready schema (see `Tool.to_openai`).
        """
        return [item.to_openai(strict) for item in self._tools.values()]

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
