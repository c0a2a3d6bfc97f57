"""`ChatProxy(tools=...)`: the tool loop run server-side, so the browser never sees tools.

This is the one deliberate exception to the proxy's byte-exact passthrough. The upstream's
frames are not relayed; the proxy runs `arun_tools` against the upstream (same URL, key,
connection pool and timeouts as the passthrough) and writes a stream of its own:

```text
data: {"id":"chatcmpl-<request id>",...,"delta":{"role":"assistant","content":""}}
: tool get_weather running
: tool get_weather done
data: {...,"delta":{"content":"It is 18 degrees"}}
data: {...,"delta":{},"finish_reason":"stop"}
data: [DONE]
```

- Only content deltas reach the browser, every turn's, in order: one `id`, one `model`
  (the requested one), a role chunk first and one finish chunk last (the last turn's
  `finish_reason`, else `"stop"`). Reasoning, tool calls and tool results stay here.
- Tool progress goes out as SSE comment lines, which every event-stream reader ignores.
  They carry the name of a registered tool only (a name the model made up is `unknown`).
- The status is sent when the first turn's 2xx headers arrive, as in the passthrough;
  failures before that get the passthrough's statuses, failures after it an error frame
  and no `[DONE]`.
- `stream: false` runs the same (streaming) loop and answers one `chat.completion`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import httpx

from .._async_client import AsyncClient
from .._base import is_event_stream
from .._config import Timeout
from .._engine import ResponseHeadTooLarge
from .._exceptions import (
    APIError,
    ProtocolError,
    StreamTimeout,
    TokenHubError,
    TransportError,
    TruncatedStreamError,
)
from .._models import ContentDelta, ReasoningDelta, RefusalDelta, Usage
from ..tools import MaxTurnsExceeded, ToolCallStarted, ToolResult, ToolSet, TurnFinished
from ..tools._loop import arun_tools
from ._record import add_usage, estimate_usage
from ._redact import KeyRedactor
from ._relay import Relay
from ._turn import Send, Turn, send_simple
from ._upstream import check_head, is_h11_head_overflow
from ._wire import ProxyRejection, upstream_error_object

__all__ = ["ToolExchange", "reject_tool_fields"]

logger = logging.getLogger("tokenhub_stream.asgi")

#: Body fields a browser may not send when the proxy owns the tools: the tool set is the
#: server's, and a page that asks for tool plumbing gets a clear 400 instead of a silently
#: different answer.
BROWSER_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")

# Fields the loop sets itself, or that a content-only stream cannot carry (several
# choices, logprobs, audio). `tool_choice` and `parallel_tool_calls` set by `on_request`
# are kept: the server owner may choose them.
_NOT_FOR_THE_LOOP = frozenset(
    {
        "messages",
        "model",
        "stream",
        "stream_options",
        "tools",
        "functions",
        "function_call",
        "n",
        "logprobs",
        "top_logprobs",
        "audio",
        "modalities",
    }
)

_PASSED_ON = (400, 404, 413, 422, 429)


def reject_tool_fields(body: Mapping[str, object]) -> None:
    """Refuse (400) a browser body that carries tool fields; `null` counts as absent."""
    for name in BROWSER_TOOL_FIELDS:
        if body.get(name) is not None:
            raise ProxyRejection(
                400,
                f"'{name}' is not accepted here: this endpoint runs its own tools.",
                code="tools_not_allowed",
                param=name,
            )


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """What every server-side tool loop of one proxy shares (built once by `ChatProxy`)."""

    tools: ToolSet
    max_turns: int
    api_key: str | None
    base_url: str
    default_model: str
    timeout: Timeout
    user_agent: str
    max_head_bytes: int
    redactor: KeyRedactor | None
    strict_schemas: bool = True


class _Watched(httpx.AsyncBaseTransport):
    """The proxy's pool for one tool loop: heads bounded as the passthrough's (issue #14),
    and the first 2xx event-stream headers reported (the moment the status is sent)."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        limit: int,
        on_headers: Callable[[], Awaitable[None]],
    ) -> None:
        self._inner = inner
        self._limit = limit
        self._on_headers = on_headers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.RemoteProtocolError as exc:
            if is_h11_head_overflow(exc):
                raise ResponseHeadTooLarge(self._limit) from exc
            raise
        await check_head(response, self._limit)
        if 200 <= response.status_code < 300 and is_event_stream(response):
            await self._on_headers()
        return response

    async def aclose(self) -> None:
        return None  # the pool is the proxy's


