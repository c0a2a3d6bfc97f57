"""Issue 14, findings 3, 4 and part of 10: the owner's spend and key at the proxy's edges.

- 3: every forwarded request carries a token limit no larger than `max_tokens_cap`
  (absent, `null` and on_request's values included), and `n` is held to `max_choices`.
- 4: a turn that ends early is charged: the upstream's usage (asked for), else an estimate.
- 10: the key is redacted in case and JSON-escape variants and when cut across two events;
  a key with a trailing newline is refused at construction; bodies are UTF-8 only.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import AsyncGenerator, Iterator, Mapping

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from tokenhub_stream import Usage
from tokenhub_stream.asgi import ChatProxy, CompletionRecord
from tokenhub_stream.testing import FakeChatUpstream, Script, ScriptedToolCall, run_upstream
from tokenhub_stream.tools import tool

from .conftest import KEY, FakeStream, MockUpstream, assert_no_key, serve, sse_response, text_of

pytestmark = pytest.mark.anyio

BODY: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}
CAP = 64


def make_proxy(mock: MockUpstream, **kw: object) -> ChatProxy:
    options: dict[str, object] = {"base_url": "https://upstream.test/v1", "default_model": "m1"}
    options.update(kw)
    return ChatProxy(api_key=KEY, transport=mock.transport, **options)  # type: ignore[arg-type]


async def post(
    proxy: ChatProxy,
    body: object = BODY,
    *,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    transport = httpx.ASGITransport(app=proxy, client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        if content is None:
            content = json.dumps(body).encode()
        response = await client.post("/", content=content, headers=dict(headers or {}))
    assert_no_key(response.content, response.headers)
    return response


def sent_body(mock: MockUpstream, index: int = 0) -> dict[str, object]:
    data = json.loads(mock.requests[index].content)
    assert isinstance(data, dict)
    return data


def limit_of(sent: Mapping[str, object]) -> list[object]:
    return [sent[f] for f in ("max_tokens", "max_completion_tokens") if f in sent]


# --- finding 3: max_tokens_cap and n ----------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize(
    "extra",
    [{}, {"max_tokens": None}, {"max_completion_tokens": None}],
    ids=["absent", "max_tokens_null", "max_completion_tokens_null"],
)
async def test_issue_14_cap_absent_or_null_limit_gets_the_cap(
    mock_upstream: MockUpstream, field: str, extra: dict[str, object]
) -> None:
    proxy = make_proxy(mock_upstream, max_tokens_cap=CAP, max_tokens_field=field)
    response = await post(proxy, {**BODY, **extra})
    assert response.status_code == 200
    sent = sent_body(mock_upstream)
    # The field the upstream expects carries the cap; no null is forwarded.
    assert sent[field] == CAP
    assert limit_of(sent) == [CAP]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("setting", ["max_tokens", "max_completion_tokens"])
async def test_issue_14_cap_clamps_the_field_the_browser_sent(
    mock_upstream: MockUpstream, field: str, setting: str
) -> None:
    proxy = make_proxy(mock_upstream, max_tokens_cap=CAP, max_tokens_field=setting)
    for value, expected in ((10_000, CAP), (CAP, CAP), (7, 7), (0, 0)):
        await post(proxy, {**BODY, field: value})
        sent = sent_body(mock_upstream, -1)
        # The browser's own field is kept (and clamped); no second, uncapped one is added.
        assert sent[field] == expected
        assert limit_of(sent) == [expected]


async def test_issue_14_cap_both_fields_are_each_clamped(mock_upstream: MockUpstream) -> None:
    proxy = make_proxy(mock_upstream, max_tokens_cap=CAP)
    await post(proxy, {**BODY, "max_tokens": 5, "max_completion_tokens": 10**9})
    await post(proxy, {**BODY, "max_tokens": None, "max_completion_tokens": 10**9})
    assert limit_of(sent_body(mock_upstream, 0)) == [5, CAP]
    assert limit_of(sent_body(mock_upstream, 1)) == [CAP]


@pytest.mark.parametrize(
    "rewrite",
    [
        {"max_tokens": 10**6},
        {"max_tokens": None},
        {"max_tokens": "lots"},
        {"max_tokens": True},
        {"max_tokens": -1},
        {"max_completion_tokens": 10**6},
        {"max_tokens": 3, "max_completion_tokens": 10**6},
        {},
    ],
)
async def test_issue_14_cap_applies_after_on_request(
    mock_upstream: MockUpstream, rewrite: dict[str, object]
) -> None:
    def hook(request: Request, body: dict[str, object]) -> Mapping[str, object]:
        body.pop("max_tokens", None)
        return {**body, **rewrite}

    proxy = make_proxy(mock_upstream, max_tokens_cap=CAP, on_request=hook)
    await post(proxy, {**BODY, "max_tokens": 10})
    limits = limit_of(sent_body(mock_upstream))
    assert limits, "no token limit forwarded"
    for value in limits:
        assert isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= CAP


async def test_issue_14_cap_is_written_even_if_not_an_allowed_field(
    mock_upstream: MockUpstream,
) -> None:
    # The cap is the proxy's own setting: it does not depend on the browser's allow-list.
    allowed = {"messages", "model", "stream"}
    proxy = make_proxy(mock_upstream, max_tokens_cap=CAP, allowed_fields=allowed)
    await post(proxy, {**BODY, "max_tokens": 10**6, "n": 9})
    assert sent_body(mock_upstream) == {**BODY, "model": "m1", "stream": True, "max_tokens": CAP}


async def test_issue_14_no_cap_leaves_the_limit_alone(mock_upstream: MockUpstream) -> None:
    proxy = make_proxy(mock_upstream)
    await post(proxy, BODY)
    await post(proxy, {**BODY, "max_tokens": 10**6})
    assert limit_of(sent_body(mock_upstream, 0)) == []
    assert limit_of(sent_body(mock_upstream, 1)) == [10**6]


@pytest.mark.parametrize(
    ("options", "n", "expected"),
    [
        ({}, 128, 1),
        ({}, 1, 1),
        ({"max_choices": 4}, 3, 3),
        ({"max_choices": 4}, 128, 4),
    ],
)
async def test_issue_14_n_is_clamped_to_max_choices(
    mock_upstream: MockUpstream, options: dict[str, object], n: int, expected: int
) -> None:
    proxy = make_proxy(mock_upstream, **options)
    response = await post(proxy, {**BODY, "n": n})
    assert response.status_code == 200
    assert sent_body(mock_upstream)["n"] == expected


async def test_issue_14_n_null_is_dropped(mock_upstream: MockUpstream) -> None:
    await post(make_proxy(mock_upstream), {**BODY, "n": None})
    assert "n" not in sent_body(mock_upstream)


@pytest.mark.parametrize("n", ["128", 0, -3, 1.5, True, [2]])
async def test_issue_14_n_not_a_positive_integer_is_400(
    mock_upstream: MockUpstream, n: object
) -> None:
    response = await post(make_proxy(mock_upstream), {**BODY, "n": n})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
    assert mock_upstream.requests == []


async def test_issue_14_n_and_best_of_from_on_request_are_clamped(
    mock_upstream: MockUpstream,
) -> None:
    def hook(request: Request, body: dict[str, object]) -> Mapping[str, object]:
        return {**body, "n": 50, "best_of": 50}

    fields = {"messages", "model", "stream", "n", "best_of"}
    proxy = make_proxy(mock_upstream, on_request=hook, allowed_fields=fields, max_choices=2)
    await post(proxy, BODY)
    sent = sent_body(mock_upstream)
    assert (sent["n"], sent["best_of"]) == (2, 2)


def test_issue_14_cap_options_are_checked() -> None:
    for kwargs in (
        {"max_tokens_field": "max_output_tokens"},
        {"max_choices": 0},
        {"max_choices": True},
        {"max_choices": 1.5},
        {"max_tokens_cap": True},
        {"max_tokens_cap": 2.5},
    ):
        with pytest.raises(ValueError):
            ChatProxy(api_key=KEY, **kwargs)


@tool
def get_time(city: str) -> str:
    """The time in a city.

    Args:
        city: the city name.
    """
    return f"noon in {city}"


PARIS = ScriptedToolCall(name="get_time", arguments='{"city": "Paris"}')


async def test_issue_14_cap_reaches_every_turn_of_the_tool_loop() -> None:
    upstream = FakeChatUpstream(api_key=KEY, delay=0.0)
    upstream.enqueue(Script(deltas=[], tool_calls=[PARIS]), Script(deltas=["It is noon."]))
    with run_upstream(upstream) as running:
        proxy = ChatProxy(
            api_key=KEY, base_url=running.base_url, tools=[get_time], max_tokens_cap=CAP
        )
        async with proxy:
            with anyio.fail_after(10):
                response = await post(proxy, {**BODY, "max_tokens": None, "n": 5})
    assert response.status_code == 200
    assert text_of(response.content) == "It is noon."
    assert len(upstream.requests) == 2
    for request in upstream.requests:
        assert request.json is not None
        assert request.json["max_tokens"] == CAP
        assert request.json.get("n", 1) == 1


# --- finding 4: usage of a turn that ends early ------------------------------------------------


class Budget:
    """A UsageLimiter in memory; `recorded` is set from the server's thread."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, Usage]] = []
        self.done = threading.Event()

    async def acquire(self, key: str) -> float | None:
        return None

    async def record(self, key: str, usage: Usage) -> None:
        self.recorded.append((key, usage))
        self.done.set()

    async def wait(self, timeout: float = 5.0) -> Usage:
        assert await anyio.to_thread.run_sync(self.done.wait, timeout), "nothing recorded"
        return self.recorded[-1][1]


