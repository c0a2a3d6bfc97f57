"""Plays one `Script` as the response to one chat request: SSE frames or a JSON completion.

Documented internal interface, used by `_upstream.py`: `Reply` plays a script,
`send_json` sends a whole JSON response, `error_body` builds an OpenAI-shaped error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

from ._requests import Exchange, ReceivedRequest
from ._rules import default_reply, include_usage, prompt_tokens, split_wordish
from ._script import Script, ScriptedToolCall

_STALL_LIMIT = 60.0


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _frame(obj: object) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def error_body(message: str, type_: str, code: str | None) -> dict[str, object]:
    """The OpenAI error shape: `{"error": {"message", "type", "code"}}`."""
    return {"error": {"message": message, "type": type_, "code": code}}


async def send_json(
    writer: Exchange,
    status: int,
    body: object,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Send `body` as a whole JSON response with `status` and extra `headers`."""
    data = _dumps(body)
    response_headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
    response_headers += list((headers or {}).items())
    await writer.start(status, response_headers)
    await writer.write(data)
    await writer.finish()


class Reply:
    """Plays one script for one chat request."""

    def __init__(
        self,
        record: ReceivedRequest,
        writer: Exchange,
        script: Script,
        *,
        number: int,
        default_model: str,
        default_delay: float,
    ) -> None:
        body = record.json or {}
        self.writer = writer
        self.script = script
        self.body = body
        self.stream = body.get("stream") is True
        model = body.get("model")
        self.model = model if isinstance(model, str) and model else default_model
        self.id = f"chatcmpl-local{number:08d}"
        self.created = int(time.time())
        self.delay = default_delay if script.delay is None else script.delay
        self.include_usage = include_usage(body)
        self.completion_tokens = 0
        self.prompt_tokens = prompt_tokens(body)
        if script.deltas is not None:
            self.deltas = list(script.deltas)
        elif script.text is not None:
            self.deltas = split_wordish(script.text)
        elif script.tool_calls or script.refusal is not None:
            self.deltas = []  # a tool turn or a refusal, not a reply with it after
        else:
            self.deltas = split_wordish(default_reply(body))
        self.reasoning = split_wordish(script.reasoning) if script.reasoning else []
        self.refusal = split_wordish(script.refusal) if script.refusal else []
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
                error = error_body(message, _error_type(script.status), None)
            await send_json(self.writer, script.status, error, script.headers)
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
        first: dict[str, object] = {"role": "assistant", "content": ""}
        if script.refusal is not None:
            first = {"role": "assistant", "content": None if not self.deltas else "", "refusal": ""}
        await self.send_frame(self.delta_chunk(first))
        for piece in self.reasoning:
            await self.send_delta({script.reasoning_field: piece})
        for piece in self.deltas:
            await self.send_delta({"content": piece})
            if script.empty_choices:
                await self.send_frame(_azure_filter_chunk(self))
        for piece in self.refusal:
            await self.send_delta({"refusal": piece})
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

    def tool_call_fragments(self, n: int, call: ScriptedToolCall) -> list[dict[str, object]]:
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
        if script.refusal is not None:
            self.completion_tokens += len(self.refusal)
            message["refusal"] = script.refusal
            if not self.deltas:
                message["content"] = None
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


def _azure_filter_chunk(reply: Reply) -> dict[str, object]:
    return {
        "choices": [],
        "created": reply.created,
        "id": reply.id,
        "model": reply.model,
        "object": "chat.completion.chunk",
        "prompt_filter_results": [],
    }
