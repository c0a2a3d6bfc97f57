"""ChatProxy(tools=...): the tool loop run server-side, behind a real uvicorn on loopback.

The browser (our client, the openai SDK, raw httpx) must read a tool-using answer as one
ordinary answer: `chat.completion.chunk` frames with content deltas only, tool progress as
SSE comments, one `[DONE]`. The upstream is FakeChatUpstream, also under uvicorn.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, MutableMapping
from typing import cast

import anyio
import anyio.to_thread
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionUserMessageParam
from starlette.applications import Starlette

from tokenhub_stream import AsyncClient, RefusalDelta, Usage
from tokenhub_stream.asgi import ChatProxy, CompletionRecord
from tokenhub_stream.testing import (
    FakeChatUpstream,
    RunningUpstream,
    Script,
    ScriptedToolCall,
    run_upstream,
)
from tokenhub_stream.tools import ToolSet, tool

from .conftest import KEY, assert_no_key, serve

pytestmark = pytest.mark.anyio

Upstream = tuple[FakeChatUpstream, RunningUpstream]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
SDK_MESSAGES: list[ChatCompletionUserMessageParam] = [
    {"role": "user", "content": "Weather in Paris?"}
]
PATH = "/v1/chat/completions"
ANSWER = ["It is", " 18 degrees", " and sunny", " in Paris."]

calls: list[str] = []


@tool
def get_weather(city: str) -> str:
    """The current weather in a city.

    Args:
        city: the city name.
    """
    calls.append(city)
    return f"18 degrees and sunny in {city}"


@tool
def flaky(city: str) -> str:
    """A tool that always fails."""
    raise RuntimeError(f"weather service down for {city}")


cancelled: list[str] = []


@tool
async def slow_lookup(city: str) -> str:
    """A tool that takes its time."""
    try:
        await anyio.sleep(30)
    except anyio.get_cancelled_exc_class():
        cancelled.append(city)
        raise
    return "late"


TOOLS = ToolSet([get_weather, flaky, slow_lookup])


def tool_turn(name: str = "get_weather", city: str = "Paris") -> Script:
    return Script(
        deltas=[], tool_calls=[ScriptedToolCall(name=name, arguments=json.dumps({"city": city}))]
    )


def answer_turn(**kw: object) -> Script:
    return Script(deltas=ANSWER, **kw)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    cancelled.clear()


def app_for(proxy: ChatProxy) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await proxy.aclose()  # the pool belongs to the server's event loop

    return Starlette(routes=proxy.routes(PATH), lifespan=lifespan)


@contextlib.contextmanager
def proxied(upstream: Upstream, **kw: object) -> Iterator[str]:
    _, running = upstream
    options: dict[str, object] = {"base_url": running.base_url, "tools": TOOLS}
    options.update(kw)
    proxy = ChatProxy(api_key=KEY, **options)  # type: ignore[arg-type]
    with serve(app_for(proxy)) as url:
        yield url


def frames(raw: bytes) -> tuple[list[dict[str, object]], list[bytes], list[bytes]]:
    """(JSON data frames, comment lines, other data payloads) of an SSE body."""
    data: list[dict[str, object]] = []
    comments: list[bytes] = []
    other: list[bytes] = []
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b":"):
                comments.append(line)
            elif line.startswith(b"data: {"):
                data.append(json.loads(line[6:]))
            elif line.startswith(b"data: "):
                other.append(line[6:])
            else:
                assert line == b"", line
    return data, comments, other


def choice(frame: dict[str, object]) -> dict[str, object]:
    choices = frame["choices"]
    assert isinstance(choices, list) and len(choices) == 1
    first = choices[0]
    assert isinstance(first, dict)
    return first


def delta(frame: dict[str, object]) -> dict[str, object]:
    value = choice(frame)["delta"]
    assert isinstance(value, dict)
    return value


def text_of(data: list[dict[str, object]]) -> str:
    return "".join(str(delta(f).get("content") or "") for f in data if "choices" in f)


def error_code(frame: dict[str, object]) -> object:
    error = frame["error"]
    assert isinstance(error, dict)
    return error["code"]


def tool_names(body: object) -> list[object]:
    assert isinstance(body, dict)
    return [t["function"]["name"] for t in body["tools"]]


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait, bounded, until `predicate()` holds (on_complete runs after the last byte)."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await anyio.sleep(0.01)
    assert predicate()


def _raw_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    return cast("AsyncGenerator[bytes, None]", response.aiter_raw())


async def wait_disconnected(upstream: Upstream, index: int, timeout: float) -> bool:
    assert await anyio.to_thread.run_sync(upstream[0].wait_for_requests, index + 1, timeout)
    request = upstream[0].requests[index]
    return await anyio.to_thread.run_sync(request.wait_disconnected, timeout)


# --- the answer, read by three clients -------------------------------------------------------


async def test_raw_stream_is_content_only_with_tool_comments(
    upstream: Upstream, key_log: pytest.LogCaptureFixture
) -> None:
    app, _ = upstream
    app.enqueue(tool_turn(), answer_turn())
    with proxied(upstream) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(
                f"{url}{PATH}", content=json.dumps({"messages": MESSAGES}).encode()
            )
    raw = response.content
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    data, comments, other = frames(raw)
    # tool progress as comments, in the raw bytes, and nothing else of the tool plumbing
    assert b": tool get_weather running\n\n" in raw
    assert b": tool get_weather done\n\n" in raw
    assert comments == [b": tool get_weather running", b": tool get_weather done"]
    assert b"tool_calls" not in raw and b"18 degrees and sunny" not in raw
    assert other == [b"[DONE]"] and raw.endswith(b"data: [DONE]\n\n")
    # one id, one model, a role chunk first, content deltas, a stop chunk last
    assert {f["id"] for f in data} == {f"chatcmpl-{response.headers['x-request-id']}"}
    assert len({f["model"] for f in data}) == 1
    assert {f["object"] for f in data} == {"chat.completion.chunk"}
    assert choice(data[0])["delta"] == {"role": "assistant", "content": ""}
    assert choice(data[-1])["delta"] == {} and choice(data[-1])["finish_reason"] == "stop"
    assert all(set(delta(f)) == {"content"} for f in data[1:-1])
    assert all(choice(f)["finish_reason"] is None for f in data[1:-1])
    assert text_of(data) == "".join(ANSWER)
    assert calls == ["Paris"]
    assert_no_key(raw, response.headers)

    # The upstream got the tools (the browser sent none), the key, and the tool result.
    first, second = app.requests
    assert first.headers["authorization"] == f"Bearer {KEY}"
    assert first.json is not None and second.json is not None
    assert tool_names(first.json) == list(TOOLS)
    assert first.json["stream"] is True
    assert second.json["messages"][-1] == {  # type: ignore[index]
        "role": "tool",
        "tool_call_id": second.json["messages"][-2]["tool_calls"][0]["id"],  # type: ignore[index]
        "content": "18 degrees and sunny in Paris",
    }


async def test_our_client_reads_one_ordinary_answer(upstream: Upstream) -> None:
    upstream[0].enqueue(tool_turn(), answer_turn())
    with proxied(upstream) as url, anyio.fail_after(10):
        async with AsyncClient(base_url=f"{url}/v1", api_key="browser-token") as client:
            async with client.stream_chat(MESSAGES, model="gpt-4o") as stream:
                texts = [text async for text in stream]
            message = stream.message
    assert "".join(texts) == "".join(ANSWER)
    assert message.content == "".join(ANSWER)
    assert message.tool_calls == ()
    assert message.finish_reason == "stop"
    assert stream.outcome is not None and stream.outcome.kind == "completed"
    received = upstream[0].requests
    assert len(received) == 2
    assert all(r.json is not None and r.json["model"] == "gpt-4o" for r in received)
    assert "browser-token" not in received[0].headers["authorization"]


async def test_a_refusal_reaches_the_browser_through_the_tool_loop(upstream: Upstream) -> None:
    # A model declining a structured output streams `delta.refusal`, not content: the
    # proxy's own loop passes it on as it came, streamed and in a whole answer.
    refusal = "I can't help with that."
    upstream[0].enqueue(Script(refusal=refusal), Script(refusal=refusal))
    with proxied(upstream) as url, anyio.fail_after(10):
        async with AsyncClient(base_url=f"{url}/v1", api_key="browser-token") as client:
            async with client.stream_chat(MESSAGES, model="gpt-4o") as stream:
                events = [event async for event in stream.events()]
            whole = await client.chat(MESSAGES, model="gpt-4o")
    refused = [e.text for e in events if isinstance(e, RefusalDelta)]
    assert "".join(refused) == refusal
    assert stream.message.refusal == refusal and stream.message.content == ""
    assert whole.message.refusal == refusal and whole.message.content == ""


# The SDK's async streams are written for asyncio (under trio they leak async generators).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_openai_sdk_reads_one_ordinary_answer(upstream: Upstream) -> None:
    upstream[0].enqueue(tool_turn(), answer_turn(), tool_turn(city="Oslo"), answer_turn())
    with proxied(upstream) as url, anyio.fail_after(10):
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        try:
            stream = await sdk.chat.completions.create(
                model="gpt-4o",
                messages=SDK_MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            completion = await sdk.chat.completions.create(
                model="gpt-4o",
                messages=SDK_MESSAGES,
                stream=False,
            )
        finally:
            await sdk.close()
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == "".join(ANSWER)
    assert len({c.id for c in chunks}) == 1 and len({c.model for c in chunks}) == 1
    assert all(c.choices[0].delta.tool_calls is None for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    usage = chunks[-1].usage  # both turns' usage, summed
    assert usage is not None and usage.completion_tokens > len(ANSWER)
    # stream: false: one ordinary chat.completion with the final message
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "".join(ANSWER)
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert calls == ["Paris", "Oslo"]


# --- tools: failures, browser fields, limits -------------------------------------------------


async def test_a_tool_that_raises_still_yields_an_answer(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(tool_turn("flaky"), answer_turn())
    with proxied(upstream) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
    data, comments, other = frames(response.content)
    assert comments == [b": tool flaky running", b": tool flaky failed"]
    assert other == [b"[DONE]"]
    assert text_of(data) == "".join(ANSWER)
    assert b"weather service down" not in response.content  # the error went to the model
    tool_message = app.requests[1].json["messages"][-1]  # type: ignore[index]
    assert tool_message["role"] == "tool"
    assert tool_message["content"] == "Error: RuntimeError: weather service down for Paris"


async def test_an_unknown_tool_name_is_not_echoed(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(tool_turn("no\nsuch: tool"), answer_turn())
    with proxied(upstream) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
    _, comments, other = frames(response.content)
    assert comments == [b": tool unknown running", b": tool unknown failed"]
    assert other == [b"[DONE]"]


@pytest.mark.parametrize(
    "field",
    [
        {"tools": [get_weather.to_openai()]},
        {"tool_choice": "required"},
        {"parallel_tool_calls": False},
        {"functions": [{"name": "f"}]},
    ],
)
async def test_browser_tool_fields_are_rejected(
    upstream: Upstream, field: dict[str, object]
) -> None:
    with proxied(upstream) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES, **field})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "tools_not_allowed" and error["param"] == next(iter(field))
    assert upstream[0].requests == []


async def test_null_tool_fields_pass_and_on_request_may_choose_tool_choice(
    upstream: Upstream,
) -> None:
    upstream[0].enqueue(tool_turn(), answer_turn())

    def on_request(request: object, body: dict[str, object]) -> dict[str, object]:
        return {**body, "tool_choice": "auto", "tools": [{"type": "function"}]}

    with proxied(upstream, on_request=on_request) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            body = {"messages": MESSAGES, "tools": None, "tool_choice": None}
            response = await client.post(f"{url}{PATH}", json=body)
    assert response.status_code == 200 and response.content.endswith(b"data: [DONE]\n\n")
    sent = upstream[0].requests[0].json
    assert sent is not None and sent["tool_choice"] == "auto"
    # the registered tool set is what goes upstream, whatever on_request put in "tools"
    assert tool_names(sent) == list(TOOLS)


async def test_max_tool_turns_ends_with_an_error_frame(upstream: Upstream) -> None:
    upstream[0].enqueue(tool_turn(), tool_turn())
    with proxied(upstream, max_tool_turns=2) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
    assert response.status_code == 200
    data, _, other = frames(response.content)
    assert other == []  # no [DONE]
    assert error_code(data[-1]) == "max_tool_turns"
    assert len(upstream[0].requests) == 2


def test_constructor_checks_the_tool_options() -> None:
    with pytest.raises(ValueError, match="tools is empty"):
        ChatProxy(api_key=KEY, base_url="http://127.0.0.1:1/v1", tools=[])
    with pytest.raises(ValueError, match="max_tool_turns"):
        ChatProxy(api_key=KEY, base_url="http://127.0.0.1:1/v1", tools=TOOLS, max_tool_turns=0)
    proxy = ChatProxy(api_key=KEY, base_url="http://127.0.0.1:1/v1", tools=[get_weather])
    assert proxy.tools is not None and list(proxy.tools) == ["get_weather"]


# --- upstream failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "status"),
    [
        (Script(status=429, headers={"Retry-After": "3"}), 429),
        (Script(status=401), 502),
        (Script(status=503), 502),
        (Script(status=200, content_type="application/json"), 502),
    ],
)
async def test_upstream_status_before_the_start(
    upstream: Upstream, script: Script, status: int
) -> None:
    upstream[0].enqueue(script)
    with proxied(upstream) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()
    if status == 429:
        assert response.headers["retry-after"] == "3"
    assert_no_key(response.content, response.headers)


async def test_unreachable_upstream_is_502() -> None:
    with socket_closed_port() as port:
        proxy = ChatProxy(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1", tools=TOOLS)
        with serve(app_for(proxy)) as url, anyio.fail_after(10):
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    yield port


# The SDK's async streams are written for asyncio (under trio they leak async generators).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_second_turn_cut_ends_with_error_frame_and_sdk_raises(upstream: Upstream) -> None:
    upstream[0].enqueue(tool_turn(), Script(text="partial answer", end="cut"))
    upstream[0].enqueue(tool_turn(), Script(text="partial answer", end="cut"))
    with proxied(upstream) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        try:
            stream = await sdk.chat.completions.create(
                model="gpt-4o",
                messages=SDK_MESSAGES,
                stream=True,
            )
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
        finally:
            await sdk.close()
    assert response.status_code == 200
    data, _, other = frames(response.content)
    assert other == []  # no [DONE]
    assert error_code(data[-1]) == "upstream_error"
    assert_no_key(response.content)


async def test_an_echoed_key_is_redacted(upstream: Upstream) -> None:
    records: list[CompletionRecord] = []
    upstream[0].enqueue(tool_turn(), Script(deltas=["the key is ", KEY, "."]))
    upstream[0].enqueue(tool_turn(), Script(deltas=["the key is ", KEY, "."]))
    with proxied(upstream, on_complete=records.append) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(
                f"{url}{PATH}", json={"messages": MESSAGES, "stream": False}
            )
            streamed = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
        await eventually(lambda: len(records) == 2)
    assert response.status_code == 200
    assert "[redacted]" in response.json()["choices"][0]["message"]["content"]
    assert_no_key(response.content, response.headers, streamed.content)
    assert [r.message.content for r in records] == ["the key is [redacted]."] * 2


# --- on_complete, disconnects ----------------------------------------------------------------


async def test_on_complete_gets_the_final_answer(upstream: Upstream) -> None:
    records: list[CompletionRecord] = []
    upstream[0].enqueue(tool_turn(), answer_turn())
    with proxied(upstream, on_complete=records.append) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
        await eventually(lambda: bool(records))
    assert response.status_code == 200
    (record,) = records
    assert record.outcome == "completed"
    assert record.message.content == "".join(ANSWER)
    assert record.message.tool_calls == ()
    assert record.finish_reason == "stop"
    assert record.messages == MESSAGES
    assert record.usage is not None and record.usage.total_tokens
    assert record.bytes_sent == len(response.content)


class CountingBudget:
    """A UsageLimiter double: lets everything through and keeps what `record` gets."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, Usage]] = []

    async def acquire(self, key: str) -> float | None:
        return None

    async def record(self, key: str, usage: Usage) -> None:
        self.recorded.append((key, usage))


