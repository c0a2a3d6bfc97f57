"""#19, tools on pydantic: pydantic models, dataclasses and TypedDicts as parameters and
return values, arguments validated before the call (a failure goes back to the model), the
strict schema and the client's `strict_schemas`, `partial_arguments` on the tool loop's
`ToolCallDelta` events (async and sync, on a real loopback upstream), and the extra.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping
from typing import Annotated

import anyio
import pytest
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

import tokenhub_stream as ts
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream
from tokenhub_stream.tools import ToolResult, tool

WAIT = 10.0
USER = [{"role": "user", "content": "Plan a trip to Oslo"}]


class Place(BaseModel):
    """A place.

    Attributes:
        city: the city's name.
    """

    city: str
    country: str = "NO"


@dataclasses.dataclass
class Window:
    start: str
    days: int = 2


class Budget(TypedDict):
    amount: float
    currency: str


class Plan(BaseModel):
    summary: str
    stops: list[Place]


calls: list[tuple[Place, Window, Budget | None]] = []


@tool
def plan_trip(place: Place, window: Window, budget: Budget | None = None) -> Plan:
    """Plan a trip.

    Args:
        place: where to go.
        window: when.
        budget: how much to spend.
    """
    calls.append((place, window, budget))
    return Plan(summary=f"{window.days} days in {place.city}", stops=[place])


def frame(delta: Mapping[str, object], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": dict(delta), "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


def tool_turn(name: str, arguments: list[str], call_id: str = "c1") -> Script:
    """One streamed call of `name`, its arguments in the given fragments."""
    first = {"index": 0, "id": call_id, "type": "function", "function": {"name": name}}
    body = [frame({"role": "assistant", "tool_calls": [first]})]
    for piece in arguments:
        body.append(frame({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    body += [frame({}, "tool_calls"), b"data: [DONE]\n\n"]
    return Script(raw=body, delay=0)


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0)) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    calls.clear()


# --- the schema -------------------------------------------------------------------------------


def test_issue_19_tools_schema_of_models_dataclasses_typeddicts() -> None:
    parameters = plan_trip.parameters
    assert parameters["required"] == ["place", "window", "budget"]
    assert parameters["additionalProperties"] is False
    properties = parameters["properties"]
    assert isinstance(properties, dict)
    assert properties["place"] == {
        "type": "object",
        "description": "where to go.",  # the Args: text, over the class's summary
        "properties": {
            "city": {"type": "string", "description": "the city's name."},
            "country": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    assert properties["budget"] == {
        "description": "how much to spend.",
        "anyOf": [{"$ref": "#/$defs/Budget"}, {"type": "null"}],
    }
    assert parameters["$defs"]["Budget"] == {  # type: ignore[index]
        "type": "object",
        "properties": {"amount": {"type": "number"}, "currency": {"type": "string"}},
        "required": ["amount", "currency"],
        "additionalProperties": False,
    }
    assert plan_trip.strict_ready
    assert plan_trip.to_openai()["function"]["strict"] is True  # type: ignore[index]


def test_issue_19_tools_arguments_validated_into_the_types() -> None:
    kwargs = plan_trip.parse_arguments(
        '{"place": {"city": "Oslo", "country": null}, "window": {"start": "mon", "days": "3"},'
        ' "budget": {"amount": 100, "currency": "EUR"}}'
    )
    assert kwargs == {
        "place": Place(city="Oslo"),  # null: the default
        "window": Window("mon", 3),  # "3": lax validation, as pydantic's
        "budget": {"amount": 100.0, "currency": "EUR"},
    }
    assert plan_trip.parse_arguments(
        '{"place": {"city": "Oslo", "country": "NO"}, "window": {"start": "mon", "days": null},'
        ' "budget": null}'
    ) == {"place": Place(city="Oslo"), "window": Window("mon")}  # budget: the function's default
    with pytest.raises(ValueError, match="window.start: Field required"):
        plan_trip.parse_arguments('{"place": {"city": "Oslo"}, "window": {}}')


def test_issue_19_tools_field_description_wins() -> None:
    @tool
    def f(n: Annotated[int, Field(description="explicit", ge=1)]) -> int:
        """F.

        Args:
            n: from the docstring.
        """
        return n

    assert f.parameters["properties"] == {
        "n": {"type": "integer", "description": "explicit", "minimum": 1}
    }
    with pytest.raises(ValueError, match="n: Input should be greater than or equal to 1"):
        f.parse_arguments('{"n": 0}')


# --- the loop ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_issue_19_tools_loop_validates_and_serialises(upstream: RunningUpstream) -> None:
    good = (
        '{"place": {"city": "Oslo", "country": "NO"}, "window": {"start": "mon", "days": 4},'
        ' "budget": null}'
    )
    upstream.app.enqueue(
        tool_turn("plan_trip", ['{"place": {"city": 5}}'], "bad"),
        tool_turn("plan_trip", [good], "good"),
        Script(text="Done."),
    )
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with anyio.fail_after(WAIT):
            async with client.run_tools(USER, tools=[plan_trip]) as loop:
                results = [e async for e in loop if isinstance(e, ToolResult)]
    bad, ok = results
    assert bad.error and bad.output.startswith("Error: invalid arguments for 'plan_trip': ")
    assert "place.city: Input should be a valid string" in bad.output
    assert "window: Field required" in bad.output
    assert not ok.error
    assert json.loads(ok.output) == {  # a pydantic model returned, sent as JSON
        "summary": "4 days in Oslo",
        "stops": [{"city": "Oslo", "country": "NO"}],
    }
    assert calls == [(Place(city="Oslo"), Window("mon", 4), None)]  # the bad call never ran
    first = upstream.app.requests[0].json
    assert first is not None
    assert first["tools"] == [plan_trip.to_openai()]
    assert first["tools"][0]["function"]["strict"] is True


def test_issue_19_tools_strict_off_leaves_the_field_out(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(text="No tools needed."))
    with ts.Client(base_url=upstream.base_url, strict_schemas=False) as client:
        client.run_tools(USER, tools=[plan_trip]).until_done()
    sent = upstream.app.requests[0].json
    assert sent is not None
    assert sent["tools"] == [plan_trip.to_openai(strict=False)]
    assert "strict" not in sent["tools"][0]["function"]


ARGUMENT_PIECES = [
    '{"place": {"ci',
    'ty": "Os',
    'lo"}, "wi',
    'ndow": {"start": "m',
    'on", "days": 12}}',
]


def _partials(events: list[object]) -> list[object]:
    return [
        e.partial_arguments
        for e in events
        if isinstance(e, ts.ToolCallDelta) and e.partial_arguments is not None
    ]


@pytest.mark.anyio
async def test_issue_19_tools_loop_partial_arguments_async(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(tool_turn("plan_trip", ARGUMENT_PIECES), Script(text="Planned."))
    snapshots: list[object] = []
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with anyio.fail_after(WAIT):
            async with client.run_tools(USER, tools=[plan_trip]) as loop:
                events: list[object] = []
                async for event in loop:
                    events.append(event)
                    if isinstance(event, ts.ToolCallDelta) and event.partial_arguments:
                        snapshots.append(copy.deepcopy(event.partial_arguments))
    deltas = [e for e in events if isinstance(e, ts.ToolCallDelta)]
    assert [d.arguments for d in deltas] == ["", *ARGUMENT_PIECES]
    assert deltas[0].partial_arguments is None  # nothing of the arguments yet
    assert snapshots == [
        {"place": {}},
        {"place": {"city": "Os"}},  # a string as it grows
        {"place": {"city": "Oslo"}},  # a key shows once its value starts
        {"place": {"city": "Oslo"}, "window": {"start": "m"}},
        {"place": {"city": "Oslo"}, "window": {"start": "mon", "days": 12}},
    ]
    assert calls == [(Place(city="Oslo"), Window("mon", 12), None)]


def test_issue_19_tools_loop_partial_arguments_sync(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(
        tool_turn("plan_trip", ['{"place": ', "oops", '"x"}']),  # not JSON: no more partials
        tool_turn("plan_trip", ARGUMENT_PIECES),
        Script(text="Planned."),
    )
    with ts.Client(base_url=upstream.base_url) as client:
        with client.run_tools(USER, tools=[plan_trip]) as loop:
            events: list[object] = list(loop)
    turns = [i for i, e in enumerate(events) if isinstance(e, ts.tools.TurnFinished)]
    first, second = events[: turns[0]], events[turns[0] : turns[1]]
    assert _partials(first) == [{}]  # shown until the text stopped being JSON
    assert [e.partial_arguments for e in first if isinstance(e, ts.ToolCallDelta)][-2:] == [
        None,
        None,
    ]
    assert _partials(second)[-1] == {
        "place": {"city": "Oslo"},
        "window": {"start": "mon", "days": 12},
    }
    results = [e for e in events if isinstance(e, ToolResult)]
    assert results[0].error and "not valid JSON" in results[0].output


# --- the extra --------------------------------------------------------------------------------


def test_issue_19_tools_need_pydantic_except_a_hand_written_schema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pydantic", None)

    def lookup(order_id: str) -> str:
        return order_id

    with pytest.raises(
        ImportError, match=r"tool\(\) .* pip install 'tokenhub_stream\[structured\]'"
    ):
        tool(lookup)
    schema = {"type": "object", "properties": {"order_id": {"type": "string"}}}
    made = tool(lookup, schema=schema)
    assert made.parse_arguments('{"order_id": "7"}') == {"order_id": "7"}
    assert "strict" not in made.to_openai()["function"]  # type: ignore[operator]
