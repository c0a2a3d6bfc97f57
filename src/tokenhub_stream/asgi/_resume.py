"""The resume route: `GET <mount>/streams/{id}` replays a resumable stream's events after
`Last-Event-ID: n` (or `?last_event_id=n`) from its `StreamBuffer`, then tails the live
rest until the stream's end marker, without a second upstream request. `DELETE` on the
same path is the user's Stop: it closes the stream's upstream.

A resume is admitted like a chat (`Gate`: host, origin, `authorize`, the rate limiter),
and at most `max_resumes_per_principal` run at once per principal in this process; a
stream is served only to the principal (or client address) that started it.

Internal interface of `tokenhub_stream.asgi` (used by `_proxy.py`).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import parse_qs

from starlette.requests import Request

from ._admission import Gate
from ._buffers import ResumableStream, StreamBuffer, StreamInfo
from ._relay import Relay
from ._turn import Receive, Scope, Send, Turn, peer, request_headers, send_error, send_simple
from ._wire import ProxyRejection, error_frame

__all__: list[str] = []

logger = logging.getLogger("tokenhub_stream.asgi")

#: The request header that asks for a resumable stream.
RESUMABLE_HEADER = "x-resumable"
_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_MAX_EVENT_ID = 10**15
# A stream id, and the owner it belongs to, are never compared in variable time.
_SAFE_EQUAL = hmac.compare_digest


def wants_resumable(headers: Mapping[str, str]) -> bool:
    """Whether a chat request asks for a resumable stream (`X-Resumable: 1`)."""
    return headers.get(RESUMABLE_HEADER, "").strip().lower() in ("1", "true", "yes")


class ResumeSettings(Protocol):
    """The proxy settings the route reads on every request."""

    stream_buffer: StreamBuffer | None
    max_resumes_per_principal: int


class ResumeRoute:
    """`GET` and `DELETE <mount>/streams/{id}` of one proxy."""

    __slots__ = ("_gate", "_idle", "_live", "_relay", "_settings", "resumes")

    def __init__(
        self,
        *,
        settings: ResumeSettings,
        gate: Gate,
        relay: Relay,
        live_streams: dict[str, ResumableStream],
        idle: float,
    ) -> None:
        self._settings = settings
        self._gate = gate
        self._relay = relay
        self._live = live_streams  # streams relayed by this process, for DELETE
        self._idle = idle  # how long a tail waits for the live stream's next event
        # Resumes being served per owner (the max_resumes_per_principal cap).
        self.resumes: dict[str, int] = {}

    async def serve(self, scope: Scope, receive: Receive, send: Send, stream_id: str) -> None:
        """Answer `GET`/`DELETE <mount>/streams/{stream_id}`."""
        held: list[str] = []  # the owner whose resume slot this request took, if it took one
        try:
            await self._serve(scope, receive, send, stream_id, held)
        finally:
            for owner in held:
                left = self.resumes.pop(owner) - 1
                if left:
                    self.resumes[owner] = left

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, stream_id: str, held: list[str]
    ) -> None:
        turn = Turn()
        after = 0
        gate = self._gate
        try:
            buffer = self._settings.stream_buffer
            headers = request_headers(scope)
            address = peer(scope)
            own_host = gate.own_host(headers, address)  # 400 for a host not in allowed_hosts
            if scope["method"] not in ("GET", "DELETE"):
                raise ProxyRejection(
                    405,
                    "Method not allowed.",
                    code="method_not_allowed",
                    headers={"allow": "GET, DELETE"},
                )
            if buffer is None or _STREAM_ID.fullmatch(stream_id) is None:
                raise _not_found()
            gate.check_origin(headers, own_host)
            if scope["method"] == "DELETE":
                # Stop saves spend, so it is never rate limited: `authorize` only.
                turn.principal = await gate.authorize(Request(scope))
                owner = gate.client_key(turn.principal, address, headers)
                await self._stop(buffer, stream_id, owner, send, turn)
                _log(turn, stream_id, after, 0, "stopped")
                return
            # A resume costs the server what a chat's stream does (a task, a buffer reader,
            # on Redis a blocking read): the same admission as a chat, and a cap per owner.
            await gate.admit(Request(scope), turn, headers, address)
            owner = gate.client_key(turn.principal, address, headers)
            after = _last_event_id(scope, headers)
            count = self.resumes.get(owner, 0)
            if count >= self._settings.max_resumes_per_principal:
                raise ProxyRejection(
                    429,
                    "Too many resumes at once: finish one first.",
                    code="too_many_resumes",
                    headers={"retry-after": "1"},
                )
            self.resumes[owner] = count + 1
            held.append(owner)
            info = await _owned_info(buffer, stream_id, owner)
            if after > info.last_id:
                raise ProxyRejection(
                    400, "Last-Event-ID is ahead of the stream.", code="invalid_last_event_id"
                )
            if after + 1 < info.first_id:
                raise ProxyRejection(
                    410,
                    "The events after that id are no longer kept.",
                    code="stream_events_expired",
                )
        except ProxyRejection as rejection:
            turn.status = rejection.status
            await send_error(send, rejection, turn.request_id)
            _log(turn, stream_id, after, 0, "rejected")
            return
        except Exception:
            logger.exception("resume failed request_id=%s", turn.request_id)
            turn.status = 500
            failure = ProxyRejection(500, "The proxy failed.", code="internal_error")
            await send_error(send, failure, turn.request_id)
            _log(turn, stream_id, after, 0, "rejected")
            return
        tail = _Tail(self._relay, buffer, stream_id, after, self._idle)
        await self._relay.race(turn, tail.run(send, turn), receive, send, _leave_now)
        outcome = tail.outcome
        if turn.client_gone:
            outcome = "client_disconnect"
        elif turn.expired:
            outcome = "timeout"
        _log(turn, stream_id, after, tail.sent, outcome)

    async def _stop(
        self, buffer: StreamBuffer, stream_id: str, owner: str, send: Send, turn: Turn
    ) -> None:
        """`DELETE <mount>/streams/{id}`: the user stopped the answer; close its upstream."""
        live = self._live.get(stream_id)
        if live is not None and _SAFE_EQUAL(live.owner.encode(), owner.encode()):
            live.stop()
            turn.status = 204
            await send_simple(send, 204, b"", [(b"x-request-id", turn.request_id.encode())])
            return
        info = await _owned_info(buffer, stream_id, owner)
        if not info.ended:
            # Relayed by another process: only that one can close the upstream connection.
            raise ProxyRejection(
                409, "The stream runs in another process of this server.", code="stream_elsewhere"
            )
        turn.status = 204  # over already: nothing to stop
        await send_simple(send, 204, b"", [(b"x-request-id", turn.request_id.encode())])


class _Tail:
    """The resume's 200: the kept events after `after`, then the live rest, then the end."""

    __slots__ = ("_after", "_buffer", "_idle", "_relay", "_stream_id", "outcome", "sent")

    def __init__(
        self, relay: Relay, buffer: StreamBuffer, stream_id: str, after: int, idle: float
    ) -> None:
        self._relay = relay
        self._buffer = buffer
        self._stream_id = stream_id
        self._after = after
        self._idle = idle
        self.outcome = "completed"
        self.sent = 0

    async def run(self, send: Send, turn: Turn) -> None:
        relay = self._relay
        await relay.start(send, turn, ((b"x-stream-id", self._stream_id.encode()),))
        expected = self._after + 1
        ended_badly: tuple[str, str] | None = None
        try:
            reader = self._buffer.read(self._stream_id, self._after, idle=self._idle)
            async for event_id, data in reader:
                if event_id != expected:
                    ended_badly = ("Events of this stream were lost.", "stream_events_expired")
                    break
                expected += 1
                await relay.write(send, turn, data)
                self.sent += 1
        except LookupError:
            ended_badly = ("The stream expired.", "stream_expired")
        except TimeoutError:
            ended_badly = ("The stream went silent.", "upstream_timeout")
        except Exception as exc:
            logger.warning("stream buffer failed: %s", type(exc).__name__)
            ended_badly = ("The stream buffer failed.", "stream_buffer_unavailable")
        if ended_badly is not None:
            self.outcome = "upstream_error"
            await relay.write(send, turn, error_frame(ended_badly[0], code=ended_badly[1]))
        await relay.end(send, turn)


