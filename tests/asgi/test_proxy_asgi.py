"""Status, headers, validation and the key swap, through httpx.ASGITransport (buffered)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from tokenhub_stream.asgi import ChatProxy, InMemoryRateLimiter, RateLimiter

from .conftest import KEY, FakeStream, MockUpstream, assert_no_key, sse_response

pytestmark = pytest.mark.anyio

URL = "http://testserver/"
BODY = {"messages": [{"role": "user", "content": "hi"}]}


def make_proxy(mock: MockUpstream, **kw: object) -> ChatProxy:
    options: dict[str, object] = {"base_url": "https://upstream.test/v1", "default_model": "m1"}
    options.update(kw)
    return ChatProxy(api_key=KEY, transport=mock.transport, **options)  # type: ignore[arg-type]


async def post(
    proxy: ChatProxy,
    body: object = BODY,
    *,
    path: str = "/",
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    method: str = "POST",
) -> httpx.Response:
    transport = httpx.ASGITransport(app=proxy, client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        if content is None and method == "POST":
            content = json.dumps(body).encode()
        response = await client.request(method, path, content=content, headers=headers or {})
    assert_no_key(response.content, response.headers)
    return response


def error_of(response: httpx.Response) -> dict[str, object]:
    data = response.json()
    assert set(data) == {"error"}
    err = data["error"]
    assert isinstance(err, dict) and isinstance(err["message"], str) and "type" in err
    return err


async def test_chatproxy_forwards_with_server_key_only(mock_upstream: MockUpstream) -> None:
    proxy = make_proxy(mock_upstream)
    response = await post(
        proxy,
        {**BODY, "temperature": 0.5, "api_key": "x", "base_url": "http://evil"},
        headers={
            "authorization": "Bearer browser-session",
            "cookie": "session=abc",
            "x-forwarded-for": "1.2.3.4",
            "x-forwarded-host": "evil.example",
            "connection": "keep-alive, x-secret",
            "x-secret": "1",
            "te": "trailers",
            "content-type": "application/json",
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    assert "access-control-allow-origin" not in response.headers
    assert response.content == b'data: {"choices":[]}\n\ndata: [DONE]\n\n'
    (request,) = mock_upstream.requests
    assert str(request.url) == "https://upstream.test/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["host"] == "upstream.test"
    for name in ("cookie", "x-forwarded-for", "x-forwarded-host", "x-secret", "te"):
        assert name not in request.headers
    sent = json.loads(request.content)
    assert sent == {**BODY, "model": "m1", "temperature": 0.5, "stream": True}


async def test_chatproxy_stream_false_passes_json(mock_upstream: MockUpstream) -> None:
    payload = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
    mock_upstream.responses.append(httpx.Response(200, json=payload))
    response = await post(
        make_proxy(mock_upstream), {**BODY, "stream": False, "stream_options": {}}
    )
    assert response.status_code == 200
    assert response.json() == payload
    sent = json.loads(mock_upstream.requests[0].content)
    assert sent["stream"] is False and "stream_options" not in sent
    assert mock_upstream.requests[0].headers["accept"] == "application/json"


async def test_chatproxy_clamps_max_tokens(mock_upstream: MockUpstream) -> None:
    proxy = make_proxy(mock_upstream, max_tokens_cap=64)
    response = await post(proxy, {**BODY, "max_tokens": 10_000, "max_completion_tokens": 8})
    assert response.status_code == 200
    sent = json.loads(mock_upstream.requests[0].content)
    assert sent["max_tokens"] == 64 and sent["max_completion_tokens"] == 8


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"body": {"model": "m1"}}, 400),
        ({"body": {"messages": "hi"}}, 400),
        ({"body": {**BODY, "model": "gpt-expensive"}}, 400),
        ({"body": {**BODY, "max_tokens": -5}}, 400),
        ({"body": {**BODY, "max_tokens": "lots"}}, 400),
        ({"headers": {"content-type": "application/x-www-form-urlencoded"}}, 415),
        ({"headers": {"content-type": "multipart/form-data; boundary=x"}}, 415),
        ({"content": b'{"messages": "' + b"x" * 300_000 + b'"}'}, 413),
        ({"method": "GET"}, 405),
        ({"method": "PUT", "content": b"{}"}, 405),
        ({"headers": {"sec-fetch-site": "cross-site"}}, 403),
        ({"headers": {"origin": "https://evil.example"}}, 403),
        ({"path": "/nope"}, 404),
    ],
)
async def test_chatproxy_bad_input_sends_nothing_upstream(
    mock_upstream: MockUpstream, kwargs: dict[str, object], status: int
) -> None:
    proxy = make_proxy(mock_upstream, allowed_models=["m1"])
    response = await post(proxy, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status
    error_of(response)
    assert mock_upstream.requests == []
    if status == 405:
        assert response.headers["allow"] == "POST"


async def test_chatproxy_accepts_browser_text_plain(mock_upstream: MockUpstream) -> None:
    response = await post(
        make_proxy(mock_upstream),
        headers={
            "content-type": "text/plain;charset=UTF-8",
            "origin": "http://testserver",
            "sec-fetch-site": "same-origin",
        },
    )
    assert response.status_code == 200
    assert len(mock_upstream.requests) == 1


async def test_chatproxy_origin_from_trusted_proxy(mock_upstream: MockUpstream) -> None:
    headers = {"origin": "https://chat.example", "x-forwarded-host": "chat.example"}
    refused = await post(make_proxy(mock_upstream), headers=headers)
    assert refused.status_code == 403
    trusted = make_proxy(mock_upstream, trusted_proxies=["203.0.113.0/24"])
    assert (await post(trusted, headers=headers)).status_code == 200
    listed = make_proxy(mock_upstream, allowed_origins=["https://chat.example"])
    assert (await post(listed, headers={"origin": "https://chat.example"})).status_code == 200


async def test_chatproxy_models_route(mock_upstream: MockUpstream) -> None:
    proxy = make_proxy(mock_upstream, allowed_models=["b", "a"])
    response = await post(proxy, path="/models", method="GET")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["a", "b"]
    assert (await post(proxy, path="/models", content=b"{}")).status_code == 405
    default = await post(make_proxy(mock_upstream), path="/models", method="GET")
    assert [m["id"] for m in default.json()["data"]] == ["m1"]


@pytest.mark.parametrize(
    ("upstream_status", "status"),
    [
        (400, 400),
        (404, 404),
        (413, 413),
        (422, 422),
        (429, 429),
        (401, 502),
        (403, 502),
        (500, 502),
        (503, 502),
        (402, 502),
    ],
)
async def test_chatproxy_maps_upstream_status(
    mock_upstream: MockUpstream, upstream_status: int, status: int
) -> None:
    body = {"error": {"message": f"upstream says no, key {KEY}", "type": "x_error", "code": "c"}}
    mock_upstream.responses.append(
        httpx.Response(upstream_status, json=body, headers={"retry-after": "7"})
    )
    response = await post(make_proxy(mock_upstream))
    assert response.status_code == status
    err = error_of(response)
    if status == upstream_status:
        assert "upstream says no" in str(err["message"])
        assert err["code"] == "c"
    if status == 429:
        assert response.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (httpx.ConnectError("refused"), 502),
        (httpx.ConnectTimeout("slow"), 504),
        (httpx.ReadTimeout("slow"), 504),
        (httpx.RemoteProtocolError("bad"), 502),
    ],
)
async def test_chatproxy_maps_transport_errors(
    mock_upstream: MockUpstream, exc: Exception, status: int
) -> None:
    mock_upstream.responses.append(exc)
    response = await post(make_proxy(mock_upstream))
    assert response.status_code == status
    assert error_of(response)["type"] == "api_error"


async def test_chatproxy_non_sse_200_is_502(mock_upstream: MockUpstream) -> None:
    mock_upstream.responses.append(httpx.Response(200, json={"choices": []}))
    response = await post(make_proxy(mock_upstream))
    assert response.status_code == 502


async def test_chatproxy_authorize_hook(mock_upstream: MockUpstream) -> None:
    async def authorize(request: Request) -> str | None:
        token = request.headers.get("authorization", "")
        if token == "Bearer teapot":
            raise HTTPException(418, "short and stout")
        return "alice" if token == "Bearer good" else None

    proxy = make_proxy(mock_upstream, authorize=authorize)
    assert (await post(proxy)).status_code == 401
    teapot = await post(proxy, headers={"authorization": "Bearer teapot"})
    assert teapot.status_code == 418 and error_of(teapot)["message"] == "short and stout"
    assert mock_upstream.requests == []
    assert (await post(proxy, headers={"authorization": "Bearer good"})).status_code == 200
    assert "authorization" in mock_upstream.requests[0].headers
    assert mock_upstream.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_chatproxy_rate_limiter(mock_upstream: MockUpstream) -> None:
    limiter = InMemoryRateLimiter(rate=0.1, burst=2)
    assert isinstance(limiter, RateLimiter)
    proxy = make_proxy(mock_upstream, rate_limiter=limiter)
    assert [(await post(proxy)).status_code for _ in range(2)] == [200, 200]
    limited = await post(proxy)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "10"
    assert error_of(limited)["type"] == "rate_limit_error"
    assert len(mock_upstream.requests) == 2


async def test_chatproxy_sees_a_reassigned_rate_limiter(mock_upstream: MockUpstream) -> None:
    # The proxy keeps whether its limiter also counts usage; reassigning `rate_limiter`
    # (a plain limiter, then a usage limiter, then none) must be seen on the next request.
    recorded: list[object] = []

    class Budget:
        async def acquire(self, key: str) -> float | None:
            return None

        async def record(self, key: str, usage: object) -> None:
            recorded.append(usage)

    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    proxy = make_proxy(mock_upstream, rate_limiter=InMemoryRateLimiter(rate=100, burst=100))
    for limiter in (proxy.rate_limiter, Budget(), None):
        proxy.rate_limiter = limiter
        mock_upstream.responses.append(sse_response([usage, b"data: [DONE]\n\n"]))
        assert (await post(proxy)).status_code == 200
    assert len(recorded) == 1  # the budget's request only


async def test_chatproxy_on_request_rewrites_then_allow_list(mock_upstream: MockUpstream) -> None:
    def on_request(request: Request, body: dict[str, object]) -> dict[str, object]:
        messages = [{"role": "system", "content": "Be brief."}, *body["messages"]]  # type: ignore[misc]
        return {**body, "messages": messages, "not_openai": 1}

    await post(make_proxy(mock_upstream, on_request=on_request))
    sent = json.loads(mock_upstream.requests[0].content)
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "not_openai" not in sent


async def test_chatproxy_failing_hook_is_keyfree_500(
    mock_upstream: MockUpstream, key_log: pytest.LogCaptureFixture
) -> None:
    def on_request(request: Request, body: dict[str, object]) -> dict[str, object]:
        raise RuntimeError("hook bug")

    response = await post(make_proxy(mock_upstream, on_request=on_request))
    assert response.status_code == 500
    assert mock_upstream.requests == []


async def test_chatproxy_key_never_in_logs_or_repr(
    mock_upstream: MockUpstream, key_log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(mock_upstream)
    mock_upstream.responses.append(httpx.Response(401, json={"error": {"message": KEY}}))
    mock_upstream.responses.append(httpx.ConnectError(f"oops {KEY[:6]}"))
    for _ in range(3):
        await post(proxy)
    assert_no_key(repr(proxy))
    assert len(key_log.records) >= 3
    assert "status=502" in key_log.text and "outcome=" in key_log.text


def test_assert_no_key_catches_a_leak() -> None:
    # The grep itself must work: a deliberately leaked canary is caught, in every form.
    for leaked in (f"Bearer {KEY}", KEY.encode(), {"authorization": KEY}):
        with pytest.raises(AssertionError):
            assert_no_key(leaked)
    assert_no_key("Bearer [redacted]")


async def test_chatproxy_redacts_key_echoed_in_stream(mock_upstream: MockUpstream) -> None:
    mock_upstream.responses.append(
        sse_response([b'data: {"x":"' + KEY.encode() + b'"}\n\n', b"data: [DONE]\n\n"])
    )
    response = await post(make_proxy(mock_upstream))
    assert b"[redacted]" in response.content


def test_chatproxy_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        ChatProxy(api_key="")
    with pytest.raises(ValueError):
        ChatProxy(api_key=KEY, base_url="ftp://x")
    with pytest.raises(ValueError):
        ChatProxy(api_key=KEY, on_disconnect="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ChatProxy(api_key=KEY, keepalive_interval=0)


def test_chatproxy_rejects_more_bad_options() -> None:
    for kwargs in ({"max_tokens_cap": 0}, {"max_body_bytes": 0}, {"max_connections": 0}):
        with pytest.raises(ValueError):
            ChatProxy(api_key=KEY, **kwargs)  # type: ignore[arg-type]
    assert "rate=" in repr(InMemoryRateLimiter())


async def test_chatproxy_async_context_manager(mock_upstream: MockUpstream) -> None:
    async with make_proxy(mock_upstream) as proxy:
        assert (await post(proxy)).status_code == 200
    assert proxy._upstreams.chosen is None  # closed: the next request chooses again


async def test_chatproxy_on_request_must_return_mapping(mock_upstream: MockUpstream) -> None:
    def on_request(request: Request, body: dict[str, object]) -> dict[str, object]:
        return None  # type: ignore[return-value]

    assert (await post(make_proxy(mock_upstream, on_request=on_request))).status_code == 500


async def test_chatproxy_chunked_body_over_limit(mock_upstream: MockUpstream) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"messages": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    transport = httpx.ASGITransport(app=make_proxy(mock_upstream, max_body_bytes=4096))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post("/", content=body())
    assert response.status_code == 413
    assert mock_upstream.requests == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"<html>bad gateway</html>", "The upstream answered 400."),
        (b"[1, 2]", "The upstream answered 400."),
        (b'{"error": "plain words"}', "plain words"),
        (b'{"error": 42}', "The upstream answered 400."),
        (b'{"message": "top level", "code": 7}', "top level"),
    ],
)
async def test_chatproxy_upstream_error_bodies(
    mock_upstream: MockUpstream, raw: bytes, message: str
) -> None:
    mock_upstream.responses.append(httpx.Response(400, content=raw))
    response = await post(make_proxy(mock_upstream))
    assert response.status_code == 400
    assert error_of(response)["message"] == message


@pytest.mark.parametrize(
    ("error", "status"), [(httpx.ReadTimeout("slow"), 504), (httpx.ReadError("cut"), 502)]
)
async def test_chatproxy_stream_false_body_fails(
    mock_upstream: MockUpstream, error: Exception, status: int
) -> None:
    stream = FakeStream([b'{"choi'], error=error)
    mock_upstream.responses.append(
        httpx.Response(200, headers={"content-type": "application/json"}, stream=stream)
    )
    response = await post(make_proxy(mock_upstream), {**BODY, "stream": False})
    assert response.status_code == status


async def test_chatproxy_origin_with_explicit_default_port(mock_upstream: MockUpstream) -> None:
    headers = {"origin": "https://app.example", "host": "app.example:443"}
    assert (await post(make_proxy(mock_upstream), headers=headers)).status_code == 200