async def test_a_usage_limiter_gets_the_usage_without_on_complete(upstream: Upstream) -> None:
    # A budget counts tokens even when nobody set on_complete or asked for usage in the body.
    budget = CountingBudget()
    upstream[0].enqueue(tool_turn(), answer_turn())
    with proxied(upstream, rate_limiter=budget) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
        await eventually(lambda: bool(budget.recorded))
    assert response.status_code == 200
    assert b'"usage"' not in response.content  # the browser did not ask for it
    (_, usage), *rest = budget.recorded
    assert not rest
    assert usage.total_tokens
    sent = [r.json for r in upstream[0].requests[-2:]]
    assert all(j is not None and j["stream_options"] == {"include_usage": True} for j in sent)


async def test_disconnect_while_second_turn_streams_closes_upstream(upstream: Upstream) -> None:
    app, _ = upstream
    trials = 5
    records: list[CompletionRecord] = []
    for _ in range(trials):
        app.enqueue(tool_turn(), Script(text="word " * 400, delay=0.01))
    with proxied(upstream, on_complete=records.append) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            for i in range(trials):
                with anyio.fail_after(10):
                    async with client.stream(
                        "POST", f"{url}{PATH}", json={"messages": MESSAGES}
                    ) as response:
                        async with contextlib.aclosing(_raw_chunks(response)) as chunks:
                            async for chunk in chunks:
                                if b"word" in chunk:
                                    break
                    closed_at = time.monotonic()
                    assert await wait_disconnected(upstream, 2 * i + 1, 1.0), f"trial {i}"
                    seen = app.requests[2 * i + 1].disconnected_at
                    assert seen is not None and seen - closed_at < 1.0
        await eventually(lambda: len(records) == trials)
    assert {r.outcome for r in records} == {"client_disconnect"}
    assert all(r.message.content.startswith("word") for r in records)
    assert len(app.requests) == 2 * trials


