"""Request shape, configuration, status mapping and retries (respx: no sockets).

Each behaviour runs on both shells: `sync=True` drives `Client`, `sync=False` drives
`AsyncClient` through `anyio.run`.
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
from tokenhub_stream import (
    APIError,
    AuthenticationError,
    BadRequestError,
    MissingAPIKeyError,
    NotFoundError,
    ProtocolError,
    RateLimitError,
    ServerError,
    StreamConsumed,
    TransportError,
)

URL = "http://upstream.test/v1"
KEY = "sk-th_canary_0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]


def sse(*texts: str, finish: str | None = "stop", done: bool = True) -> bytes:
    out = b""
    for text in texts:
        out += (
            b"data: "
            + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode()
            + b"\n\n"
        )
    if finish:
        out += (
            b"data: "
            + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}).encode()
            + b"\n\n"
        )
    if done:
        out += b"data: [DONE]\n\n"
    return out


def ok(body: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    # respx mocks httpx, so these clients send through httpx, not through our engine: the
    # same behaviours over the engine, on a real socket, are in test_issue_17_engine.py.
    monkeypatch.setenv("TOKENHUB_STREAM_ENGINE", "httpx")
    with respx.mock(assert_all_called=False) as router:
        yield router


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENHUB_KEY", raising=False)
    monkeypatch.delenv("TOKENHUB_BASE_URL", raising=False)


def collect(
    sync: bool, client_kwargs: dict[str, Any] | None = None, **call: Any
) -> tuple[list[str], Any]:
    """Stream one answer with Client or AsyncClient; return the texts and the stream."""
    kwargs = {"base_url": URL, "api_key": KEY, **(client_kwargs or {})}
    if sync:
        with ts.Client(**kwargs) as client:
            with client.stream_chat(MESSAGES, **call) as stream:
                return list(stream), stream

    async def main() -> tuple[list[str], Any]:
        async with ts.AsyncClient(**kwargs) as client:
            async with client.stream_chat(MESSAGES, **call) as stream:
                return [t async for t in stream], stream

    return anyio.run(main)


both = pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])


@both
def test_client_request_shape(mock: respx.MockRouter, sync: bool) -> None:
    route = mock.post(URL + "/chat/completions").mock(return_value=ok(sse("a", "b")))
    texts, stream = collect(
        sync, model="gpt-4o", temperature=0.2, max_tokens=5, extra_headers={"X-Trace": "1"}
    )
    assert texts == ["a", "b"]
    request = route.calls.last.request
    assert json.loads(request.content) == {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "stream": True,
        "temperature": 0.2,
        "max_tokens": 5,
    }
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["x-trace"] == "1"
    assert stream.outcome == ts.Outcome("completed", "done")


@both
def test_client_include_usage_merges_stream_options(mock: respx.MockRouter, sync: bool) -> None:
    route = mock.post(URL + "/chat/completions").mock(return_value=ok(sse("a")))
    collect(sync, include_usage=True, stream_options={"continuous_usage_stats": True})
    body = json.loads(route.calls.last.request.content)
    assert body["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


@both
def test_client_stream_param_refused(sync: bool) -> None:
    client_cls = ts.Client if sync else ts.AsyncClient
    client = client_cls(base_url=URL)
    with pytest.raises(TypeError, match="stream"):
        client.stream_chat(MESSAGES, stream=False)
    with pytest.raises(TypeError, match="messages"):
        client.stream_chat("hello")  # type: ignore[arg-type]


@both
def test_client_refuses_nan_before_any_request(mock: respx.MockRouter, sync: bool) -> None:
    # Not JSON: the upstream would answer 400; the caller gets a ValueError at once.
    route = mock.route().mock(return_value=ok(sse("a")))
    client_cls = ts.Client if sync else ts.AsyncClient
    client = client_cls(base_url=URL)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="JSON"):
            client.stream_chat(MESSAGES, temperature=value)
    assert not route.called


def test_client_default_url_needs_key_before_any_request(mock: respx.MockRouter) -> None:
    route = mock.route().mock(return_value=ok(sse("a")))
    with pytest.raises(MissingAPIKeyError, match="TOKENHUB_KEY"):
        ts.stream_chat(MESSAGES)
    with pytest.raises(MissingAPIKeyError):
        ts.stream_chat_sync(MESSAGES)
    with pytest.raises(ValueError):
        ts.Client().stream_chat(MESSAGES)
    assert not route.called


def test_client_env_read_at_call_time(
    mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = mock.post("http://env.test/v1/chat/completions").mock(return_value=ok(sse("e")))
    monkeypatch.setenv("TOKENHUB_BASE_URL", "http://env.test/v1/")
    monkeypatch.setenv("TOKENHUB_KEY", KEY)
    with ts.stream_chat_sync(MESSAGES) as stream:
        assert list(stream) == ["e"]
    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content)["model"] == ts.DEFAULT_MODEL


def test_client_local_server_needs_no_key(mock: respx.MockRouter) -> None:
    route = mock.post("http://localhost:8000/v1/chat/completions").mock(return_value=ok(sse("x")))
    with ts.stream_chat_sync(MESSAGES, base_url="http://localhost:8000/v1") as stream:
        assert list(stream) == ["x"]
    assert "authorization" not in route.calls.last.request.headers


def test_client_module_stream_chat_async(mock: respx.MockRouter) -> None:
    mock.post(URL + "/chat/completions").mock(return_value=ok(sse("x", "y")))

    async def main() -> list[str]:
        async with ts.stream_chat(MESSAGES, api_key=KEY, base_url=URL) as stream:
            return [t async for t in stream]

    assert anyio.run(main) == ["x", "y"]


STATUS_CASES = [
    (400, BadRequestError),
    (422, BadRequestError),
    (401, AuthenticationError),
    (403, AuthenticationError),
    (404, NotFoundError),
    (429, RateLimitError),
    (500, ServerError),
    (503, ServerError),
    (418, APIError),
]


@both
@pytest.mark.parametrize(("status", "cls"), STATUS_CASES)
def test_client_status_maps_to_error_class(
    mock: respx.MockRouter, sync: bool, status: int, cls: type[APIError]
) -> None:
    body = {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "x_error"}}
    mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(status, json=body, headers={"x-request-id": "req_9"})
    )
    with pytest.raises(cls) as info:
        collect(sync, max_retries=0)
    assert type(info.value) is cls
    assert info.value.status_code == status
    assert info.value.request_id == "req_9"
    assert KEY not in str(info.value) and KEY not in repr(info.value)


@both
def test_client_retries_then_succeeds(mock: respx.MockRouter, sync: bool) -> None:
    route = mock.post(URL + "/chat/completions").mock(
        side_effect=[
            httpx.Response(503, json={"error": {"message": "busy"}}, headers={"retry-after": "0"}),
            httpx.ConnectError("refused"),
            httpx.Response(429, headers={"retry-after": "0.01"}),
            ok(sse("finally")),
        ]
    )
    texts, stream = collect(sync, max_retries=3)
    assert texts == ["finally"]
    assert route.call_count == 4


@both
def test_client_retry_after_beyond_max_wait_raises(mock: respx.MockRouter, sync: bool) -> None:
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(429, headers={"retry-after": "120"})
    )
    with pytest.raises(RateLimitError) as info:
        collect(sync, client_kwargs={"max_retry_wait": 60})
    assert info.value.retry_after == 120.0
    assert route.call_count == 1


@both
def test_client_no_retry_for_client_errors(mock: respx.MockRouter, sync: bool) -> None:
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(400, json={"error": {"message": "no"}})
    )
    with pytest.raises(BadRequestError, match="no"):
        collect(sync, max_retries=5)
    assert route.call_count == 1


@both
def test_client_retryable_error_frame_before_first_delta_is_retried(
    mock: respx.MockRouter, sync: bool
) -> None:
    frame = b'data: {"error": {"message": "overloaded", "code": 503}}\n\n'
    route = mock.post(URL + "/chat/completions").mock(side_effect=[ok(frame), ok(sse("ok"))])
    texts, stream = collect(sync, max_retries=1, client_kwargs={"max_retry_wait": 0})
    assert texts == ["ok"]
    assert route.call_count == 2


@both
def test_client_error_frame_after_delta_is_not_retried(mock: respx.MockRouter, sync: bool) -> None:
    body = (
        sse("partial", finish=None, done=False)
        + b'data: {"error": {"message": "boom", "code": 500}}\n\n'
    )
    route = mock.post(URL + "/chat/completions").mock(return_value=ok(body))
    got: list[str] = []
    with pytest.raises(ServerError, match="boom"):
        if sync:
            with ts.Client(base_url=URL, api_key=KEY) as client:
                with client.stream_chat(MESSAGES, max_retries=3) as stream:
                    for text in stream:
                        got.append(text)
        else:

            async def main() -> None:
                async with ts.AsyncClient(base_url=URL, api_key=KEY) as client:
                    async with client.stream_chat(MESSAGES, max_retries=3) as s:
                        async for text in s:
                            got.append(text)

            anyio.run(main)
    assert got == ["partial"]
    assert route.call_count == 1


@both
def test_client_connect_error_is_transport_error(mock: respx.MockRouter, sync: bool) -> None:
    mock.post(URL + "/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(TransportError) as info:
        collect(sync, max_retries=0)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@both
def test_client_connect_timeout_is_stream_timeout(mock: respx.MockRouter, sync: bool) -> None:
    mock.post(URL + "/chat/completions").mock(side_effect=httpx.ConnectTimeout("slow"))
    with pytest.raises(ts.StreamTimeout) as info:
        collect(sync, max_retries=0)
    assert info.value.kind == "connect"


@both
def test_client_not_event_stream_is_protocol_error(mock: respx.MockRouter, sync: bool) -> None:
    mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, json={"choices": []})
    )
    with pytest.raises(ProtocolError, match="text/event-stream"):
        collect(sync)


@both
def test_client_json_error_body_with_200_is_api_error(mock: respx.MockRouter, sync: bool) -> None:
    mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, json={"error": {"message": "quota", "code": 429}})
    )
    with pytest.raises(RateLimitError):
        collect(sync, max_retries=0)


@both
def test_client_gzip_body_is_decoded(mock: respx.MockRouter, sync: bool) -> None:
    import gzip

    mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(
            200,
            headers={"content-type": "text/event-stream", "content-encoding": "gzip"},
            content=gzip.compress(sse("zipped")),
        )
    )
    texts, _ = collect(sync)
    assert texts == ["zipped"]


@both
def test_client_one_consumer_per_stream(mock: respx.MockRouter, sync: bool) -> None:
    mock.post(URL + "/chat/completions").mock(return_value=ok(sse("a")))
    if sync:
        with ts.Client(base_url=URL) as client, client.stream_chat(MESSAGES) as stream:
            assert list(stream) == ["a"]
            with pytest.raises(StreamConsumed):
                list(stream.events())
        return

    async def main() -> None:
        async with ts.AsyncClient(base_url=URL) as client, client.stream_chat(MESSAGES) as stream:
            assert [t async for t in stream] == ["a"]
            with pytest.raises(StreamConsumed):
                [e async for e in stream.events()]

    anyio.run(main)


@both
def test_client_chat_non_streaming(mock: respx.MockRouter, sync: bool) -> None:
    completion = {
        "id": "chatcmpl-1",
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, json=completion)
    )
    if sync:
        with ts.Client(base_url=URL) as client:
            result = client.chat(MESSAGES, model="gpt-4o")
    else:

        async def main() -> ts.ChatResult:
            async with ts.AsyncClient(base_url=URL) as client:
                return await client.chat(MESSAGES, model="gpt-4o")

        result = anyio.run(main)
    assert json.loads(route.calls.last.request.content)["stream"] is False
    assert result.usage == ts.Usage(3, 4, 7)
    assert result.message.finish_reason == "tool_calls"
    assert result.message.tool_calls[0].name == "f"
    assert (result.id, result.model) == ("chatcmpl-1", "gpt-4o")


@both
def test_client_chat_errors_and_retries(mock: respx.MockRouter, sync: bool) -> None:
    route = mock.post(URL + "/chat/completions").mock(
        side_effect=[
            httpx.Response(500, json={"error": {"message": "x"}}),
            httpx.Response(404, json={"error": {"message": "no model"}}),
        ]
    )
    with pytest.raises(NotFoundError):
        if sync:
            with ts.Client(base_url=URL, max_retry_wait=0) as client:
                client.chat(MESSAGES, max_retries=1, timeout=5)
        else:

            async def main() -> None:
                async with ts.AsyncClient(base_url=URL) as client:
                    await client.chat(MESSAGES, max_retries=1)

            anyio.run(main)
    assert route.call_count == 2


def test_client_chat_bad_bodies(mock: respx.MockRouter) -> None:
    route = mock.post(URL + "/chat/completions")
    with ts.Client(base_url=URL) as client:
        for body in [
            b"nope",
            b"[]",
            b'{"choices": []}',
            b'{"choices": [{"message": 1}]}',
            b'{"choices": [{"message": {"tool_calls": [1]}}]}',
        ]:
            route.mock(return_value=httpx.Response(200, content=body))
            with pytest.raises(ProtocolError):
                client.chat(MESSAGES)
        route.mock(
            return_value=httpx.Response(200, json={"error": {"message": "in band", "code": 400}})
        )
        with pytest.raises(BadRequestError):
            client.chat(MESSAGES)


def test_client_repr_never_shows_key() -> None:
    for client in (ts.Client(api_key=KEY), ts.AsyncClient(api_key=KEY)):
        assert KEY not in repr(client)
        assert KEY not in repr(client.stream_chat(MESSAGES))
        assert KEY not in repr(client.stream_chat(MESSAGES)._state._call)
    stream = ts.Client(api_key=KEY).stream_chat(MESSAGES)
    assert repr(stream) == f"<ChatStream model={ts.DEFAULT_MODEL!r} new>"


def test_client_bad_options() -> None:
    with pytest.raises(ValueError):
        ts.Client(max_retries=-1)
    with pytest.raises(ValueError):
        ts.Client(max_event_bytes=0)
    with pytest.raises(ValueError):
        ts.Timeout(connect=-1)


def test_client_uses_given_http_client(mock: respx.MockRouter) -> None:
    mock.post(URL + "/chat/completions").mock(return_value=ok(sse("a")))
    http = httpx.Client()
    with (
        ts.Client(base_url=URL, http_client=http) as client,
        client.stream_chat(MESSAGES) as stream,
    ):
        assert list(stream) == ["a"]
    assert not http.is_closed  # not ours to close
    http.close()


def test_client_stream_is_an_iterator_too(mock: respx.MockRouter) -> None:
    from collections.abc import AsyncIterator, Iterator

    mock.post(URL + "/chat/completions").mock(return_value=ok(sse("a", "b", "c")))
    with ts.Client(base_url=URL) as client, client.stream_chat(MESSAGES) as stream:
        assert isinstance(stream, Iterator)
        assert next(stream) == "a"
        assert list(stream) == ["b", "c"]  # a for loop goes on where next() stopped

    async def main() -> None:
        async with ts.AsyncClient(base_url=URL) as client, client.stream_chat(MESSAGES) as stream:
            assert isinstance(stream, AsyncIterator)
            assert await anext(stream) == "a"
            assert [t async for t in stream] == ["b", "c"]
            with pytest.raises(StopAsyncIteration):
                await anext(stream)

    anyio.run(main)


def test_client_missing_key_builds_no_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenhub_stream._api as api

    def no_client(**kwargs: object) -> None:
        raise AssertionError("a client (and its pool) was built before validation")

    monkeypatch.setattr(api, "AsyncClient", no_client)
    monkeypatch.setattr(api, "Client", no_client)
    with pytest.raises(MissingAPIKeyError):
        ts.stream_chat(MESSAGES)
    with pytest.raises(MissingAPIKeyError):
        ts.stream_chat_sync(MESSAGES)
    with pytest.raises(TypeError):
        ts.stream_chat(MESSAGES, base_url=URL, stream=True)


@both
def test_client_409_is_not_retried(mock: respx.MockRouter, sync: bool) -> None:
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(409, json={"error": {"message": "conflict"}})
    )
    with pytest.raises(APIError) as info:
        collect(sync, max_retries=3)
    assert not info.value.retryable and route.call_count == 1


def test_client_module_level_max_event_bytes_is_a_client_option(mock: respx.MockRouter) -> None:
    route = mock.post(URL + "/chat/completions").mock(return_value=ok(sse("x" * 500)))
    with pytest.raises(ProtocolError, match="max_event_bytes"):
        with ts.stream_chat_sync(MESSAGES, base_url=URL, max_event_bytes=100) as stream:
            list(stream)
    assert "max_event_bytes" not in json.loads(route.calls.last.request.content)


@both
def test_client_own_pool_sends_to_its_transport(mock: respx.MockRouter, sync: bool) -> None:
    # Our own pool skips `httpx.Client.send()`: the request must still be the one
    # `build_request` makes (httpx's default headers, ours over them, no duplicates), and
    # the response and errors must carry it.
    route = mock.post(URL + "/chat/completions").mock(return_value=ok(sse("a")))
    texts, stream = collect(sync, extra_headers={"User-Agent": "mine/1"})
    assert texts == ["a"]
    request = route.calls.last.request
    assert request.headers.get_list("accept") == ["text/event-stream"]
    assert request.headers.get_list("accept-encoding") == ["identity"]
    assert request.headers.get_list("user-agent") == ["mine/1"]
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == "upstream.test"
    assert request.headers["connection"] == "keep-alive"
    assert int(request.headers["content-length"]) == len(request.content)
    assert stream.response.request.url == URL + "/chat/completions"
    client = (ts.Client if sync else ts.AsyncClient)(base_url=URL)
    assert client._transport is not None
    mock.post(URL + "/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(TransportError) as info:
        collect(sync, max_retries=0)
    cause = info.value.__cause__
    assert isinstance(cause, httpx.ConnectError) and cause.request.method == "POST"


@both
@pytest.mark.parametrize(
    ("env", "url"),
    [({"HTTPS_PROXY": "http://proxy.test:3128"}, URL), ({}, "http://user:pw@upstream.test/v1")],
)
def test_client_send_when_a_proxy_or_url_credentials_apply(
    mock: respx.MockRouter,
    monkeypatch: pytest.MonkeyPatch,
    sync: bool,
    env: dict[str, str],
    url: str,
) -> None:
    # A proxy from the environment or basic auth from the URL: httpx's `send()` applies
    # them, so our own pool uses it too; a client passed in always goes through `send()`.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if sync:
        assert ts.Client(base_url=url)._transport is None
        assert ts.Client(base_url=URL, http_client=httpx.Client())._transport is None
    else:
        assert ts.AsyncClient(base_url=url)._transport is None
        assert ts.AsyncClient(base_url=URL, http_client=httpx.AsyncClient())._transport is None
    if not env:
        route = mock.post(URL + "/chat/completions").mock(return_value=ok(sse("a")))
        assert collect(sync, client_kwargs={"base_url": url})[0] == ["a"]
        assert route.calls.last.request.headers["authorization"].startswith("Basic ")
