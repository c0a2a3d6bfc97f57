"""The passthrough: one browser request sent upstream, and its answer relayed.

The upstream's SSE bytes are forwarded unchanged, cut only at event boundaries (so a
keep-alive or an error frame always lands between two events), with an echoed key
redacted; a copy goes to the turn's record when there is one. The HTTP status is sent only
once the upstream's 2xx headers arrive, and only for what the proxy will relay: an event
stream (a streaming request) or JSON (`"stream": false`), never compressed. Before it,
failures are JSON errors with the status docs/proxy.md lists; after it, an error frame.

Internal interface of `tokenhub_stream.asgi` (used by `_proxy.py`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Coroutine, Mapping
from typing import Any, NamedTuple, Protocol, cast

import anyio
import httpx

from .._engine import ResponseHeadTooLarge
from ._buffers import ResumableStream
from ._redact import KeyRedactor
from ._relay import MAX_ERROR_BODY, Relay
from ._turn import Send, Turn, Watch, log_upstream_failure, logger, send_simple
from ._upstream import UpstreamResponse, Upstreams
from ._wire import (
    EventSplitter,
    ProxyRejection,
    is_identity,
    is_json_answer,
    is_length_framed,
    upstream_error_object,
)

__all__: list[str] = []

_CLOSE_TIMEOUT = 1.0
_PASSED_ON = (400, 404, 413, 422, 429)


class PassthroughSettings(Protocol):
    """The proxy settings the passthrough reads on every request."""

    max_response_bytes: int


class _ClosesNow(Protocol):
    def close(self) -> None: ...


class Passthrough:
    """Sends a prepared body upstream and relays the answer (`exchange`, raced by the relay)."""

    __slots__ = (
        "_api_key",
        "_headers",
        "_live",
        "_redactor",
        "_relay",
        "_settings",
        "_url",
        "upstreams",
    )

    def __init__(
        self,
        *,
        settings: PassthroughSettings,
        relay: Relay,
        upstreams: Upstreams,
        url: str,
        headers: Mapping[bool, Mapping[str, str]],
        api_key: str | None,
        redactor: KeyRedactor | None,
        live_streams: dict[str, ResumableStream],
    ) -> None:
        self._settings = settings
        self._relay = relay
        self.upstreams = upstreams
        self._url = url
        self._headers = headers  # the upstream request's headers by `stream`
        self._api_key = api_key
        self._redactor = redactor
        self._live = live_streams  # resumable streams relayed here, for DELETE

    def exchange(
        self, content: bytes, stream: bool, send: Send, turn: Turn
    ) -> Coroutine[Any, Any, None]:
        """Send `content` upstream and relay the answer to `send` (await the coroutine
        returned; not a coroutine itself, so a stream holds no extra frame for it)."""
        watch = turn.watch
        if watch is None:
            return self._exchange(content, self._headers[stream], stream, send, turn)
        return self._watched(content, stream, send, turn, watch)

    async def _watched(
        self, content: bytes, stream: bool, send: Send, turn: Turn, watch: Watch
    ) -> None:
        # The upstream call as a span of its own, its traceparent in a copy of the headers.
        headers = watch.upstream_headers(self._headers[stream])
        try:
            await self._exchange(content, headers, stream, send, turn)
        finally:
            watch.upstream_ended(turn)

    async def _exchange(
        self, content: bytes, headers: Mapping[str, str], stream: bool, send: Send, turn: Turn
    ) -> None:
        relay = self._relay
        upstreams = self.upstreams
        try:
            response = await upstreams.get().send(self._url, headers, content)
        except Exception as exc:
            log_upstream_failure(turn, exc)
            if isinstance(exc, ResponseHeadTooLarge):
                message = f"The upstream's response head is larger than {exc.limit} bytes."
                await relay.fail_before(send, turn, 502, message, "upstream_protocol_error")
            elif _is_timeout(exc):
                message = "The upstream timed out."
                await relay.fail_before(send, turn, 504, message, "upstream_timeout")
            else:
                message = "Could not reach the upstream."
                await relay.fail_before(send, turn, 502, message, "upstream_unreachable")
            return
        if turn.watch is not None:
            turn.watch.upstream_status = response.status_code
        try:
            if not 200 <= response.status_code < 300:
                await self._upstream_status(response, send, turn)
            elif not is_identity(response.headers.get("content-encoding")):
                # We ask for identity; compressed bytes relayed as text would be garbage
                # behind a 200 (issue #14). The headers say so before any status is sent.
                message = "The upstream sent a compressed answer."
                await relay.fail_before(send, turn, 502, message, "upstream_protocol_error")
            elif not stream:
                await self._relay_json(response, send, turn)
            else:
                ctype = response.headers.get("content-type", "")
                if not ctype.lower().startswith("text/event-stream"):
                    message = "The upstream answered a streaming request without an event stream."
                    await relay.fail_before(send, turn, 502, message, "upstream_protocol_error")
                    return
                await self._relay_stream(response, send, turn)
        finally:
            # Closing an unfinished response closes its connection: the upstream stops
            # generating. The engine's close is synchronous; httpx's is shielded, because
            # this runs when the race cancelled us.
            if upstreams.native:
                cast("_ClosesNow", response).close()
            else:
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    await response.aclose()
            if turn.resume is not None:  # the end marker, also after a cut or a timeout
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    await turn.resume.close()

    async def _upstream_status(self, response: UpstreamResponse, send: Send, turn: Turn) -> None:
        status = response.status_code
        raw = await _read_capped(response, MAX_ERROR_BODY)
        turn.outcome = "upstream_error"
        if status in _PASSED_ON:
            upstream = _upstream_error(self._relay.redact(raw), self._api_key)
            message = upstream.message or f"The upstream answered {status}."
            headers = {}
            retry_after = response.headers.get("retry-after")
            if retry_after is not None and retry_after.strip().replace(".", "", 1).isdigit():
                headers["retry-after"] = retry_after.strip()
            # The upstream's own error object when it sent one (param and any extra keys
            # included, for the SDKs); else one built from what it did send.
            rejection = ProxyRejection(
                status,
                message,
                code=upstream.code,
                param=upstream.param,
                error_type=upstream.type or None,
                headers=headers,
                upstream=upstream.error,
            )
        else:
            # An upstream 401/403 means the server's key is wrong, not the browser's session.
            rejection = ProxyRejection(
                502,
                f"The upstream answered {status}.",
                code="upstream_error",
                error_type="api_error",
            )
        turn.status = rejection.status
        turn.error = rejection.message
        await self._relay.send_start_error(send, turn, rejection)

    async def _relay_json(self, response: UpstreamResponse, send: Send, turn: Turn) -> None:
        # Only JSON is answered (issue #14: a text/html 200 was served from the app's
        # origin), and only up to max_response_bytes is read into memory.
        relay = self._relay
        if not is_json_answer(response.headers.get("content-type")):
            message = "The upstream answered a non-streaming request without JSON."
            await relay.fail_before(send, turn, 502, message, "upstream_protocol_error")
            return
        limit = self._settings.max_response_bytes
        length = response.headers.get("content-length", "").strip()
        try:
            too_long = length.isdigit() and int(length) > limit
            raw = None if too_long else await _read_up_to(response, limit)
        except Exception as exc:
            log_upstream_failure(turn, exc)
            if _is_timeout(exc):
                message = "The upstream timed out."
                await relay.fail_before(send, turn, 504, message, "upstream_timeout")
                return
            await relay.fail_before(
                send, turn, 502, "The upstream response broke off.", "upstream_error"
            )
            return
        if raw is None:
            logger.warning("upstream answer too large request_id=%s", turn.request_id)
            message = f"The upstream's answer is larger than {limit} bytes."
            await relay.fail_before(send, turn, 502, message, "upstream_response_too_large")
            return
        body = relay.redact(raw)
        if turn.collector is not None:
            turn.collector.feed_json(body)
        turn.status = response.status_code
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", turn.request_id.encode()),
        ]
        if not turn.client_gone:
            turn.response_done = True
            await send_simple(send, turn.status, body, headers)
            turn.ttfb = time.perf_counter() - turn.started
            turn.bytes_sent += len(body)

    async def _relay_stream(self, response: UpstreamResponse, send: Send, turn: Turn) -> None:
        relay = self._relay
        extra: tuple[tuple[bytes, bytes], ...] = ()
        resume = turn.resume
        if resume is not None:
            if await resume.open():
                extra = ((b"x-stream-id", resume.stream_id.encode()),)
            else:
                resume = turn.resume = None
        await relay.start(send, turn, extra)
        if resume is not None:
            resume.announce(turn, self._live)
        splitter = EventSplitter()
        redact = None if self._redactor is None else self._redactor.stream().feed
        collector = turn.collector
        # From here on the status is fixed: a failure ends the stream with an error frame.
        try:
            # try/finally rather than contextlib.aclosing: no object for the whole stream.
            chunks = _raw_chunks(response)
            try:
                async for chunk in chunks:
                    out = splitter.feed(chunk)
                    if not out:
                        continue
                    if redact is not None:
                        out = redact(out)
                    if collector is not None:
                        collector.feed(out)
                    if resume is not None:
                        out = await resume.tag(out)
                    if not turn.client_gone:
                        await relay.write(send, turn, out)
            finally:
                await chunks.aclose()
            rest = splitter.flush()
            if rest.strip(b"\r\n") and not _is_framed(response):
                # A close-delimited body ends with the connection, so a cut looks like an
                # end: a half event there is a cut, never forwarded as if whole (issue #14).
                raise httpx.RemoteProtocolError("the upstream closed the connection mid-event")
            if rest and redact is not None:
                rest = redact(rest)
            if rest:
                if collector is not None:
                    collector.feed(rest)
                if resume is not None:
                    rest = await resume.tag(rest)
                if not turn.client_gone:
                    await relay.write(send, turn, rest)
        except Exception as exc:
            log_upstream_failure(turn, exc)
            if _is_timeout(exc):
                message = "The upstream went silent."
                await relay.fail_after(send, turn, "timeout", message, "upstream_timeout")
            else:
                message = "The upstream stream broke off."
                await relay.fail_after(send, turn, "upstream_error", message, "upstream_error")
        finally:
            relay.stop_keepalives(turn)
        if resume is not None:
            resume.mark_complete()
        await relay.end(send, turn)


def _is_timeout(exc: BaseException) -> bool:
    # A refused connection is no timeout (502, not 504), whatever a client library maps
    # it to: look at the cause.
    cause = exc.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
        return False
    return isinstance(exc, httpx.TimeoutException | TimeoutError)


def _raw_chunks(response: UpstreamResponse) -> AsyncGenerator[bytes, None]:
    # aiter_raw() is an async generator typed as an iterator; closing it explicitly frees
    # the connection at once instead of when the garbage collector gets to it.
    return cast("AsyncGenerator[bytes, None]", response.aiter_raw())


async def _read_up_to(response: UpstreamResponse, limit: int) -> bytes | None:
    # The body, or None past `limit`: read no further than one chunk beyond it (the
    # caller's close then drops the connection, and the upstream stops sending).
    if response.is_stream_consumed:  # a response built in memory (httpx.MockTransport)
        content = response.content
        return content if len(content) <= limit else None
    parts: list[bytes] = []
    size = 0
    chunks = _raw_chunks(response)
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
    finally:
        await chunks.aclose()
    return b"".join(parts)


def _is_framed(response: UpstreamResponse) -> bool:
    version = getattr(response, "http_version", "HTTP/1.1")
    return is_length_framed(response.headers, version if isinstance(version, str) else "HTTP/1.1")


async def _read_capped(response: UpstreamResponse, limit: int) -> bytes:
    if response.is_stream_consumed:  # a response built in memory (httpx.MockTransport)
        return response.content[:limit]
    parts: list[bytes] = []
    size = 0
    try:
        async with contextlib.aclosing(_raw_chunks(response)) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
    except httpx.HTTPError:
        pass
    return b"".join(parts)[:limit]


class _UpstreamError(NamedTuple):
    message: str | None = None
    type: str | None = None
    code: str | None = None
    param: str | None = None
    error: dict[str, object] | None = None  # the OpenAI-shaped object, passed on as is


def _upstream_error(raw: bytes, secret: str | None) -> _UpstreamError:
    import json

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return _UpstreamError()
    if not isinstance(data, dict):
        return _UpstreamError()
    err = data.get("error", data)
    if isinstance(err, str):
        return _UpstreamError(err[:1000])
    if not isinstance(err, dict):
        return _UpstreamError()
    message = err.get("message")
    etype = err.get("type")
    code = err.get("code")
    param = err.get("param")
    return _UpstreamError(
        message[:1000] if isinstance(message, str) else None,
        etype if isinstance(etype, str) else None,
        str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None,
        param if isinstance(param, str) else None,
        upstream_error_object(data, secret),
    )
