"""Issue 15, finding 4: `include_usage` is a client option that each call can override.

Issue 2 listed it among the client options; before this it existed per call only and
`AsyncClient(include_usage=True)` raised `TypeError`. respx: the request body is the
behaviour.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import respx

import tokenhub_stream as ts

URL = "http://upstream.test/v1"
MESSAGES = [{"role": "user", "content": "hi"}]
BODY = (
    b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.fixture
def route(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.Route]:
    # respx mocks httpx: these clients send through it, not through the engine.
    monkeypatch.setenv("TOKENHUB_STREAM_ENGINE", "httpx")
    with respx.mock(assert_all_called=False) as router:
        yield router.post(URL + "/chat/completions").mock(
            side_effect=lambda request: httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=BODY
            )
        )


def sent_options(route: respx.Route) -> object:
    body = json.loads(route.calls.last.request.content)
    return body.get("stream_options")


def stream_once(sync: bool, client_usage: bool | None, **call: Any) -> None:
    kwargs: dict[str, Any] = {"base_url": URL}
    if client_usage is not None:
        kwargs["include_usage"] = client_usage
    if sync:
        with ts.Client(**kwargs) as client, client.stream_chat(MESSAGES, **call) as stream:
            assert list(stream) == ["a"]
        return

    async def main() -> None:
        async with ts.AsyncClient(**kwargs) as client:
            async with client.stream_chat(MESSAGES, **call) as stream:
                assert [t async for t in stream] == ["a"]

    anyio.run(main)


both = pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])


@both
@pytest.mark.parametrize(
    ("client_usage", "call", "expected"),
    [
        (None, {}, None),  # the default stays off
        (True, {}, {"include_usage": True}),  # the client's default applies
        (True, {"include_usage": False}, None),  # a call turns it off
        (False, {"include_usage": True}, {"include_usage": True}),  # a call turns it on
        (
            True,
            {"stream_options": {"continuous_usage_stats": True}},
            {"continuous_usage_stats": True, "include_usage": True},
        ),
    ],
    ids=["default", "client_on", "call_off", "call_on", "merged"],
)
def test_issue_15_include_usage_client_default_and_call_override(
    route: respx.Route,
    sync: bool,
    client_usage: bool | None,
    call: dict[str, Any],
    expected: object,
) -> None:
    stream_once(sync, client_usage, **call)
    assert sent_options(route) == expected


@both
def test_issue_15_include_usage_is_a_client_attribute(sync: bool) -> None:
    cls: type[ts.Client] | type[ts.AsyncClient] = ts.Client if sync else ts.AsyncClient
    assert cls(base_url=URL).include_usage is False
    assert cls(base_url=URL, include_usage=True).include_usage is True


@both
def test_issue_15_include_usage_client_default_reaches_the_tool_loop(
    route: respx.Route, sync: bool
) -> None:
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    if sync:
        with ts.Client(base_url=URL, include_usage=True) as client:
            client.run_tools(MESSAGES, tools=[get_weather]).until_done()
    else:

        async def main() -> None:
            async with ts.AsyncClient(base_url=URL, include_usage=True) as client:
                await client.run_tools(MESSAGES, tools=[get_weather]).until_done()

        anyio.run(main)
    assert sent_options(route) == {"include_usage": True}


def test_issue_15_include_usage_not_sent_by_chat(route: respx.Route) -> None:
    """`chat()` does not stream: a client-wide include_usage adds no stream_options."""
    route.mock(
        return_value=httpx.Response(
            200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}}]}
        )
    )
    with ts.Client(base_url=URL, include_usage=True) as client:
        assert client.chat(MESSAGES).message.content == "a"
    body = json.loads(route.calls.last.request.content)
    assert "stream_options" not in body and body["stream"] is False


def test_issue_15_include_usage_module_functions_keep_their_parameter() -> None:
    import inspect

    for function in (ts.stream_chat, ts.stream_chat_sync):
        assert inspect.signature(function).parameters["include_usage"].default is False
