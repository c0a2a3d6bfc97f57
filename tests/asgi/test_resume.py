"""Resumable streams (issue #7) in one process: ChatProxy behind uvicorn, InMemoryStreamBuffer."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from tokenhub_stream import SSEDecoder
from tokenhub_stream.asgi import (
    ChatProxy,
    CompletionRecord,
    InMemoryStreamBuffer,
    StreamBuffer,
)
from tokenhub_stream.asgi._buffers import tag_events
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script

from .conftest import KEY, assert_no_key, serve, text_of
from .test_proxy_uvicorn import Mounting, browser_headers, starlette_app

Upstream = tuple[FakeChatUpstream, RunningUpstream]
MESSAGES = [{"role": "user", "content": "hi"}]
BODY = json.dumps({"messages": MESSAGES}).encode()


def chunk(i: int, text: str) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


WORDS = [f"w{i} " for i in range(12)]
RAW = [chunk(i, w) for i, w in enumerate(WORDS)] + [b"data: [DONE]\n\n"]


class Records:
    """An on_complete hook the test can wait on (it runs in the server's thread)."""

    def __init__(self) -> None:
        self.items: list[CompletionRecord] = []
        self.done = threading.Event()

    def __call__(self, record: CompletionRecord) -> None:
        self.items.append(record)
        self.done.set()

    async def wait(self) -> list[CompletionRecord]:
        assert await anyio.to_thread.run_sync(self.done.wait, 5.0)
        return self.items


def raw_script(delay: float = 0.05) -> Script:
    return Script(raw=RAW, delay=delay)


@contextlib.contextmanager
def proxied(
    upstream: Upstream, mount: Mounting = "routes", **kw: object
) -> Iterator[tuple[str, ChatProxy]]:
    _, running = upstream
    options: dict[str, object] = {
        "base_url": running.base_url,
        "resumable": True,
        "keepalive_interval": None,
    }
    options.update(kw)
    proxy = ChatProxy(api_key=KEY, **options)  # type: ignore[arg-type]
    with serve(starlette_app(proxy, "/api/chat", mount)) as url:
        yield url, proxy


def resumable_headers(url: str, **extra: str) -> dict[str, str]:
    return {**browser_headers(url), "x-resumable": "1", **extra}


def split_events(data: bytes) -> list[bytes]:
    parts = data.split(b"\n\n")
    events = [p + b"\n\n" for p in parts[:-1]]
    return events + ([parts[-1]] if parts[-1] else [])


def ids_of(data: bytes) -> list[str]:
    return [e.id or "" for e in SSEDecoder().feed(data) if e.data or e.id]


def untag(data: bytes) -> bytes:
    return b"".join(
        b"".join(line for line in e.splitlines(keepends=True) if not line.startswith(b"id: "))
        for e in split_events(data)
    )


async def post_all(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    response = await client.post(f"{url}/api/chat", content=BODY, headers=headers)
    await response.aread()
    return response


async def post_until(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], events: int
) -> tuple[str, bytes]:
    """POST, read `events` events, then drop the connection; return (stream id, bytes read)."""
    got = b""
    async with client.stream("POST", f"{url}/api/chat", content=BODY, headers=headers) as response:
        assert response.status_code == 200
        stream_id = response.headers["x-stream-id"]
        async for piece in response.aiter_raw():
            got += piece
            if got.count(b"\n\n") >= events:
                break
    # Leaving the block unread closes the connection: the client is gone.
    return stream_id, got


async def resume(
    client: httpx.AsyncClient,
    url: str,
    stream_id: str,
    last_id: str | None,
    headers: dict[str, str] | None = None,
    *,
    query: bool = False,
) -> httpx.Response:
    h = dict(headers or {})
    target = f"{url}/api/chat/streams/{stream_id}"
    if last_id is not None and query:
        target += f"?last_event_id={last_id}"
    elif last_id is not None:
        h["last-event-id"] = last_id
    response = await client.get(target, headers=h)
    return response


# --- the bytes ---------------------------------------------------------------------------------


def test_tag_events_puts_the_id_before_the_blank_line() -> None:
    assert tag_events(b"data: a\n\ndata: b\r\n\r\n: c\r\r", 7) == [
        (7, b"data: a\nid: 7\n\n"),
        (8, b"data: b\r\nid: 8\n\r\n"),
        (9, b": c\rid: 9\n\r"),
    ]
    # Unfinished bytes at EOF stay as they are (a client drops them), under their own id.
    assert tag_events(b"data: a\n\ndata: [DONE]", 1)[1] == (2, b"data: [DONE]")
    for data in (b"data: a\n\n", b"data: b\r\n\r\n", b"data: c\r\r"):
        ((_, tagged),) = tag_events(data, 3)
        (event,) = SSEDecoder().feed(tagged)
        assert (event.id, event.data) == ("3", data.split(b":", 1)[1].strip().decode())


@pytest.mark.anyio
async def test_resume_plain_request_is_byte_exact_passthrough(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    with proxied(upstream) as (url, _):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await post_all(client, url, browser_headers(url))
    assert response.status_code == 200
    assert "x-stream-id" not in response.headers
    assert response.content == b"".join(RAW)


@pytest.mark.anyio
async def test_resume_opt_in_tags_every_event_with_consecutive_ids(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    with proxied(upstream) as (url, _):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await post_all(client, url, resumable_headers(url))
    assert response.status_code == 200
    assert len(response.headers["x-stream-id"]) == 24
    assert ids_of(response.content) == [str(i) for i in range(1, len(RAW) + 1)]
    assert untag(response.content) == b"".join(RAW)
    expected = b"".join(tagged for _, tagged in tag_events(b"".join(RAW), 1))
    assert response.content == expected


@pytest.mark.anyio
async def test_resume_ignored_when_the_proxy_is_not_resumable(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    with proxied(upstream, resumable=False) as (url, _):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await post_all(client, url, resumable_headers(url))
            missing = await resume(client, url, "a" * 24, "0")
    assert "x-stream-id" not in response.headers
    assert response.content == b"".join(RAW)
    assert missing.status_code == 404


# --- resuming ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mount", ["routes", "middleware"])
async def test_resume_after_a_cut_is_byte_exact_with_one_upstream_request(
    upstream: Upstream, mount: Mounting
) -> None:
    # The resume route is below the proxy's path: both mountings must reach it.
    app, _ = upstream
    app.enqueue(raw_script(0.001), raw_script(0.05))
    with proxied(upstream, mount) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                direct = await post_all(client, url, resumable_headers(url))
                stream_id, first = await post_until(client, url, resumable_headers(url), 3)
                last_id = ids_of(first)[-1]
                assert int(last_id) >= 3
                rest = await resume(client, url, stream_id, last_id, browser_headers(url))
    assert rest.status_code == 200
    assert rest.headers["content-type"] == "text/event-stream"
    assert rest.headers["x-stream-id"] == stream_id
    whole = first + rest.content
    assert whole == direct.content  # no event twice, none missing, the same bytes
    assert text_of(whole) == "".join(WORDS)
    assert whole.endswith(b"data: [DONE]\nid: 13\n\n")
    assert len(app.requests) == 2  # the direct run and the cut one: no second upstream call
    # The cut client did not cancel the upstream: the proxy read it to its end.
    assert app.requests[1].completed and not app.requests[1].disconnected
    assert_no_key(whole, rest.headers)


@pytest.mark.anyio
async def test_resume_tails_the_live_stream_and_takes_the_query_parameter(
    upstream: Upstream,
) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.1))
    with proxied(upstream) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                stream_id, first = await post_until(client, url, resumable_headers(url), 2)
                started = time.monotonic()
                rest = await resume(client, url, stream_id, ids_of(first)[-1], query=True)
                took = time.monotonic() - started
    # The upstream was still sending: the resume waited for the live events.
    assert took > 0.4
    assert text_of(first + rest.content) == "".join(WORDS)
    assert rest.content.endswith(b"data: [DONE]\nid: 13\n\n")


@pytest.mark.anyio
async def test_resume_a_second_reader_while_the_first_still_reads(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.05))
    with proxied(upstream) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                async with client.stream(
                    "POST", f"{url}/api/chat", content=BODY, headers=resumable_headers(url)
                ) as original:
                    stream_id = original.headers["x-stream-id"]
                    second = await resume(client, url, stream_id, None)
                    first = await original.aread()
    assert second.content == first
    assert len(app.requests) == 1


@pytest.mark.anyio
async def test_resume_finishes_the_turn_for_on_complete_after_a_disconnect(
    upstream: Upstream,
) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.03))
    records = Records()
    with proxied(upstream, on_complete=records) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                await post_until(client, url, resumable_headers(url), 1)
                (record,) = await records.wait()
    assert record.message.content == "".join(WORDS)
    assert record.outcome == "completed"  # finished into the buffer: nothing was lost
    assert not app.requests[0].disconnected