async def test_disconnect_while_a_tool_runs_stops_the_loop(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(tool_turn("slow_lookup"), answer_turn())
    with proxied(upstream) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                async with client.stream(
                    "POST", f"{url}{PATH}", json={"messages": MESSAGES}
                ) as response:
                    async with contextlib.aclosing(_raw_chunks(response)) as chunks:
                        async for chunk in chunks:
                            if b": tool slow_lookup running" in chunk:
                                break
            await eventually(lambda: bool(cancelled), 1.0)
            await anyio.sleep(0.2)
    assert cancelled == ["Paris"]
    assert len(app.requests) == 1  # no second turn was asked for


async def test_disconnect_before_the_first_token(upstream: Upstream) -> None:
    upstream[0].enqueue(Script(text="late", first_delay=30))
    with proxied(upstream, keepalive_interval=None) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(5):
                async with client.stream(
                    "POST", f"{url}{PATH}", json={"messages": MESSAGES}
                ) as response:
                    assert response.status_code == 200  # the upstream's headers arrived
                assert await wait_disconnected(upstream, 0, 1.0)


async def test_keepalives_while_a_tool_runs(upstream: Upstream) -> None:
    @tool
    async def pause(city: str) -> str:
        """Takes half a second."""
        await anyio.sleep(0.5)
        return "ok"

    upstream[0].enqueue(tool_turn("pause"), answer_turn())
    with proxied(upstream, tools=[pause], keepalive_interval=0.1) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}{PATH}", json={"messages": MESSAGES})
    raw = response.content
    running = raw.index(b": tool pause running")
    done = raw.index(b": tool pause done")
    assert raw[running:done].count(b": keep-alive\n\n") >= 2
    assert raw.endswith(b"data: [DONE]\n\n")


