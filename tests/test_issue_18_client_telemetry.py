"""Issue #18: OpenTelemetry GenAI spans and metrics of the clients and the tool loop.

Recorded by the SDK's in-memory span exporter and metric reader (the `telemetry` fixture,
tests/conftest.py), against the local upstream over real sockets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry.trace import SpanKind, StatusCode

import tokenhub_stream
from conftest import Telemetry
from tokenhub_stream import (
    AsyncClient,
    AuthenticationError,
    Client,
    StreamTimeout,
    Timeout,
    _genai,
    stream_chat,
    tool,
)
from tokenhub_stream import _telemetry as telemetry_module
from tokenhub_stream._base import BaseClient, build_call
from tokenhub_stream._config import UNSET
from tokenhub_stream.testing import (
    FakeChatUpstream,
    RunningUpstream,
    Script,
    ScriptedToolCall,
    run_upstream,
)

pytestmark = pytest.mark.timeout(30)

KEY = "sk-otel-canary-7d3e9b1a4c6f2e8d"
PROMPT = "the secret plan is purple elephants"
MODEL = "gpt-4o-mini"


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(api_key=KEY, delay=0.001)) as running:
        yield running


def _messages(text: str = PROMPT) -> list[dict[str, object]]:
    return [{"role": "user", "content": text}]


# --- one stream ---------------------------------------------------------------------------------


def test_issue_18_stream_chat_is_one_chat_span_with_the_genai_attributes(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    upstream.app.enqueue(Script(deltas=["Hel", "lo", " there"], delay=0.01))
    with Client(api_key=KEY, base_url=upstream.base_url, include_usage=True) as client:
        with client.stream_chat(
            _messages(), model=MODEL, max_tokens=40, temperature=0.3, top_p=0.9, stop=["\n\n"]
        ) as stream:
            assert "".join(stream) == "Hello there"
    span = telemetry.span()
    assert span.name == f"chat {MODEL}"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    attrs = telemetry.attrs(span)
    port = int(upstream.base_url.rsplit(":", 1)[1].split("/")[0])
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.request.max_tokens"] == 40
    assert attrs["gen_ai.request.temperature"] == 0.3
    assert attrs["gen_ai.request.top_p"] == 0.9
    assert attrs["gen_ai.request.stop_sequences"] == ("\n\n",)
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == port
    assert str(attrs["gen_ai.response.id"]).startswith("chatcmpl-")
    assert attrs["gen_ai.response.model"] == MODEL
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["gen_ai.usage.output_tokens"] == 3
    assert 0 < attrs["gen_ai.response.time_to_first_chunk"] < 5
    assert attrs["tokenhub.outcome"] == "completed"
    assert attrs["tokenhub.chunks"] == 3
    assert "error.type" not in attrs
    # The W3C traceparent went upstream, naming this span.
    traceparent = upstream.app.requests[-1].headers["traceparent"]
    assert span.context is not None
    assert traceparent.split("-")[1:3] == [
        f"{span.context.trace_id:032x}",
        f"{span.context.span_id:016x}",
    ]


def test_issue_18_stream_records_the_four_client_histograms(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    upstream.app.enqueue(Script(deltas=["a", "b", "c", "d"], delay=0.02))
    with Client(api_key=KEY, base_url=upstream.base_url, include_usage=True) as client:
        with client.stream_chat(_messages(), model=MODEL) as stream:
            assert "".join(stream) == "abcd"
    base = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "server.address": "127.0.0.1",
    }
    ((attrs, duration),) = telemetry.points("gen_ai.client.operation.duration")
    assert base.items() <= attrs.items() and "error.type" not in attrs
    assert duration.count == 1 and 0.06 < duration.sum < 5
    tokens = {a["gen_ai.token.type"]: p for a, p in telemetry.points("gen_ai.client.token.usage")}
    assert tokens["output"].sum == 4 and tokens["input"].sum > 0
    ((attrs, first),) = telemetry.points("gen_ai.client.operation.time_to_first_chunk")
    assert base.items() <= attrs.items()
    assert first.count == 1 and 0 < first.sum < duration.sum
    ((attrs, per_chunk),) = telemetry.points("gen_ai.client.operation.time_per_output_chunk")
    # One value per stream: its mean time between chunks (0.02 s apart here).
    assert per_chunk.count == 1 and 0.01 < per_chunk.sum < 1


@pytest.mark.anyio
async def test_issue_18_async_client_and_stream_chat_are_traced_alike(
    telemetry: Telemetry, upstream: RunningUpstream, anyio_backend: str
) -> None:
    async with AsyncClient(api_key=KEY, base_url=upstream.base_url) as client:
        async with client.stream_chat(_messages(), model=MODEL) as stream:
            async for _ in stream:
                pass
    async with stream_chat(
        _messages(), model="gpt-4o", api_key=KEY, base_url=upstream.base_url
    ) as s:
        async for _ in s:
            pass
    names = [span.name for span in telemetry.spans()]
    assert names == [f"chat {MODEL}", "chat gpt-4o"]
    outcomes = [telemetry.attrs(span)["tokenhub.outcome"] for span in telemetry.spans()]
    assert outcomes == ["completed", "completed"]


def test_issue_18_structured_output_is_gen_ai_output_type_json(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    with Client(api_key=KEY, base_url=upstream.base_url) as client:
        with client.stream_chat(
            _messages(), model=MODEL, response_format={"type": "json_object"}
        ) as stream:
            "".join(stream)
        client.chat(_messages(), model=MODEL)
    structured, plain = (telemetry.attrs(span) for span in telemetry.spans())
    assert structured["gen_ai.output.type"] == "json"
    assert "gen_ai.output.type" not in plain


def test_issue_18_chat_is_a_span_without_chunk_metrics(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    with Client(api_key=KEY, base_url=upstream.base_url) as client:
        result = client.chat(_messages(), model=MODEL, max_tokens=30)
    span = telemetry.span()
    attrs = telemetry.attrs(span)
    assert span.name == f"chat {MODEL}"
    assert attrs["gen_ai.request.stream"] is False
    assert attrs["gen_ai.request.max_tokens"] == 30
    assert attrs["gen_ai.response.id"] == result.id
    assert result.usage is not None
    assert attrs["gen_ai.usage.output_tokens"] == result.usage.completion_tokens
    assert len(telemetry.points("gen_ai.client.operation.duration")) == 1
    assert telemetry.points("gen_ai.client.operation.time_to_first_chunk") == []
    assert telemetry.points("gen_ai.client.operation.time_per_output_chunk") == []


# --- failures, retries, early ends --------------------------------------------------------------


def test_issue_18_error_status_sets_error_type_and_status(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    with Client(api_key="sk-wrong", base_url=upstream.base_url) as client:
        with pytest.raises(AuthenticationError):
            with client.stream_chat(_messages(), model=MODEL) as stream:
                list(stream)
    span = telemetry.span()
    attrs = telemetry.attrs(span)
    assert span.status.status_code is StatusCode.ERROR
    assert attrs["error.type"] == "AuthenticationError"
    assert attrs["http.response.status_code"] == 401
    assert attrs["tokenhub.outcome"] == "upstream_error"
    ((attrs, point),) = telemetry.points("gen_ai.client.operation.duration")
    assert attrs["error.type"] == "AuthenticationError" and point.count == 1
    assert telemetry.points("gen_ai.client.token.usage") == []
    # chat() says the same, with the stream's outcome names.
    with Client(api_key="sk-wrong", base_url=upstream.base_url) as client:
        with pytest.raises(AuthenticationError):
            client.chat(_messages(), model=MODEL)
    attrs = telemetry.attrs(telemetry.spans()[-1])
    assert attrs["tokenhub.outcome"] == "upstream_error"
    assert attrs["error.type"] == "AuthenticationError"


def test_issue_18_retries_are_events_of_one_span(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    upstream.app.enqueue(
        Script(status=429, headers={"Retry-After": "0"}),
        Script(status=429, headers={"Retry-After": "0"}),
        Script(text="third time lucky"),
    )
    with Client(api_key=KEY, base_url=upstream.base_url, max_retries=2) as client:
        with client.stream_chat(_messages(), model=MODEL) as stream:
            assert "".join(stream) == "third time lucky"
        assert client.chat(_messages(), model=MODEL).message.content
    stream_span, chat_span = telemetry.spans()
    events = [(e.name, dict(e.attributes or {})) for e in stream_span.events]
    retry = {"error.type": "RateLimitError", "tokenhub.retry.delay": 0.0}
    assert events == [
        ("retry", {**retry, "tokenhub.retry.attempt": 1}),
        ("retry", {**retry, "tokenhub.retry.attempt": 2}),
    ]
    assert telemetry.attrs(stream_span)["tokenhub.retries"] == 2
    assert stream_span.status.status_code is StatusCode.UNSET
    assert chat_span.events == ()  # the chat() went through at once
    assert len(upstream.app.requests) == 4
    # One operation each: one duration, covering the retries.
    ((_, duration),) = telemetry.points("gen_ai.client.operation.duration")
    assert duration.count == 2


def test_issue_18_timeout_is_an_error_with_its_kind(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    upstream.app.enqueue(Script(deltas=["one"], end="stall"))
    timeout = Timeout(10, idle=0.2)
    with Client(api_key=KEY, base_url=upstream.base_url, timeout=timeout) as client:
        with pytest.raises(StreamTimeout):
            with client.stream_chat(_messages(), model=MODEL, max_retries=0) as stream:
                list(stream)
    span = telemetry.span()
    attrs = telemetry.attrs(span)
    assert span.status.status_code is StatusCode.ERROR
    assert attrs["error.type"] == "StreamTimeout"
    assert attrs["tokenhub.outcome"] == "timeout"
    assert attrs["tokenhub.outcome.detail"] == "idle"


def test_issue_18_a_consumer_leaving_early_is_cancelled_not_an_error(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    upstream.app.enqueue(Script(deltas=[f"w{i} " for i in range(50)], delay=0.01))
    with Client(api_key=KEY, base_url=upstream.base_url) as client:
        with client.stream_chat(_messages(), model=MODEL) as stream:
            for _ in stream:
                break
    span = telemetry.span()
    assert telemetry.attrs(span)["tokenhub.outcome"] == "cancelled"
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in telemetry.attrs(span)
    assert span.end_time is not None


def test_issue_18_a_stream_never_opened_records_nothing(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    with Client(api_key=KEY, base_url=upstream.base_url) as client:
        client.stream_chat(_messages(), model=MODEL).close()
    assert telemetry.spans() == []
    assert telemetry.points("gen_ai.client.operation.duration") == []


# --- the tool loop ------------------------------------------------------------------------------


@tool
def get_weather(city: str) -> str:
    """The weather now."""
    return f"sunny in {city}"


@tool
def broken(city: str) -> str:
    """Always fails."""
    raise RuntimeError("the weather service is down")


def test_issue_18_tool_calls_are_execute_tool_spans_under_their_turn(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    calls = [
        ScriptedToolCall(name="get_weather", arguments='{"city": "Paris"}', id="call_a"),
        ScriptedToolCall(name="broken", arguments='{"city": "Rome"}', id="call_b"),
    ]
    upstream.app.enqueue(Script(tool_calls=calls), Script(text="Paris is sunny."))
    with Client(api_key=KEY, base_url=upstream.base_url) as client:
        loop = client.run_tools(_messages(), tools=[get_weather, broken], model=MODEL)
        assert loop.until_done().content == "Paris is sunny."
    turns = telemetry.spans(f"chat {MODEL}")
    assert len(turns) == 2
    first_turn = turns[0]
    assert first_turn.context is not None
    assert telemetry.attrs(first_turn)["gen_ai.response.finish_reasons"] == ("tool_calls",)
    ok = telemetry.span("execute_tool get_weather")
    failed = telemetry.span("execute_tool broken")
    for span, call_id in ((ok, "call_a"), (failed, "call_b")):
        attrs = telemetry.attrs(span)
        assert span.kind is SpanKind.INTERNAL
        assert span.parent is not None and span.parent.span_id == first_turn.context.span_id
        assert span.context is not None
        assert span.context.trace_id == first_turn.context.trace_id
        assert attrs["gen_ai.operation.name"] == "execute_tool"
        assert attrs["gen_ai.tool.call.id"] == call_id
        assert attrs["gen_ai.tool.type"] == "function"
        # Arguments and results are content: not recorded by default.
        assert "gen_ai.tool.call.arguments" not in attrs
        assert "gen_ai.tool.call.result" not in attrs
    assert telemetry.attrs(ok)["gen_ai.tool.description"] == "The weather now."
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert telemetry.attrs(failed)["error.type"] == "RuntimeError"


@pytest.mark.anyio
async def test_issue_18_async_tool_loop_spans(
    telemetry: Telemetry, upstream: RunningUpstream, anyio_backend: str
) -> None:
    upstream.app.enqueue(
        Script(tool_calls=[ScriptedToolCall(name="get_weather", arguments='{"city": "Oslo"}')]),
        Script(text="Cold."),
    )
    async with AsyncClient(api_key=KEY, base_url=upstream.base_url) as client:
        await client.run_tools(_messages(), tools=[get_weather], model=MODEL).until_done()
    turn = telemetry.spans(f"chat {MODEL}")[0]
    span = telemetry.span("execute_tool get_weather")
    assert turn.context is not None
    assert span.parent is not None and span.parent.span_id == turn.context.span_id


# --- content, and the key -----------------------------------------------------------------------


def _everything(recorded: Telemetry) -> str:
    """Every span name, attribute and event, and every metric attribute, as text."""
    out: list[str] = []
    for span in recorded.spans():
        out.append(span.name)
        out.append(json.dumps(recorded.attrs(span), default=str))
        out += [json.dumps([e.name, dict(e.attributes or {})], default=str) for e in span.events]
        out.append(str(span.status.description))
    data = recorded.reader.get_metrics_data()
    assert data is not None
    out.append(data.to_json())
    return "\n".join(out)


def test_issue_18_the_key_and_message_content_are_in_no_span_or_metric(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    answer = "an answer only the model knows"
    upstream.app.enqueue(
        Script(text=answer),
        Script(tool_calls=[ScriptedToolCall(name="get_weather", arguments='{"city": "Atlantis"}')]),
        Script(text=answer),
    )
    with Client(api_key=KEY, base_url=upstream.base_url, include_usage=True) as client:
        with client.stream_chat(_messages(), model=MODEL) as stream:
            assert "".join(stream) == answer
        client.run_tools(_messages(), tools=[get_weather], model=MODEL).until_done()
    with Client(api_key="sk-" + KEY, base_url=upstream.base_url) as client:
        with pytest.raises(AuthenticationError):
            client.chat(_messages(), model=MODEL)
    recorded = _everything(telemetry)
    assert len(telemetry.spans()) == 5
    for secret in (KEY, PROMPT, answer, "Atlantis", "sunny in"):
        assert secret not in recorded, secret


def test_issue_18_content_is_recorded_when_the_application_opts_in(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The conventions' switch, read when the telemetry is set up.
    monkeypatch.setenv(_genai.CAPTURE_CONTENT_ENV, "true")
    recorded = Telemetry(capture_content=True)
    tokenhub_stream.instrument(
        tracer_provider=recorded.tracer_provider, meter_provider=recorded.meter_provider
    )
    try:
        upstream.app.enqueue(
            Script(tool_calls=[ScriptedToolCall(name="get_weather", arguments='{"city": "Lima"}')]),
            Script(text="It is sunny in Lima."),
        )
        with Client(api_key=KEY, base_url=upstream.base_url) as client:
            client.run_tools(_messages(), tools=[get_weather], model=MODEL).until_done()
    finally:
        tokenhub_stream.instrument()
    first, second = (recorded.attrs(span) for span in recorded.spans(f"chat {MODEL}"))
    assert json.loads(first["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}
    ]
    output = json.loads(first["gen_ai.output.messages"])
    assert output[0]["finish_reason"] == "tool_calls"
    assert output[0]["parts"][0]["name"] == "get_weather"
    inputs = json.loads(second["gen_ai.input.messages"])
    call_id = output[0]["parts"][0]["id"]
    assert inputs[-1]["parts"] == [
        {"type": "tool_call_response", "id": call_id, "response": "sunny in Lima"}
    ]
    assert json.loads(second["gen_ai.output.messages"])[0]["parts"] == [
        {"type": "text", "content": "It is sunny in Lima."}
    ]
    tool_span = recorded.attrs(recorded.span("execute_tool get_weather"))
    assert tool_span["gen_ai.tool.call.arguments"] == '{"city": "Lima"}'
    assert tool_span["gen_ai.tool.call.result"] == "sunny in Lima"
    assert KEY not in _everything(recorded)


# --- off ----------------------------------------------------------------------------------------


def test_issue_18_off_by_default_nothing_is_made_per_request(upstream: RunningUpstream) -> None:
    # No provider configured in this process: the API's proxy providers do not count.
    assert telemetry_module.current() is None
    client = BaseClient(api_key=KEY, base_url=upstream.base_url)
    call = build_call(
        client, _messages(), UNSET, {}, stream=True, timeout=UNSET, max_retries=UNSET,
        include_usage=UNSET, extra_headers=None,
    )  # fmt: skip
    assert call.observer is None
    with Client(api_key=KEY, base_url=upstream.base_url) as sync_client:
        with sync_client.stream_chat(_messages()) as stream:
            assert "".join(stream)
    assert "traceparent" not in upstream.app.requests[-1].headers


def test_issue_18_uninstrument_stops_spans_and_instrument_resumes(
    telemetry: Telemetry, upstream: RunningUpstream
) -> None:
    tokenhub_stream.uninstrument()
    assert telemetry_module.current() is None
    with Client(api_key=KEY, base_url=upstream.base_url) as client:
        client.chat(_messages(), model=MODEL)
        assert telemetry.spans() == []
        tokenhub_stream.instrument(tracer_provider=telemetry.tracer_provider)
        client.chat(_messages(), model=MODEL)
    assert len(telemetry.spans()) == 1


def _run(code: str, upstream: RunningUpstream) -> str:
    env = {**os.environ, "BASE_URL": upstream.base_url, "KEY": KEY}
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=25, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_issue_18_without_opentelemetry_installed_streams_work(upstream: RunningUpstream) -> None:
    out = _run(
        """
        import os, sys
        sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
        import tokenhub_stream
        from tokenhub_stream import _telemetry
        client = tokenhub_stream.Client(api_key=os.environ["KEY"], base_url=os.environ["BASE_URL"])
        with client, client.stream_chat([{"role": "user", "content": "hi"}]) as s:
            text = "".join(s)
        assert _telemetry.current() is None
        try:
            tokenhub_stream.instrument()
        except ImportError as exc:
            print("instrument:", exc)
        print("ok", bool(text))
        """,
        upstream,
    )
    assert "ok True" in out
    assert "pip install 'tokenhub_stream[otel]'" in out


def test_issue_18_global_providers_are_used_once_configured(upstream: RunningUpstream) -> None:
    # set_tracer_provider can be called once per process: in a process of its own.
    out = _run(
        """
        import os
        import tokenhub_stream
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        client = tokenhub_stream.Client(api_key=os.environ["KEY"], base_url=os.environ["BASE_URL"])
        client.chat([{"role": "user", "content": "before"}])  # no provider yet: no span
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        client.chat([{"role": "user", "content": "after"}])
        client.close()
        print([s.name for s in exporter.get_finished_spans()])
        """,
        upstream,
    )
    assert out.strip() == "['chat claude-3-5-sonnet-20241022']"


def test_issue_18_provider_name_follows_the_api_host() -> None:
    assert _genai.provider_name("api.openai.com") == "openai"
    assert _genai.provider_name("api.deepseek.com") == "deepseek"
    assert _genai.provider_name("x.openai.azure.com") == "azure.ai.openai"
    assert _genai.provider_name("api.sandboxclaw.com") == "openai"  # the API flavour
    assert _genai.server_of("https://api.groq.com/openai/v1") == ("api.groq.com", 443)
    assert _genai.server_of("http://127.0.0.1:8000/v1") == ("127.0.0.1", 8000)


def test_issue_17_the_off_check_is_two_reads_and_sees_a_meter_provider_set_later(
    upstream: RunningUpstream,
) -> None:
    # Off, `current()` reads the API's two globals (no environment look-up per request);
    # a global provider set later still turns the telemetry on at once.
    out = _run(
        """
        import os
        import tokenhub_stream
        from tokenhub_stream import _telemetry
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        client = tokenhub_stream.Client(api_key=os.environ["KEY"], base_url=os.environ["BASE_URL"])
        client.chat([{"role": "user", "content": "before"}])
        print("fast", _telemetry._unset_globals is not None)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        client.chat([{"role": "user", "content": "after"}])
        client.close()
        data = reader.get_metrics_data()
        names = sorted(
            m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        )
        print(names)
        """,
        upstream,
    )
    assert "fast True" in out
    assert "gen_ai.client.operation.duration" in out
