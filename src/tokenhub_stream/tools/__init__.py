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

from ._events import MaxTurnsExceeded, ToolCallStarted, ToolLoopEvent, ToolResult, TurnFinished
from ._tool import Tool, ToolSet, ToolsTypes, tool

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

for _name in __all__:  # shown as tokenhub_stream.tools.X, as httpx does for its names
    _value = globals()[_name]
    if isinstance(_value, type):
        _value.__module__ = __name__
del _name, _value
