from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenhub_stream import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ChunkParser,
    ContentDelta,
    FinishEvent,
    NotFoundError,
    ProtocolError,
    RateLimitError,
    ReasoningDelta,
    ServerError,
    ToolCallDelta,
    TruncatedStreamError,
    Usage,
    UsageEvent,
)
from tokenhub_stream._errors import error_from_status, retry_after_seconds


def frame(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(
    delta: dict[str, object] | None = None, finish: str | None = None, **extra: object
) -> bytes:
    choice: dict[str, object] = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return frame({"object": "chat.completion.chunk", "choices": [choice], **extra})


DONE = b"data: [DONE]\n\n"


def texts(*chunks: bytes) -> tuple[list[str], ChunkParser]:
    parser = ChunkParser()
    out: list[str] = []
    for c in chunks:
        out.extend(parser.feed_text(c))
    parser.feed_eof()
    return out, parser


def test_chunks_text_and_message() -> None:
    out, p = texts(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({}, "stop"),
        DONE,
    )
    assert out == ["Hel", "lo"]
    assert p.error is None and p.done
    m = p.message()
    assert (m.role, m.content, m.finish_reason, m.tool_calls) == ("assistant", "Hello", "stop", ())


def test_chunks_done_stops_at_once() -> None:
    out, p = texts(chunk({"content": "a"}) + DONE + chunk({"content": "never"}))
    assert out == ["a"] and p.done and p.error is None


def test_chunks_quirks_never_break_text() -> None:
    azure_first = frame(
        {"id": "", "object": "", "model": "", "choices": [], "prompt_filter_results": []}
    )
    azure_filter = frame(
        {"choices": [{"index": 0, "content_filter_results": {}, "content_filter_offsets": {}}]}
    )
    out, p = texts(
        azure_first,
        chunk({"role": "assistant"}),
        chunk({"content": None}),
        chunk({"content": "x"}),
        azure_filter,
        chunk(
            {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]}
        ),
        chunk({"content": "y"}),
        chunk({}, "stop"),
        frame(
            {
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        ),
        DONE,
    )
    assert out == ["x", "y"]
    assert p.error is None
    assert p.usage == Usage(3, 2, 5)


def test_chunks_other_choices_skipped() -> None:
    body = frame(
        {
            "choices": [
                {"index": 1, "delta": {"content": "B"}},
                {"index": 0, "delta": {"content": "A"}},
            ]
        }
    )
    out, _ = texts(body, chunk({}, "stop"))
    assert out == ["A"]


def test_chunks_close_after_finish_reason_is_normal_end() -> None:
    out, p = texts(chunk({"content": "a"}), chunk({}, "length"))
    assert out == ["a"] and p.error is None and p.finished and not p.done


def test_chunks_close_without_done_or_finish_is_truncated() -> None:
    out, p = texts(chunk({"content": "a"}), b'data: {"choi')
    assert out == ["a"]
    assert isinstance(p.error, TruncatedStreamError)


def test_chunks_invalid_json_after_deltas() -> None:
    parser = ChunkParser()
    out = parser.feed_text(
        chunk({"content": "a"}) + b"data: {not json\n\n" + chunk({"content": "b"})
    )
    assert out == ["a"]
    assert isinstance(parser.error, ProtocolError)
    assert parser.feed_text(chunk({"content": "c"})) == []  # stopped


@pytest.mark.parametrize(
    "bad",
    [
        b"data: [1, 2]\n\n",
        b'data: {"choices": {"a": 1}}\n\n',
        b'data: {"choices": [1]}\n\n',
        b'data: {"choices": [{"delta": [1]}]}\n\n',
        b'data: {"choices": [{"delta": {"content": 5}}]}\n\n',
        b'data: {"choices": [{"delta": {"tool_calls": {"a": 1}}}]}\n\n',
        b'data: {"choices": [{"delta": {"tool_calls": [3]}}]}\n\n',
        b'data: {"choices": [{"delta": {"tool_calls": [{"function": 3}]}}]}\n\n',
        b'data: {"choices": [{"delta": {"tool_calls": [{"function": {"name": 3}}]}}]}\n\n',
        b'data: {"choices": [{"delta": {"tool_calls": [{"id": 3}]}}]}\n\n',
        b'data: {"choices": [{"delta": {"reasoning_content": 3}}]}\n\n',
        b"data: " + b"[" * 100_000 + b"\n\n",
    ],
)
def test_chunks_bad_shapes_are_protocol_errors(bad: bytes) -> None:
    for mode in ("text", "events"):
        parser = ChunkParser()
        (parser.feed_text if mode == "text" else parser.feed_events)(bad)
        assert isinstance(parser.error, ProtocolError), (mode, parser.error)


def test_chunks_oversized_event_is_protocol_error() -> None:
    parser = ChunkParser(max_event_bytes=100)
    assert parser.feed_text(chunk({"content": "x" * 200})) == []
    assert isinstance(parser.error, ProtocolError)
    parser = ChunkParser(max_event_bytes=100)
    assert parser.feed_events(chunk({"content": "x" * 200})) == []
    assert isinstance(parser.error, ProtocolError)


@pytest.mark.parametrize(
    ("frame_obj", "cls", "status", "code"),
    [
        (
            {"error": {"message": "slow down", "type": "rate_limit_error"}},
            RateLimitError,
            429,
            "rate_limit_error",
        ),
        (
            {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400},
            BadRequestError,
            400,
            "BadRequestError",
        ),
        (
            {
                "error": {
                    "message": "tool",
                    "type": "invalid_request_error",
                    "code": "tool_use_failed",
                    "status_code": 400,
                }
            },
            BadRequestError,
            400,
            "tool_use_failed",
        ),
        (
            {
                "error": {"code": 502, "message": "provider down"},
                "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
            },
            ServerError,
            502,
            None,
        ),
        (
            {"error": {"message": "who?", "code": "invalid_api_key"}},
            AuthenticationError,
            401,
            "invalid_api_key",
        ),
        (
            {"error": {"message": "no model", "code": "model_not_found"}},
            NotFoundError,
            404,
            "model_not_found",
        ),
        ({"error": "plain string"}, APIError, None, None),
        (
            {"error": {"message": "overloaded", "type": "overloaded_error"}},
            ServerError,
            529,
            "overloaded_error",
        ),
    ],
)
def test_chunks_error_frames(
    frame_obj: dict[str, object], cls: type[APIError], status: int | None, code: str | None
) -> None:
    parser = ChunkParser()
    out = parser.feed_text(chunk({"content": "before"}) + frame(frame_obj))
    assert out == ["before"]
    assert type(parser.error) is cls
    assert isinstance(parser.error, APIError)
    assert (parser.error.status_code, parser.error.code) == (status, code)


def test_chunks_error_frame_and_http_status_raise_the_same_class() -> None:
    for status in (400, 401, 403, 404, 422, 429, 500, 503):
        body = json.dumps({"error": {"message": "m", "status_code": status}}).encode()
        from_status = error_from_status(status, body, {})
        parser = ChunkParser()
        parser.feed_text(b"data: " + body + b"\n\n")
        assert type(parser.error) is type(from_status), status
        assert isinstance(parser.error, APIError)
        assert parser.error.retryable == from_status.retryable == (status in (429, 500, 503))


def test_chunks_error_status_parsing() -> None:
    e = error_from_status(
        429,
        b'{"error":{"message":"quota","code":"insufficient_quota"}}',
        {"retry-after": "3", "x-request-id": "req_1"},
    )
    assert isinstance(e, RateLimitError)
    assert (e.message, e.code, e.retry_after, e.request_id, e.retryable) == (
        "quota",
        "insufficient_quota",
        3.0,
        "req_1",
        False,
    )
    e = error_from_status(500, b"<html>oops</html>", {})
    assert isinstance(e, ServerError) and e.message == "<html>oops</html>" and e.retryable
    e = error_from_status(418, b"", {}, reason="I'm a teapot")
    assert type(e) is APIError and e.message == "I'm a teapot" and not e.retryable
    e = error_from_status(422, b'{"detail": "field required"}', {})
    assert isinstance(e, BadRequestError) and e.message == "field required"
    e = error_from_status(
        401,
        b'{"error":{"message":"Incorrect API key provided: sk-th_secret"}}',
        {},
        redact=lambda t: t.replace("sk-th_secret", "***"),
    )
    assert "sk-th_secret" not in str(e) and "***" in str(e)


def test_chunks_retry_after_forms() -> None:
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_chunks_usage_normalised() -> None:
    # usage on every chunk (Gemini, continuous_usage_stats): keep the last, never sum
    _, p = texts(
        chunk(
            {"content": "a"}, usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        ),
        chunk(
            {"content": "b"}, usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        ),
        chunk({}, "stop", usage=None),
    )
    assert p.usage == Usage(5, 2, 7)
    # Groq's x_groq.usage
    _, p = texts(
        chunk({}, "stop", x_groq={"id": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 4}})
    )
    assert p.usage == Usage(1, 4, 5)
    # absent usage is None, never zeros
    _, p = texts(chunk({"content": "a"}), chunk({}, "stop"))
    assert p.usage is None
    # details
    u = Usage.from_dict(
        {
            "input_tokens": 2,
            "output_tokens": 3,
            "completion_tokens_details": {"reasoning_tokens": 1},
            "prompt_tokens_details": {"cached_tokens": 2},
        }
    )
    assert u == Usage(2, 3, 5, 1, 2)


