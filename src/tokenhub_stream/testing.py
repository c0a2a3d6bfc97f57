"""A local OpenAI-compatible upstream for tests, examples and demos.

```python
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

upstream = FakeChatUpstream()
upstream.enqueue(Script(text="Hello!", end="cut"))
with run_upstream(upstream) as running:
    ...  # point a client at running.base_url
```

`FakeChatUpstream` is a plain ASGI app (no starlette) serving `POST /v1/chat/completions`
(streaming SSE and plain JSON) and `GET /v1/models`. Each chat request pops the next
`Script` from a FIFO queue; with no script left it answers deterministically: a reply that
quotes the last user message, or, when the request carries `tools`, a call to one of them
and then a reply that quotes the tool's result (see `FakeChatUpstream`). Scripts reproduce
the upstream quirks listed in
`PROVIDER_QUIRKS.md`: keep-alive comments, stalls, cut bodies, in-band error frames,
tool-call fragments without `index`, `reasoning` vs `reasoning_content`, Azure's empty
`choices`, Groq's `x_groq.usage` and raw byte streams.

`run_upstream` serves it with uvicorn (the `cli` extra) on a random loopback port in a
daemon thread, so it works from sync tests and from asyncio or trio tests alike.

Deliberate choices:

- Every SSE event is sent as its own `http.response.body` message, so with uvicorn's h11
  protocol each event is one HTTP chunk on the wire.
- `end="cut"` returns from the app without the final `more_body=False` message; uvicorn
  then closes the socket without the terminating zero-length chunk, which httpx reports
  as `httpx.RemoteProtocolError`. `run_upstream` hides uvicorn's one log line about it.
- A client disconnect is only recorded when it happens before the response is complete
  (uvicorn's `receive()` reports `http.disconnect` for every finished response too).
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import itertools
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio

__all__ = [
    "DEFAULT_MODELS",
    "FakeChatUpstream",
    "ReceivedRequest",
    "RunningUpstream",
    "Script",
    "ScriptEnd",
    "ToolCall",
    "UsageStyle",
    "run_upstream",
]

DEFAULT_MODELS: tuple[str, ...] = (
    "claude-3-5-sonnet-20241022",
    "gpt-4o",
    "gpt-4o-mini",
    "gemini-2.0-flash",
    "deepseek-chat",
)

ScriptEnd = Literal["done", "close", "cut", "stall"]
UsageStyle = Literal["final", "every_chunk", "x_groq"]

# The ASGI interface typed without `Any`: scopes and received messages are only read, and
# sent messages are plain dicts, so uvicorn, starlette, httpx.ASGITransport and hand-written
# test callables all fit.
_Scope = Mapping[str, object]
_Message = dict[str, object]
_Receive = Callable[[], Awaitable[Mapping[str, object]]]
_Send = Callable[[_Message], Awaitable[None]]

_STALL_LIMIT = 60.0
_POLL = 0.05
_CUT_LOG_MESSAGE = "ASGI callable returned without completing response."
_WORDISH = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """One scripted tool call, streamed as a first fragment plus argument fragments.

    ```python
    Script(tool_calls=[ToolCall(name="get_weather", arguments='{"city":"Paris"}')])
    Script(tool_calls=[ToolCall(name="f", pieces=['{"a":', "1}"], id="")])  # Gemini-like id
    ```

    Args:
        name: the function name, sent in the first fragment.
        arguments: the JSON arguments text, split into 8-character pieces.
        pieces: an explicit split of the arguments; overrides `arguments`.
        id: the call id sent in the first fragment; `None` generates `call_<n>`.
    """

    name: str
    arguments: str = ""
    pieces: Sequence[str] | None = None
    id: str | None = None

    def argument_pieces(self) -> list[str]:
        """Return the argument fragments in the order they are streamed."""
        if self.pieces is not None:
            return list(self.pieces)
        return [self.arguments[i : i + 8] for i in range(0, len(self.arguments), 8)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Script:
    """How the upstream answers one chat request; every field is optional.

    ```python
    upstream.enqueue(Script(deltas=["Hel", "lo"], end="close"))  # no [DONE]
    upstream.enqueue(Script(status=429, headers={"Retry-After": "2"}))
    upstream.enqueue(Script(text="thinking...", keepalive=0.01, end="stall"))
    upstream.enqueue(Script(raw=[b"data: {}\\r\\n", b"\\r\\n"]))
    ```

    Args:
        text: the reply, split into small word-ish deltas. Without `text` or `deltas` the
            reply is the default one, or none at all when `tool_calls` are given (a tool
            turn with text before its calls says so: `text="Let me look."`).
        deltas: the reply as explicit content deltas; overrides `text`.
        delay: seconds before each content-bearing chunk; `None` uses the upstream default.
        first_delay: seconds after the headers and before the first chunk.
        keepalive: send `: keep-alive` comments when nothing was written for this long,
            during delays and stalls (a blank line for non-streaming requests).
        end: `done` finish chunk then `[DONE]`; `close` finish chunk then a bare close;
            `cut` stop without finish chunk or `[DONE]` and drop the connection mid-body;
            `stall` send nothing more (but keep-alives) until the client goes away or 60 s.
        finish_reason: the reason in the final chunk; `"auto"` means `"tool_calls"` when
            `tool_calls` is given and `"stop"` otherwise; `None` sends no finish chunk.
        status: the HTTP status; at 400 or above the body is `error` as JSON.
        error: the JSON body of an error status; `None` builds an OpenAI-shaped one.
        error_frame: a frame sent as `data: <json>` after the deltas, before `end`.
        tool_calls: tool calls streamed after the content.
        tool_call_index: `False` drops `index` from tool-call fragments (Gemini, Ollama).
        reasoning: reasoning text, streamed as deltas before the content.
        reasoning_field: the delta key for reasoning; vLLM uses `reasoning`.
        usage: overrides the computed usage object.
        usage_style: `final` a `choices: []` chunk when `stream_options.include_usage` is
            true; `every_chunk` cumulative usage on every chunk (Gemini, vLLM continuous
            stats); `x_groq` usage under `x_groq` on the finish chunk, plus the final chunk
            when asked for.
        empty_choices: Azure-style: a first chunk with `choices: []` and
            `prompt_filter_results`, and a filter frame with empty choices after each
            content chunk.
        raw: send exactly these body chunks (with `delay` between) and nothing else.
        content_type: the response content type.
        headers: extra response headers.
    """

    text: str | None = None
    deltas: Sequence[str] | None = None
    delay: float | None = None
    first_delay: float = 0.0
    keepalive: float | None = None
    end: ScriptEnd = "done"
    finish_reason: str | None = "auto"
    status: int = 200
    error: Mapping[str, object] | None = None
    error_frame: Mapping[str, object] | None = None
    tool_calls: Sequence[ToolCall] = ()
    tool_call_index: bool = True
    reasoning: str | None = None
    reasoning_field: str = "reasoning_content"
    usage: Mapping[str, object] | None = None
    usage_style: UsageStyle = "final"
    empty_choices: bool = False
    raw: Sequence[bytes] | None = None
    content_type: str = "text/event-stream"
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.end not in ("done", "close", "cut", "stall"):
            raise ValueError(f"end must be done, close, cut or stall, not {self.end!r}")
        if self.usage_style not in ("final", "every_chunk", "x_groq"):
            raise ValueError(f"unknown usage_style {self.usage_style!r}")
        for name in ("delay", "keepalive"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.keepalive == 0:
            raise ValueError("keepalive must be > 0")
        if self.first_delay < 0:
            raise ValueError("first_delay must be >= 0")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, not {self.status}")


class ReceivedRequest:
    """One request as the upstream received it, and what became of its response.

    The server runs in another thread; the waits are thread-safe and bounded.

    ```python
    with run_upstream(upstream) as running:
        ...  # a client opens a stream and closes it early
        request = upstream.requests[-1]
        assert request.wait_disconnected(1.0)
        assert request.json is not None and request.json["stream"] is True
    ```

    Attributes:
        method: the HTTP method.
        path: the request path, without the query string.
        query: the raw query string.
        headers: header names lower-cased; repeated headers joined with `", "`.
        body: the raw request body.
        json: the body parsed as a JSON object, or `None`.
        received_at: `time.monotonic()` when the whole body had arrived.
        script: the script that answered this request, if any.
    """

    def __init__(
        self,
        *,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        json: Mapping[str, object] | None,
        received_at: float,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.json = json
        self.received_at = received_at
        self.script: Script | None = None
        self._completed = False
        self._disconnected_at: float | None = None
        self._disconnected = threading.Event()
        self._finished = threading.Event()

    def __repr__(self) -> str:
        # Never show headers: they carry the Authorization key.
        state = (
            "completed"
            if self._completed
            else "disconnected"
            if self._disconnected.is_set()
            else "finished"
            if self._finished.is_set()
            else "in progress"
        )
        return f"<ReceivedRequest {self.method} {self.path} {state}>"

    @property
    def completed(self) -> bool:
        """Whether the response was sent to its end (the final empty body message)."""
        return self._completed

    @property
    def disconnected(self) -> bool:
        """Whether the client went away before the response was complete."""
        return self._disconnected.is_set()

    @property
    def disconnected_at(self) -> float | None:
        """`time.monotonic()` when the disconnect was seen, or `None`."""
        return self._disconnected_at

    @property
    def finished(self) -> bool:
        """Whether the app is done with this request (completed, cut, disconnected...)."""
        return self._finished.is_set()

    def wait_disconnected(self, timeout: float) -> bool:
        """Block until the client disconnects before the response completed.

        Args:
            timeout: the most seconds to wait.

        Returns:
            `True` if the disconnect was seen, `False` on timeout.
        """
        return self._disconnected.wait(timeout)

    def wait_finished(self, timeout: float) -> bool:
        """Block until the app has finished handling this request.

        Read `completed` after this: it is set just after the last byte was handed to the
        server, which can race with the client seeing that byte.

        Args:
            timeout: the most seconds to wait.

        Returns:
            `True` if the handler finished, `False` on timeout.
        """
        return self._finished.wait(timeout)

    def _mark_disconnected(self) -> None:
        if not self._completed and not self._disconnected.is_set():
            self._disconnected_at = time.monotonic()
            self._disconnected.set()


@dataclass(frozen=True, slots=True)
class RunningUpstream:
    """A `FakeChatUpstream` being served by `run_upstream`.

    ```python
    with run_upstream() as running:
        httpx.get(f"{running.base_url}/models")
    ```

    Attributes:
        app: the upstream being served.
        host: the address it listens on.
        port: the bound port.
        base_url: `http://<host>:<port>/v1`, ready for an OpenAI-style client.
    """

    app: FakeChatUpstream
    host: str
    port: int

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in `/v1`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"


class _Disconnected(Exception):
    pass


class _Writer:
    """Sends the response, tracks the last write for keep-alives, records the outcome."""

    def __init__(self, send: _Send, record: ReceivedRequest, closing: threading.Event) -> None:
        self._send = send
        self._record = record
        self._closing = closing
        self.last_write = anyio.current_time()

    async def _raw_send(self, message: _Message) -> None:
        try:
            await self._send(message)
        except OSError as exc:
            # Servers other than uvicorn raise when writing to a closed socket.
            self._record._mark_disconnected()
            raise _Disconnected from exc

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        encoded = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await self._raw_send({"type": "http.response.start", "status": status, "headers": encoded})
        self.last_write = anyio.current_time()

    async def write(self, data: bytes) -> None:
        await self._raw_send({"type": "http.response.body", "body": data, "more_body": True})
        self.last_write = anyio.current_time()

    async def finish(self) -> None:
        await self._raw_send({"type": "http.response.body", "body": b"", "more_body": False})
        # No checkpoint between the last send and this flag, so the disconnect watcher
        # cannot mistake uvicorn's post-response `http.disconnect` for a client leaving.
        self._record._completed = True

    async def idle(self, seconds: float, keepalive: float | None, ping: bytes) -> None:
        """Wait `seconds`, writing `ping` whenever nothing was written for `keepalive`."""
        deadline = anyio.current_time() + seconds
        while not self._closing.is_set():
            now = anyio.current_time()
            if now >= deadline:
                return
            if keepalive is not None and now - self.last_write >= keepalive:
                await self.write(ping)
                continue
            wake = deadline if keepalive is None else min(deadline, self.last_write + keepalive)
            await anyio.sleep(max(0.0, min(wake, now + _POLL) - now))


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _frame(obj: object) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _error_body(message: str, type_: str, code: str | None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "code": code}}


def _split_wordish(text: str) -> list[str]:
    return _WORDISH.findall(text)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _messages(body: Mapping[str, object]) -> list[Mapping[str, object]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def _default_reply(body: Mapping[str, object]) -> str:
    users = [m for m in _messages(body) if m.get("role") == "user"]
    said = " ".join(_content_text(users[-1].get("content")).split()) if users else ""
    if not said:
        return "Hello! I am the local tokenhub upstream. Say something and I will answer."
    if len(said) > 200:
        said = said[:199] + "…"
    words = len(said.split())
    return (
        f'You said: "{said}". That is {words} word{"s" if words != 1 else ""}. '
        "I am a local test upstream, so this reply is deterministic and streams word by word."
    )


# --- the answer to a request no script answers (the rule is in FakeChatUpstream's docstring)


def _unscripted(body: Mapping[str, object]) -> Script:
    messages = _messages(body)
    last = messages[-1] if messages else {}
    if last.get("role") == "user":
        call = _tool_call_for(body, _content_text(last.get("content")))
        if call is not None:
            return Script(tool_calls=[call])
    json_answer = _json_deltas(body)
    if json_answer is not None:
        return Script(deltas=json_answer)
    if last.get("role") == "tool":
        return Script(text=_tool_results_reply(messages))
    return Script()


def _functions(body: Mapping[str, object]) -> list[Mapping[str, object]]:
    tools = body.get("tools")
    out: list[Mapping[str, object]] = []
    for item in tools if isinstance(tools, list) else []:
        function = item.get("function") if isinstance(item, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            if function["name"]:
                out.append(function)
    return out


_NAME_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_TEXT_WORDS = re.compile(r"\w+")
_NUMBERS = re.compile(r"-?\d+(?:\.\d+)?")


def _tool_call_for(body: Mapping[str, object], said: str) -> ToolCall | None:
    functions = _functions(body)
    choice = body.get("tool_choice")
    if not functions or choice == "none":
        return None
    chosen = functions[0]
    named = choice.get("function") if isinstance(choice, dict) else None
    said_words = {w.lower() for w in _TEXT_WORDS.findall(said)}
    if isinstance(named, dict) and isinstance(named.get("name"), str):
        chosen = next((f for f in functions if f["name"] == named["name"]), chosen)
    else:
        for function in functions:
            name_words = {w.lower() for w in _NAME_WORDS.findall(str(function["name"]))}
            if name_words & said_words:
                chosen = function
                break
    numbers = iter(_NUMBERS.findall(said))
    words = _TEXT_WORDS.findall(said)
    last_word = words[-1] if words else ""
    parameters = chosen.get("parameters") or {"type": "object"}
    arguments = _schema_value(parameters, last_word, numbers, 0, parameters)
    return ToolCall(name=str(chosen["name"]), arguments=json.dumps(arguments))


def _schema_value(
    schema: object, word: str, numbers: Iterator[str], depth: int, root: object
) -> object:
    schema = _resolved(schema, root)
    if not isinstance(schema, dict) or depth > 16:
        return None
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            for branch in branches:
                if isinstance(branch, dict) and branch.get("type") != "null":
                    return _schema_value(branch, word, numbers, depth + 1, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return word
    if kind in ("integer", "number"):
        text = next(numbers, "1")
        value = float(text)
        return int(value) if kind == "integer" or value.is_integer() else value
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
        return {n: _schema_value(properties.get(n), word, numbers, depth + 1, root) for n in names}
    return None


def _resolved(schema: object, root: object) -> object:
    """A local `$ref` (`#/$defs/Name`) followed to its schema in `root`."""
    for _ in range(16):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        schema = root
        for part in ref[2:].split("/"):
            schema = schema.get(part) if isinstance(schema, dict) else None
    return schema


# --- a JSON answer, for a request with `response_format` (the rule is in FakeChatUpstream's
# docstring)

_LONG_TEXT = {"description", "summary", "text", "body", "content", "details", "notes"}
_FORMATS = {
    "date": "2025-01-01",
    "date-time": "2025-01-01T12:00:00Z",
    "time": "12:00:00",
    "duration": "P1D",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
_PIECES = (3, 5, 8, 4, 6, 7)  # delta sizes, in turn
_LONG_NOTE = "notes from the local upstream, streamed a few characters at a time."


def _json_deltas(body: Mapping[str, object]) -> list[str] | None:
    """The deltas of a JSON answer when the request asks for one, else None."""
    spec = body.get("response_format")
    kind = spec.get("type") if isinstance(spec, dict) else None
    users = [m for m in _messages(body) if m.get("role") == "user"]
    said = _content_text(users[-1].get("content")) if users else ""
    if kind == "json_object":
        value: object = {"answer": _default_reply(body)}
    elif kind == "json_schema":
        assert isinstance(spec, dict)
        inner = spec.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
        value = _JSONFiller(schema, said).fill(schema, "", 0, 0)
    else:
        return None
    text = json.dumps(value, ensure_ascii=False)
    pieces: list[str] = []
    i = 0
    while i < len(text):
        size = _PIECES[len(pieces) % len(_PIECES)]
        pieces.append(text[i : i + size])
        i += size
    return pieces


class _JSONFiller:
    """Fills a JSON schema with a value made of the user's words (see FakeChatUpstream)."""

    def __init__(self, root: object, said: str) -> None:
        self.root = root
        words = _TEXT_WORDS.findall(said)
        self.words = [w for w in words if len(w) > 3 and not w.isdigit()] or words or ["text"]
        numbers = _NUMBERS.findall(said)
        self.length = min(10, max(1, int(float(numbers[0])))) if numbers else 3

    def fill(self, schema: object, name: str, n: int, depth: int) -> object:
        schema = _resolved(schema, self.root)
        if not isinstance(schema, dict) or depth > 8:
            return None
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[n % len(enum)]
        if "const" in schema:
            return schema["const"]
        kind = schema.get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        options = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(options, list) and options:
            usable = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            if not usable or (depth > 4 and len(usable) < len(options)):
                return None  # deep in a recursive type: stop where null is allowed
            return self.fill(usable[0], name, n, depth + 1)
        word = self.words[n % len(self.words)]
        if "string" in kinds:
            fmt = schema.get("format")
            if fmt == "email":
                return f"{word.lower()}@example.com"
            if isinstance(fmt, str) and fmt in _FORMATS:
                return _FORMATS[fmt]
            if name.lower() in _LONG_TEXT:
                return f"{word}: {_LONG_NOTE}"
            return word
        if "integer" in kinds or "number" in kinds:
            low, high = schema.get("minimum"), schema.get("maximum")
            value: float = n + 1 if "integer" in kinds else n + 1.5
            if isinstance(low, int | float) and value < low:
                value = low
            if isinstance(high, int | float) and value > high:
                value = high
            return int(value) if "integer" in kinds else value
        if "boolean" in kinds:
            return n % 2 == 0
        if "array" in kinds:
            count = self.length if depth <= 2 else 2
            low, high = schema.get("minItems"), schema.get("maxItems")
            if isinstance(low, int):
                count = max(count, low)
            if isinstance(high, int):
                count = min(count, high)
            items = schema.get("items")
            return [self.fill(items, name, i, depth + 1) for i in range(count)]
        if "object" in kinds or "properties" in schema:
            properties = schema.get("properties")
            if not isinstance(properties, dict):
                return {}
            return {key: self.fill(sub, key, n, depth + 1) for key, sub in properties.items()}
        return None


