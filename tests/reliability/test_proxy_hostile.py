"""Hostile input to ChatProxy: the key never leaves, the browser never steers the upstream.

Header and body checks run in-process (hand-built ASGI scopes, `httpx.MockTransport` as
the upstream, which records every request it would have sent); the header-forwarding and
key-redaction checks also run under uvicorn against the local upstream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, MutableMapping

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenhub_stream.asgi import DEFAULT_ALLOWED_FIELDS, ChatProxy
from tokenhub_stream.testing import RunningUpstream, Script

from .conftest import (
    EXAMPLES,
    KEY,
    MESSAGES,
    LeakScanner,
    Proxied,
    _ProxyApp,
    http_client,
    serve,
)
from .faults import content_frame, finish_frame

pytestmark = pytest.mark.anyio

Message = MutableMapping[str, object]
UPSTREAM = "https://upstream.test/v1"
CAP = 100


class Recorder:
    """An upstream that records what the proxy sent; answers a short SSE stream."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=_Body([content_frame("hi"), finish_frame(), b"data: [DONE]\n\n"]),
        )


class _Body(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def make_proxy(recorder: Recorder, **kw: object) -> ChatProxy:
    options: dict[str, object] = {"base_url": UPSTREAM, "max_tokens_cap": CAP}
    options.update(kw)
    transport = httpx.MockTransport(recorder.handler)
    return ChatProxy(api_key=KEY, transport=transport, **options)  # type: ignore[arg-type]


async def call(
    proxy: ChatProxy,
    body: bytes | list[bytes],
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    path: str = "/",
    query: bytes = b"",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request through a hand-built ASGI scope; returns status, headers, body."""
    parts = [body] if isinstance(body, bytes) else list(body)
    sent: list[Message] = []
    scope: dict[str, object] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers
        if headers is not None
        else [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    index = 0

    async def receive() -> Message:
        nonlocal index
        if index < len(parts):
            index += 1
            return {
                "type": "http.request",
                "body": parts[index - 1],
                "more_body": index < len(parts),
            }
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await proxy(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(
        m.get("body", b"")  # type: ignore[misc]
        for m in sent
        if m["type"] == "http.response.body"
    )
    return int(start["status"]), list(start.get("headers", [])), body_out  # type: ignore[call-overload]


def body_of(**fields: object) -> bytes:
    return json.dumps({"messages": MESSAGES, **fields}).encode()


# --- the key scan proves it can fail -----------------------------------------------------------


class LeakyProxy:
    """A deliberately broken test double: ChatProxy plus a debug header and a log line
    that carry the key. The scan must catch both."""

    def __init__(self, proxy: ChatProxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Message, receive: object, send: object) -> None:
        async def leaky_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))  # type: ignore[call-overload]
                message = {**message, "headers": [*headers, (b"x-debug-key", KEY.encode())]}
            await send(message)  # type: ignore[operator]

        logging.getLogger("leaky").warning("forwarding with key %s", KEY)
        await self.proxy(scope, receive, leaky_send)  # type: ignore[arg-type]


async def test_leak_scan_catches_a_deliberate_leak(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    app = LeakyProxy(make_proxy(recorder))
    scanner = LeakScanner()
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post("/", content=body_of())
    scanner.add_response(response, response.content)
    with pytest.raises(AssertionError, match="x-debug-key|headers"):
        scanner.check()
    logs = LeakScanner()
    for record in caplog.records:
        logs.add(record.name, record.getMessage())
    with pytest.raises(AssertionError, match="leaky"):
        logs.check()
    caplog.clear()  # the leak was ours on purpose: keep the autouse scan for real leaks


ECHOES = [
    Script(status=400, error={"error": {"message": f"bad key {KEY}", "code": "x"}}),
    Script(status=500, error={"error": {"message": f"key={KEY}"}}),
    Script(deltas=["a"], error_frame={"error": {"message": f"echo Bearer {KEY}"}}),
    Script(deltas=[f"the key is {KEY}", "!"]),
    # the key split across two network chunks of one event
    Script(raw=[content_frame(KEY)[:30], content_frame(KEY)[30:], b"data: [DONE]\n\n"]),
]
ECHO_IDS = ["400_body", "500_body", "error_frame", "delta", "split_across_chunks"]


@pytest.mark.parametrize("script", ECHOES, ids=ECHO_IDS)
async def test_key_echoed_by_the_upstream_never_reaches_the_browser(
    proxy: Proxied, leaks: LeakScanner, script: Script
) -> None:
    proxy.upstream.app.enqueue(script)
    async with http_client(leaks) as browser:
        with anyio.fail_after(5):
            response = await browser.post(proxy.url, content=body_of())
    leaks.add("browser body", response.content)


# What on_complete sees, beyond ECHOES: a JSON (stream: false) answer, and a last event the
# upstream never terminated (the proxy flushes it at the close).
RECORD_ECHOES = [
    *[(s, True) for s in ECHOES],
    (Script(text=f"here: {KEY}"), False),
    (Script(raw=[content_frame(KEY).rstrip(b"\n")]), True),
]
RECORD_IDS = [*ECHO_IDS, "json_answer", "unterminated_last_event"]


@pytest.mark.parametrize(("script", "stream"), RECORD_ECHOES, ids=RECORD_IDS)
async def test_key_echoed_by_the_upstream_stays_out_of_on_complete(
    proxy: Proxied, leaks: LeakScanner, script: Script, stream: bool
) -> None:
    # on_complete records go to the owner's store and logs: they are scanned too.
    proxy.upstream.app.enqueue(script)
    async with http_client(leaks) as browser:
        with anyio.fail_after(5):
            response = await browser.post(proxy.url, content=body_of(stream=stream))
    leaks.add("browser body", response.content)
    (record,) = await proxy.records.wait(1)
    assert KEY in repr(script), "the script must echo the key for this test to mean anything"
    scan = LeakScanner()
    scan.add("on_complete record", f"{record!r} {record.message} {record.error}")
    scan.check()


async def test_key_echoed_in_a_json_answer_is_redacted(proxy: Proxied, leaks: LeakScanner) -> None:
    proxy.upstream.app.enqueue(Script(text=f"here: {KEY}"))
    async with http_client(leaks) as browser:
        response = await browser.post(proxy.url, content=body_of(stream=False))
    assert response.status_code == 200
    leaks.add("browser body", response.content)


# --- browser headers never reach the upstream --------------------------------------------------

# What the proxy itself sends upstream, plus what HTTP clients add on their own.
UPSTREAM_HEADERS = {
    "host",
    "authorization",
    "content-type",
    "content-length",
    "accept",
    "accept-encoding",
    "user-agent",
    "connection",
}

HOSTILE_HEADERS = {
    "authorization": "Bearer browser-session-token",
    "cookie": "session=browser-secret",
    "host": "evil.example",
    "x-forwarded-for": "6.6.6.6",
    "x-forwarded-host": "evil.example",
    "x-forwarded-proto": "evil-proto",
    "x-real-ip": "6.6.6.6",
    "forwarded": "for=6.6.6.6;host=evil.example",
    "keep-alive": "timeout=99, max=666",
    "te": "trailers, deflate;q=0.5",
    "upgrade": "h2c",
    "proxy-authorization": "Basic ZXZpbDpldmls",
    "proxy-connection": "evil-proxy-connection",
    "trailer": "x-evil",
    "x-api-key": "sk-browser",
    "api-key": "sk-browser",
    "openai-organization": "org-evil",
    "x-original-url": "/admin",
    "x-rewrite-url": "/admin",
    "x-http-method-override": "DELETE",
}


async def test_browser_headers_never_reach_the_upstream(proxy: Proxied, leaks: LeakScanner) -> None:
    async with http_client(leaks) as browser:
        with anyio.fail_after(5):
            response = await browser.post(
                proxy.url, content=body_of(), headers={**HOSTILE_HEADERS, "connection": "upgrade"}
            )
    assert response.status_code == 200
    leaks.add("browser body", response.content)
    (request,) = proxy.upstream.app.requests
    assert set(request.headers) <= UPSTREAM_HEADERS, set(request.headers) - UPSTREAM_HEADERS
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["host"] == f"{proxy.upstream.host}:{proxy.upstream.port}"
    assert "upgrade" not in request.headers.get("connection", "").lower()
    forwarded = " ".join(request.headers.values())
    for value in HOSTILE_HEADERS.values():
        assert value not in forwarded, value
    assert request.path == "/v1/chat/completions" and request.query == ""


# --- nothing in the request can move the upstream URL -------------------------------------------

STEERING_FIELDS: list[dict[str, object]] = [
    {"url": "http://evil.example/v1/chat/completions"},
    {"base_url": "http://evil.example/v1", "api_base": "http://evil.example"},
    {"path": "/v1/admin", "endpoint": "/v1/files", "deployment": "../../x"},
    {"model": "../../../admin?x=1#"},
    {"model": "http://evil.example/v1"},
    {"model": "gpt-4o\r\nHost: evil.example"},
    {"extra_headers": {"Host": "evil.example"}, "extra_query": {"api-version": "x"}},
    {"extra_body": {"url": "http://evil.example"}, "headers": {"authorization": "x"}},
    {"user": "@evil.example/", "metadata": {"url": "http://evil.example"}},
]


@pytest.mark.parametrize("fields", STEERING_FIELDS)
@pytest.mark.parametrize(
    ("path", "query"),
    [("/", b""), ("/", b"url=http://evil.example&api-version=1"), ("/%2e%2e/%2e%2e/admin", b"")],
)
async def test_no_request_field_changes_the_upstream_url(
    fields: dict[str, object], path: str, query: bytes
) -> None:
    recorder = Recorder()
    proxy = make_proxy(recorder)
    status, _, _ = await call(proxy, body_of(**fields), path=path, query=query)
    for request in recorder.requests:
        assert str(request.url) == f"{UPSTREAM}/chat/completions"
        sent = json.loads(request.content)
        assert set(sent) <= DEFAULT_ALLOWED_FIELDS
    assert status in (200, 400, 404), status


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=max(50, EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=EXAMPLES <= 1000,
)
@given(st.dictionaries(st.text(max_size=12), _json_values, max_size=6))
def test_fuzz_request_body_never_steers_and_never_500s(extra: dict[str, object]) -> None:
    recorder = Recorder()
    proxy = make_proxy(recorder)
    body = {"messages": MESSAGES, **extra}

    async def main() -> int:
        status, _, _ = await call(proxy, json.dumps(body).encode())
        return status

    status = anyio.run(main)
    assert status == 200 or 400 <= status < 500, (status, body)
    for request in recorder.requests:
        assert str(request.url) == f"{UPSTREAM}/chat/completions"
        assert set(json.loads(request.content)) <= DEFAULT_ALLOWED_FIELDS


# --- bad bodies: a clear 4xx, nothing sent upstream ----------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"messages":[{"role":"user","content":' + b"[" * depth + b"]" * depth + b"}]}"


BAD_BODIES: list[tuple[str, bytes | list[bytes], list[tuple[bytes, bytes]] | None, int]] = [
    ("oversized_declared", b"{}", [(b"content-length", b"999999999")], 413),
    ("oversized_chunked", [b" " * 65536] * 5 + [body_of()], None, 413),
    ("oversized_lying_length", [b" " * 65536] * 5, [(b"content-length", b"10")], 413),
    ("huge_messages_array", json.dumps({"messages": MESSAGES * 30_000}).encode(), None, 413),
    ("deep_nesting_over_limit", nested(200_000), None, 413),
    ("not_utf8", '{"messages":[{"role":"user","content":"é"}]}'.encode("latin-1"), None, 400),
    ("unknown_charset", body_of(), [(b"content-type", b"application/json; charset=x-evil")], 415),
    ("not_json", b"messages=hi", None, 400),
    ("json_not_object", b'[{"role":"user"}]', None, 400),
    ("empty_body", b"", None, 400),
    ("no_messages", b'{"model":"m"}', None, 400),
    ("messages_not_list", b'{"messages":"hi"}', None, 400),
    ("message_not_object", b'{"messages":["hi"]}', None, 400),
    (
        "form_content_type",
        body_of(),
        [(b"content-type", b"application/x-www-form-urlencoded")],
        415,
    ),
    ("multipart", body_of(), [(b"content-type", b"multipart/form-data; boundary=x")], 415),
    ("xml", body_of(), [(b"content-type", b"application/xml")], 415),
    ("max_tokens_negative", body_of(max_tokens=-1), None, 400),
    ("max_tokens_float", body_of(max_tokens=1.5), None, 400),
    ("max_tokens_string", body_of(max_tokens="100"), None, 400),
    ("max_tokens_bool", body_of(max_tokens=True), None, 400),
    ("max_tokens_list", body_of(max_tokens=[1]), None, 400),
    ("max_tokens_nan", body_of()[:-1] + b',"max_tokens":NaN}', None, 400),
    ("max_tokens_infinity", body_of()[:-1] + b',"max_tokens":Infinity}', None, 400),
    ("max_completion_tokens_negative", body_of(max_completion_tokens=-5), None, 400),
    # Python's json reads these; they are not JSON, and the upstream would refuse them.
    ("temperature_nan", body_of()[:-1] + b',"temperature":NaN}', None, 400),
    ("top_p_minus_infinity", body_of()[:-1] + b',"top_p":-Infinity}', None, 400),
    ("temperature_overflows_to_infinity", body_of()[:-1] + b',"temperature":1e999}', None, 400),
    ("nan_inside_a_message", b'{"messages":[{"role":"user","content":NaN}]}', None, 400),
    ("stream_not_bool", body_of(stream="yes"), None, 400),
    ("model_not_string", body_of(model=["gpt"]), None, 400),
]


def _headers(extra: list[tuple[bytes, bytes]] | None) -> list[tuple[bytes, bytes]]:
    base = {b"host": b"testserver", b"content-type": b"application/json"}
    for name, value in extra or []:
        base[name] = value
    return list(base.items())


@pytest.mark.parametrize(
    ("name", "body", "headers", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
async def test_bad_body_gets_a_clear_4xx_and_nothing_goes_upstream(
    leaks: LeakScanner,
    name: str,
    body: bytes | list[bytes],
    headers: list[tuple[bytes, bytes]] | None,
    status: int,
) -> None:
    recorder = Recorder()
    got, response_headers, content = await call(make_proxy(recorder), body, _headers(headers))
    assert got == status, (got, content[:200])
    error = json.loads(content)["error"]
    assert isinstance(error["message"], str) and error["message"] and error["code"]
    assert (b"content-type", b"application/json") in response_headers
    assert recorder.requests == []
    leaks.add(f"{name} response", content)


async def test_deeply_nested_body_under_the_size_limit_is_a_400(leaks: LeakScanner) -> None:
    recorder = Recorder()
    got, _, content = await call(make_proxy(recorder), nested(100_000))
    assert recorder.requests == []
    assert got == 400, (got, content[:200])


async def test_lone_surrogate_in_a_message_is_a_400(leaks: LeakScanner) -> None:
    recorder = Recorder()
    body = b'{"messages":[{"role":"user","content":"\\ud800"}]}'
    got, _, content = await call(make_proxy(recorder), body)
    assert recorder.requests == []
    assert got == 400, (got, content[:200])


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [CAP + 1, 10**6, 10**30])
async def test_token_limits_over_the_cap_are_clamped_not_refused(field: str, value: int) -> None:
    recorder = Recorder()
    status, _, _ = await call(make_proxy(recorder), body_of(**{field: value}))
    assert status == 200
    (request,) = recorder.requests
    assert json.loads(request.content)[field] == CAP


@pytest.mark.parametrize("value", [0, 1, CAP])
async def test_token_limits_within_the_cap_pass_unchanged(value: int) -> None:
    recorder = Recorder()
    status, _, _ = await call(make_proxy(recorder), body_of(max_tokens=value))
    assert status == 200
    assert json.loads(recorder.requests[0].content)["max_tokens"] == value


# --- header injection: CR/LF in values (real servers refuse them first) ---------------------------

INJECTIONS: list[tuple[bytes, bytes]] = [
    (b"origin", b"http://testserver\r\nSet-Cookie: pwned=1"),
    (b"host", b"testserver\r\nX-Injected: 1"),
    (b"content-type", b"application/json\r\nX-Injected: 1"),
    (b"x-forwarded-for", b"1.2.3.4\r\nX-Injected: 1"),
    (b"x-forwarded-host", b"evil\nX-Injected: 1"),
    (b"authorization", b"Bearer t\r\n\r\nGET /admin HTTP/1.1"),
    (b"cookie", b"a=b\rX-Injected: 1"),
    (b"x-request-id", b"abc\r\nSet-Cookie: pwned=1"),
    (b"user-agent", b"ua\r\nX-Injected: 1"),
]

# The response headers ChatProxy may send, whatever came in.
RESPONSE_HEADERS = {
    b"content-type",
    b"content-length",
    b"cache-control",
    b"x-accel-buffering",
    b"x-request-id",
    b"x-content-type-options",
    b"retry-after",
    b"allow",
}


@pytest.mark.parametrize(("name", "value"), INJECTIONS, ids=[i[0].decode() for i in INJECTIONS])
async def test_header_injection_reaches_neither_response_nor_upstream(
    leaks: LeakScanner, name: bytes, value: bytes
) -> None:
    recorder = Recorder()
    headers = _headers([(name, value)])
    status, response_headers, content = await call(make_proxy(recorder), body_of(), headers)
    assert status in (200, 400, 403, 415), status
    for key, val in response_headers:
        assert key in RESPONSE_HEADERS, key
        assert b"\r" not in val and b"\n" not in val, (key, val)
    assert b"pwned" not in b"".join(v for _, v in response_headers)
    for request in recorder.requests:
        for key, val in request.headers.raw:
            assert b"\r" not in val and b"\n" not in val
            assert b"injected" not in key.lower() and b"Injected" not in val
        assert str(request.url) == f"{UPSTREAM}/chat/completions"
    leaks.add("injection response", content)


# --- the same checks under uvicorn, with the key scanned everywhere ----------------------------


async def test_hostile_requests_under_uvicorn_never_leak_or_forward(
    upstream: RunningUpstream, leaks: LeakScanner
) -> None:
    proxy = ChatProxy(api_key=KEY, base_url=upstream.base_url, max_tokens_cap=CAP)
    with serve(_ProxyApp(proxy)) as root:
        url = f"{root}/v1/chat/completions"
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                for _, body, headers, status in BAD_BODIES:
                    if (
                        not isinstance(body, bytes)
                        or headers
                        and headers[0][0] == b"content-length"
                    ):
                        continue  # framing cases need the hand-built scope
                    sent = {k.decode(): v.decode() for k, v in _headers(headers)}
                    sent.pop("host")
                    response = await browser.post(url, content=body, headers=sent)
                    leaks.add("uvicorn bad body", response.content)
                    assert response.status_code == status, (response.status_code, body[:80])
                big = await browser.post(
                    url, content=b" " * 300_000, headers={"content-type": "application/json"}
                )
                assert big.status_code == 413
    assert upstream.app.requests == []