def test_chunks_events_mode() -> None:
    parser = ChunkParser()
    events = parser.feed_events(
        chunk({"role": "assistant", "reasoning_content": "think"})
        + chunk({"reasoning": "ing"})
        + chunk({"content": "hi"})
        + chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ]
            }
        )
        + chunk({}, "tool_calls")
        + frame(
            {
                "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
        )
        + DONE
    )
    assert events == [
        ReasoningDelta("think"),
        ReasoningDelta("ing"),
        ContentDelta("hi"),
        ToolCallDelta(0, "c1", "f", "{}"),
        FinishEvent("tool_calls"),
        UsageEvent(Usage(1, 2, 3)),
    ]
    assert parser.message().reasoning == "thinking"
    assert parser.delivered == 6


def test_chunks_parallel_tool_calls_interleaved_by_index() -> None:
    def tc(index: int, **kw: object) -> bytes:
        fn = {k: v for k, v in kw.items() if k in ("name", "arguments")}
        item: dict[str, object] = {"index": index, "function": fn}
        if "id" in kw:
            item["id"] = kw["id"]
        return chunk({"tool_calls": [item]})

    _, p = texts(
        tc(0, id="a", name="get_weather", arguments=""),
        tc(1, id="b", name="get_time", arguments=""),
        tc(0, arguments='{"city":'),
        tc(1, arguments='{"tz":'),
        tc(0, arguments='"Paris"}'),
        tc(1, arguments='"UTC"}'),
        chunk({}, "tool_calls"),
    )
    calls = p.message().tool_calls
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("a", "get_weather", '{"city":"Paris"}'),
        ("b", "get_time", '{"tz":"UTC"}'),
    ]


