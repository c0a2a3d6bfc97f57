from __future__ import annotations

import json
import logging
import socket
import sys
import time
from collections.abc import Iterator, Mapping

import anyio
import httpx
import pytest

from tokenhub_stream.testing import (
    DEFAULT_MODELS,
    FakeChatUpstream,
    RunningUpstream,
    Script,
    ScriptedToolCall,
    run_upstream,
)

KEY = "sk-test-0123456789-secret"


@pytest.fixture
def upstream() -> FakeChatUpstream:
    return FakeChatUpstream(delay=0.001)


@pytest.fixture
def running(upstream: FakeChatUpstream) -> Iterator[RunningUpstream]:
    with run_upstream(upstream) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


def chat(stream: bool = True, text: str = "Hello world", **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": text},
        ],
        **extra,
    }
    if stream:
        body["stream"] = True
    return body


def stream_lines(
    client: httpx.Client, running: RunningUpstream, body: Mapping[str, object] | None = None
) -> list[str]:
    url = f"{running.base_url}/chat/completions"
    with client.stream("POST", url, json=body or chat()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        return list(response.iter_lines())


def frames(lines: list[str]) -> list[dict[str, object]]:
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: ") :]))
    return out


def choice(frame: Mapping[str, object]) -> dict[str, object]:
    choices = frame["choices"]
    assert isinstance(choices, list) and len(choices) == 1
    first = choices[0]
    assert isinstance(first, dict)
    return first


def deltas(lines: list[str], key: str = "content") -> list[object]:
    out = []
    for frame in frames(lines):
        choices = frame["choices"]
        assert isinstance(choices, list)
        for c in choices:
            if key in c.get("delta", {}):
                out.append(c["delta"][key])
    return out


def content(lines: list[str]) -> str:
    return "".join(str(d) for d in deltas(lines))


def finish_reasons(lines: list[str]) -> list[object]:
    return [c["finish_reason"] for f in frames(lines) for c in f["choices"]]  # type: ignore[attr-defined]


def read_chunked(port: int, body: Mapping[str, object]) -> list[bytes]:
    """Send one raw HTTP/1.1 request and return the body's chunks as framed on the wire."""
    payload = json.dumps(body).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request + payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks: list[bytes] = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


# default reply and framing


def test_default_reply_quotes_the_last_user_message(
    client: httpx.Client, running: RunningUpstream
) -> None:
    lines = stream_lines(client, running, chat(text="  what   is SSE? "))
    first = choice(frames(lines)[0])
    assert first["delta"] == {"role": "assistant", "content": ""}
    text = content(lines)
    assert text.startswith('You said: "what is SSE?". That is 3 words.')
    assert len(deltas(lines)) > 10  # word-ish pieces, not one blob
    assert finish_reasons(lines)[-1] == "stop"
    assert lines[-2:] == ["data: [DONE]", ""]
    # Deterministic: the same question gets the same reply.
    assert content(stream_lines(client, running, chat(text="what is SSE?"))) == text


def test_default_reply_chunk_shape(client: httpx.Client, running: RunningUpstream) -> None:
    lines = stream_lines(client, running, chat(model="deepseek-chat"))
    data_lines = [line[len("data: ") :] for line in lines if line.startswith("data: {")]
    for data in data_lines:
        # Compact JSON with UTF-8 text, like OpenAI.
        compact = json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False)
        assert data == compact
    frame = frames(lines)[1]
    assert str(frame["id"]).startswith("chatcmpl-")
    assert frame["object"] == "chat.completion.chunk"
    assert frame["model"] == "deepseek-chat"
    assert isinstance(frame["created"], int)
    assert choice(frame)["index"] == 0 and choice(frame)["finish_reason"] is None
    assert "usage" not in frame


def test_each_event_is_one_http_chunk(upstream: FakeChatUpstream, running: RunningUpstream) -> None:
    upstream.enqueue(Script(deltas=["a", "b", "c"]))
    chunks = read_chunked(running.port, chat())
    assert len(chunks) == 6  # role, a, b, c, finish, [DONE]
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        assert chunk.count(b"\n\n") == 1
    assert chunks[-1] == b"data: [DONE]\n\n"