class ToolExchange:
    """One request through the server-side loop; `run` is raced by the relay."""

    def __init__(
        self,
        settings: ToolSettings,
        relay: Relay,
        transport: httpx.AsyncBaseTransport,
        content: bytes,
        stream: bool,
        *,
        want_usage: bool,
    ) -> None:
        self._settings = settings
        self._relay = relay
        self._transport = transport
        self._want_usage = want_usage
        self._tools: ToolSet = settings.tools
        self._stream = stream
        body = json.loads(content)  # the passthrough's outgoing body: allow-listed, clamped
        self._messages: list[dict[str, object]] = list(body["messages"])
        self._model: str = body["model"]
        options = body.get("stream_options")
        self._send_usage = (
            stream and isinstance(options, Mapping) and options.get("include_usage") is True
        )
        self._params = {k: v for k, v in body.items() if k not in _NOT_FOR_THE_LOOP}
        self._parts: list[str] = []
        self._refusal: list[str] = []  # a structured output the model declined
        self._usage: Usage | None = None
        self._finish_reason: str | None = None
        self._started = False
        self._created = int(time.time())
        self._send: Send | None = None
        self._turn: Turn | None = None
        self._prefix = b""
        # The frames are the model's text: one stream redactor, so a key cut across two
        # deltas is caught as in the passthrough.
        redactor = settings.redactor
        self._redact = None if redactor is None else redactor.stream().feed
        # For the estimate of a turn cut before its usage arrived: whether a turn's 2xx
        # headers came and its TurnFinished did not yet, and the text it streamed so far.
        self._in_turn = False
        self._turn_chars = 0
        self._loop: object = None

    async def run(self, send: Send, turn: Turn) -> None:
        self._send, self._turn = send, turn
        self._prefix = (
            b'{"id":"chatcmpl-'
            + turn.request_id.encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(self._created).encode()
            + b',"model":'
            + json.dumps(self._model).encode()
            + b',"choices":'
        )
        settings = self._settings
        watched = _Watched(self._transport, settings.max_head_bytes, self._headers_arrived)
        http = httpx.AsyncClient(transport=watched, follow_redirects=False, trust_env=False)
        client = AsyncClient(
            # "" rather than None: no Authorization, and no fallback to TOKENHUB_KEY.
            api_key=settings.api_key or "",
            base_url=settings.base_url,
            model=settings.default_model,
            timeout=settings.timeout,
            max_retries=0,  # as the passthrough: the browser decides about retrying
            headers={"user-agent": settings.user_agent},
            http_client=http,  # the proxy's pool; not closed by the client
            strict_schemas=settings.strict_schemas,
        )
        loop = arun_tools(
            client,
            self._messages,
            tools=self._tools,
            model=self._model,
            max_turns=settings.max_turns,
            # Usage for on_complete, a UsageLimiter's budget and the JSON answer; the stream
            # shows it only when asked.
            include_usage=self._send_usage or not self._stream or self._want_usage,
            **self._params,
        )
        self._loop = loop
        completed = False
        watch = turn.watch
        # The loop's own spans (each turn's `chat`, each `execute_tool`) go under the
        # request's span: it is current in this task while the loop runs.
        token = None if watch is None else watch.attach()
        try:
            async with http, loop:
                async for event in loop:
                    if isinstance(event, ContentDelta):
                        self._parts.append(event.text)
                        self._turn_chars += len(event.text)
                        if self._stream:
                            await self._frame([{"index": 0, "delta": {"content": event.text}}])
                    elif isinstance(event, ReasoningDelta):
                        self._turn_chars += len(event.text)
                    elif isinstance(event, RefusalDelta):
                        self._refusal.append(event.text)
                        self._turn_chars += len(event.text)
                        if self._stream:
                            await self._frame([{"index": 0, "delta": {"refusal": event.text}}])
                    elif isinstance(event, TurnFinished):
                        self._in_turn = False
                        self._turn_chars = 0
                        self._usage = add_usage(self._usage, event.usage)
                        self._finish_reason = event.message.finish_reason
                    elif isinstance(event, ToolCallStarted):
                        await self._comment(event.call.name, "running")
                    elif isinstance(event, ToolResult):
                        logger.debug(
                            "tool request_id=%s name=%s error=%s elapsed_ms=%.1f",
                            turn.request_id,
                            self._name(event.call.name),
                            event.error,
                            event.elapsed * 1000,
                        )
                        await self._comment(event.call.name, "failed" if event.error else "done")
            completed = True
        except Exception as exc:
            await self._fail(exc)
            return
        finally:
            # Also on a disconnect (cancellation): on_complete gets what the browser saw.
            self._record(completed)
            if watch is not None:
                watch.detach(token)
        if self._stream:
            await self._finish_stream()
        else:
            await self._answer()

    # --- streaming ----------------------------------------------------------------------

    async def _headers_arrived(self) -> None:
        self._in_turn = True
        if self._stream:
            await self._start()

    async def _start(self) -> None:
        # The first turn's 2xx headers arrived: the status is fixed from here on.
        turn, send = self._turn, self._send
        assert turn is not None and send is not None
        if self._started or turn.client_gone:
            return
        self._started = True
        await self._relay.start(send, turn)
        await self._frame([{"index": 0, "delta": {"role": "assistant", "content": ""}}])

    async def _frame(self, choices: list[dict[str, object]], extra: bytes = b"") -> None:
        for choice in choices:
            choice.setdefault("logprobs", None)
            choice.setdefault("finish_reason", None)
        data = self._prefix + _dumps(choices) + extra + b"}"
        await self._write(b"data: " + data + b"\n\n")

    async def _comment(self, name: str, state: str) -> None:
        if self._stream and self._started:
            await self._write(f": tool {self._name(name)} {state}\n\n".encode())

    def _name(self, name: str) -> str:
        # Registered names are [A-Za-z0-9_-]; a made-up one could carry a line break.
        return name if name in self._tools else "unknown"

    async def _write(self, data: bytes) -> None:
        turn, send = self._turn, self._send
        assert turn is not None and send is not None
        if not turn.client_gone:
            redact = self._redact
            await self._relay.write(send, turn, data if redact is None else redact(data))

    async def _finish_stream(self) -> None:
        turn, send = self._turn, self._send
        assert turn is not None and send is not None
        reason = self._finish_reason or "stop"
        await self._frame([{"index": 0, "delta": {}, "finish_reason": reason}])
        if self._send_usage and self._usage is not None:
            await self._frame([], b',"usage":' + _dumps(_usage_dict(self._usage)))
        await self._write(b"data: [DONE]\n\n")
        await self._end_body()

    async def _end_body(self) -> None:
        turn, send = self._turn, self._send
        assert turn is not None and send is not None
        await self._relay.end(send, turn)

    # --- stream: false --------------------------------------------------------------------

    async def _answer(self) -> None:
        turn, send = self._turn, self._send
        assert turn is not None and send is not None
        turn.status = 200
        if turn.client_gone:
            return
        body = self._relay.redact(_dumps(self._completion(turn.request_id, True)))
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", turn.request_id.encode()),
        ]
        turn.response_done = True
        await send_simple(send, 200, body, headers)
        turn.ttfb = time.perf_counter() - turn.started
        turn.bytes_sent += len(body)

    def _completion(self, request_id: str, completed: bool) -> dict[str, object]:
        reason = (self._finish_reason or "stop") if completed else None
        message: dict[str, object] = {"role": "assistant", "content": "".join(self._parts)}
        if self._refusal:
            message["refusal"] = "".join(self._refusal)
        out: dict[str, object] = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ],
        }
        if self._usage is not None:
            out["usage"] = _usage_dict(self._usage)
        return out

    # --- failures and the record ----------------------------------------------------------

    async def _fail(self, exc: Exception) -> None:
        turn, send = self._turn, self._send
        assert turn is not None and send is not None
        status, message, code, headers = _failure(exc, self._relay.redact)
        # The upstream's own error object, where the passthrough would pass it on: a
        # passed-on status, or an error frame inside the stream.
        upstream, param = None, None
        if isinstance(exc, APIError) and (exc.status_code in _PASSED_ON or exc.status_code is None):
            upstream = upstream_error_object(exc.body, self._settings.api_key)
            param = exc.param
        timeout = status == 504
        if not self._started:
            turn.status = status
            turn.outcome = "timeout" if timeout else "upstream_error"
            turn.error = message
            error_type = None if status in _PASSED_ON else "api_error"
            rejection = ProxyRejection(
                status,
                message,
                code=code,
                param=param,
                error_type=error_type,
                headers=headers,
                upstream=upstream,
            )
            await self._relay.send_start_error(send, turn, rejection)
            return
        # After the start the status is fixed: an error frame, and no [DONE].
        outcome: Literal["timeout", "upstream_error"] = "timeout" if timeout else "upstream_error"
        await self._relay.fail_after(
            send, turn, outcome, message, code or "upstream_error", upstream
        )
        await self._end_body()

    def _record(self, completed: bool) -> None:
        turn = self._turn
        if turn is None or turn.collector is None:
            return
        completion = self._completion(turn.request_id, completed)
        # Redacted like the passthrough's copy: an echoed key stays out of on_complete.
        turn.collector.feed_json(self._relay.redact(_dumps(completion)))
        if not completed and self._in_turn:
            # Cut mid-turn: that turn's usage never came. Its prompt was the conversation
            # so far plus the tool schemas; its output, the text it streamed.
            messages = getattr(self._loop, "messages", self._messages)
            prompt = len(_dumps(messages)) + len(_dumps(self._tools.to_openai()))
            turn.collector.unfinished = estimate_usage(
                request_bytes=prompt, text_chars=self._turn_chars, event_bytes=0
            )


