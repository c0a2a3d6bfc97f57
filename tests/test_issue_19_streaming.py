"""#19, streaming: `partials()`, `elements()` and `parsed` on a real loopback stream from the
local upstream, sync and async (asyncio and trio), and the errors: invalid JSON at once, a
failed validation with pydantic's errors, finish_reason `length`/`content_filter` with the
last partial value, and a truncated stream still a `TruncatedStreamError`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import anyio
import pytest
from pydantic import BaseModel

import tokenhub_stream as ts
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

WAIT = 10.0  # seconds: the bound of every wait here
MESSAGES = [{"role": "user", "content": "Mercury, Venus and Mars"}]


class Card(BaseModel):
    title: str
    description: str
    moons: int
    rings: bool = False


CARDS = [
    {"title": "Mercury", "description": 'Small and "hot" é.', "moons": 0, "rings": None},
    {"title": "Venus", "description": "Cloudy.", "moons": 0, "rings": False},
    {"title": "Mars", "description": "Red, with 2 moons.", "moons": 2, "rings": None},
]
TEXT = json.dumps({"items": CARDS}, ensure_ascii=False)
FINAL = [
    Card(title="Mercury", description='Small and "hot" é.', moons=0),
    Card(title="Venus", description="Cloudy.", moons=0, rings=False),
    Card(title="Mars", description="Red, with 2 moons.", moons=2),  # rings: null, the default
]


def pieces(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0)) as running:
        yield running


# --- partials, elements, parsed ------------------------------------------------------------


def test_issue_19_streaming_partials_grow_sync(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=pieces(TEXT)))
    snapshots: list[object] = []
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            live = None
            for value in stream.partials():
                assert live is None or value is live  # one list, grown in place
                live = value
                snapshots.append(copy.deepcopy(value))
            assert stream.parsed == FINAL
    final = CARDS
    assert snapshots[-1] == final
    for snapshot in snapshots:
        assert _prefix(snapshot, final), snapshot
    # Strings show as they grow, not only once closed; numbers only once whole.
    titles = [s[0].get("title") for s in snapshots if isinstance(s, list) and s]
    assert "Mercury" in titles
    assert any(t and t != "Mercury" and "Mercury".startswith(t) for t in titles)
    assert all(
        not isinstance(s, list) or len(s) < 3 or s[2].get("moons") in (None, 2) for s in snapshots
    )


def _prefix(part: object, final: object) -> bool:
    if isinstance(final, dict):
        if not isinstance(part, dict) or list(part) != list(final)[: len(part)]:
            return False
        keys = list(part)
        return all(part[k] == final[k] for k in keys[:-1]) and (
            not keys or _prefix(part[keys[-1]], final[keys[-1]])
        )
    if isinstance(final, list):
        if not isinstance(part, list) or len(part) > len(final):
            return False
        return all(p == f for p, f in zip(part[:-1], final, strict=False)) and (
            not part or _prefix(part[-1], final[len(part) - 1])
        )
    if isinstance(final, str):
        return isinstance(part, str) and final.startswith(part)
    return part == final


@pytest.mark.anyio
async def test_issue_19_streaming_partials_and_elements_async(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=pieces(TEXT)), Script(deltas=pieces(TEXT, 3)))
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with anyio.fail_after(WAIT):
            async with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
                count = 0
                async for value in stream.partials():
                    assert isinstance(value, list)
                    count += 1
                assert stream.parsed == FINAL
            assert count > 20
            async with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
                elements = [card async for card in stream.elements()]
                assert stream.parsed == FINAL
    assert elements == FINAL
    assert all(isinstance(card, Card) for card in elements)


def test_issue_19_streaming_elements_come_as_they_complete(upstream: RunningUpstream) -> None:
    # The stream stalls after the first card: elements() must hand it over before the end.
    first = json.dumps(CARDS[0], ensure_ascii=False)
    upstream.app.enqueue(Script(deltas=pieces('{"items": [' + first + ", "), end="stall"))
    with ts.Client(base_url=upstream.base_url, timeout=WAIT) as client:  # bounds the wait
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            elements = stream.elements()
            assert next(elements) == FINAL[0]
    assert upstream.app.requests[-1].wait_disconnected(WAIT)


def test_issue_19_streaming_text_consumer_then_parsed(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=pieces(TEXT)), Script(deltas=pieces(TEXT)))
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            assert "".join(stream) == TEXT  # still the text deltas
            assert stream.parsed == FINAL
            assert stream.parsed is stream.parsed  # computed once
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            events = list(stream.events())
            assert any(isinstance(e, ts.ContentDelta) for e in events)
            assert stream.parsed == FINAL


def test_issue_19_streaming_one_consumer(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=pieces(TEXT)))
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            for _ in stream.partials():
                break
            with pytest.raises(ts.StreamConsumed):
                list(stream.elements())


def test_issue_19_streaming_misuse_is_a_clear_error(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(text="hi"), Script(deltas=['{"title": "A", ', '"descri']))
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES) as stream:
            with pytest.raises(TypeError, match="partials\\(\\) needs a stream started with"):
                stream.partials()
            with pytest.raises(TypeError, match="elements\\(\\) needs"):
                stream.elements()
            list(stream)
            with pytest.raises(TypeError, match="parsed needs"):
                stream.parsed  # noqa: B018
        with client.stream_chat(MESSAGES, response_format=Card) as stream:
            with pytest.raises(TypeError, match="elements\\(\\) needs a list output"):
                stream.elements()
            with pytest.raises(RuntimeError, match="read to its end"):
                stream.parsed  # noqa: B018
            next(iter(stream))
            with pytest.raises(RuntimeError, match="read to its end"):
                stream.parsed  # noqa: B018


def test_issue_19_streaming_local_upstream_answers_a_schema(upstream: RunningUpstream) -> None:
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            values = sum(1 for _ in stream.partials())
            cards = stream.parsed
        request = upstream.app.requests[-1].json
    assert request is not None
    assert request["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "list_Card",
            "schema": request["response_format"]["json_schema"]["schema"],  # type: ignore[index]
            "strict": True,
        },
    }
    assert isinstance(cards, list) and [c.title for c in cards] == ["Mercury", "Venus", "Mars"]
    assert [c.moons for c in cards] == [1, 2, 3]
    assert cards[0].description.startswith("Mercury: notes from the local upstream")
    assert values > 30  # many small deltas


# --- errors -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_issue_19_streaming_invalid_json_raises_at_once(upstream: RunningUpstream) -> None:
    # The stream stalls after the bad character: waiting for the end would hang.
    upstream.app.enqueue(Script(deltas=['{"items": [', "{oops", "more"], end="stall"))
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with anyio.fail_after(WAIT):
            async with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
                with pytest.raises(ts.OutputValidationError) as info:
                    async for _ in stream.partials():
                        pass
    error = info.value
    assert type(error).__name__ == "PartialJSONError"
    assert isinstance(error, ts.TokenHubError) and isinstance(error, ValueError)
    assert error.text.startswith('{"items": [{oops')
    assert "Expecting property name" in str(error)
    assert upstream.app.requests[-1].wait_disconnected(WAIT)


def test_issue_19_streaming_validation_failure_has_pydantic_errors(
    upstream: RunningUpstream,
) -> None:
    bad = json.dumps({"items": [{"title": "A", "description": "d", "moons": "many"}]})
    upstream.app.enqueue(Script(deltas=pieces(bad)), Script(deltas=pieces(bad)))
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            with pytest.raises(ts.OutputValidationError) as info:
                for _ in stream.partials():
                    pass
            assert stream.outcome is not None and stream.outcome.ok  # the stream itself was fine
            with pytest.raises(ts.OutputValidationError):
                stream.parsed  # noqa: B018
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            with pytest.raises(ts.OutputValidationError) as element_info:
                list(stream.elements())  # the element fails as it completes
    for error in (info.value, element_info.value):
        assert error.text.startswith('{"items"')
        assert [(e["type"], e["loc"]) for e in error.errors] == [("int_parsing", (0, "moons"))]
        assert "moons: Input should be a valid integer" in str(error)
    assert info.value.text == bad


@pytest.mark.parametrize("reason", ["length", "content_filter"])
def test_issue_19_streaming_cut_short_is_incomplete(upstream: RunningUpstream, reason: str) -> None:
    cut = '{"items": [{"title": "Mars", "descr'
    upstream.app.enqueue(Script(deltas=pieces(cut), finish_reason=reason))
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            with pytest.raises(ts.IncompleteOutputError) as info:
                for _ in stream.partials():
                    pass
            with pytest.raises(ts.IncompleteOutputError):
                stream.parsed  # noqa: B018
    assert info.value.finish_reason == reason
    assert info.value.partial == [{"title": "Mars"}]
    assert info.value.text == cut
    assert isinstance(info.value, ts.TokenHubError)


@pytest.mark.anyio
async def test_issue_19_streaming_truncated_stream_stays_truncated(
    upstream: RunningUpstream,
) -> None:
    # Cut mid-JSON with no finish_reason: the stream's error, not a validation error.
    upstream.app.enqueue(*[Script(deltas=pieces(TEXT[:40]), end="cut") for _ in range(3)])
    async with ts.AsyncClient(base_url=upstream.base_url, max_retries=0) as client:
        with anyio.fail_after(WAIT):
            for consume in ("partials", "elements", "text"):
                async with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
                    with pytest.raises(ts.TruncatedStreamError):
                        if consume == "partials":
                            async for _ in stream.partials():
                                pass
                        elif consume == "elements":
                            async for _ in stream.elements():
                                pass
                        else:
                            async for _ in stream:
                                pass
                    with pytest.raises(ts.TruncatedStreamError):
                        stream.parsed  # noqa: B018