def test_default_reply_without_user_message(client: httpx.Client, running: RunningUpstream) -> None:
    lines = stream_lines(client, running, {"model": "gpt-4o", "messages": [], "stream": True})
    assert content(lines).startswith("Hello!")


def test_default_reply_multimodal_content(client: httpx.Client, running: RunningUpstream) -> None:
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": parts}]}
    assert content(stream_lines(client, running, body)).startswith('You said: "look".')


# scripted text, deltas and timing


def test_script_deltas_sent_exactly(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["Hel", "lo, ", "wörld ✓"]))
    assert deltas(stream_lines(client, running)) == ["", "Hel", "lo, ", "wörld ✓"]


def test_script_text_split_wordish(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(text="One  two\nthree "))
    assert deltas(stream_lines(client, running))[1:] == ["One", "  two", "\nthree", " "]


def test_scripts_are_fifo_then_default(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(text="first"), Script(text="second"))
    assert upstream.pending_scripts == 2
    assert content(stream_lines(client, running)) == "first"
    assert content(stream_lines(client, running)) == "second"
    assert content(stream_lines(client, running)).startswith("You said:")
    assert upstream.pending_scripts == 0
    assert [r.script for r in upstream.requests][:2] == [
        Script(text="first"),
        Script(text="second"),
    ]


def test_script_delay_between_chunks(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["a", "b", "c", "d"], delay=0.05))
    start = time.monotonic()
    stream_lines(client, running)
    assert time.monotonic() - start >= 0.2


def test_upstream_default_delay_used(client: httpx.Client) -> None:
    upstream = FakeChatUpstream(delay=0.04)
    upstream.enqueue(Script(deltas=["a", "b", "c"]))
    with run_upstream(upstream) as running:
        start = time.monotonic()
        stream_lines(client, running)
        assert time.monotonic() - start >= 0.12


@pytest.mark.timing
def test_issue_16_run_upstream_answers_without_a_nagle_delay(
    client: httpx.Client, running: RunningUpstream
) -> None:
    # A response is several small writes (headers, body, end). On a socket without
    # TCP_NODELAY, Nagle held each second write for the client's delayed ACK: 40 ms a
    # request, 0.4 s for these ten.
    client.get(f"{running.base_url}/models")  # the connection is open and warm
    start = time.monotonic()
    for _ in range(10):
        assert client.get(f"{running.base_url}/models").status_code == 200
    assert time.monotonic() - start < 0.2


@pytest.mark.timing
def test_script_first_delay_after_headers(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["x"], first_delay=0.2))
    start = time.monotonic()
    with client.stream("POST", f"{running.base_url}/chat/completions", json=chat()) as response:
        headers_at = time.monotonic() - start
        lines = response.iter_lines()
        next(lines)
        first_line_at = time.monotonic() - start
        list(lines)
    assert headers_at < 0.15
    assert first_line_at >= 0.2


def test_script_keepalive_comments_while_waiting(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["x"], first_delay=0.2, keepalive=0.03))
    lines = stream_lines(client, running)
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert lines[:first_data].count(": keep-alive") >= 3
    assert lines.count(": keep-alive") == lines[:first_data].count(": keep-alive")


def test_script_no_keepalive_by_default(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["x"], first_delay=0.1))
    assert not [line for line in stream_lines(client, running) if line.startswith(":")]


# how the stream ends


def test_script_end_done(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(text="hi", end="done"))
    lines = stream_lines(client, running)
    assert "data: [DONE]" in lines
    assert finish_reasons(lines)[-1] == "stop"
    request = upstream.requests[-1]
    assert request.wait_finished(1.0)
    assert request.completed and not request.disconnected


