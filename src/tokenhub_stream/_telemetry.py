"""OpenTelemetry spans and metrics for the clients, the tool loop and the proxy (sans-I/O).

What is emitted follows the GenAI semantic conventions of OpenTelemetry semantic conventions
**v1.41.0** (`docs/gen-ai/`, the last release before they moved to their own repository):
one `chat {model}` span per request (kind CLIENT; retries are span events, as the span
covers the whole logical operation), `execute_tool {name}` spans for the tool loop's
calls, and the histograms `gen_ai.client.operation.duration`, `gen_ai.client.token.usage`,
`gen_ai.client.operation.time_to_first_chunk` and
`gen_ai.client.operation.time_per_output_chunk`. docs/observability.md lists every name.

**Off, it costs one check per request.** `current()` is that check: it answers None when
opentelemetry-api is not installed, when `uninstrument()` was called, or when neither a
tracer provider nor a meter provider is configured (the API's own no-op and proxy
providers are not); nothing is created per request then. On, a request gets one
`ChatRecorder`, fed at the stream's lifecycle points (`_stream.py`: sent, retried, ended)
and never per chunk: the chunk count and times are read from the parser at the end.

**Content is opt-in, the key never recorded.** Message content (`gen_ai.input.messages`,
`gen_ai.output.messages`, tool arguments and results) is recorded only when
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT` is true (read when the telemetry is
set up) or `instrument(capture_content=True)`. Headers are never read; error texts are not
recorded either (an upstream's error message may quote the prompt): `error.type` is the
exception's class name.

Internal interface: `current`, `ChatRecorder`, `ToolRecorder` and `Telemetry` are used by
`_base.py`, `_stream.py`, `_retry.py`'s caller, `tools/_core.py` and `asgi/_telemetry.py`;
the conventions' names and attribute helpers are in `_genai.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from .__version__ import __version__
from ._exceptions import StreamTimeout, TruncatedStreamError
from ._genai import (
    CAPTURE_CONTENT_ENV,
    DURATION_BUCKETS,
    FIRST_CHUNK_BUCKETS,
    PER_CHUNK_BUCKETS,
    SCHEMA_URL,
    TOKEN_BUCKETS,
    error_type,
    input_messages,
    output_messages,
    provider_name,
    request_attributes,
    server_of,
    usage_attributes,
)

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Histogram, Meter, MeterProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from ._chunks import ChunkParser
    from ._models import ChatResult, Outcome, ToolCall, Usage

    #: Span and metric attributes.
    Attrs = dict[str, AttributeValue]

__all__ = [
    "ChatRecorder",
    "Telemetry",
    "ToolRecorder",
    "current",
    "instrument",
    "uninstrument",
]

# --- the switch -------------------------------------------------------------------------------

_AUTO: Literal["auto"] = "auto"
_mode: Literal["auto", "explicit", "off"] = _AUTO
# The telemetry every request gets without a further look: set by instrument() with real
# providers, or once both global providers are real (a global provider is set only once).
_chosen: Telemetry | None = None
# The last look at the global providers: (tracer provider, meter provider, telemetry).
_seen: tuple[object, object, Telemetry | None] | None = None
_apis: tuple[object, object] | None = None  # the opentelemetry.trace and .metrics modules
_installed: bool | None = None
# The modules holding the API's global providers (`_TRACER_PROVIDER`, `_METER_PROVIDER`:
# None until the application sets one), when the API keeps them there and no environment
# variable names a provider to load: then `current()` reads two module attributes instead
# of asking `get_tracer_provider()` and `get_meter_provider()`, which look the variables
# up in `os.environ` on every call while no provider is set (~1 µs a request).
_unset_globals: tuple[object, object] | None = None
_PROVIDER_ENVS = ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")


def current() -> Telemetry | None:
    """The telemetry for a request starting now; None when there is none (see module)."""
    chosen = _chosen
    if chosen is not None:
        return chosen
    if _mode is not _AUTO:
        return None
    unset = _unset_globals
    if (
        unset is not None
        and unset[0]._TRACER_PROVIDER is None  # type: ignore[attr-defined]
        and unset[1]._METER_PROVIDER is None  # type: ignore[attr-defined]
    ):
        return None  # neither global provider set yet: as `_from_globals` would find
    return _from_globals()


def _from_globals() -> Telemetry | None:
    global _chosen, _seen, _installed, _apis
    apis = _apis
    if apis is None:
        if _installed is None:
            try:
                import opentelemetry.metrics
                import opentelemetry.trace
            except ImportError:
                _installed = False
                return None
            _installed = True
            apis = _apis = (opentelemetry.trace, opentelemetry.metrics)
            _watch_unset_globals()
        else:
            return None
    tracer_provider = apis[0].get_tracer_provider()  # type: ignore[attr-defined]
    meter_provider = apis[1].get_meter_provider()  # type: ignore[attr-defined]
    seen = _seen
    if seen is not None and seen[0] is tracer_provider and seen[1] is meter_provider:
        return seen[2]
    real_tracer = tracer_provider if _is_real(tracer_provider) else None
    real_meter = meter_provider if _is_real(meter_provider) else None
    telemetry = None
    if real_tracer is not None or real_meter is not None:
        telemetry = Telemetry(real_tracer, real_meter, _capture_from_env())
    _seen = (tracer_provider, meter_provider, telemetry)
    if real_tracer is not None and real_meter is not None:
        _chosen = telemetry  # neither can change any more
    return telemetry


def _watch_unset_globals() -> None:
    """Set `_unset_globals` when the fast check in `current()` means the same as a look
    through the API's getters: the API keeps its globals where this version does, and no
    variable names a provider for the getters to load (opentelemetry-instrument and the
    SDK's configurator set them before the process starts, and loading one sets the
    global, which the fast check sees)."""
    global _unset_globals
    import opentelemetry.metrics._internal
    import opentelemetry.trace

    trace_module, meter_module = opentelemetry.trace, opentelemetry.metrics._internal
    if (
        hasattr(trace_module, "_TRACER_PROVIDER")
        and hasattr(meter_module, "_METER_PROVIDER")
        and not any(name in os.environ for name in _PROVIDER_ENVS)
    ):
        _unset_globals = (trace_module, meter_module)


def _is_real(provider: object) -> bool:
    # The API's own providers (its no-op ones, and the proxies it hands out until the
    # application sets a provider) live in the API's modules; an SDK's live elsewhere.
    module = type(provider).__module__
    return not (
        module == "opentelemetry.trace"
        or module.startswith(("opentelemetry.trace.", "opentelemetry.metrics"))
    )


def _capture_from_env() -> bool:
    value = os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower()
    # "true" as in the conventions' instrumentations; the newer modes name where content
    # goes, and this library records it on spans.
    return value in ("true", "1", "yes", "span_only", "span_and_event")


def instrument(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    capture_content: bool | None = None,
) -> None:
    """Choose where this library's spans and metrics go.

    Without a call, they go to OpenTelemetry's global providers once the application
    configures them (`trace.set_tracer_provider`, `metrics.set_meter_provider`, or
    `opentelemetry-instrument`); this is for other providers, or for tests.

    ```python
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    tokenhub_stream.instrument(tracer_provider=provider)
    ```

    Args:
        tracer_provider: where spans go (None: the global tracer provider).
        meter_provider: where metrics go (None: the global meter provider).
        capture_content: record message content on spans (`gen_ai.input.messages`,
            `gen_ai.output.messages`, tool arguments and results). None: as the
            `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT` variable says (default
            off).

    Raises:
        ImportError: opentelemetry-api is not installed (`pip install 'tokenhub_stream[otel]'`).
    """
    global _mode, _chosen, _seen
    try:
        from opentelemetry import metrics, trace
    except ImportError as exc:
        raise ImportError(
            "telemetry needs opentelemetry-api: pip install 'tokenhub_stream[otel]'"
        ) from exc
    tracer_provider = tracer_provider or trace.get_tracer_provider()
    meter_provider = meter_provider or metrics.get_meter_provider()
    capture = _capture_from_env() if capture_content is None else capture_content
    real_tracer = tracer_provider if _is_real(tracer_provider) else None
    real_meter = meter_provider if _is_real(meter_provider) else None
    _seen = None
    if real_tracer is None and real_meter is None:
        _mode, _chosen = _AUTO, None  # nothing real given: watch the globals, as by default
        return
    _mode, _chosen = "explicit", Telemetry(real_tracer, real_meter, capture)


def uninstrument() -> None:
    """Emit no spans or metrics from now on, whatever providers are configured.

    `instrument()` turns them on again. Streams and turns already running finish as they
    began.
    """
    global _mode, _chosen, _seen
    _mode, _chosen, _seen = "off", None, None


# --- the instruments ----------------------------------------------------------------------------


class Telemetry:
    """A tracer and the GenAI client histograms, for one pair of providers."""

    __slots__ = (
        "capture_content",
        "duration",
        "extras",
        "meter",
        "per_chunk",
        "first_chunk",
        "tokens",
        "tracer",
        "_servers",
    )

    def __init__(
        self,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        capture_content: bool,
    ) -> None:
        self.capture_content = capture_content
        self.tracer: Tracer | None = None
        self.meter: Meter | None = None
        self.duration: Histogram | None = None
        self.tokens: Histogram | None = None
        self.first_chunk: Histogram | None = None
        self.per_chunk: Histogram | None = None
        #: What other parts built on these providers (the proxy's instruments), by name.
        self.extras: dict[str, object] = {}
        self._servers: dict[str, tuple[str, int | None, str]] = {}
        if tracer_provider is not None:
            self.tracer = tracer_provider.get_tracer(
                "tokenhub_stream", __version__, schema_url=SCHEMA_URL
            )
        if meter_provider is not None:
            meter = self.meter = meter_provider.get_meter(
                "tokenhub_stream", __version__, schema_url=SCHEMA_URL
            )
            self.duration = meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
            self.tokens = meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
            )
            self.first_chunk = meter.create_histogram(
                "gen_ai.client.operation.time_to_first_chunk",
                unit="s",
                description="Time to receive the first chunk, measured from when the client "
                "issues the generation request to when the first chunk is received in the "
                "response stream.",
                explicit_bucket_boundaries_advisory=FIRST_CHUNK_BUCKETS,
            )
            self.per_chunk = meter.create_histogram(
                "gen_ai.client.operation.time_per_output_chunk",
                unit="s",
                description="Time per output chunk after the first one (here: a stream's "
                "mean, recorded once per stream).",
                explicit_bucket_boundaries_advisory=PER_CHUNK_BUCKETS,
            )

    def __repr__(self) -> str:
        return (
            f"<Telemetry traces={self.tracer is not None} metrics={self.meter is not None} "
            f"capture_content={self.capture_content}>"
        )

    def server(self, url: str) -> tuple[str, int | None, str]:
        """(server.address, server.port, gen_ai.provider.name) of an API URL, cached."""
        found = self._servers.get(url)
        if found is None:
            address, port = server_of(url)
            found = (address, port, provider_name(address))
            if len(self._servers) > 256:  # many distinct URLs: keep the cache small
                self._servers.clear()
            self._servers[url] = found
        return found

    def chat(
        self,
        *,
        model: str,
        params: Mapping[str, object],
        url: str,
        messages: Sequence[Mapping[str, object]],
        stream: bool,
    ) -> ChatRecorder:
        """The recorder of one chat request (`build_call` makes it)."""
        return ChatRecorder(
            self, model=model, params=params, url=url, messages=messages, stream=stream
        )


# --- one chat request -----------------------------------------------------------------------------


class ChatRecorder:
    """The span and measurements of one chat request (`stream_chat`, `chat()`).

    Fed at lifecycle points only: `sending` (before each attempt: the span starts at the
    first), `retrying` (through `Retries`), then one of `stream_ended` or
    `completion_ended`. Whatever comes after the first end is ignored.
    """

    __slots__ = (
        "_base",
        "_ended",
        "_messages",
        "_model",
        "_params",
        "_retries",
        "_started",
        "_stream",
        "_telemetry",
        "span",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        model: str,
        params: Mapping[str, object],
        url: str,
        messages: Sequence[Mapping[str, object]],
        stream: bool,
    ) -> None:
        self._telemetry = telemetry
        self._model = model
        self._params = params
        self._stream = stream
        address, port, provider = telemetry.server(url)
        # The metrics' attributes, and the span's first ones.
        self._base: Attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "server.address": address,
        }
        if port is not None:
            self._base["server.port"] = port
        self._messages = messages if telemetry.capture_content else None
        self._started: float | None = None
        self._retries = 0
        self._ended = False
        #: The `chat {model}` span once the first attempt is sent (None without a tracer).
        self.span: Span | None = None

    def __repr__(self) -> str:
        return f"<ChatRecorder model={self._model!r} started={self._started is not None}>"

    def sending(self, headers: dict[str, str]) -> None:
        """An attempt is about to be sent with `headers` (the call's own dict)."""
        if self._started is not None:
            return
        self._started = time.monotonic()
        tracer = self._telemetry.tracer
        if tracer is None:
            return
        from opentelemetry import propagate, trace

        attributes = dict(self._base)
        attributes.update(request_attributes(self._params))
        attributes["gen_ai.request.stream"] = self._stream
        if self._messages is not None:
            attributes["gen_ai.input.messages"] = input_messages(self._messages)
        span = self.span = tracer.start_span(
            f"chat {self._model}", kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        # W3C traceparent to the upstream: a gateway that traces joins this trace.
        propagate.inject(headers, context=trace.set_span_in_context(span))

    def retrying(self, error: BaseException, attempt: int, delay: float) -> None:
        """`Retries` granted a retry after `error`: an event on the span."""
        self._retries = attempt
        span = self.span
        if span is not None and not self._ended:
            span.add_event(
                "retry",
                {
                    "error.type": error_type(error),
                    "tokenhub.retry.attempt": attempt,
                    "tokenhub.retry.delay": delay,
                },
            )

    def context(self) -> Context | None:
        """A context with this request's span as the parent (the tool calls' spans)."""
        if self.span is None:
            return None
        from opentelemetry import trace

        return trace.set_span_in_context(self.span)

    def stream_ended(self, parser: ChunkParser, outcome: Outcome | None) -> None:
        """The stream's outcome is final; its parser holds what arrived."""
        if self._ended or self._started is None:
            self._ended = True
            return
        first = parser.first_token_at
        chunks = parser.delta_count
        per_chunk = None
        last = parser.last_event_at
        if first is not None and chunks > 1 and last is not None and last > first:
            # One value per stream (its mean), not one per chunk: the count and the times
            # are read once, here, so the hot loop does nothing for the telemetry.
            per_chunk = (last - first) / (chunks - 1)
        kind = outcome.kind if outcome is not None else "cancelled"
        extra: Attrs = {"tokenhub.outcome": kind, "tokenhub.chunks": chunks}
        if outcome is not None and outcome.detail:
            extra["tokenhub.outcome.detail"] = outcome.detail
        output = None
        if self._telemetry.capture_content and self.span is not None:
            output = output_messages(parser.message(), parser.finish_reason)
        self._end(
            response_id=parser.response_id,
            response_model=parser.response_model,
            finish_reason=parser.finish_reason,
            usage=parser.usage,
            error=outcome.error if outcome is not None else None,
            first_chunk=None if first is None else first - self._started,
            per_chunk=per_chunk,
            extra=extra,
            output=output,
        )

    def completion_ended(self, result: ChatResult | None, error: BaseException | None) -> None:
        """`chat()` returned `result`, or raised `error`."""
        if self._ended or self._started is None:
            self._ended = True
            return
        output = None
        if result is not None and self._telemetry.capture_content and self.span is not None:
            output = output_messages(result.message, result.message.finish_reason)
        if error is None:
            outcome = "completed"
        elif not isinstance(error, Exception):  # cancelled, KeyboardInterrupt
            outcome, error = "cancelled", None
        elif isinstance(error, StreamTimeout):
            outcome = "timeout"
        elif isinstance(error, TruncatedStreamError):
            outcome = "truncated"
        else:
            outcome = "upstream_error"  # as a stream's `Outcome` says it
        self._end(
            response_id=None if result is None else result.id,
            response_model=None if result is None else result.model,
            finish_reason=None if result is None else result.message.finish_reason,
            usage=None if result is None else result.usage,
            error=error,
            first_chunk=None,
            per_chunk=None,
            extra={"tokenhub.outcome": outcome},
            output=output,
        )

    def _end(
        self,
        *,
        response_id: str | None,
        response_model: str | None,
        finish_reason: str | None,
        usage: Usage | None,
        error: BaseException | None,
        first_chunk: float | None,
        per_chunk: float | None,
        extra: Attrs,
        output: str | None,
    ) -> None:
        self._ended = True
        assert self._started is not None
        duration = time.monotonic() - self._started
        telemetry = self._telemetry
        attributes = self._base
        if response_model:
            attributes = {**attributes, "gen_ai.response.model": response_model}
        if telemetry.meter is not None:
            self._record_metrics(attributes, usage, error, duration, first_chunk, per_chunk)
        span = self.span
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        ended = usage_attributes(usage)
        if response_id:
            ended["gen_ai.response.id"] = response_id
        if response_model:
            ended["gen_ai.response.model"] = response_model
        if finish_reason:
            ended["gen_ai.response.finish_reasons"] = (finish_reason,)
        if first_chunk is not None:
            ended["gen_ai.response.time_to_first_chunk"] = first_chunk
        if self._retries:
            ended["tokenhub.retries"] = self._retries
        if output is not None:
            ended["gen_ai.output.messages"] = output
        ended.update(extra)
        if error is not None:
            ended["error.type"] = error_type(error)
            status_code = getattr(error, "status_code", None)
            if isinstance(status_code, int):
                ended["http.response.status_code"] = status_code
            span.set_status(Status(StatusCode.ERROR, error_type(error)))
        span.set_attributes(ended)
        span.end()

    def _record_metrics(
        self,
        attributes: Attrs,
        usage: Usage | None,
        error: BaseException | None,
        duration: float,
        first_chunk: float | None,
        per_chunk: float | None,
    ) -> None:
        telemetry = self._telemetry
        assert telemetry.duration is not None and telemetry.tokens is not None
        timed = attributes if error is None else {**attributes, "error.type": error_type(error)}
        telemetry.duration.record(duration, timed)
        if usage is not None:
            if usage.prompt_tokens is not None:
                telemetry.tokens.record(
                    usage.prompt_tokens,
                    {**attributes, "gen_ai.token.type": "input"},
                )
            if usage.completion_tokens is not None:
                telemetry.tokens.record(
                    usage.completion_tokens,
                    {**attributes, "gen_ai.token.type": "output"},
                )
        if self._stream:
            if first_chunk is not None and telemetry.first_chunk is not None:
                telemetry.first_chunk.record(first_chunk, attributes)
            if per_chunk is not None and telemetry.per_chunk is not None:
                telemetry.per_chunk.record(per_chunk, attributes)

    def tool(self, call: ToolCall, description: str | None) -> ToolRecorder | None:
        """The `execute_tool` span of one call this request's answer asked for."""
        tracer = self._telemetry.tracer
        span = self.span
        if tracer is None or span is None:
            return None
        return ToolRecorder(tracer, span, call, description, self._telemetry.capture_content)


class ToolRecorder:
    """The `execute_tool {name}` span of one tool call, a child of its turn's chat span."""

    __slots__ = ("_capture", "_span")

    def __init__(
        self,
        tracer: Tracer,
        parent: Span,
        call: ToolCall,
        description: str | None,
        capture: bool,
    ) -> None:
        from opentelemetry import trace

        attributes: Attrs = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": call.name,
            "gen_ai.tool.type": "function",
        }
        if call.id:
            attributes["gen_ai.tool.call.id"] = call.id
        if description:
            attributes["gen_ai.tool.description"] = description
        if capture:
            attributes["gen_ai.tool.call.arguments"] = call.arguments
        self._capture = capture
        self._span = tracer.start_span(
            f"execute_tool {call.name}",
            context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.INTERNAL,
            attributes=attributes,
        )

    def ended(self, result: str, error: BaseException | None) -> None:
        """The tool returned (`result`, what the model gets) or raised `error`."""
        span = self._span
        if self._capture:
            span.set_attribute("gen_ai.tool.call.result", result)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("error.type", error_type(error))
            span.set_status(Status(StatusCode.ERROR, error_type(error)))
        span.end()