def _leave_now(turn: Turn) -> float | None:
    # A resume's reader left: only this reader stops; the stream itself runs on.
    return None


def _last_event_id(scope: Scope, headers: Mapping[str, str]) -> int:
    value = headers.get("last-event-id")
    if value is None:
        query = scope.get("query_string", b"")
        text = query.decode("latin-1") if isinstance(query, bytes) else ""
        values = parse_qs(text).get("last_event_id")
        value = values[-1] if values else "0"
    value = value.strip() or "0"
    if not value.isascii() or not value.isdigit() or int(value) > _MAX_EVENT_ID:
        raise ProxyRejection(
            400, "Last-Event-ID must be a non-negative integer.", code="invalid_last_event_id"
        )
    return int(value)


async def _owned_info(buffer: StreamBuffer, stream_id: str, owner: str) -> StreamInfo:
    """What the buffer knows of a stream `owner` started; 404 for anyone else's, 503 if
    the buffer fails."""
    try:
        info = await buffer.info(stream_id)
    except Exception as exc:
        logger.warning("stream buffer failed: %s", type(exc).__name__)
        raise ProxyRejection(
            503, "The stream buffer is unavailable.", code="stream_buffer_unavailable"
        ) from None
    if info is None or not _SAFE_EQUAL(info.owner.encode(), owner.encode()):
        raise _not_found()
    return info


def _not_found() -> ProxyRejection:
    # Unknown, expired and someone else's streams look the same.
    return ProxyRejection(404, "No such stream.", code="stream_not_found")


def _log(turn: Turn, stream_id: str, after: int, events: int, outcome: str) -> None:
    logger.info(
        "resume request_id=%s stream_id=%s principal=%s status=%s after=%d events=%d "
        "duration_ms=%.1f outcome=%s",
        turn.request_id,
        stream_id,
        "-" if turn.principal is None else turn.principal,
        turn.status,
        after,
        events,
        (time.perf_counter() - turn.started) * 1000,
        outcome,
    )