@pytest.mark.anyio
async def test_resume_finish_timeout_ends_the_buffer_with_an_error_frame(
    upstream: Upstream,
) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["a", "b"], delay=0.01, end="stall"))
    records = Records()
    with proxied(upstream, on_complete=records, finish_timeout=0.3) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                stream_id, first = await post_until(client, url, resumable_headers(url), 2)
                rest = await resume(client, url, stream_id, ids_of(first)[-1])
                (record,) = await records.wait()
    assert record.outcome == "timeout"
    assert b"[DONE]" not in rest.content
    assert b'"code":"stream_interrupted"' in rest.content
    assert await anyio.to_thread.run_sync(app.requests[0].wait_disconnected, 2.0)


@pytest.mark.anyio
async def test_resume_non_resumable_request_keeps_the_cancel_policy(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(Script(text="word " * 200, delay=0.02))
    with proxied(upstream) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream(
                "POST", f"{url}/api/chat", content=BODY, headers=browser_headers(url)
            ) as response:
                async for _ in response.aiter_raw():
                    break
        assert await anyio.to_thread.run_sync(app.requests[0].wait_disconnected, 1.0)


@pytest.mark.anyio
async def test_resume_upstream_failure_is_replayed_as_its_error_frame(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["a", "b", "c"], delay=0.01, end="cut", finish_reason=None))
    with proxied(upstream) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                direct = await post_all(client, url, resumable_headers(url))
                replay = await resume(client, url, direct.headers["x-stream-id"], "0")
    assert b'"code":"upstream_error"' in direct.content
    assert replay.content == direct.content