def _tool_results_reply(messages: list[Mapping[str, object]]) -> str:
    results: list[Mapping[str, object]] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, message)
    names: dict[str, str] = {}
    asked = messages[-len(results) - 1] if len(messages) > len(results) else {}
    calls = asked.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(call.get("id"), str):
            names[call["id"]] = str(function.get("name"))
    parts = []
    for result in results:
        name = names.get(str(result.get("tool_call_id")), "the tool")
        text = " ".join(_content_text(result.get("content")).split())
        if len(text) > 200:
            text = text[:199] + "…"
        parts.append(f'{name} returned "{text}".')
    return " ".join(parts)


def _prompt_tokens(body: Mapping[str, object]) -> int:
    words = sum(len(_content_text(m.get("content")).split()) for m in _messages(body))
    return max(1, words)


def _include_usage(body: Mapping[str, object]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class FakeChatUpstream:
    """A scriptable OpenAI-compatible chat upstream, as a plain ASGI app.

    ```python
    upstream = FakeChatUpstream(api_key="sk-test", delay=0.001)
    upstream.enqueue(Script(deltas=["Hi", "!"]), Script(status=503))
    with run_upstream(upstream) as running:
        ...  # requests to running.base_url get the scripts in order, then the default reply
    ```

    Routes: `POST /v1/chat/completions` and `GET /v1/models`; anything else is a 404 with
    an OpenAI-shaped error body.

    A chat request with no script left is answered by a fixed rule, so a demo shows a
    chat, and a tool turn, with no key and no network:

    - the last message is the user's, and the request has `tools` (and `tool_choice` is
      not `"none"`): one call to the tool `tool_choice` names, else to the first tool with
      a word of its name (split at `_`, `-`, `.` and case changes) among the words of the
      user's message, else to the first tool. Its arguments are the schema's required
      properties (`$ref`s followed, the first non-null `anyOf` branch): an `enum` or
      `const` gives its first value, a string the last word of the user's message, an
      integer or number the next number in the message (1 when none is left), a boolean
      `true`, an array `[]`, an object its own required properties, anything else `null`;
    - otherwise, when the request has `response_format`, a JSON answer streamed in deltas
      of 3 to 8 characters. For `json_object`, `{"answer": <the reply below>}`. For
      `json_schema`, a value of the schema (`$ref`s followed, the first non-null `anyOf`
      branch), where n is the element's index in the innermost list around it (else 0)
      and the words are those of four letters or more of the last user message: an
      `enum` gives its n-th value, a `const` its value, a string the n-th word (with a
      `format`, a fixed valid value; for a property named `description`, `summary`,
      `text`, `body`, `content`, `details` or `notes`, a sentence starting with the
      word), an integer n + 1 and a number n + 1.5 (within `minimum`/`maximum`), a
      boolean `true` for even n, an array as many elements as the first number in the
      user's message (1 to 10; 3 when none; 2 deeper than a field of the top object;
      within `minItems`/`maxItems`), an object all its properties; `pattern` is not
      honoured. `examples/structured.py` shows it;
    - the last messages are tool results: a reply quoting each, as
      `get_weather returned "18 degrees in Paris".`;
    - otherwise a reply quoting the last user message (`You said: "..."`).

    Args:
        api_key: when given, requests need `Authorization: Bearer <api_key>` or get a 401
            (the key is never echoed).
        models: the ids listed by `GET /v1/models`; the first is used when a request
            names no model.
        delay: default seconds between streamed chunks (0.02 is about 50 tokens/s).

    Raises:
        ValueError: `delay` is negative or `models` is empty.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
        delay: float = 0.02,
    ) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        if isinstance(models, str) or not models:
            raise ValueError("models must be a non-empty sequence of model ids")
        self._api_key = api_key
        self.models: tuple[str, ...] = tuple(models)
        self.delay = delay
        self._lock = threading.Condition()
        self._scripts: collections.deque[Script] = collections.deque()
        self._requests: list[ReceivedRequest] = []
        self._ids = itertools.count(1)
        self._closing = threading.Event()

    def __repr__(self) -> str:
        return (
            f"<FakeChatUpstream models={len(self.models)} scripts={self.pending_scripts} "
            f"requests={len(self.requests)}>"
        )

    def enqueue(self, *scripts: Script) -> None:
        """Queue scripts; each chat request takes the oldest one left.

        Args:
            *scripts: the scripts, in the order requests will get them.

        Raises:
            TypeError: something other than a `Script` was given.
        """
        for script in scripts:
            if not isinstance(script, Script):
                raise TypeError(f"expected a Script, got {type(script).__name__}")
        with self._lock:
            self._scripts.extend(scripts)

    @property
    def pending_scripts(self) -> int:
        """How many queued scripts no request has taken yet."""
        with self._lock:
            return len(self._scripts)

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until at least `n` requests were received.

        Args:
            n: the number of requests to wait for.
            timeout: the most seconds to wait.

        Returns:
            `True` once `len(requests) >= n`, `False` on timeout.
        """
        with self._lock:
            return self._lock.wait_for(lambda: len(self._requests) >= n, timeout)

    # ASGI entry point

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """Serve one ASGI connection scope (`http`; `lifespan` is acknowledged).

        Raises:
            RuntimeError: the scope type is neither `http` nor `lifespan`.
        """
        if scope.get("type") == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope.get("type") != "http":
            raise RuntimeError(f"FakeChatUpstream serves http only, not {scope.get('type')!r}")
        record = await self._receive_request(scope, receive)
        if record is None:
            return
        writer = _Writer(send, record, self._closing)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_disconnect, receive, record, tg.cancel_scope)
                try:
                    await self._route(record, writer)
                except _Disconnected:
                    pass
                finally:
                    tg.cancel_scope.cancel()
        finally:
            record._finished.set()

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        while True:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message.get("type") == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _receive_request(self, scope: _Scope, receive: _Receive) -> ReceivedRequest | None:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if isinstance(chunk, bytes):
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        parsed: Mapping[str, object] | None = None
        try:
            loaded = json.loads(body) if body else None
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            parsed = loaded
        headers: dict[str, str] = {}
        raw_headers = scope.get("headers", [])
        if isinstance(raw_headers, list | tuple):
            for name, value in raw_headers:
                key = bytes(name).decode("latin-1").lower()
                text = bytes(value).decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        query = scope.get("query_string", b"")
        record = ReceivedRequest(
            method=str(scope.get("method", "GET")),
            path=str(scope.get("path", "/")),
            query=query.decode("latin-1") if isinstance(query, bytes) else "",
            headers=headers,
            body=body,
            json=parsed,
            received_at=time.monotonic(),
        )
        with self._lock:
            self._requests.append(record)
            self._lock.notify_all()
        return record

    async def _watch_disconnect(
        self, receive: _Receive, record: ReceivedRequest, scope: anyio.CancelScope
    ) -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                record._mark_disconnected()
                scope.cancel()
                return

    def _authorized(self, record: ReceivedRequest) -> bool:
        if self._api_key is None:
            return True
        scheme, _, token = record.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._api_key.encode()
        )

    async def _route(self, record: ReceivedRequest, writer: _Writer) -> None:
        path = record.path.rstrip("/") or "/"
        if path not in ("/v1/chat/completions", "/v1/models"):
            message = f"Unknown request URL: {record.method} {record.path}."
            await _send_json(writer, 404, _error_body(message, "invalid_request_error", None))
        elif not self._authorized(record):
            # Like OpenAI, but the key is never echoed back, not even masked.
            message = "Incorrect or missing API key. Send 'Authorization: Bearer <key>'."
            body = _error_body(message, "invalid_request_error", "invalid_api_key")
            await _send_json(writer, 401, body)
        elif path == "/v1/models":
            if record.method != "GET":
                await _send_json(writer, 405, _method_not_allowed(record))
                return
            data = [{"id": m, "object": "model", "owned_by": "tokenhub-local"} for m in self.models]
            await _send_json(writer, 200, {"object": "list", "data": data})
        elif record.method != "POST":
            await _send_json(writer, 405, _method_not_allowed(record))
        elif record.json is None:
            message = "We could not parse the JSON body of your request."
            await _send_json(writer, 400, _error_body(message, "invalid_request_error", None))
        else:
            with self._lock:
                queued = self._scripts.popleft() if self._scripts else None
            script = queued if queued is not None else _unscripted(record.json or {})
            record.script = script
            await _Reply(self, record, writer, script, next(self._ids)).run()