def _failure(
    exc: Exception, redact: Callable[[bytes], bytes]
) -> tuple[int, str, str | None, dict[str, str]]:
    """(status, message, code, headers) for a loop failure, mapped as the passthrough maps
    the upstream's: 400/404/413/422/429 passed on, 401/403/5xx 502, refused 502, timeout 504."""
    cause = exc.__cause__
    if isinstance(exc, MaxTurnsExceeded):
        logger.warning("tool loop hit max_tool_turns=%d", exc.max_turns)
        message = f"The model still asked for tools after {exc.max_turns} turns."
        return 502, message, "max_tool_turns", {}
    if isinstance(exc, APIError):
        text = redact(exc.message.encode()).decode(errors="replace")[:1000]
        status = exc.status_code
        if status in _PASSED_ON:
            headers = {}
            if exc.retry_after is not None:
                headers["retry-after"] = str(max(1, int(exc.retry_after + 0.999)))
            return status, text or f"The upstream answered {status}.", exc.code, headers
        if status is None:  # an error frame inside the stream
            return 502, text or "The upstream sent an error.", exc.code or "upstream_error", {}
        return 502, f"The upstream answered {status}.", "upstream_error", {}
    if isinstance(exc, StreamTimeout):
        # A refused connection is no timeout, whatever a client library maps it to.
        inner = cause.__cause__ if cause is not None else None
        if (
            exc.kind == "connect"
            and isinstance(inner, OSError)
            and not isinstance(inner, TimeoutError)
        ):
            return 502, "Could not reach the upstream.", "upstream_unreachable", {}
        if exc.kind in ("connect", "first_token"):
            return 504, "The upstream timed out.", "upstream_timeout", {}
        return 504, "The upstream went silent.", "upstream_timeout", {}
    if isinstance(cause, ResponseHeadTooLarge):
        message = f"The upstream's response head is larger than {cause.limit} bytes."
        return 502, message, "upstream_protocol_error", {}
    if isinstance(exc, TransportError):
        if exc.retryable:
            return 502, "Could not reach the upstream.", "upstream_unreachable", {}
        return 502, "The upstream stream broke off.", "upstream_error", {}
    if isinstance(exc, TruncatedStreamError):
        # A cut (the connection closed mid-body, or no end): as the passthrough says it,
        # whichever client library noticed it.
        return 502, "The upstream stream broke off.", "upstream_error", {}
    if isinstance(exc, ProtocolError):
        return 502, "The upstream sent an invalid stream.", "upstream_protocol_error", {}
    if isinstance(exc, TokenHubError):
        return 502, "The upstream request failed.", "upstream_error", {}
    logger.error("tool loop failed: %s", type(exc).__name__, exc_info=exc)
    return 500, "The proxy failed.", "internal_error", {}


def _usage_dict(usage: Usage) -> dict[str, object]:
    out: dict[str, object] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    if usage.cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return out


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