# --- who may resume ----------------------------------------------------------------------------


def bearer(request: Request) -> str:
    token = request.headers.get("authorization", "")
    if token not in ("Bearer alice", "Bearer bob"):
        raise HTTPException(401, "who are you?")
    return token.split()[1]


@pytest.mark.anyio
async def test_resume_belongs_to_the_principal_that_started_it(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    alice = {"authorization": "Bearer alice"}
    with proxied(upstream, authorize=bearer) as (url, _):
        async with httpx.AsyncClient(timeout=5) as client:
            direct = await post_all(client, url, resumable_headers(url, **alice))
            stream_id = direct.headers["x-stream-id"]
            as_bob = await resume(client, url, stream_id, "0", {"authorization": "Bearer bob"})
            nobody = await resume(client, url, stream_id, "0")
            as_alice = await resume(client, url, stream_id, "0", alice)
            unknown = await resume(client, url, "x" * 24, "0", alice)
    assert as_bob.status_code == 404
    assert as_bob.json()["error"]["code"] == "stream_not_found"
    assert nobody.status_code == 401
    assert unknown.status_code == 404
    assert as_alice.status_code == 200 and as_alice.content == direct.content
    assert len(app.requests) == 1


@pytest.mark.anyio
async def test_resume_without_authorize_belongs_to_the_client_address(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    with proxied(upstream, trusted_proxies=["127.0.0.1"]) as (url, _):
        async with httpx.AsyncClient(timeout=5) as client:
            here = {"x-forwarded-for": "203.0.113.5"}
            direct = await post_all(client, url, resumable_headers(url, **here))
            stream_id = direct.headers["x-stream-id"]
            elsewhere = await resume(client, url, stream_id, "0", {"x-forwarded-for": "192.0.2.9"})
            same = await resume(client, url, stream_id, "0", here)
    assert elsewhere.status_code == 404
    assert same.content == direct.content


@pytest.mark.anyio
async def test_resume_refuses_cross_site_bad_ids_and_other_methods(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    with proxied(upstream) as (url, _):
        async with httpx.AsyncClient(timeout=5) as client:
            direct = await post_all(client, url, resumable_headers(url))
            stream_id = direct.headers["x-stream-id"]
            cross = await resume(client, url, stream_id, "0", {"sec-fetch-site": "cross-site"})
            evil = await resume(client, url, stream_id, "0", {"origin": "https://evil.example"})
            bad = await resume(client, url, stream_id, "-1")
            ahead = await resume(client, url, stream_id, "99")
            post = await client.post(f"{url}/api/chat/streams/{stream_id}")
            odd = await resume(client, url, "short", "0")
            done = await resume(client, url, stream_id, "13")
    assert cross.status_code == 403 and evil.status_code == 403
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_last_event_id"
    assert ahead.status_code == 400
    assert post.status_code == 405
    assert odd.status_code == 404
    assert done.status_code == 200 and done.content == b""  # all seen: it just ends


@pytest.mark.anyio
async def test_resume_expires_after_resume_ttl(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    with proxied(upstream, resume_ttl=0.3) as (url, proxy):
        async with httpx.AsyncClient(timeout=5) as client:
            direct = await post_all(client, url, resumable_headers(url))
            stream_id = direct.headers["x-stream-id"]
            fresh = await resume(client, url, stream_id, "0")
            await anyio.sleep(0.5)
            stale = await resume(client, url, stream_id, "0")
    assert fresh.status_code == 200 and stale.status_code == 404
    assert isinstance(proxy.stream_buffer, InMemoryStreamBuffer)
    assert len(proxy.stream_buffer) == 0


@pytest.mark.anyio
async def test_resume_trimmed_events_are_a_410_never_missing_text(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    buffer = InMemoryStreamBuffer(max_stream_bytes=600)
    with proxied(upstream, stream_buffer=buffer) as (url, _):
        async with httpx.AsyncClient(timeout=5) as client:
            direct = await post_all(client, url, resumable_headers(url))
            stream_id = direct.headers["x-stream-id"]
            old = await resume(client, url, stream_id, "1")
            recent = await resume(client, url, stream_id, "11")
    assert old.status_code == 410
    assert old.json()["error"]["code"] == "stream_events_expired"
    assert recent.status_code == 200
    assert direct.content.endswith(recent.content) and recent.content.count(b"id: ") == 2


# --- the buffer --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_in_memory_buffer_bounds_and_protocol() -> None:
    buffer = InMemoryStreamBuffer(max_streams=2)
    assert isinstance(buffer, StreamBuffer)
    for name in ("a", "b", "c"):
        await buffer.create(name, "me")
    assert await buffer.info("a") is None  # the oldest went first
    await buffer.append("c", [(1, b"x"), (2, b"y")])
    info = await buffer.info("c")
    assert info is not None and (info.first_id, info.last_id, info.ended) == (1, 2, False)

    async def reader() -> list[tuple[int, bytes]]:
        return [event async for event in buffer.read("c", 1, idle=5)]

    got: list[tuple[int, bytes]] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            got.extend(await reader())

        tg.start_soon(run)
        await anyio.sleep(0.05)
        await buffer.append("c", [(3, b"z")])
        await buffer.end("c", ttl=60)
    assert got == [(2, b"y"), (3, b"z")]
    with pytest.raises(TimeoutError):
        async for _ in buffer.read("b", 0, idle=0.05):
            pass
    with pytest.raises(LookupError):
        async for _ in buffer.read("a", 0, idle=0.05):
            pass
    with pytest.raises(ValueError):
        InMemoryStreamBuffer(max_streams=0)


def test_resume_options_are_checked() -> None:
    with pytest.raises(ValueError, match="tools"):
        ChatProxy(api_key=KEY, resumable=True, tools=[len])
    with pytest.raises(ValueError, match="resume_ttl"):
        ChatProxy(api_key=KEY, resumable=True, resume_ttl=0)
    assert ChatProxy(api_key=KEY).stream_buffer is None
    buffer = InMemoryStreamBuffer()
    assert ChatProxy(api_key=KEY, stream_buffer=buffer).stream_buffer is buffer
    assert KEY not in repr(buffer)


# --- stopping ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_resume_delete_stops_the_upstream(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["Let me think"], end="stall"))
    alice = {"authorization": "Bearer alice"}
    records = Records()
    with proxied(upstream, authorize=bearer, on_complete=records) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                stream_id, first = await post_until(client, url, resumable_headers(url, **alice), 1)
                target = f"{url}/api/chat/streams/{stream_id}"
                # The gone client does not stop a resumable stream: the proxy finishes it.
                assert not await anyio.to_thread.run_sync(app.requests[0].wait_disconnected, 0.3)
                cross = await client.delete(
                    target, headers={**alice, "sec-fetch-site": "cross-site"}
                )
                as_bob = await client.delete(target, headers={"authorization": "Bearer bob"})
                stopped = await client.delete(target, headers={**alice, "origin": url})
                assert await anyio.to_thread.run_sync(app.requests[0].wait_disconnected, 1.0)
                (record,) = await records.wait()
                rest = await resume(client, url, stream_id, ids_of(first)[-1], alice)
                again = await client.delete(target, headers=alice)
    assert (cross.status_code, as_bob.status_code, stopped.status_code) == (403, 404, 204)
    assert record.outcome == "client_disconnect"
    assert record.message.content == "Let me think"
    assert b'"code":"stream_interrupted"' in rest.content and b"[DONE]" not in rest.content
    assert again.status_code == 204  # over already


@pytest.mark.anyio
async def test_resume_gone_before_the_first_event_cancels_the_upstream(
    upstream: Upstream,
) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["too late"], first_delay=30))
    with proxied(upstream) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream(
                "POST", f"{url}/api/chat", content=BODY, headers=resumable_headers(url)
            ) as response:
                stream_id = response.headers["x-stream-id"]
            # Nothing was sent, so nothing to resume: the usual cancel (an Escape while
            # waiting, before the page could know the id).
            assert await anyio.to_thread.run_sync(app.requests[0].wait_disconnected, 1.0)
            replay = await resume(client, url, stream_id, "0")
    assert replay.status_code == 200
    assert b'"code":"stream_interrupted"' in replay.content