def _method_not_allowed(record: ReceivedRequest) -> dict[str, object]:
    message = f"Method {record.method} not allowed for {record.path}."
    return _error_body(message, "invalid_request_error", "method_not_allowed")


async def _send_json(
    writer: _Writer,
    status: int,
    body: object,
    headers: Mapping[str, str] | None = None,
) -> None:
    data = _dumps(body)
    response_headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
    response_headers += list((headers or {}).items())
    await writer.start(status, response_headers)
    await writer.write(data)
    await writer.finish()


class _Reply:
    """Plays one script for one chat request."""

    def __init__(
        self,
        upstream: FakeChatUpstream,
        record: ReceivedRequest,
        writer: _Writer,
        script: Script,
        number: int,
    ) -> None:
        body = record.json or {}
        self.upstream = upstream
        self.writer = writer
        self.script = script
        self.body = body
        self.stream = body.get("stream") is True
        model = body.get("model")
        self.model = model if isinstance(model, str) and model else upstream.models[0]
        self.id = f"chatcmpl-local{number:08d}"
        self.created = int(time.time())
        self.delay = upstream.delay if script.delay is None else script.delay
        self.include_usage = _include_usage(body)
        self.completion_tokens = 0
        self.prompt_tokens = _prompt_tokens(body)
        if script.deltas is not None:
            self.deltas = list(script.deltas)
        elif script.text is not None:
            self.deltas = _split_wordish(script.text)
        elif script.tool_calls:
            self.deltas = []  # a tool turn, not a reply with calls after it
        else:
            self.deltas = _split_wordish(_default_reply(body))
        self.reasoning = _split_wordish(script.reasoning) if script.reasoning else []
        self.finish_reason = script.finish_reason
        if self.finish_reason == "auto":
            self.finish_reason = "tool_calls" if script.tool_calls else "stop"

    # helpers

    def usage(self) -> Mapping[str, object]:
        if self.script.usage is not None:
            return self.script.usage
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }

    def chunk(self, choices: list[dict[str, object]]) -> dict[str, object]:
        chunk: dict[str, object] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.script.usage_style == "every_chunk":
            chunk["usage"] = self.usage()
        elif self.include_usage:
            chunk["usage"] = None
        return chunk

    def delta_chunk(self, delta: Mapping[str, object]) -> dict[str, object]:
        return self.chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    async def idle(self, seconds: float) -> None:
        ping = b": keep-alive\n\n" if self.stream else b"\n"
        await self.writer.idle(seconds, self.script.keepalive, ping)

    async def send_frame(self, obj: object) -> None:
        await self.writer.write(_frame(obj))

    async def send_delta(self, delta: Mapping[str, object]) -> None:
        await self.idle(self.delay)
        self.completion_tokens += 1
        await self.send_frame(self.delta_chunk(delta))

    async def stall(self) -> None:
        await self.idle(_STALL_LIMIT)

    def headers(self, content_type: str) -> list[tuple[str, str]]:
        headers = [("content-type", content_type)]
        if content_type.startswith("text/event-stream"):
            headers += [("cache-control", "no-cache"), ("x-accel-buffering", "no")]
        headers += [("x-request-id", f"req_{self.id}")]
        return headers + list(self.script.headers.items())

    # the flows

    async def run(self) -> None:
        script = self.script
        if script.raw is not None:
            await self.run_raw(script.raw)
        elif script.status >= 400:
            await self.idle(script.first_delay)
            error = script.error
            if error is None:
                message = f"Scripted upstream error (HTTP {script.status})."
                error = _error_body(message, _error_type(script.status), None)
            await _send_json(self.writer, script.status, error, script.headers)
        elif self.stream:
            await self.run_stream()
        else:
            await self.run_json()

    async def run_raw(self, chunks: Sequence[bytes]) -> None:
        await self.writer.start(self.script.status, self.headers(self.script.content_type))
        await self.idle(self.script.first_delay)
        for i, data in enumerate(chunks):
            if i:
                await self.idle(self.delay)
            await self.writer.write(data)
        await self.end()

    async def end(self) -> None:
        if self.script.end == "stall":
            await self.stall()
        elif self.script.end in ("done", "close"):
            await self.writer.finish()
        # "cut": return without the final message; uvicorn then drops the connection
        # without the zero-length chunk (an incomplete chunked body).

    async def run_stream(self) -> None:
        script = self.script
        await self.writer.start(script.status, self.headers(script.content_type))
        await self.idle(script.first_delay)
        if script.empty_choices:
            await self.send_frame(_azure_prompt_filter_chunk())
        await self.send_frame(self.delta_chunk({"role": "assistant", "content": ""}))
        for piece in self.reasoning:
            await self.send_delta({script.reasoning_field: piece})
        for piece in self.deltas:
            await self.send_delta({"content": piece})
            if script.empty_choices:
                await self.send_frame(_azure_filter_chunk(self))
        for n, call in enumerate(script.tool_calls):
            for fragment in self.tool_call_fragments(n, call):
                await self.send_delta({"tool_calls": [fragment]})
        if script.error_frame is not None:
            await self.send_frame(script.error_frame)
        if script.end in ("cut", "stall"):
            await self.end()
            return
        if self.finish_reason is not None:
            finish = self.chunk(
                [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": self.finish_reason}]
            )
            if script.usage_style == "x_groq":
                finish["x_groq"] = {"id": f"req_{self.id}", "usage": self.usage()}
            await self.send_frame(finish)
        if self.include_usage and script.usage_style != "every_chunk":
            usage_chunk = self.chunk([])
            usage_chunk["usage"] = self.usage()
            await self.send_frame(usage_chunk)
        if script.end == "done":
            await self.writer.write(b"data: [DONE]\n\n")
        await self.writer.finish()

    def tool_call_fragments(self, n: int, call: ToolCall) -> list[dict[str, object]]:
        first: dict[str, object] = {
            "id": f"call_{self.id[-8:]}_{n}" if call.id is None else call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        fragments = [first] + [{"function": {"arguments": p}} for p in call.argument_pieces()]
        if self.script.tool_call_index:
            fragments = [{"index": n, **f} for f in fragments]
        return fragments

    async def run_json(self) -> None:
        script = self.script
        await self.writer.start(script.status, self.headers("application/json"))
        await self.idle(script.first_delay)
        message: dict[str, object] = {"role": "assistant", "content": "".join(self.deltas)}
        self.completion_tokens = len(self.deltas) + len(self.reasoning)
        if self.reasoning:
            message[script.reasoning_field] = "".join(self.reasoning)
        if script.tool_calls:
            calls: list[dict[str, object]] = []
            for n, call in enumerate(script.tool_calls):
                pieces = call.argument_pieces()
                self.completion_tokens += 1 + len(pieces)
                first = self.tool_call_fragments(n, call)[0]
                calls.append(
                    {**first, "function": {"name": call.name, "arguments": "".join(pieces)}}
                )
            message["tool_calls"] = calls
            if not self.deltas:
                message["content"] = None
        completion = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(),
        }
        data = _dumps(completion)
        if script.end == "cut":
            await self.writer.write(data[: len(data) // 2])
            return
        if script.end == "stall":
            await self.stall()
            return
        await self.writer.write(data)
        await self.writer.finish()


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _azure_prompt_filter_chunk() -> dict[str, object]:
    safe = {"filtered": False, "severity": "safe"}
    results = {k: safe for k in ("hate", "self_harm", "sexual", "violence")}
    return {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": results}],
    }


def _azure_filter_chunk(reply: _Reply) -> dict[str, object]:
    return {
        "choices": [],
        "created": reply.created,
        "id": reply.id,
        "model": reply.model,
        "object": "chat.completion.chunk",
        "prompt_filter_results": [],
    }


class _DropCutLog(logging.Filter):
    """Hide uvicorn's error line for our own deliberate `cut`, from our thread only."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_id: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread_id and record.msg == _CUT_LOG_MESSAGE)


@contextlib.contextmanager
def run_upstream(
    app: FakeChatUpstream | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    startup_timeout: float = 10.0,
    shutdown_timeout: float = 5.0,
) -> Iterator[RunningUpstream]:
    """Serve a `FakeChatUpstream` with uvicorn in a daemon thread.

    The socket is bound before the server starts (port 0 picks a free one), so there is
    no port race; the context manager waits until uvicorn serves and stops it on exit.
    It is a plain `with`, usable from sync tests and from asyncio or trio tests.

    ```python
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        with httpx.stream("POST", f"{running.base_url}/chat/completions", json=body) as r:
            for line in r.iter_lines():
                ...
    ```

    Args:
        app: the upstream to serve; a default `FakeChatUpstream()` when `None`.
        host: the address to bind.
        port: the port to bind; 0 picks a free one.
        log_level: uvicorn's log level.
        startup_timeout: the most seconds to wait for uvicorn to start.
        shutdown_timeout: the most seconds to wait for it to stop (then it is forced).

    Returns:
        A context manager yielding the `RunningUpstream`.

    Raises:
        ImportError: uvicorn is not installed (`pip install 'tokenhub_stream[cli]'`).
        RuntimeError: the server did not start in time.
        OSError: the address could not be bound.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(
            "run_upstream needs uvicorn; install it with: pip install 'tokenhub_stream[cli]'"
        ) from exc

    upstream = FakeChatUpstream() if app is None else app
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        bound_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            upstream,
            lifespan="off",
            log_level=log_level,
            log_config=None,
            ws="none",
            http="h11",
            loop="asyncio",
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(shutdown_timeout / 2)),
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"tokenhub-fake-upstream-{bound_port}",
            daemon=True,
        )
        log_filter = _DropCutLog()
        uvicorn_logger = logging.getLogger("uvicorn.error")
        uvicorn_logger.addFilter(log_filter)
        upstream._closing.clear()
        try:
            thread.start()
            log_filter.thread_id = thread.ident
            deadline = time.monotonic() + startup_timeout
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the fake upstream did not start")
                time.sleep(0.005)
            yield RunningUpstream(app=upstream, host=host, port=bound_port)
        finally:
            upstream._closing.set()
            server.should_exit = True
            thread.join(shutdown_timeout)
            if thread.is_alive():  # pragma: no cover - only when a handler ignores shutdown
                server.force_exit = True
                thread.join(shutdown_timeout)
            uvicorn_logger.removeFilter(log_filter)
    finally:
        sock.close()