# --- a keyless upstream ----------------------------------------------------------------------


def test_keyless_upstream_gets_no_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENHUB_KEY", KEY)  # must not be picked up from the environment
    app = FakeChatUpstream(delay=0.001)
    app.enqueue(tool_turn(), answer_turn())
    with run_upstream(app) as running:
        proxy = ChatProxy(api_key=None, base_url=running.base_url, tools=TOOLS)
        with serve(app_for(proxy)) as url:
            response = httpx.post(f"{url}{PATH}", json={"messages": MESSAGES}, timeout=10)
    assert response.status_code == 200
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert all("authorization" not in r.headers for r in app.requests)


async def test_on_disconnect_finish_runs_the_loop_to_its_end(upstream: Upstream) -> None:
    app, _ = upstream
    records: list[CompletionRecord] = []
    app.enqueue(tool_turn(), Script(deltas=["a"] * 30, delay=0.01))
    options = {"on_complete": records.append, "on_disconnect": "finish"}
    with proxied(upstream, **options) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                async with client.stream(
                    "POST", f"{url}{PATH}", json={"messages": MESSAGES}
                ) as response:
                    async with contextlib.aclosing(_raw_chunks(response)) as chunks:
                        async for chunk in chunks:
                            if b'"content":"a"' in chunk:
                                break
            await eventually(lambda: bool(records), 5.0)
    (record,) = records
    assert record.outcome == "client_disconnect"
    assert record.message.content == "a" * 30  # the whole answer, sent nowhere
    assert app.requests[1].completed