def test_script_end_close_has_finish_but_no_done(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(text="hi", end="close"))
    lines = stream_lines(client, running)
    assert "data: [DONE]" not in lines
    assert finish_reasons(lines)[-1] == "stop"
    assert upstream.requests[-1].wait_finished(1.0)
    assert upstream.requests[-1].completed


def test_script_finish_reason_none_and_custom(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(
        Script(text="hi", finish_reason=None), Script(text="x", finish_reason="length")
    )
    lines = stream_lines(client, running)
    assert set(finish_reasons(lines)) == {None} and "data: [DONE]" in lines
    assert finish_reasons(stream_lines(client, running))[-1] == "length"


def test_script_end_cut_raises_remote_protocol_error(
    client: httpx.Client,
    upstream: FakeChatUpstream,
    running: RunningUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.enqueue(Script(deltas=["par", "tial"], end="cut"))
    received: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):
        url = f"{running.base_url}/chat/completions"
        with client.stream("POST", url, json=chat()) as response:
            for chunk in response.iter_raw():
                received.append(chunk)
    body = b"".join(received)
    assert b'"content":"tial"' in body
    assert b'finish_reason":"stop' not in body and b"[DONE]" not in body
    request = upstream.requests[-1]
    assert request.wait_finished(1.0)
    assert not request.completed
    # Our deliberate cut does not spam uvicorn's error log.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_script_stall_records_client_disconnect(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["think", "ing"], end="stall"))
    url = f"{running.base_url}/chat/completions"
    with client.stream("POST", url, json=chat()) as response:
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(6)]  # role, blank, think, blank, ing, blank
    closed_at = time.monotonic()
    assert content(seen) == "thinking"
    request = upstream.requests[-1]
    assert request.wait_disconnected(1.0)
    assert request.disconnected_at is not None
    assert request.disconnected_at - closed_at < 1.0
    assert request.wait_finished(1.0) and not request.completed


def test_received_request_last_write_at_is_when_the_last_bytes_went_out(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    # A proxy's read timeout counts from the upstream's last write: tests time it from
    # here, not from the client's last delta, which the relay delivers later.
    upstream.enqueue(Script(deltas=["a", "b"], delay=0.2, end="stall"))
    url = f"{running.base_url}/chat/completions"
    with client.stream("POST", url, json=chat()) as response:
        for line in response.iter_lines():
            if '"content":"b"' in line:
                seen_at = time.monotonic()
                break
        request = upstream.requests[-1]
        written = request.last_write_at
        assert written is not None
        # "b" went out after two delays, and no byte since (a stall without keep-alives).
        assert request.received_at + 2 * 0.2 <= written <= seen_at
    assert request.wait_finished(1.0)
    assert request.last_write_at == written


def test_script_stall_sends_keepalives(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["x"], end="stall", keepalive=0.02))
    url = f"{running.base_url}/chat/completions"
    with client.stream("POST", url, json=chat()) as response:
        pings = 0
        for line in response.iter_lines():
            pings += line == ": keep-alive"
            if pings == 3:
                break
    assert upstream.requests[-1].wait_disconnected(1.0)