def test_chunks_tool_calls_without_index_gemini_style() -> None:
    sig = {"google": {"thought_signature": "SIG"}}
    _, p = texts(
        chunk(
            {
                "tool_calls": [
                    {
                        "id": "",
                        "type": "function",
                        "function": {"name": "a", "arguments": '{"x":'},
                        "extra_content": sig,
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": None, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"id": "", "function": {"name": "b", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"id": "call_c", "function": {"arguments": "{"}}]}),
        chunk({"tool_calls": [{"id": "call_c", "function": {"arguments": "}"}}]}),
        chunk({}, "stop"),
    )
    calls = p.message().tool_calls
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("", "a", '{"x":1}'),
        ("", "b", "{}"),
        ("call_c", "", "{}"),
    ]
    assert calls[0].extra == {"extra_content": sig}
    assert calls[0].to_dict()["extra_content"] == sig
    assert p.message().finish_reason == "stop"
    assert p.message().to_dict()["content"] is None


def test_chunks_first_token_includes_reasoning_and_finish() -> None:
    clock = iter([0.0, 1.0, 2.0, 3.0]).__next__
    p = ChunkParser(clock=clock)
    p.feed_text(b": keep-alive\n\n")
    assert p.first_token_at is None and p.last_event_at is None
    p.feed_text(chunk({"role": "assistant"}))
    assert p.first_token_at is None and p.last_event_at == 1.0
    p.feed_text(chunk({"reasoning_content": "r"}))
    assert p.first_token_at == 2.0
    p2 = ChunkParser(clock=iter([0.0, 5.0]).__next__)
    p2.feed_text(chunk({}, "stop"))
    assert p2.first_token_at == 5.0


def test_chunks_usage_on_a_content_chunk_is_kept() -> None:
    # llama.cpp attached usage to a content chunk; Groq puts it under x_groq
    _, p = texts(
        chunk({"content": "a"}, usage={"prompt_tokens": 1, "completion_tokens": 1}),
        chunk({}, "stop"),
    )
    assert p.usage == Usage(1, 1, 2)
    _, p = texts(
        chunk({"content": "a"}, x_groq={"usage": {"prompt_tokens": 2, "completion_tokens": 1}}),
        chunk({}, "stop"),
    )
    assert p.usage == Usage(2, 1, 3)


def test_chunks_invalid_utf8_on_the_fast_path() -> None:
    # The hot path hands the JSON parser raw bytes: invalid UTF-8 must still become
    # U+FFFD (the spec) or, in strict mode, a ProtocolError; never a JSON error.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"a\xffb"}}]}\n\n'
    parser = ChunkParser()
    assert parser.feed_text(body) == ["a\ufffdb"]
    assert parser.error is None
    strict = ChunkParser(strict=True)
    assert strict.feed_text(body) == []
    assert isinstance(strict.error, ProtocolError) and "UTF-8" in str(strict.error)
    # and invalid JSON on the fast path is still a ProtocolError naming JSON
    bad = ChunkParser()
    assert bad.feed_text(b'data: {"choices": [\n\n') == []
    assert isinstance(bad.error, ProtocolError) and "JSON" in str(bad.error)


@pytest.mark.parametrize("backend", ["orjson", "stdlib"])
def test_chunks_fast_path_json_backends(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both JSON backends parse the hot path's raw bytes the same way: the stdlib one
    # decodes strictly first, so an encoded lone surrogate (which `json.loads(bytes)`
    # would let through) and invalid UTF-8 both become U+FFFD, as the spec says.
    from tokenhub_stream import _chunks

    if backend == "stdlib":
        monkeypatch.setattr(_chunks, "_loads_event", _chunks._stdlib_loads_event)
        monkeypatch.setattr(_chunks, "loads", json.loads)
    else:
        pytest.importorskip("orjson")
    surrogate = b'data: {"choices":[{"index":0,"delta":{"content":"a\xed\xa0\x80b"}}]}\n\n'
    out, p = texts(
        chunk({"content": "h\u00e9"}),
        surrogate,
        b'data: {"choices":[{"index":0,"delta":{"content":"c\xffd"}}]}\n\n',
        chunk({}, "stop"),
    )
    assert out == ["h\u00e9", "a\ufffd\ufffd\ufffdb", "c\ufffdd"]
    assert p.error is None and p.finish_reason == "stop"


# --- the template fast path: a chunk that repeats the last plain one but for its content


@pytest.fixture(params=["orjson", "stdlib"])
def json_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from tokenhub_stream import _chunks

    backend: str = request.param
    if backend == "stdlib":
        monkeypatch.setattr(_chunks, "_loads_event", _chunks._stdlib_loads_event)
        monkeypatch.setattr(_chunks, "loads", json.loads)
        monkeypatch.setattr(_chunks, "_TEMPLATE_U_ESCAPES", True)
    else:
        pytest.importorskip("orjson")
    return backend


def _plain(content: object, **extra: object) -> bytes:
    # Compact, like OpenAI, vLLM and the benchmark: the template is learned from these.
    obj = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        **extra,
    }
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _reference(chunks: list[bytes]) -> tuple[list[str], ChunkParser]:
    # The same parser with the template never learned: the plain JSON hot path.
    parser = ChunkParser()
    parser._template_next = 1 << 62
    out: list[str] = []
    for c in chunks:
        out.extend(parser.feed_text(c))
    parser.feed_eof()
    return out, parser


def _same_as_reference(chunks: list[bytes]) -> tuple[list[str], ChunkParser]:
    out, parser = texts(*chunks)
    ref_out, ref = _reference(chunks)
    assert out == ref_out
    assert parser.message() == ref.message()
    assert (parser.usage, parser.finish_reason, parser.done) == (
        ref.usage,
        ref.finish_reason,
        ref.done,
    )
    assert type(parser.error) is type(ref.error)
    events = ChunkParser()  # the general path, which never takes a fast path
    expected = [
        e.text for c in chunks for e in events.feed_events(c) if isinstance(e, ContentDelta)
    ]
    assert out == expected
    return out, parser


def test_chunks_template_learned_and_used(json_backend: str) -> None:
    parser = ChunkParser()
    assert parser.feed_text(chunk({"role": "assistant", "content": ""})) == []
    assert parser.feed_text(_plain("Hel")) == ["Hel"]
    assert parser._template is not None  # learned from the first plain chunk
    assert parser.feed_text(_plain("lo")) == ["lo"]
    assert parser.feed_text(_plain("")) == []
    assert parser.feed_text(_plain(" w\u00f6rld")) == [" w\u00f6rld"]
    assert parser.message().content == "Hello w\u00f6rld"
    assert parser.first_token_at is not None and parser.last_event_at is not None


@pytest.mark.parametrize(
    "content",
    [
        'say "hi"',
        "back\\slash\\",
        "ends with a backslash \\",
        "\\u0041 is not an escape here",
        "line\nbreak\r\n\ttab",
        "\u00e9\u4e2d\U0001f600",
        '","finish_reason":"stop"}]}',  # looks like the suffix
        "\x7f\u2028",
    ],
)
def test_chunks_template_escapes_in_content(content: str, json_backend: str) -> None:
    chunks = [_plain("a"), _plain(content), _plain("b")]
    out, _ = _same_as_reference(chunks)
    assert out == ["a", content, "b"]
    # \uXXXX escapes for everything that is not ASCII
    escaped = [
        b"data: " + json.dumps(json.loads(c[6:]), separators=(",", ":")).encode() + b"\n\n"
        for c in chunks
    ]
    assert _same_as_reference(escaped)[0] == ["a", content, "b"]


@pytest.mark.parametrize(
    "middle",
    [
        b'x"y',  # an unescaped quote: not one string literal
        b"x\ny",  # a raw line feed splits the SSE line
        b"x\ry",
        b"x\x01y",  # a raw control character is invalid JSON
        b"x\\qy",  # an invalid escape
        b"x\\",  # escapes the closing quote
        b"x\xffy",  # invalid UTF-8: U+FFFD
        b"x\xed\xa0\x80y",  # an encoded lone surrogate: U+FFFD
        b"x\\ud800y",  # an escaped lone surrogate: each backend as without the template
        b"\\ud83d\\ude00",  # an escaped surrogate pair
    ],
)
def test_chunks_template_odd_middles_match_the_general_path(
    middle: bytes, json_backend: str
) -> None:
    first = _plain("a")
    odd = first.replace(b'"content":"a"', b'"content":"' + middle + b'"')
    _same_as_reference([first, odd, _plain("b"), chunk({}, "stop")])


@pytest.mark.parametrize(
    "other",
    [
        _plain(None),  # content null
        _plain(5),  # a wrong type: ProtocolError
        _plain("x", usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
        _plain("x", extra_field=[1, 2]),
        _plain("x").replace(b'"finish_reason":null', b'"finish_reason":"stop"'),
        _plain("x").replace(b'"index":0', b'"index":1'),
        _plain("x").replace(b'"content":"x"', b'"content":"x","reasoning_content":"r"'),
        _plain("x").replace(b'"content":"x"', b'"content":"x","reasoning":"r"'),
        _plain("x").replace(b'"content":"x"', b'"reasoning_content":"r","content":"x"'),
        _plain("x").replace(
            b'"content":"x"',
            b'"content":"x","tool_calls":[{"index":0,"id":"t","function":{"name":"f"}}]',
        ),
        _plain("x").replace(b'"content":"x"', b'"content":"x","content":"y"'),
        _plain("x").replace(b'"choices":[', b'"choices":[{"index":1,"delta":{"content":"B"}},'),
        _plain("x").replace(b'"choices":[', b'"error":{"message":"boom","code":500},"choices":['),
        _plain("x").replace(b'"id":"c1"', b'"id":"c2"'),
        _plain("x").replace(b'"c1"', b'"c1 "'),
        _plain("x").replace(b"data: ", b"data:"),
        _plain("x")[:-1],  # an unfinished event
        _plain("x") + b": keep-alive\n",
        _plain("x") + _plain("y"),
        _plain("x").replace(b"\n\n", b"\r\n\r\n"),
        b'data: {"object":"error","message":"overloaded","code":529}\n\n',
        DONE,
    ],
)
def test_chunks_template_other_shapes_match_the_general_path(
    other: bytes, json_backend: str
) -> None:
    _same_as_reference([_plain("a"), other, _plain("b"), chunk({}, "stop"), DONE])


@pytest.mark.parametrize(
    "first",
    [
        # another "content" key before the delta's: the probe finds it is not the delta's
        b'data: {"meta":{"content":"a"},"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        # a key that ends in `"content` through an escaped quote
        b'data: {"k\\"content":"a","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        # the delta's key written with an escape
        b'data: {"choices":[{"index":0,"delta":{"\\u0063ontent":"a"}}],"x":{"content":"a"}}\n\n',
        # the delta's key written with an escape, and no other "content" key
        b'data: {"choices":[{"index":0,"delta":{"\\u0063ontent":"a"}}]}\n\n',
        # a repeated key: the last one counts
        b'data: {"choices":[{"index":0,"delta":{"content":"z","content":"a"}}]}\n\n',
    ],
)
def test_chunks_template_misleading_content_keys(first: bytes, json_backend: str) -> None:
    # The same chunk with only that other "a" changed must still yield the delta's "a".
    second = first.replace(b'"a"', b'"b"', 1)
    _, parser = _same_as_reference([first, second, first, second])
    assert parser._template is None


def test_chunks_template_respects_max_event_bytes_and_state(json_backend: str) -> None:
    parser = ChunkParser(max_event_bytes=len(_plain("a")) - 8)
    assert parser.feed_text(_plain("a")) == ["a"]
    assert parser.feed_text(_plain("b")) == ["b"]
    assert parser._template is not None
    assert parser.feed_text(_plain("ab")) == []
    assert isinstance(parser.error, ProtocolError)
    # a partial line pending: the next chunk continues it, it is no new event
    parser = ChunkParser()
    assert parser.feed_text(_plain("a")) == ["a"]
    assert parser.feed_text(_plain("a")) == ["a"]
    assert parser._template is not None
    assert parser.feed_text(b"data: {") == []
    assert parser.feed_text(_plain("b")) == []
    assert isinstance(parser.error, ProtocolError)
    # stopped by [DONE]
    parser = ChunkParser()
    assert parser.feed_text(_plain("a")) == ["a"]
    assert parser.feed_text(DONE) == []
    assert parser.feed_text(_plain("b")) == []


def test_chunks_template_relearned_when_the_chunks_change(json_backend: str) -> None:
    # `created` changing every second, or a per-chunk id: a new template now and then,
    # never a wrong delta.
    chunks = [_plain(f"t{i}", created=i // 20) for i in range(100)]
    out, parser = _same_as_reference(chunks)
    assert out == [f"t{i}" for i in range(100)]
    assert parser._template is not None and b'"created":4' in parser._template[1]
    varying = [_plain(f"t{i}", obfuscation="x" * (i % 7)) for i in range(100)]
    assert _same_as_reference(varying)[0] == [f"t{i}" for i in range(100)]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=12),
            st.sampled_from(['"', "\\", "\n", "\\u0041", "\ud800", "\U0001f600", ""]),
        ),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
    st.sampled_from([(",", ":"), (", ", ": ")]),
)
def test_chunks_template_any_content_matches_the_general_path(
    json_backend: str, contents: list[str], ascii_only: bool, separators: tuple[str, str]
) -> None:
    chunks = []
    for content in contents:
        obj = {"id": "x", "choices": [{"index": 0, "delta": {"content": content}}]}
        text = json.dumps(obj, ensure_ascii=ascii_only, separators=separators)
        chunks.append(b"data: " + text.encode("utf-8", "surrogatepass") + b"\n\n")
    _same_as_reference([*chunks, chunk({}, "stop")])
