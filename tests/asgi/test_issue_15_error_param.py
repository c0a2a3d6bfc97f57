"""Issue 15, finding 5: the upstream's error object reaches the browser intact.

An upstream 400 with `{"error": {"message", "type", "param": "max_tokens", "code"}}` used
to reach the openai SDK with `param` null: the proxy rebuilt the error object from its
message, type and code. Now the object passes through as the upstream sent it (extra keys
too), with the server key redacted from every string in it and within the 64 KiB cap: in
the JSON error response, and in the error frame the tool loop writes after the status.
ChatProxy and FakeChatUpstream both run under uvicorn on loopback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import openai
import pytest
from starlette.applications import Starlette

from tokenhub_stream import APIError, AsyncClient, BadRequestError
from tokenhub_stream._errors import error_from_frame, error_from_status
from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, ScriptedToolCall
from tokenhub_stream.tools import ToolSet, tool

from .conftest import KEY, assert_no_key, serve

pytestmark = pytest.mark.anyio

Upstream = tuple[FakeChatUpstream, RunningUpstream]
PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]

UPSTREAM_ERROR: dict[str, object] = {
    "message": "max_tokens is too large: 99999. This model supports at most 16384 tokens.",
    "type": "invalid_request_error",
    "param": "max_tokens",
    "code": "invalid_value",
    "limits": {"max_tokens": 16384, "hints": ["lower it", None, True]},
}


@tool
def get_weather(city: str) -> str:
    """The current weather in a city.

    Args:
        city: the city name.
    """
    return f"18 degrees in {city}"


def app_for(proxy: ChatProxy) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await proxy.aclose()  # the pool belongs to the server's event loop

    return Starlette(routes=proxy.routes(PATH), lifespan=lifespan)


@contextlib.contextmanager
def proxied(upstream: Upstream, **options: object) -> Iterator[str]:
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url, **options)  # type: ignore[arg-type]
    with serve(app_for(proxy)) as url:
        yield url


async def post(url: str, **body: object) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(f"{url}{PATH}", json={"messages": MESSAGES, **body})


def strings_in(value: object) -> Iterator[str]:
    """Every string in a JSON value, object keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


async def sdk_error(url: str, *, stream: bool) -> openai.APIError:
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.APIError) as caught:
            if stream:
                chunks = await sdk.chat.completions.create(
                    model="gpt-4o",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=99999,
                    stream=True,
                )
                async for _ in chunks:
                    pass
            else:
                await sdk.chat.completions.create(
                    model="gpt-4o",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=99999,
                )
    finally:
        await sdk.close()
    return caught.value


# --- the passthrough: the JSON error response --------------------------------------------------


# The SDK's async client is written for asyncio.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("stream", [True, False])
async def test_issue_15_error_param_reaches_the_openai_sdk(
    upstream: Upstream, stream: bool
) -> None:
    upstream[0].enqueue(Script(status=400, error={"error": UPSTREAM_ERROR}))
    with proxied(upstream) as url, anyio.fail_after(10):
        err = await sdk_error(url, stream=stream)
    assert isinstance(err, openai.BadRequestError) and err.status_code == 400
    assert err.param == "max_tokens"
    assert err.code == "invalid_value" and err.type == "invalid_request_error"
    assert err.body == UPSTREAM_ERROR  # every key, the extra ones too


async def test_issue_15_error_param_json_response_is_the_upstream_object(
    upstream: Upstream,
) -> None:
    upstream[0].enqueue(Script(status=422, error={"error": UPSTREAM_ERROR}))
    with proxied(upstream) as url, anyio.fail_after(10):
        response = await post(url)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": UPSTREAM_ERROR}