def test_completed_stream_is_not_a_disconnect(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    stream_lines(client, running)
    request = upstream.requests[-1]
    assert request.wait_finished(1.0)
    assert not request.wait_disconnected(0.1)
    assert request.disconnected_at is None


def test_run_upstream_shutdown_ends_a_stalled_stream(upstream: FakeChatUpstream) -> None:
    upstream.enqueue(Script(deltas=["x"], end="stall"))
    with httpx.Client(timeout=5) as client:
        with run_upstream(upstream) as running:
            request = client.build_request(
                "POST", f"{running.base_url}/chat/completions", json=chat()
            )
            response = client.send(request, stream=True)
            assert upstream.wait_for_requests(1, 1.0)
            start = time.monotonic()
        assert time.monotonic() - start < 2.0
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
        response.close()


# errors


def test_script_error_status_with_retry_after(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(status=429, headers={"Retry-After": "7"}))
    response = client.post(f"{running.base_url}/chat/completions", json=chat())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["type"] == "rate_limit_error"


def test_script_error_body_verbatim(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    body = {"error": {"message": "overloaded", "type": "server_error", "code": "overloaded"}}
    upstream.enqueue(Script(status=503, error=body))
    response = client.post(f"{running.base_url}/chat/completions", json=chat())
    assert response.status_code == 503
    assert response.json() == body


def test_script_error_frame_then_done(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    frame = {"object": "error", "message": "model crashed", "type": "InternalServerError"}
    upstream.enqueue(Script(deltas=["a"], error_frame=frame, finish_reason=None))
    lines = stream_lines(client, running)
    assert frames(lines)[-1] == frame
    assert lines[-2:] == ["data: [DONE]", ""]


def test_script_error_frame_then_close(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    frame = {"error": {"message": "bad tool", "code": "tool_use_failed", "status_code": 400}}
    upstream.enqueue(Script(deltas=["a"], error_frame=frame, finish_reason=None, end="close"))
    lines = stream_lines(client, running)
    assert frames(lines)[-1] == frame
    assert "data: [DONE]" not in lines


# tool calls, reasoning, usage, Azure


def test_script_tool_calls_with_index(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    calls = [
        ScriptedToolCall(name="get_weather", arguments='{"city":"Paris","unit":"C"}', id="call_1"),
        ScriptedToolCall(name="noop", pieces=["{", "}"]),
    ]
    upstream.enqueue(Script(tool_calls=calls))
    lines = stream_lines(client, running)
    fragments = [f[0] for f in deltas(lines, "tool_calls")]  # type: ignore[index]
    assert all("index" in f for f in fragments)
    by_index: dict[int, str] = {}
    for f in fragments:
        by_index[f["index"]] = by_index.get(f["index"], "") + f["function"]["arguments"]
    assert by_index == {0: '{"city":"Paris","unit":"C"}', 1: "{}"}
    firsts = [f for f in fragments if "id" in f]
    assert [f["function"]["name"] for f in firsts] == ["get_weather", "noop"]
    assert firsts[0]["id"] == "call_1" and firsts[1]["id"].startswith("call_")
    assert firsts[0]["type"] == "function"
    assert finish_reasons(lines)[-1] == "tool_calls"


def test_script_tool_calls_without_index(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    call = ScriptedToolCall(name="f", arguments='{"a":1}', id="")
    upstream.enqueue(Script(tool_calls=[call], tool_call_index=False, finish_reason="stop"))
    lines = stream_lines(client, running)
    fragments = [f[0] for f in deltas(lines, "tool_calls")]  # type: ignore[index]
    assert len(fragments) == 2
    assert not any("index" in f for f in fragments)
    assert fragments[0]["id"] == ""
    assert finish_reasons(lines)[-1] == "stop"


def test_usage_chunk_only_with_include_usage(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["a", "b"]), Script(deltas=["a", "b"]))
    without = frames(stream_lines(client, running, chat()))
    assert not [f for f in without if "usage" in f]
    body = chat(stream_options={"include_usage": True})
    with_usage = frames(stream_lines(client, running, body))
    last = with_usage[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert all(f["usage"] is None for f in with_usage[:-1])


def test_usage_override_and_every_chunk(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    upstream.enqueue(Script(deltas=["a", "b"], usage=usage, usage_style="every_chunk"))
    got = frames(stream_lines(client, running, chat(stream_options={"include_usage": True})))
    assert len(got) == 4 and all(f["usage"] == usage for f in got)
    assert all(f["choices"] for f in got)


def test_usage_every_chunk_is_cumulative(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["a", "b"], usage_style="every_chunk"))
    got = frames(stream_lines(client, running))
    completion = [f["usage"]["completion_tokens"] for f in got]  # type: ignore[index]
    assert completion == [0, 1, 2, 2]


def test_usage_x_groq(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["a"], usage_style="x_groq"))
    got = frames(stream_lines(client, running))
    assert [f for f in got if "x_groq" in f] == [got[-1]]
    assert got[-1]["x_groq"]["usage"]["completion_tokens"] == 1  # type: ignore[index]
    assert choice(got[-1])["finish_reason"] == "stop"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_script_reasoning_field(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream, field: str
) -> None:
    upstream.enqueue(Script(reasoning="Let me think.", text="42", reasoning_field=field))
    lines = stream_lines(client, running)
    assert "".join(str(d) for d in deltas(lines, field)) == "Let me think."
    other = {"reasoning_content", "reasoning"} - {field}
    assert deltas(lines, other.pop()) == []
    kinds = [next(iter(choice(f)["delta"])) for f in frames(lines)[1:-1]]  # type: ignore[call-overload]
    assert kinds == [field] * 3 + ["content"]


def test_script_azure_empty_choices(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["a", "b"], empty_choices=True))
    got = frames(stream_lines(client, running))
    first = got[0]
    assert first["choices"] == [] and first["prompt_filter_results"]
    assert first["id"] == "" and first["model"] == "" and first["object"] == ""
    empties = [i for i, f in enumerate(got) if f["choices"] == []]
    assert empties == [0, 3, 5]  # prompt filter, then a filter frame after each content chunk
    assert [choice(f)["delta"] for f in got[2:6:2]] == [{"content": "a"}, {"content": "b"}]


# raw bytes and content type


def test_script_raw_bytes_exactly(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    snowman = "☃".encode()
    raw = [b'\xef\xbb\xbfdata: {"a":"', snowman[:1], snowman[1:] + b'"}\r\n', b"\r\n", b"x"]
    upstream.enqueue(Script(raw=raw, content_type="text/plain", headers={"X-Test": "1"}))
    url = f"{running.base_url}/chat/completions"
    with client.stream("POST", url, json=chat()) as response:
        assert response.headers["content-type"] == "text/plain"
        assert response.headers["x-test"] == "1"
        assert b"".join(response.iter_raw()) == b"".join(raw)


def test_script_raw_chunks_on_the_wire(
    upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    raw = [b"data: 1\r\n\r\n", b"data: 2\r", b"\n\r\n"]
    upstream.enqueue(Script(raw=raw))
    assert read_chunked(running.port, chat()) == raw


def test_script_raw_cut(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(raw=[b"data: {}\n\n"], end="cut"))
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{running.base_url}/chat/completions", json=chat())


# auth, routes, non-streaming


def test_bearer_key_required_and_never_echoed(client: httpx.Client) -> None:
    upstream = FakeChatUpstream(api_key=KEY, delay=0.001)
    with run_upstream(upstream) as running:
        url = f"{running.base_url}/chat/completions"
        missing = client.post(url, json=chat())
        wrong = client.post(url, json=chat(), headers={"Authorization": f"Bearer {KEY}x"})
        models = client.get(f"{running.base_url}/models")
        ok = client.post(url, json=chat(stream=False), headers={"Authorization": f"Bearer {KEY}"})
    for response in (missing, wrong, models):
        assert response.status_code == 401
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code"}
        assert error["code"] == "invalid_api_key"
        assert KEY not in response.text and KEY[:12] not in response.text
    assert ok.status_code == 200
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(upstream.requests[-1]) and KEY not in repr(upstream)


def test_models_route(client: httpx.Client, running: RunningUpstream) -> None:
    response = client.get(f"{running.base_url}/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(DEFAULT_MODELS)
    assert {"claude-3-5-sonnet-20241022", "gpt-4o", "gemini-2.0-flash", "deepseek-chat"} <= {
        m["id"] for m in body["data"]
    }
    assert all(m["object"] == "model" and m["owned_by"] == "tokenhub-local" for m in body["data"])


def test_models_route_custom_list(client: httpx.Client) -> None:
    with run_upstream(FakeChatUpstream(models=["m1"])) as running:
        assert client.get(f"{running.base_url}/models").json()["data"][0]["id"] == "m1"
        response = client.post(
            f"{running.base_url}/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.json()["model"] == "m1"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("POST", "/chat/completions", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
    ],
)
def test_other_routes_get_openai_errors(
    client: httpx.Client, running: RunningUpstream, method: str, path: str, status: int
) -> None:
    response = client.request(method, f"http://127.0.0.1:{running.port}{path}")
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "code"}


def test_bad_json_is_400_and_keeps_the_script(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(text="kept"))
    response = client.post(f"{running.base_url}/chat/completions", content=b"{nope")
    assert response.status_code == 400
    assert upstream.pending_scripts == 1
    assert upstream.requests[-1].json is None and upstream.requests[-1].body == b"{nope"


def test_non_streaming_json(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["Hi", " there"], reasoning="hmm"))
    response = client.post(f"{running.base_url}/chat/completions", json=chat(stream=False))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o"
    assert body["id"].startswith("chatcmpl-")
    first = body["choices"][0]
    assert first["message"] == {
        "role": "assistant",
        "content": "Hi there",
        "reasoning_content": "hmm",
    }
    assert first["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_non_streaming_default_reply_and_tool_calls(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    url = f"{running.base_url}/chat/completions"
    default = client.post(url, json=chat(stream=False, text="yo")).json()
    assert default["choices"][0]["message"]["content"].startswith('You said: "yo".')
    upstream.enqueue(
        Script(deltas=[], tool_calls=[ScriptedToolCall(name="f", arguments="{}", id="c")])
    )
    body = client.post(url, json=chat(stream=False)).json()
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("end", ["cut", "stall"])
def test_non_streaming_cut_and_stall(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream, end: str
) -> None:
    upstream.enqueue(Script(text="hi", end=end))  # type: ignore[arg-type]
    if end == "cut":
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(f"{running.base_url}/chat/completions", json=chat(stream=False))
    else:
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                f"{running.base_url}/chat/completions", json=chat(stream=False), timeout=0.2
            )
        assert upstream.requests[-1].wait_disconnected(1.0)


# recording


def test_requests_recorded(
    client: httpx.Client, upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    before = time.monotonic()
    stream_lines(client, running)
    client.get(f"{running.base_url}/models?x=1", headers={"X-Trace": "abc"})
    assert upstream.wait_for_requests(2, 1.0)
    assert not upstream.wait_for_requests(3, 0.05)
    chat_request, models_request = upstream.requests
    assert chat_request.method == "POST" and chat_request.path == "/v1/chat/completions"
    assert chat_request.json is not None and chat_request.json["model"] == "gpt-4o"
    assert chat_request.headers["content-type"] == "application/json"
    assert before <= chat_request.received_at <= models_request.received_at
    assert models_request.query == "x=1" and models_request.headers["x-trace"] == "abc"
    assert chat_request.script == Script()
    assert models_request.script is None


def test_requests_snapshot_is_a_copy(upstream: FakeChatUpstream) -> None:
    upstream.requests.append(None)  # type: ignore[arg-type]
    assert upstream.requests == []


# async callers


@pytest.mark.anyio
async def test_async_client_streams_from_thread_server(
    upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    upstream.enqueue(Script(deltas=["a", "b"]), Script(deltas=["c"], end="stall"))
    url = f"{running.base_url}/chat/completions"
    async with httpx.AsyncClient(timeout=5) as client:
        with anyio.fail_after(5):
            async with client.stream("POST", url, json=chat()) as response:
                lines = [line async for line in response.aiter_lines()]
            assert content(lines) == "ab" and lines[-2] == "data: [DONE]"
            # Ends by a read timeout rather than `break`: under trio, httpcore's nested
            # async generators warn when a loop over them is left early.
            lines = []
            with pytest.raises(httpx.ReadTimeout):
                async with client.stream("POST", url, json=chat(), timeout=0.3) as response:
                    async for line in response.aiter_lines():
                        lines.append(line)
    assert content(lines) == "c"
    assert await anyio.to_thread.run_sync(upstream.requests[-1].wait_disconnected, 1.0)


@pytest.mark.anyio
async def test_app_works_in_process_with_asgi_transport(upstream: FakeChatUpstream) -> None:
    upstream.enqueue(Script(text="in process"))
    transport = httpx.ASGITransport(app=upstream)
    async with httpx.AsyncClient(transport=transport, base_url="http://t/v1") as client:
        response = await client.post("/chat/completions", json=chat())
        models = await client.get("/models")
    assert '"content":" process"' in response.text
    assert response.text.endswith("data: [DONE]\n\n")
    assert models.json()["object"] == "list"


# the ASGI surface, by hand


@pytest.mark.anyio
async def test_app_lifespan_and_non_http_scopes() -> None:
    app = FakeChatUpstream()
    incoming: Iterator[dict[str, object]] = iter(
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    )
    sent: list[object] = []

    async def receive() -> dict[str, object]:
        return next(incoming)

    async def send(message: dict[str, object]) -> None:
        sent.append(message["type"])

    with anyio.fail_after(1):
        await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    with pytest.raises(RuntimeError, match="http only"):
        await app({"type": "websocket"}, receive, send)


@pytest.mark.anyio
async def test_app_failing_send_counts_as_disconnect() -> None:
    app = FakeChatUpstream(delay=0)
    body = json.dumps(chat()).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    writes = 0

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, object]) -> None:
        nonlocal writes
        writes += 1
        if writes == 3:
            raise OSError("broken pipe")

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    with anyio.fail_after(1):
        await app(scope, receive, send)
    request = app.requests[-1]
    assert request.disconnected and request.finished and not request.completed
    assert writes == 3


@pytest.mark.anyio
async def test_app_disconnect_while_reading_body_is_not_served() -> None:
    app = FakeChatUpstream()

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        raise AssertionError("nothing must be sent")  # pragma: no cover

    await app({"type": "http", "method": "POST", "path": "/v1/chat/completions"}, receive, send)
    assert app.requests == []


# construction


@pytest.mark.parametrize(
    "kwargs",
    [
        {"end": "explode"},
        {"usage_style": "sometimes"},
        {"delay": -1},
        {"keepalive": 0},
        {"first_delay": -0.1},
        {"status": 42},
    ],
)
def test_script_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Script(**kwargs)  # type: ignore[arg-type]


def test_upstream_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        FakeChatUpstream(delay=-1)
    with pytest.raises(ValueError):
        FakeChatUpstream(models=[])
    with pytest.raises(ValueError):
        FakeChatUpstream(models="gpt-4o")
    with pytest.raises(TypeError):
        FakeChatUpstream().enqueue("hi")  # type: ignore[arg-type]


def test_run_upstream_without_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ImportError, match=r"pip install 'tokenhub_stream\[cli\]'"):
        with run_upstream():
            pass  # pragma: no cover


def test_run_upstream_default_app_and_base_url(client: httpx.Client) -> None:
    with run_upstream() as running:
        assert running.base_url == f"http://127.0.0.1:{running.port}/v1"
        assert isinstance(running.app, FakeChatUpstream)
        assert client.get(f"{running.base_url}/models").status_code == 200
    with pytest.raises(httpx.ConnectError):
        client.get(f"{running.base_url}/models")


def test_default_reply_truncates_long_messages(
    client: httpx.Client, running: RunningUpstream
) -> None:
    text = content(stream_lines(client, running, chat(text="word " * 100)))
    quoted = text.split('"')[1]
    assert len(quoted) == 200 and quoted.endswith("…")
    odd = {"model": "m", "stream": True, "messages": "not a list"}
    assert content(stream_lines(client, running, odd)).startswith("Hello!")


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (500, "server_error")],
)
def test_script_error_status_types(
    client: httpx.Client,
    upstream: FakeChatUpstream,
    running: RunningUpstream,
    status: int,
    error_type: str,
) -> None:
    upstream.enqueue(Script(status=status))
    response = client.post(f"{running.base_url}/chat/completions", json=chat())
    assert response.status_code == status
    assert response.json()["error"]["type"] == error_type
