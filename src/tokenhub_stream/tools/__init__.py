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

The schema comes from the type hints, through pydantic (the `structured` extra), in the
strict form of structured outputs (docs/structured.md), and the descriptions from the
Google-style docstring: any type pydantic validates, pydantic models, dataclasses and
`TypedDict`s included. A type a strict schema cannot express (`Any`, `dict[str, X]`, a
`set`, ...) is a `TypeError` when the tool is registered, not when the model calls it. A
hand-written `schema=` is used as given (no pydantic needed).

When the model calls a tool, pydantic validates its JSON arguments into the parameters'
types before the call; arguments that do not fit go back to the model as an error.
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