async def test_issue_15_error_param_our_client_keeps_param_and_body(upstream: Upstream) -> None:
    upstream[0].enqueue(Script(status=400, error={"error": UPSTREAM_ERROR}))
    with proxied(upstream) as url, anyio.fail_after(10):
        async with AsyncClient(base_url=f"{url}/v1", api_key="browser", max_retries=0) as client:
            with pytest.raises(BadRequestError) as caught:
                await client.chat([{"role": "user", "content": "hi"}], model="gpt-4o")
    assert caught.value.param == "max_tokens" and caught.value.code == "invalid_value"
    assert caught.value.body == {"error": UPSTREAM_ERROR}


async def test_issue_15_error_param_key_is_redacted_in_every_string(upstream: Upstream) -> None:
    # The key echoed in the message, the param, a nested list, an object key, and once
    # with a JSON escape, which a byte-level replace cannot see.
    escaped = "\\u0073" + KEY[1:]
    error = {
        "message": f"bad key {KEY}, also @@",
        "type": "invalid_request_error",
        "param": KEY,
        "code": None,
        "seen": [{KEY: "x"}, "@@"],
    }
    raw = json.dumps({"error": error}).replace("@@", escaped).encode()
    assert json.loads(raw)["error"]["message"].count(KEY) == 2
    upstream[0].enqueue(Script(status=400, raw=[raw], content_type="application/json"))
    with proxied(upstream) as url, anyio.fail_after(10):
        response = await post(url)
    assert response.status_code == 400
    assert_no_key(response.content, response.headers)
    error = response.json()["error"]
    assert not [s for s in strings_in(error) if KEY in s]
    assert error["message"] == "bad key [redacted], also [redacted]"
    assert error["param"] == "[redacted]"
    assert error["seen"] == [{"[redacted]": "x"}, "[redacted]"]
    assert error["code"] is None and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Not JSON: the rebuilt object, as before.
        (b"upstream exploded", {"message": "The upstream answered 400.", "param": None}),
        # `error` a string: its text as the message.
        (b'{"error":"no such thing"}', {"message": "no such thing", "param": None}),
        # vLLM's flat shape: not passed on as is, but its param is kept.
        (
            b'{"object":"error","message":"max_tokens too big","type":"BadRequestError",'
            b'"param":"max_tokens","code":400}',
            {"message": "max_tokens too big", "param": "max_tokens"},
        ),
        # An `error` object without a message string: rebuilt, its param kept.
        (
            b'{"error":{"message":7,"type":"invalid_request_error","param":"n","code":"c"}}',
            {"message": "The upstream answered 400.", "param": "n", "code": "c"},
        ),
    ],
)
async def test_issue_15_error_param_other_shapes_are_rebuilt(
    upstream: Upstream, raw: bytes, expected: dict[str, object]
) -> None:
    upstream[0].enqueue(Script(status=400, raw=[raw], content_type="application/json"))
    with proxied(upstream) as url, anyio.fail_after(10):
        response = await post(url)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert {k: error[k] for k in expected} == expected


async def test_issue_15_error_param_over_the_cap_is_rebuilt(upstream: Upstream) -> None:
    big = {"error": {**UPSTREAM_ERROR, "message": "x" * (70 * 1024)}}
    upstream[0].enqueue(Script(status=400, error=big))
    with proxied(upstream) as url, anyio.fail_after(10):
        response = await post(url)
    assert response.status_code == 400
    assert len(response.content) < 64 * 1024
    assert response.json()["error"]["message"] == "The upstream answered 400."


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 60_000,  # past the JSON parser's recursion limit
        b'{"error":{"message":"deep","param":"p","x":' + b"[" * 200 + b"]" * 200 + b"}}",
    ],
    ids=["unparsable", "too-deep-to-walk"],
)
async def test_issue_15_error_param_deep_json_is_rebuilt(upstream: Upstream, raw: bytes) -> None:
    upstream[0].enqueue(Script(status=400, raw=[raw], content_type="application/json"))
    with proxied(upstream) as url, anyio.fail_after(10):
        response = await post(url)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_issue_15_error_param_a_502_does_not_pass_the_object(upstream: Upstream) -> None:
    # 401/403/5xx are the server's problem: the browser gets the proxy's own 502.
    upstream[0].enqueue(Script(status=401, error={"error": UPSTREAM_ERROR}))
    with proxied(upstream) as url, anyio.fail_after(10):
        response = await post(url)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert "limits" not in response.json()["error"]