class Records:
    def __init__(self) -> None:
        self.items: list[CompletionRecord] = []
        self.done = threading.Event()

    def __call__(self, record: CompletionRecord) -> None:
        self.items.append(record)
        self.done.set()

    async def wait(self, timeout: float = 5.0) -> CompletionRecord:
        assert await anyio.to_thread.run_sync(self.done.wait, timeout), "no on_complete"
        return self.items[-1]


async def test_issue_14_usage_limiter_asks_streams_for_usage(mock_upstream: MockUpstream) -> None:
    proxy = make_proxy(mock_upstream, rate_limiter=Budget())
    options = {"include_usage": False, "continuous_usage_stats": True}
    await post(proxy, {**BODY, "stream_options": options})
    await post(proxy, {**BODY, "stream": False})
    mock_upstream.responses.append(httpx.Response(200, json={"choices": []}))
    # Kept: the browser's other stream options; not sent: options on a non-stream request.
    assert sent_body(mock_upstream, 0)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    assert "stream_options" not in sent_body(mock_upstream, 1)


async def test_issue_14_without_usage_limiter_the_body_is_left_alone(
    mock_upstream: MockUpstream,
) -> None:
    await post(make_proxy(mock_upstream, on_complete=lambda r: None), BODY)
    assert "stream_options" not in sent_body(mock_upstream)


