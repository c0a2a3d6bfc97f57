"""Issue #18: the proxy's spans and metrics, and `GET <mount>/stats`.

Real uvicorn in front of the local upstream; the SDK's in-memory span exporter and metric
reader (the `telemetry` fixture, tests/conftest.py), and one Prometheus scrape through
`opentelemetry-exporter-prometheus`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette

import tokenhub_stream
from conftest import Telemetry
from tokenhub_stream import tool
from tokenhub_stream.asgi import ChatProxy, InMemoryRateLimiter
from tokenhub_stream.asgi._passthrough import Passthrough
from tokenhub_stream.asgi._turn import Turn
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, ScriptedToolCall

from .conftest import KEY, Message, serve

pytestmark = pytest.mark.timeout(30)

Upstream = tuple[FakeChatUpstream, RunningUpstream]
MODEL = "gpt-4o-mini"
PROMPT = "my bank password is hunter2"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait, bounded, for `predicate()` (the proxy ends a turn after the client left)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def proxy_url(upstream: Upstream) -> Iterator[tuple[str, ChatProxy]]:
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url, stats=True)
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    with serve(app) as url:
        yield url, proxy


def _chat(url: str, body: dict[str, Any] = BODY, **headers: str) -> httpx.Response:
    return httpx.post(url + "/api/chat", json=body, headers=headers, timeout=10)


def _point(points: list[tuple[dict[str, Any], Any]], **attrs: object) -> Any:
    found = [p for a, p in points if attrs.items() <= a.items()]
    assert len(found) == 1, points
    return found[0]


# --- spans --------------------------------------------------------------------------------------


def test_issue_18_proxy_request_span_and_upstream_client_span(
    telemetry: Telemetry, upstream: Upstream, proxy_url: tuple[str, ChatProxy]
) -> None:
    url, _ = proxy_url
    upstream[0].enqueue(Script(deltas=["Hi", " you"], delay=0.01))
    response = _chat(url, {**BODY, "stream": True, "temperature": 0.5})
    assert response.status_code == 200
    eventually(lambda: len(telemetry.spans()) == 2)
    server = telemetry.span("POST /api/chat")
    client = telemetry.span(f"chat {MODEL}")
    assert server.kind is SpanKind.SERVER and server.parent is None
    assert client.kind is SpanKind.CLIENT
    assert server.context is not None and client.context is not None
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    s, c = telemetry.attrs(server), telemetry.attrs(client)
    assert s["http.request.method"] == "POST" and s["url.path"] == "/api/chat"
    assert s["http.response.status_code"] == 200
    assert s["tokenhub.outcome"] == "completed"
    assert s["tokenhub.request_id"] == response.headers["x-request-id"]
    assert s["tokenhub.bytes_sent"] == len(response.content)
    assert 0 < s["tokenhub.time_to_first_token"] < 5
    for attrs in (s, c):  # the same gen_ai attributes on both
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.request.model"] == MODEL
        assert attrs["gen_ai.request.max_tokens"] == 64
        assert attrs["gen_ai.request.temperature"] == 0.5
        assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
        assert str(attrs["gen_ai.response.id"]).startswith("chatcmpl-")
    assert c["gen_ai.provider.name"] == "openai"
    assert c["server.address"] == "127.0.0.1"
    assert c["gen_ai.request.stream"] is True
    assert c["http.response.status_code"] == 200
    assert server.status.status_code is client.status.status_code is StatusCode.UNSET
    assert "enduser.id" not in s  # no telemetry_principal: no principal recorded
    # The upstream got the client span's traceparent: one trace through a tracing gateway.
    traceparent = upstream[0].requests[-1].headers["traceparent"]
    assert traceparent.split("-")[1:3] == [
        f"{client.context.trace_id:032x}",
        f"{client.context.span_id:016x}",
    ]
    assert "traceparent" not in response.headers


def test_issue_18_proxy_span_is_a_child_of_the_asgi_instrumentations_span(
    telemetry: Telemetry, upstream: Upstream
) -> None:
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url)
    tracer = telemetry.tracer_provider.get_tracer("an-asgi-instrumentation")

    async def instrumented(scope: Any, receive: Any, send: Any) -> None:
        # What opentelemetry-instrumentation-asgi does: a SERVER span, current for the app.
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        with tracer.start_as_current_span("POST /api/chat", kind=SpanKind.SERVER):
            await app(scope, receive, send)

    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    with serve(instrumented) as url:
        assert _chat(url).status_code == 200
    eventually(lambda: len(telemetry.spans()) == 3)
    spans = telemetry.spans()
    outer = next(s for s in spans if s.kind is SpanKind.SERVER)
    ours = next(s for s in spans if s.kind is SpanKind.INTERNAL)
    upstream_call = next(s for s in spans if s.kind is SpanKind.CLIENT)
    assert outer.instrumentation_scope is not None
    assert outer.instrumentation_scope.name == "an-asgi-instrumentation"
    assert ours.name == "POST /api/chat"
    assert outer.context is not None and ours.context is not None
    assert ours.parent is not None and ours.parent.span_id == outer.context.span_id
    assert upstream_call.parent is not None
    assert upstream_call.parent.span_id == ours.context.span_id


def test_issue_18_proxy_continues_the_callers_trace(
    telemetry: Telemetry, upstream: Upstream, proxy_url: tuple[str, ChatProxy]
) -> None:
    url, _ = proxy_url
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = _chat(url, traceparent=f"00-{trace_id}-{parent_id}-01")
    assert response.status_code == 200
    eventually(lambda: len(telemetry.spans()) == 2)
    server = telemetry.span("POST /api/chat")
    assert server.context is not None and server.parent is not None
    assert f"{server.context.trace_id:032x}" == trace_id
    assert f"{server.parent.span_id:016x}" == parent_id
    assert upstream[0].requests[-1].headers["traceparent"].split("-")[1] == trace_id


def test_issue_18_rejected_request_is_counted_with_its_status(
    telemetry: Telemetry, upstream: Upstream
) -> None:
    proxy = ChatProxy(
        api_key=KEY,
        base_url=upstream[1].base_url,
        allowed_models=[MODEL],
        authorize=lambda request: request.headers.get("x-user"),
        stats=True,
    )
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    with serve(app) as url:
        assert _chat(url).status_code == 401
        assert _chat(url, {**BODY, "model": "o9"}, **{"x-user": "bob"}).status_code == 400
        stats = httpx.get(url + "/api/chat/stats", headers={"x-user": "bob"}).json()
    assert stats["turns"]["rejected"] == 2
    assert stats["rejected"] == {"400": 1, "401": 1}
    assert stats["open_streams"] == 0
    spans = telemetry.spans("POST /api/chat")
    assert [telemetry.attrs(s)["error.type"] for s in spans] == ["401", "400"]
    # A 4xx is the client's error: the server span's status stays unset.
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)
    assert telemetry.spans(f"chat {MODEL}") == []  # nothing went upstream
    turns = telemetry.points("tokenhub.proxy.turns")
    assert _point(turns, **{"http.response.status_code": 401}).value == 1
    assert _point(turns, **{"http.response.status_code": 400})
    assert all(a["tokenhub.outcome"] == "rejected" for a, _ in turns)


def test_issue_18_upstream_error_marks_both_spans(
    telemetry: Telemetry, upstream: Upstream, proxy_url: tuple[str, ChatProxy]
) -> None:
    url, _ = proxy_url
    upstream[0].enqueue(Script(status=500))
    assert _chat(url, {**BODY, "stream": True}).status_code == 502
    eventually(lambda: len(telemetry.spans()) == 2)
    server, client = telemetry.span("POST /api/chat"), telemetry.span(f"chat {MODEL}")
    assert client.status.status_code is StatusCode.ERROR
    assert telemetry.attrs(client)["error.type"] == "500"
    assert telemetry.attrs(client)["http.response.status_code"] == 500
    assert server.status.status_code is StatusCode.ERROR
    assert telemetry.attrs(server)["error.type"] == "upstream_error"
    assert telemetry.attrs(server)["http.response.status_code"] == 502
    ((attrs, duration),) = [(a, p) for a, p in telemetry.points("gen_ai.client.operation.duration")]
    assert attrs["error.type"] == "500" and duration.count == 1
    assert _point(
        telemetry.points("tokenhub.proxy.turns"), **{"tokenhub.outcome": "upstream_error"}
    )


def test_issue_18_client_disconnect_is_an_outcome_not_an_error(
    telemetry: Telemetry, upstream: Upstream, proxy_url: tuple[str, ChatProxy]
) -> None:
    url, proxy = proxy_url
    upstream[0].enqueue(Script(deltas=[f"w{i} " for i in range(200)], delay=0.02))
    with httpx.stream("POST", url + "/api/chat", json={**BODY, "stream": True}) as response:
        for _ in response.iter_raw():
            break  # the browser tab closes after the first bytes
    eventually(lambda: len(telemetry.spans()) == 2)
    server, client = telemetry.span("POST /api/chat"), telemetry.span(f"chat {MODEL}")
    for span in (server, client):
        assert telemetry.attrs(span)["tokenhub.outcome"] == "client_disconnect"
        assert span.status.status_code is StatusCode.UNSET
        assert "error.type" not in telemetry.attrs(span)
    assert upstream[0].requests[-1].wait_disconnected(5)
    assert proxy._observer.stats is not None
    eventually(lambda: proxy._observer.stats.turns["client_disconnect"] == 1)  # type: ignore[union-attr]
    turns = telemetry.points("tokenhub.proxy.turns")
    assert _point(turns, **{"tokenhub.outcome": "client_disconnect"}).value == 1
    ((_, open_streams),) = telemetry.points("tokenhub.proxy.open_streams")
    assert open_streams.value == 0


def test_issue_18_total_timeout_is_a_timeout(telemetry: Telemetry, upstream: Upstream) -> None:
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url, total_timeout=0.3)
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    upstream[0].enqueue(Script(deltas=["a"], end="stall"))
    with serve(app) as url:
        response = _chat(url, {**BODY, "stream": True})
    assert response.status_code == 200 and b"upstream_timeout" in response.content
    eventually(lambda: len(telemetry.spans()) == 2)
    server = telemetry.span("POST /api/chat")
    assert telemetry.attrs(server)["tokenhub.outcome"] == "timeout"
    assert telemetry.attrs(server)["error.type"] == "timeout"
    assert _point(telemetry.points("tokenhub.proxy.turns"), **{"tokenhub.outcome": "timeout"})


def test_issue_18_keepalives_are_counted(telemetry: Telemetry, upstream: Upstream) -> None:
    proxy = ChatProxy(
        api_key=KEY, base_url=upstream[1].base_url, keepalive_interval=0.05, stats=True
    )
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    upstream[0].enqueue(Script(deltas=["x"], first_delay=0.1, delay=0.5))
    with serve(app) as url:
        response = _chat(url, {**BODY, "stream": True})
        sent = response.text.count(": keep-alive")
        assert sent >= 1
        stats = httpx.get(url + "/api/chat/stats").json()
    assert stats["keepalives_sent"] == sent
    eventually(lambda: len(telemetry.spans()) == 2)
    assert telemetry.attrs(telemetry.span("POST /api/chat"))["tokenhub.keepalives"] == sent
    ((_, point),) = telemetry.points("tokenhub.proxy.keepalives")
    assert point.value == sent


def test_issue_18_principal_is_recorded_only_when_mapped(
    telemetry: Telemetry, upstream: Upstream
) -> None:
    def authorize(request: Any) -> str:
        return "alice@example.com"

    mapped = ChatProxy(
        api_key=KEY,
        base_url=upstream[1].base_url,
        authorize=authorize,
        telemetry_principal=lambda principal: f"team-{str(principal).split('@')[0]}",
    )
    unmapped = ChatProxy(api_key=KEY, base_url=upstream[1].base_url, authorize=authorize)
    for proxy in (mapped, unmapped):
        app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
        with serve(app) as url:
            assert _chat(url, {**BODY, "stream": True}).status_code == 200
    eventually(lambda: len(telemetry.spans("POST /api/chat")) == 2)
    first, second = (telemetry.attrs(s) for s in telemetry.spans("POST /api/chat"))
    assert first["enduser.id"] == "team-alice"
    assert "enduser.id" not in second
    turns = telemetry.points("tokenhub.proxy.turns")
    assert [a.get("enduser.id") for a, _ in turns] == ["team-alice", None]
    tokens = telemetry.points("tokenhub.proxy.tokens")
    assert {a.get("enduser.id") for a, _ in tokens} == {"team-alice", None}
    assert {a["gen_ai.token.type"] for a, _ in tokens} == {"input", "output"}
    assert "alice@example.com" not in json.dumps([a for a, _ in turns + tokens])


def test_issue_18_tool_loop_spans_go_under_the_request_span(
    telemetry: Telemetry, upstream: Upstream
) -> None:
    @tool
    def get_weather(city: str) -> str:
        """The weather now."""
        return "sunny"

    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url, tools=[get_weather])
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    upstream[0].enqueue(
        Script(tool_calls=[ScriptedToolCall(name="get_weather", arguments='{"city": "Nice"}')]),
        Script(text="Sunny in Nice."),
    )
    with serve(app) as url:
        assert _chat(url, {**BODY, "stream": True}).status_code == 200
    eventually(lambda: len(telemetry.spans()) == 4)
    server = telemetry.span("POST /api/chat")
    turns = telemetry.spans(f"chat {MODEL}")
    tool_span = telemetry.span("execute_tool get_weather")
    assert server.context is not None and turns[0].context is not None
    assert len(turns) == 2
    for turn in turns:
        assert turn.parent is not None and turn.parent.span_id == server.context.span_id
    assert tool_span.parent is not None
    assert tool_span.parent.span_id == turns[0].context.span_id
    traceparents = [r.headers["traceparent"] for r in upstream[0].requests[-2:]]
    assert {t.split("-")[1] for t in traceparents} == {f"{server.context.trace_id:032x}"}


# --- metrics ------------------------------------------------------------------------------------


def test_issue_18_proxy_metrics_of_a_completed_turn(
    telemetry: Telemetry, upstream: Upstream, proxy_url: tuple[str, ChatProxy]
) -> None:
    url, _ = proxy_url
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    response = _chat(url, body)
    eventually(lambda: len(telemetry.spans()) == 2)
    model = {"gen_ai.request.model": MODEL}
    turns = telemetry.points("tokenhub.proxy.turns")
    assert _point(turns, **model, **{"tokenhub.outcome": "completed"}).value == 1
    ((attrs, relayed),) = telemetry.points("tokenhub.proxy.relayed")
    assert relayed.value == len(response.content) and attrs == model
    ((_, ttft),) = telemetry.points("tokenhub.proxy.time_to_first_token")
    assert ttft.count == 1
    ((_, open_streams),) = telemetry.points("tokenhub.proxy.open_streams")
    assert open_streams.value == 0
    tokens = telemetry.points("tokenhub.proxy.tokens")
    # The browser asked for usage: the reported figures, not an estimate.
    assert {a["tokenhub.usage.estimated"] for a, _ in tokens} == {False}
    usage = telemetry.attrs(telemetry.span(f"chat {MODEL}"))
    output = _point(tokens, **{"gen_ai.token.type": "output"}).value
    assert output == usage["gen_ai.usage.output_tokens"]
    # The upstream call records the GenAI client histograms too.
    for name in (
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.time_to_first_chunk",
        "gen_ai.client.operation.time_per_output_chunk",
    ):
        assert telemetry.points(name), name


def test_issue_18_prometheus_scrape_shows_the_names_and_labels(upstream: Upstream) -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import REGISTRY, generate_latest

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    tokenhub_stream.instrument(meter_provider=provider)
    try:
        proxy = ChatProxy(
            api_key=KEY,
            base_url=upstream[1].base_url,
            authorize=lambda request: "alice",
            telemetry_principal=str,
        )
        app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
        body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
        with serve(app) as url:
            assert _chat(url, body).status_code == 200
            eventually(lambda: b"tokenhub_proxy_turns_total" in generate_latest(REGISTRY))
        scrape = generate_latest(REGISTRY).decode()
    finally:
        tokenhub_stream.instrument()
        provider.shutdown()
    lines = scrape.splitlines()

    def series(name: str, **labels: str) -> str:
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        found = [ln for ln in lines if ln.startswith(name + "{") and all(w in ln for w in wanted)]
        assert found, f"no {name} with {labels} in:\n{scrape}"
        return found[0]

    model = {"gen_ai_request_model": MODEL}
    series(
        "tokenhub_proxy_turns_total",
        tokenhub_outcome="completed",
        http_response_status_code="200",
        enduser_id="alice",
        **model,
    )
    series("tokenhub_proxy_tokens_total", gen_ai_token_type="output", enduser_id="alice")
    series("tokenhub_proxy_relayed_bytes_total", **model)
    series("tokenhub_proxy_open_streams", **model)
    series("tokenhub_proxy_time_to_first_token_seconds_bucket", le="+Inf", **model)
    series(
        "gen_ai_client_operation_duration_seconds_bucket",
        gen_ai_operation_name="chat",
        gen_ai_provider_name="openai",
        server_address="127.0.0.1",
        **model,
    )
    series("gen_ai_client_token_usage_bucket", gen_ai_token_type="input", **model)
    series("gen_ai_client_operation_time_to_first_chunk_seconds_count", **model)
    series("gen_ai_client_operation_time_per_output_chunk_seconds_sum", **model)
    assert KEY not in scrape and PROMPT not in scrape


def test_issue_18_proxy_records_neither_key_nor_content(
    telemetry: Telemetry, upstream: Upstream
) -> None:
    # An upstream that echoes the key in its answer: the browser gets it redacted, and
    # no span or metric carries it (nor the prompt, nor the answer).
    answer = f"the key is {KEY} and the secret is safe"
    upstream[0].enqueue(Script(text=answer), Script(status=400, error={"error": {"message": KEY}}))
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url)
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    with serve(app) as url:
        assert KEY not in _chat(url, {**BODY, "stream": True}).text
        assert _chat(url, {**BODY, "stream": True}).status_code == 400
    eventually(lambda: len(telemetry.spans()) == 4)
    recorded = [s.name for s in telemetry.spans()]
    for span in telemetry.spans():
        recorded.append(json.dumps(telemetry.attrs(span), default=str))
        recorded.append(str(span.status.description))
        recorded += [json.dumps(dict(e.attributes or {})) for e in span.events]
    data = telemetry.reader.get_metrics_data()
    assert data is not None
    recorded.append(data.to_json())
    text = "\n".join(recorded)
    for secret in (KEY, PROMPT, "the secret is safe"):
        assert secret not in text, secret


def test_issue_18_off_the_proxy_watches_nothing(upstream: Upstream) -> None:
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url)
    # No stats, no provider: no watch per request, and the exchange is the passthrough's
    # own coroutine (no extra frame held for the whole stream).
    turn = Turn()
    proxy._observer.begin({"type": "http", "method": "POST", "path": "/", "headers": []}, turn)
    assert turn.watch is None

    async def send(message: Message) -> None:
        pass

    exchange = proxy._passthrough.exchange(b"{}", True, send, turn)
    assert getattr(exchange, "cr_code", None) is Passthrough._exchange.__code__
    exchange.close()
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    with serve(app) as url:
        assert _chat(url, {**BODY, "stream": True}).status_code == 200
        assert httpx.get(url + "/api/chat/stats").status_code == 404  # stats not asked for
    assert "traceparent" not in upstream[0].requests[-1].headers
    assert proxy._observer.stats is None


# --- GET <mount>/stats --------------------------------------------------------------------------


def test_issue_18_stats_route_snapshot_without_opentelemetry(upstream: Upstream) -> None:
    proxy = ChatProxy(
        api_key=KEY,
        base_url=upstream[1].base_url,
        stats=True,
        authorize=lambda request: request.headers.get("x-user"),
        rate_limiter=InMemoryRateLimiter(rate=100, burst=100),
    )
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    user = {"x-user": "carol"}
    upstream[0].enqueue(
        Script(deltas=[f"w{i} " for i in range(10)], delay=0.02),
        Script(deltas=[f"w{i} " for i in range(40)], delay=0.05),
    )
    with serve(app) as url:
        stats_url = url + "/api/chat/stats"
        # Behind the same gate as the chat.
        assert httpx.get(stats_url).status_code == 401
        assert httpx.post(stats_url, headers=user).status_code == 405
        assert _chat(url, {**BODY, "stream": True}, **user).status_code == 200
        stream = {**BODY, "stream": True}
        with httpx.stream("POST", url + "/api/chat", json=stream, headers=user) as answer:
            chunks = answer.iter_raw()  # held: dropping it would close the connection
            next(chunks)  # the answer has begun: it is open, with its first byte
            assert httpx.get(stats_url, headers=user).json()["open_streams"] == 1
        response = httpx.get(stats_url, headers=user)
        eventually(lambda: httpx.get(stats_url, headers=user).json()["open_streams"] == 0)
        stats = httpx.get(stats_url, headers=user).json()
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert stats["object"] == "proxy.stats"
    assert stats["turns"] == {
        "completed": 1,
        "client_disconnect": 1,
        "upstream_error": 0,
        "timeout": 0,
        "rejected": 0,
    }
    ttft = stats["time_to_first_token"]
    assert ttft["samples"] == 2 and 0 < ttft["p50"] <= ttft["p95"] < 5
    rate = stats["tokens_per_second"]
    assert rate["samples"] >= 1 and rate["p50"] > 0
    assert stats["bytes_sent"] > 0
    assert stats["output_tokens"] > 0 and stats["input_tokens"] > 0
    assert stats["keepalives_sent"] == 0
    assert time.time() - 60 < stats["since"] <= time.time()