# --- in-process, on both anyio backends (the server side under trio too) ---------------------


def _sse(*payloads: object) -> httpx.Response:
    body = b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=body + b"data: [DONE]\n\n"
    )


def _chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


async def test_in_process_tool_answer_on_both_backends() -> None:
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    responses = [
        _sse(_chunk({"role": "assistant", "tool_calls": [call]}), _chunk({}, "tool_calls")),
        _sse(_chunk({"content": "Cold"}), _chunk({"content": " in Oslo."}), _chunk({}, "stop")),
    ]
    sent: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return responses.pop(0)

    proxy = ChatProxy(
        api_key=KEY,
        base_url="https://upstream.test/v1",
        transport=httpx.MockTransport(handler),
        tools=TOOLS,
    )
    body = json.dumps({"messages": MESSAGES}).encode()
    done = anyio.Event()
    out: list[MutableMapping[str, object]] = []
    delivered = False

    async def receive() -> MutableMapping[str, object]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, object]) -> None:
        out.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope: dict[str, object] = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
    }
    with anyio.fail_after(5):
        await proxy(scope, receive, send)
    await proxy.aclose()
    assert out[0]["status"] == 200
    raw = b"".join(m.get("body", b"") for m in out[1:])  # type: ignore[misc]
    data, comments, other = frames(raw)
    assert text_of(data) == "Cold in Oslo."
    assert comments == [b": tool get_weather running", b": tool get_weather done"]
    assert other == [b"[DONE]"]
    assert calls == ["Oslo"]
    assert [r.headers["authorization"] for r in sent] == [f"Bearer {KEY}"] * 2
    assert tool_names(json.loads(sent[0].content)) == list(TOOLS)