# --- the tool loop: before the status, and in the error frame after it ------------------------


def tool_turn() -> Script:
    call = ScriptedToolCall(name="get_weather", arguments=json.dumps({"city": "Paris"}))
    return Script(deltas=[], tool_calls=[call])


def last_error_frame(body: bytes) -> dict[str, object]:
    frames = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]
    assert b"data: [DONE]" not in body
    error = frames[-1]["error"]
    assert isinstance(error, dict)
    return error


async def test_issue_15_error_param_tool_loop_before_the_status(upstream: Upstream) -> None:
    upstream[0].enqueue(Script(status=400, error={"error": UPSTREAM_ERROR}))
    with proxied(upstream, tools=ToolSet([get_weather])) as url, anyio.fail_after(10):
        response = await post(url)
    assert response.status_code == 400
    assert response.json() == {"error": UPSTREAM_ERROR}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    "second",
    [
        Script(status=400, error={"error": UPSTREAM_ERROR}),  # the second request refused
        Script(deltas=["It is"], error_frame={"error": UPSTREAM_ERROR}, end="close"),
    ],
    ids=["status", "frame"],
)
async def test_issue_15_error_param_tool_loop_error_frame_after_the_status(
    upstream: Upstream, second: Script
) -> None:
    upstream[0].enqueue(tool_turn(), second, tool_turn(), second)
    with proxied(upstream, tools=ToolSet([get_weather])) as url, anyio.fail_after(10):
        response = await post(url)
        err = await sdk_error(url, stream=True)
    assert response.status_code == 200
    assert last_error_frame(response.content) == UPSTREAM_ERROR
    assert err.param == "max_tokens" and err.code == "invalid_value"
    assert err.body == UPSTREAM_ERROR


async def test_issue_15_error_param_tool_loop_frame_is_redacted(upstream: Upstream) -> None:
    leaky = {**UPSTREAM_ERROR, "param": KEY, "limits": [KEY]}
    upstream[0].enqueue(tool_turn(), Script(status=400, error={"error": leaky}))
    with proxied(upstream, tools=ToolSet([get_weather])) as url, anyio.fail_after(10):
        response = await post(url)
    assert_no_key(response.content)
    error = last_error_frame(response.content)
    # The loop's client already masks its key (as `***`) in what it raises.
    assert error["param"] == "***" and error["limits"] == ["***"]
    assert error["message"] == UPSTREAM_ERROR["message"]


# --- the client: APIError.param and .body --------------------------------------------------------


def test_issue_15_error_param_client_errors_carry_param_and_body() -> None:
    def redact(text: str) -> str:
        return text.replace("sk-secret", "***")

    body = json.dumps({"error": {**UPSTREAM_ERROR, "param": "sk-secret"}}).encode()
    err = error_from_status(400, body, {}, redact=redact)
    assert isinstance(err, BadRequestError)
    assert err.param == "***"
    assert err.body == {"error": {**UPSTREAM_ERROR, "param": "***"}}
    frame = error_from_frame({"error": UPSTREAM_ERROR})
    assert frame.param == "max_tokens" and frame.body == {"error": UPSTREAM_ERROR}
    flat = error_from_frame({"object": "error", "message": "m", "param": "n", "code": 400})
    assert flat.param == "n" and flat.status_code == 400
    assert error_from_status(400, b"not json", {}).body is None
    assert error_from_status(400, b'{"error":{"param":3}}', {}).param is None
    plain = APIError("m")
    assert plain.param is None and plain.body is None
