"""Disconnects, keep-alives, error frames and on_complete, with a hand-written receive/send."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import MutableMapping

import anyio
import httpx
import pytest

from tokenhub_stream.asgi import ChatProxy, CompletionRecord

from .conftest import KEY, FakeStream, MockUpstream, assert_no_key, sse_response

pytestmark = pytest.mark.anyio

Message = MutableMapping[str, object]
BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


def chunk(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


class FakeClient:
    """The browser side of one ASGI request: sends the body, can go away, records output."""

    def __init__(self) -> None:
        self.gone = anyio.Event()
        self.started = anyio.Event()
        self.first_body = anyio.Event()
        self.messages: list[Message] = []
        self._body_sent = False

    async def receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.start":
            self.started.set()
        elif message.get("body"):
            self.first_body.set()

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return int(starts[0]["status"]) if starts else None  # type: ignore[call-overload]

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]  # type: ignore[misc]

    @property
    def body(self) -> bytes:
        return b"".join(self.bodies)

    @property
    def ended(self) -> bool:
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False)
            for m in self.messages
        )


def make_proxy(mock: MockUpstream, **kw: object) -> ChatProxy:
    options: dict[str, object] = {"base_url": "https://upstream.test/v1"}
    options.update(kw)
    return ChatProxy(api_key=KEY, transport=mock.transport, **options)  # type: ignore[arg-type]


SCOPE: dict[str, object] = {
    "type": "http",
    "method": "POST",
    "path": "/",
    "root_path": "",
    "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
    "client": ("127.0.0.1", 1234),
}


async def run(proxy: ChatProxy, client: FakeClient) -> None:
    await proxy(dict(SCOPE), client.receive, client.send)


async def test_disconnect_while_waiting_for_upstream_headers(mock_upstream: MockUpstream) -> None:
    mock_upstream.before_headers = 30
    proxy = make_proxy(mock_upstream)
    client = FakeClient()
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, proxy, client)
            while True:  # until the proxy sent its request and waits for the headers
                if mock_upstream.requests:
                    break
                await anyio.sleep(0.005)
            assert len(mock_upstream.requests) == 1
            client.gone.set()
    assert client.status is None


async def test_disconnect_before_first_token_closes_upstream(mock_upstream: MockUpstream) -> None:
    stream = FakeStream([], hang=True)
    mock_upstream.responses.append(sse_response(stream))
    proxy = make_proxy(mock_upstream, keepalive_interval=None)
    client = FakeClient()
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, proxy, client)
            await client.started.wait()
            client.gone.set()
            await stream.wait_closed(1.0)
    assert client.status == 200
    assert client.body == b""


async def test_disconnect_mid_stream_closes_upstream(mock_upstream: MockUpstream) -> None:
    stream = FakeStream([chunk(str(i)) for i in range(200)], delay=0.01)
    mock_upstream.responses.append(sse_response(stream))
    proxy = make_proxy(mock_upstream)
    client = FakeClient()
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, proxy, client)
            await client.first_body.wait()
            client.gone.set()
            await stream.wait_closed(1.0)
    assert stream.yielded < 50


async def test_complete_events_forwarded_at_once(mock_upstream: MockUpstream) -> None:
    # Events split across reads: each is sent as soon as it is complete, no sooner.
    pieces = [b'data: {"a"', b":1}\n", b'\ndata: {"b":2}\n\ndata: {"c"', b":3}\n\n"]
    mock_upstream.responses.append(sse_response(pieces))
    client = FakeClient()
    with anyio.fail_after(2):
        await run(make_proxy(mock_upstream), client)
    # The third read completes "a" and "b": both go out at once, the start of "c" waits.
    assert [b for b in client.bodies if b] == [
        b'data: {"a":1}\n\ndata: {"b":2}\n\n',
        b'data: {"c":3}\n\n',
    ]
    assert client.ended


async def test_keepalive_comments_while_upstream_is_silent(mock_upstream: MockUpstream) -> None:
    stream = FakeStream([chunk("a"), chunk("b", "stop"), b"data: [DONE]\n\n"], delay=0.25)
    mock_upstream.responses.append(sse_response(stream))
    client = FakeClient()
    with anyio.fail_after(3):
        await run(make_proxy(mock_upstream, keepalive_interval=0.1), client)
    bodies = [b for b in client.bodies if b]
    assert bodies[0] == b": keep-alive\n\n"  # before the first token, right after the headers
    assert bodies.count(b": keep-alive\n\n") >= 4
    assert b"".join(b for b in bodies if b != b": keep-alive\n\n") == b"".join(stream.chunks)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (httpx.RemoteProtocolError("cut"), "upstream_error"),
        (httpx.ReadTimeout("idle"), "upstream_timeout"),
    ],
)
async def test_failure_after_start_ends_with_error_frame(
    mock_upstream: MockUpstream, error: Exception, code: str
) -> None:
    stream = FakeStream([chunk("Hel"), b'data: {"choices": [{"delta": {"cont'], error=error)
    mock_upstream.responses.append(sse_response(stream))
    client = FakeClient()
    with anyio.fail_after(2):
        await run(make_proxy(mock_upstream), client)
    assert client.status == 200
    body = client.body
    assert body.startswith(chunk("Hel"))
    frame = body[len(chunk("Hel")) :]
    assert frame.startswith(b"data: {") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:])["error"]["code"] == code
    assert b"[DONE]" not in body
    assert client.ended
    assert_no_key(body)


async def test_on_complete_record(mock_upstream: MockUpstream) -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    mock_upstream.responses.append(
        sse_response([chunk("Hel"), chunk("lo", "stop"), usage, b"data: [DONE]\n\n"])
    )
    records: list[CompletionRecord] = []
    proxy = make_proxy(mock_upstream, on_complete=records.append, default_model="m1")
    client = FakeClient()
    with anyio.fail_after(2):
        await run(proxy, client)
    (record,) = records
    assert record.message.content == "Hello"
    assert record.finish_reason == "stop"
    assert record.usage is not None and record.usage.total_tokens == 5
    assert record.outcome == "completed" and record.model == "m1" and record.status == 200
    assert record.messages == [{"role": "user", "content": "hi"}]
    assert record.ttfb is not None and record.duration >= record.ttfb
    assert record.bytes_sent == len(client.body)
    assert "Hello" not in repr(record)


async def test_on_complete_sees_truncation_and_errors(mock_upstream: MockUpstream) -> None:
    mock_upstream.responses.append(sse_response([chunk("Hel")]))
    mock_upstream.responses.append(
        sse_response([chunk("x"), b'data: {"error": {"message": "overloaded"}}\n\n'])
    )
    records: list[CompletionRecord] = []
    proxy = make_proxy(mock_upstream, on_complete=records.append)
    for _ in range(2):
        with anyio.fail_after(2):
            await run(proxy, FakeClient())
    assert [r.outcome for r in records] == ["upstream_error", "upstream_error"]
    assert records[1].error is not None and "overloaded" in records[1].error


async def test_on_complete_failure_is_logged_not_raised(
    mock_upstream: MockUpstream, key_log: pytest.LogCaptureFixture
) -> None:
    mock_upstream.responses.append(sse_response([b"data: {not json\n\n", b"data: [DONE]\n\n"]))

    async def on_complete(record: CompletionRecord) -> None:
        raise RuntimeError("hook bug")

    client = FakeClient()
    with anyio.fail_after(2):
        await run(make_proxy(mock_upstream, on_complete=on_complete), client)
    assert client.body == b"data: {not json\n\ndata: [DONE]\n\n"
    assert client.ended
    assert any("on_complete failed" in r.getMessage() for r in key_log.records)


async def test_on_disconnect_finish_reads_to_end(mock_upstream: MockUpstream) -> None:
    stream = FakeStream([chunk(str(i)) for i in range(20)] + [b"data: [DONE]\n\n"], delay=0.01)
    mock_upstream.responses.append(sse_response(stream))
    records: list[CompletionRecord] = []
    proxy = make_proxy(mock_upstream, on_complete=records.append, on_disconnect="finish")
    client = FakeClient()
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, proxy, client)
            await client.first_body.wait()
            client.gone.set()
    (record,) = records
    assert record.outcome == "client_disconnect"
    assert record.message.content == "".join(str(i) for i in range(20))
    assert stream.yielded == 21
    assert len(client.body) < len(b"".join(stream.chunks))


async def test_on_disconnect_finish_is_time_bounded(mock_upstream: MockUpstream) -> None:
    stream = FakeStream([chunk("a")], hang=True)
    mock_upstream.responses.append(sse_response(stream))
    records: list[CompletionRecord] = []
    proxy = make_proxy(
        mock_upstream, on_complete=records.append, on_disconnect="finish", finish_timeout=0.2
    )
    client = FakeClient()
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, proxy, client)
            await client.first_body.wait()
            client.gone.set()
        await stream.wait_closed(1.0)
    assert records[0].outcome == "timeout"
    assert records[0].message.content == "a"


async def test_stream_false_on_complete(mock_upstream: MockUpstream) -> None:
    payload = {
        "choices": [
            {
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
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    mock_upstream.responses.append(httpx.Response(200, json=payload))
    records: list[CompletionRecord] = []
    proxy = make_proxy(mock_upstream, on_complete=records.append)
    client = FakeClient()
    client._body_sent = True
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": False}).encode()

    async def receive() -> Message:
        if not client.messages and not getattr(receive, "done", False):
            receive.done = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": body, "more_body": False}
        await client.gone.wait()
        return {"type": "http.disconnect"}

    with anyio.fail_after(2):
        await proxy(dict(SCOPE), receive, client.send)
    assert json.loads(client.body) == payload
    (record,) = records
    assert record.finish_reason == "tool_calls"
    assert record.message.tool_calls[0].name == "f"
    assert record.usage is not None and record.usage.prompt_tokens == 1


async def test_non_http_scopes(mock_upstream: MockUpstream) -> None:
    proxy = make_proxy(mock_upstream)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def ws_receive() -> Message:
        return {"type": "websocket.connect"}

    await proxy({"type": "websocket", "path": "/"}, ws_receive, send)
    assert sent[-1]["type"] == "websocket.close"
    lifespan: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    events = iter(lifespan)

    async def ls_receive() -> Message:
        return next(events)

    await proxy({"type": "lifespan"}, ls_receive, send)
    assert [m["type"] for m in sent[-2:]] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    with pytest.raises(RuntimeError):
        await proxy({"type": "other"}, ls_receive, send)


async def test_log_line_per_request(
    mock_upstream: MockUpstream, key_log: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(2):
        await run(make_proxy(mock_upstream), FakeClient())
    ours = [r for r in key_log.records if r.name == "tokenhub_stream.asgi"]
    lines = [r.getMessage() for r in ours]
    assert len(lines) == 1
    for part in (
        "request_id=",
        "principal=-",
        "status=200",
        "ttfb_ms=",
        "bytes=",
        "outcome=completed",
    ):
        assert part in lines[0]
    assert ours[0].levelno == logging.INFO


async def test_default_transport_by_event_loop(anyio_backend: str) -> None:
    # The measured choice (docs/performance.md): our engine on asyncio, httpx under trio.
    proxy = ChatProxy(api_key=KEY, base_url="http://127.0.0.1:9/v1")
    try:
        name = type(proxy._upstreams.get()).__name__
        tool_transport = type(proxy._upstreams.tool_transport()).__name__
    finally:
        await proxy.aclose()
    engine = anyio_backend == "asyncio" and importlib.util.find_spec("httptools") is not None
    assert name == ("HttpEngine" if engine else "HttpxUpstream")
    # The tool loop speaks httpx, over the same pool.
    assert tool_transport == ("EngineTransport" if engine else "AsyncHTTPTransport")


async def test_client_gone_while_sending_body(mock_upstream: MockUpstream) -> None:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(2):
        await make_proxy(mock_upstream)(dict(SCOPE), receive, send)
    assert mock_upstream.requests == []


async def test_unterminated_last_event_is_forwarded(mock_upstream: MockUpstream) -> None:
    # An upstream that ends a framed body (chunked here) without the final blank line: its
    # bytes still go out unchanged. A close-delimited body that does so was cut (issue #14:
    # test_issue_14_close_delimited_half_event_is_an_error_frame).
    response = sse_response([chunk("a", "stop"), b"data: [DONE]"])
    response.headers["transfer-encoding"] = "chunked"
    mock_upstream.responses.append(response)
    records: list[CompletionRecord] = []
    client = FakeClient()
    with anyio.fail_after(2):
        await run(make_proxy(mock_upstream, on_complete=records.append), client)
    assert client.body == chunk("a", "stop") + b"data: [DONE]"
    assert records[0].outcome == "completed" and records[0].message.content == "a"