async def test_issue_14_cut_stream_is_charged_an_estimate(mock_upstream: MockUpstream) -> None:
    words = [f" word{i}" for i in range(40)]
    frames = [
        b'data: {"choices":[{"index":0,"delta":{"content":' + json.dumps(w).encode() + b"}}]}\n\n"
        for w in words
    ]
    mock_upstream.responses.append(sse_response(FakeStream(frames, error=httpx.ReadError("cut"))))
    budget, records = Budget(), Records()
    proxy = make_proxy(mock_upstream, rate_limiter=budget, on_complete=records)
    response = await post(proxy, BODY)
    assert response.status_code == 200
    record = await records.wait()
    assert record.outcome == "upstream_error"
    assert record.usage is None  # the upstream never said
    request_bytes = len(mock_upstream.requests[0].content)
    chars = sum(len(w) for w in words)
    expected = Usage(
        math.ceil(request_bytes / 4),
        math.ceil(chars / 4),
        math.ceil(request_bytes / 4) + math.ceil(chars / 4),
    )
    assert record.estimated_usage == expected
    assert await budget.wait() == expected


async def test_issue_14_stream_without_text_is_still_charged(mock_upstream: MockUpstream) -> None:
    # Frames the copy-parser reads no text from: the estimate falls back to their bytes.
    frames = [b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'] * 10
    mock_upstream.responses.append(sse_response(FakeStream(frames, error=httpx.ReadError("x"))))
    budget = Budget()
    await post(make_proxy(mock_upstream, rate_limiter=budget), BODY)
    usage = await budget.wait()
    assert usage.completion_tokens == math.ceil(sum(map(len, frames)) / 200)
    assert usage.completion_tokens and usage.completion_tokens > 0


async def test_issue_14_upstream_usage_is_charged_when_it_arrives(
    mock_upstream: MockUpstream,
) -> None:
    frames = [
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1,'
        b'"total_tokens":8}}\n\n',
        b"data: [DONE]\n\n",
    ]
    mock_upstream.responses.append(sse_response(frames))
    budget, records = Budget(), Records()
    await post(make_proxy(mock_upstream, rate_limiter=budget, on_complete=records), BODY)
    record = await records.wait()
    assert record.usage == Usage(7, 1, 8) and record.estimated_usage is None
    assert await budget.wait() == Usage(7, 1, 8)


async def test_issue_14_refused_turn_is_not_charged(mock_upstream: MockUpstream) -> None:
    mock_upstream.responses.append(httpx.Response(429, json={"error": {"message": "slow"}}))
    budget, records = Budget(), Records()
    response = await post(make_proxy(mock_upstream, rate_limiter=budget, on_complete=records))
    assert response.status_code == 429
    record = await records.wait()
    assert record.usage is None and record.estimated_usage is None
    assert budget.recorded == []


@contextlib.contextmanager
def proxied(app_proxy: ChatProxy) -> Iterator[str]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncGenerator[None, None]:
        async with app_proxy:
            yield

    with serve(Starlette(routes=app_proxy.routes("/api/chat"), lifespan=lifespan)) as url:
        yield url


async def read_then_leave(url: str, words: int) -> str:
    # Read the answer until `words` words have arrived, then close the connection.
    text = ""
    async with httpx.AsyncClient(timeout=5) as client:
        async with client.stream("POST", f"{url}/api/chat", json=BODY) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        text += choice["delta"].get("content") or ""
                if len(text.split()) >= words:
                    break
    return text


@pytest.mark.parametrize("on_disconnect", ["cancel", "finish"])
async def test_issue_14_leaving_early_is_charged(on_disconnect: str) -> None:
    # The issue's case: most of 60 words read, then the tab closes. With "cancel" the
    # upstream is closed and its usage never comes: the estimate is charged. With
    # "finish" the proxy reads on and charges the upstream's own usage.
    answer = " ".join(f"w{i:02d}" for i in range(60))
    # 30 ms between words: the close after word 57 reaches the upstream before word 60
    # (and the usage after it) with room to spare on a loaded machine.
    upstream = FakeChatUpstream(api_key=KEY, delay=0.03)
    usage = {"prompt_tokens": 11, "completion_tokens": 60, "total_tokens": 71}
    upstream.enqueue(Script(text=answer, usage=usage))
    budget, records = Budget(), Records()
    with run_upstream(upstream) as running:
        proxy = ChatProxy(
            api_key=KEY,
            base_url=running.base_url,
            rate_limiter=budget,
            on_complete=records,
            on_disconnect=on_disconnect,  # type: ignore[arg-type]
        )
        with proxied(proxy) as url, anyio.fail_after(15):
            read = await read_then_leave(url, 57)
            charged = await budget.wait(10)
            record = await records.wait(10)
    request = upstream.requests[0]
    assert request.json is not None
    assert request.json["stream_options"] == {"include_usage": True}
    if on_disconnect == "finish":
        assert charged == Usage(11, 60, 71)
        assert record.usage == charged and record.estimated_usage is None
        return
    assert record.outcome == "client_disconnect" and record.usage is None
    assert record.estimated_usage == charged
    assert charged.total_tokens is not None and charged.total_tokens > 0
    # The estimate: the request body's bytes / 4, and the text relayed / 4 (at least what
    # the browser read, at most the whole answer).
    assert charged.prompt_tokens == math.ceil(len(request.body) / 4)
    assert charged.completion_tokens is not None
    assert math.ceil(len(read) / 4) <= charged.completion_tokens <= math.ceil(len(answer) / 4)


async def test_issue_14_tool_loop_cut_mid_turn_is_charged() -> None:
    upstream = FakeChatUpstream(api_key=KEY, delay=0.005)
    first = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
    upstream.enqueue(
        Script(deltas=[], tool_calls=[PARIS], usage=first),
        Script(text=" ".join(f"w{i:02d}" for i in range(200))),
    )
    budget, records = Budget(), Records()
    with run_upstream(upstream) as running:
        proxy = ChatProxy(
            api_key=KEY,
            base_url=running.base_url,
            tools=[get_time],
            rate_limiter=budget,
            on_complete=records,
        )
        with proxied(proxy) as url, anyio.fail_after(15):
            read = await read_then_leave(url, 50)
            charged = await budget.wait(10)
            record = await records.wait(10)
    assert record.outcome == "client_disconnect"
    assert record.usage == Usage(20, 5, 25)  # the finished turn, as the upstream said
    assert record.estimated_usage == charged
    # ... plus the cut turn: its prompt (the conversation so far) and its text so far.
    assert charged.prompt_tokens is not None and charged.prompt_tokens > 20
    assert charged.completion_tokens is not None
    assert charged.completion_tokens >= 5 + math.ceil(len(read) / 4)


# --- finding 10: key redaction ---------------------------------------------------------------


def frame(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}\n\n'


def escape_all(text: str, upper: bool = False) -> str:
    return "".join(("\\u%04X" if upper else "\\u%04x") % ord(c) for c in text)


KEY_FORMS = {
    "exact": KEY,
    "upper": KEY.upper(),
    "mixed": "".join(c.upper() if i % 2 else c for i, c in enumerate(KEY)),
    "dash_escaped": KEY.replace("-", "\\u002d"),
    "dash_escaped_upper_hex": KEY.replace("-", "\\u002D"),
    "all_escaped": escape_all(KEY),
    "all_escaped_upper_hex": escape_all(KEY, upper=True),
    "some_escaped": "".join(escape_all(c) if i % 3 == 0 else c for i, c in enumerate(KEY)),
}


@pytest.mark.parametrize("form", list(KEY_FORMS))
async def test_issue_14_redacts_key_variants_in_a_stream(
    mock_upstream: MockUpstream, form: str
) -> None:
    echoed = KEY_FORMS[form]
    mock_upstream.responses.append(
        sse_response([frame("the key is " + echoed + "."), b"data: [DONE]\n\n"])
    )
    response = await post(make_proxy(mock_upstream))
    text = text_of(response.content)  # still valid JSON frames
    assert text == "the key is [redacted]."
    assert KEY.lower() not in response.content.decode().lower()


@pytest.mark.parametrize("form", ["upper", "all_escaped"])
async def test_issue_14_redacts_key_variants_in_a_json_answer(
    mock_upstream: MockUpstream, form: str
) -> None:
    body = b'{"choices":[{"message":{"role":"assistant","content":"' + KEY_FORMS[form].encode()
    json_type = {"content-type": "application/json"}
    mock_upstream.responses.append(httpx.Response(200, content=body + b'"}}]}', headers=json_type))
    response = await post(make_proxy(mock_upstream), {**BODY, "stream": False})
    assert response.json()["choices"][0]["message"]["content"] == "[redacted]"


@pytest.mark.parametrize("cut", [3, 15, 16, 17, 20, len(KEY) - 5, len(KEY) - 4])
async def test_issue_14_redacts_key_split_across_two_events(
    mock_upstream: MockUpstream, cut: int
) -> None:
    # A model (or gateway) that streams the key as two deltas: the browser joins them.
    mock_upstream.responses.append(
        sse_response([frame("key: " + KEY[:cut]), frame(KEY[cut:] + " end"), b"data: [DONE]\n\n"])
    )
    response = await post(make_proxy(mock_upstream))
    text = text_of(response.content)
    assert KEY not in text
    # What is promised: at most the first 15 characters of the key ever reach the browser.
    assert KEY[15:] not in text and KEY[:16] not in text
    assert text.endswith(" end")


@pytest.mark.parametrize("cut", [16, 20, 24])
def test_issue_14_redacts_split_key_in_one_write(cut: int) -> None:
    # The two events of a cut key can reach the relay in one read (they were written
    # together, or the proxy was busy): the rest is taken out of the same write.
    from tokenhub_stream.asgi._redact import KeyRedactor

    write = frame("key: " + KEY[:cut]) + frame(KEY[cut:].upper() + " end")
    for redact in (KeyRedactor(KEY), KeyRedactor(KEY).stream().feed):
        text = text_of(redact(write))
        assert text == "key: [redacted][redacted] end", text


async def test_issue_14_redacts_split_key_through_uvicorn() -> None:
    # The same through a real upstream, so the relay on the proxy's own HTTP client runs.
    upstream = FakeChatUpstream(api_key=KEY, delay=0.001)
    upstream.enqueue(Script(deltas=["key: ", KEY[:20], KEY[20:].upper(), " end"]))
    with run_upstream(upstream) as running:
        proxy = ChatProxy(api_key=KEY, base_url=running.base_url)
        with proxied(proxy) as url, anyio.fail_after(10):
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.post(f"{url}/api/chat", json=BODY)
    text = text_of(response.content)
    assert KEY[:16] not in text and KEY[20:].upper() not in text
    assert text.startswith("key: ") and text.endswith(" end")


async def test_issue_14_redacts_split_key_in_the_tool_loop_stream() -> None:
    # The tool loop writes its own frames, one per delta: the same stream redaction.
    upstream = FakeChatUpstream(api_key=KEY, delay=0.0)
    upstream.enqueue(Script(deltas=["key: ", KEY[:20], KEY[20:].upper(), " end"]))
    records = Records()
    with run_upstream(upstream) as running:
        proxy = ChatProxy(
            api_key=KEY, base_url=running.base_url, tools=[get_time], on_complete=records
        )
        async with proxy:
            with anyio.fail_after(10):
                response = await post(proxy, BODY)
                record = await records.wait()
    text = text_of(response.content)
    assert text == "key: [redacted][redacted] end"
    assert record.message.content == "key: [redacted] end"  # the joined copy: one find


def test_issue_14_redactor_unit_cases() -> None:
    from tokenhub_stream.asgi._redact import KeyRedactor

    r = KeyRedactor(KEY)
    plain = frame("nothing to see, caf\\u00e9 \\u003cb\\u003e \\n")
    assert r(plain) is plain  # the common case hands back the same bytes
    assert r(frame(KEY[:10] + " and " + KEY[10:])) == frame(KEY[:10] + " and [redacted]")
    assert r(frame(KEY + KEY.upper())) == frame("[redacted]")
    assert r(frame("x" + KEY[:20])) == frame("x[redacted]")
    assert r(frame(KEY[-20:] + "x")) == frame("[redacted]x")
    assert "KEY" not in repr(r) and KEY not in repr(r)
    # Escapes of key characters that are not the key: looked at, left alone.
    escaped = frame('\\u0073\\u006b and \\/ and \\"q\\"')
    assert r(escaped) is escaped
    assert r.stream().feed(escaped) is escaped
    newline = frame("a\\nb")
    assert r.stream().feed(newline) is newline
    # A key holding "/" (base64 keys) is also found with JSON's "\/".
    slash = "abcDEF/ghiJKL/mnoPQR/stu"
    assert KeyRedactor(slash)(frame(slash.replace("/", "\\/"))) == frame("[redacted]")
    # A short key (a placeholder) is matched as its exact bytes only.
    assert KeyRedactor("EMPTY")(b"empty, EMPTY, Empty") == b"empty, [redacted], Empty"
    assert KeyRedactor("EMPTY").stream().feed(b"empty, EMPTY") == b"empty, [redacted]"


def test_issue_14_stream_redactor_takes_the_rest_of_a_cut_key() -> None:
    from tokenhub_stream.asgi._redact import KeyRedactor

    r = KeyRedactor(KEY)
    for cut in range(1, len(KEY)):
        feed = r.stream().feed
        first = feed(frame(KEY[:cut]))
        second = feed(frame(KEY[cut:]))
        seen = text_of(first + second)
        leaked = 0 if "[redacted]" in text_of(first) else cut
        assert leaked <= 15, cut
        assert KEY[cut:] not in seen or len(KEY) - cut < 4, cut
        # Never more than 15 leading or 3 trailing characters in all.
        assert KEY[:16] not in seen and KEY[-4:] not in seen.replace("[redacted]", ""), cut


# --- finding 10: the key and the charset -------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [KEY + "\n", KEY + "\r\n", " " + KEY, KEY + " ", KEY + "\t", KEY[:8] + "\x00" + KEY[8:]]
)
def test_issue_14_key_with_whitespace_is_refused_at_construction(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        ChatProxy(api_key=bad)
    assert "newline" in str(info.value)
    assert_no_key(str(info.value), repr(info.value))


def test_issue_14_non_ascii_key_is_refused() -> None:
    with pytest.raises(ValueError):
        ChatProxy(api_key=KEY + "é")


@pytest.mark.parametrize(
    ("charset", "encoding"),
    [("utf-7", "utf-7"), ("utf-16", "utf-16"), ("UTF-16LE", "utf-16-le"), ("latin-1", "latin-1")],
)
async def test_issue_14_charset_other_than_utf8_is_415(
    mock_upstream: MockUpstream, charset: str, encoding: str
) -> None:
    content = json.dumps({"messages": [{"role": "user", "content": "<hi>"}]}).encode(encoding)
    headers = {"content-type": f"text/plain;charset={charset}"}
    response = await post(make_proxy(mock_upstream), content=content, headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_charset"
    assert mock_upstream.requests == []


@pytest.mark.parametrize("charset", ["UTF-8", "utf8", '"utf-8"'])
async def test_issue_14_utf8_charset_is_accepted(mock_upstream: MockUpstream, charset: str) -> None:
    headers = {"content-type": f"application/json; charset={charset}"}
    response = await post(make_proxy(mock_upstream), BODY, headers=headers)
    assert response.status_code == 200


def test_issue_14_rest_of_a_cut_key_is_found_past_a_keepalive() -> None:
    from tokenhub_stream.asgi._redact import KeyRedactor

    feed = KeyRedactor(KEY).stream().feed
    out = [feed(frame(KEY[:20])), feed(b": keep-alive\n\n"), feed(b'data: {"choices":[]}\n\n')]
    out.append(feed(frame(KEY[20:])))
    assert text_of(b"".join(out)) == "[redacted][redacted]"
    # ... for a few writes only: later text is left alone.
    feed = KeyRedactor(KEY).stream().feed
    feed(frame(KEY[:20]))
    for _ in range(4):
        feed(b": keep-alive\n\n")
    assert feed(frame(KEY[20:])) == frame(KEY[20:])


async def test_issue_14_allow_list_without_stream_options_opts_out_of_usage(
    mock_upstream: MockUpstream,
) -> None:
    # For an upstream that refuses stream_options: the turn is charged the estimate instead.
    budget = Budget()
    fields = {"messages", "model", "stream"}
    await post(make_proxy(mock_upstream, rate_limiter=budget, allowed_fields=fields), BODY)
    assert "stream_options" not in sent_body(mock_upstream)
    usage = await budget.wait()
    assert usage.total_tokens is not None and usage.total_tokens > 0
