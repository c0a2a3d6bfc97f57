"""The proxy's telemetry: a span per request, the upstream call as a GenAI client span,
the proxy's metrics, and the counters behind `GET <mount>/stats`.

- **Spans.** A request gets a span named `POST <path>`: kind SERVER, or INTERNAL under
  the span an ASGI instrumentation already opened (the current context). A passthrough's
  upstream call is a `chat {model}` CLIENT span under it, with the client's `gen_ai.*`
  attributes, and its W3C `traceparent` goes upstream in a per-request copy of the
  headers. A tool loop's upstream calls are the client's own `chat` spans (and its
  `execute_tool` spans), under the request span.
- **Metrics** (`tokenhub.proxy.*`): open streams, turns by outcome and status, tokens
  (reported, else estimated) by type, bytes relayed, keep-alives, and the time to the
  first byte of the answer as the browser sees it; a passthrough's upstream call also
  records the GenAI client histograms. `enduser.id` is on the spans and the turn and
  token counters only when `telemetry_principal` maps the principal to it.
- **Cost.** Nothing runs per request unless `stats=True` or a provider is configured
  (`TurnWatch` is then made once per request, and the turn's copy is parsed, as for
  `on_complete`: the usage and the finish reason come from it). Nothing runs per chunk
  beyond that copy; the keep-alive count is one integer on the turn.

Internal interface of `tokenhub_stream.asgi` (used by `_proxy.py`, `_passthrough.py`,
`_tools.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from .._genai import (
    FIRST_CHUNK_BUCKETS,
    input_messages,
    output_messages,
    request_attributes,
    usage_attributes,
)
from .._telemetry import Telemetry, current
from ._stats import ProxyStats

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, UpDownCounter
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.util.types import AttributeValue

    from ._record import TurnSummary
    from ._turn import Scope, Turn

    Attrs = dict[str, AttributeValue]

__all__ = ["PrincipalHook", "ProxyObserver", "TurnWatch"]

logger = logging.getLogger("tokenhub_stream.asgi")

#: `telemetry_principal`: the principal `authorize` returned -> the `enduser.id` to record
#: (None: record none for this request).
PrincipalHook = Callable[[object], "str | None"]


class _Instruments:
    """The proxy's own instruments on one meter (shared by every proxy of the process)."""

    __slots__ = ("keepalives", "open_streams", "relayed", "tokens", "ttft", "turns")

    def __init__(self, telemetry: Telemetry) -> None:
        meter = telemetry.meter
        assert meter is not None
        self.open_streams: UpDownCounter = meter.create_up_down_counter(
            "tokenhub.proxy.open_streams",
            unit="{stream}",
            description="Chat turns being forwarded now.",
        )
        self.turns: Counter = meter.create_counter(
            "tokenhub.proxy.turns",
            unit="{turn}",
            description="Chat requests, by outcome and status.",
        )
        self.tokens: Counter = meter.create_counter(
            "tokenhub.proxy.tokens",
            unit="{token}",
            description="Tokens of the forwarded turns: reported, else estimated.",
        )
        self.relayed: Counter = meter.create_counter(
            "tokenhub.proxy.relayed", unit="By", description="Bytes sent to the browsers."
        )
        self.keepalives: Counter = meter.create_counter(
            "tokenhub.proxy.keepalives",
            unit="{keepalive}",
            description="Keep-alive comments sent on silent streams.",
        )
        self.ttft: Histogram = meter.create_histogram(
            "tokenhub.proxy.time_to_first_token",
            unit="s",
            description="From the request to the first byte of the answer sent to the browser.",
            explicit_bucket_boundaries_advisory=FIRST_CHUNK_BUCKETS,
        )


def _instruments(telemetry: Telemetry) -> _Instruments | None:
    if telemetry.meter is None:
        return None
    found = telemetry.extras.get("proxy")
    if not isinstance(found, _Instruments):
        found = telemetry.extras["proxy"] = _Instruments(telemetry)
    return found


class ProxyObserver:
    """One proxy's telemetry settings and stats; `begin` watches a request, if anything
    is to be recorded."""

    __slots__ = ("principal", "provider", "server", "stats")

    def __init__(
        self,
        *,
        stats: bool,
        principal: PrincipalHook | None,
        server: tuple[str, int | None],
        provider: str,
    ) -> None:
        self.stats = ProxyStats() if stats else None
        self.principal = principal
        #: The upstream's server.address and server.port, and its gen_ai.provider.name.
        self.server = server
        self.provider = provider

    def begin(self, scope: Scope, turn: Turn) -> None:
        """Watch `turn` (sets `turn.watch`) when stats or OpenTelemetry are on."""
        telemetry = current()
        if telemetry is None and self.stats is None:
            return
        turn.watch = TurnWatch(self, telemetry, scope)


class TurnWatch:
    """The telemetry of one chat request; fed at its lifecycle points, ended once."""

    __slots__ = (
        "_attrs",
        "_ended",
        "_instruments",
        "_messages",
        "_opened",
        "_owner",
        "_started",
        "_telemetry",
        "_upstream",
        "_upstream_started",
        "model",
        "span",
        "stream",
        "upstream_status",
    )

    def __init__(self, owner: ProxyObserver, telemetry: Telemetry | None, scope: Scope) -> None:
        self._owner = owner
        self._telemetry = telemetry
        self._instruments = None if telemetry is None else _instruments(telemetry)
        self._started = time.monotonic()
        self._opened = False
        self._ended = False
        self._messages: list[object] | None = None
        self._attrs: Attrs = {}
        self._upstream: Span | None = None
        self._upstream_started = 0.0
        self.model: str | None = None
        self.stream = True
        #: The upstream's HTTP status once its headers came (the passthrough sets it).
        self.upstream_status: int | None = None
        #: The request's span (None without a tracer).
        self.span: Span | None = None
        tracer = None if telemetry is None else telemetry.tracer
        if tracer is not None:
            self.span = _request_span(tracer, scope)

    def __repr__(self) -> str:
        return f"<TurnWatch model={self.model!r} ended={self._ended}>"

    # --- lifecycle ------------------------------------------------------------------------

    def request(self, body: Mapping[str, object], stream: bool) -> None:
        """The request passed the gate and its body is final: it is being forwarded."""
        model = body.get("model")
        self.model = model if isinstance(model, str) else None
        self.stream = stream
        attrs: Attrs = {"gen_ai.operation.name": "chat"}
        if self.model is not None:
            attrs["gen_ai.request.model"] = self.model
        attrs.update(request_attributes(body))
        self._attrs = attrs
        telemetry = self._telemetry
        if telemetry is not None and telemetry.capture_content:
            messages = body.get("messages")
            self._messages = list(messages) if isinstance(messages, list) else []
        if self.span is not None:
            self.span.set_attributes(attrs)
        self._opened = True
        stats = self._owner.stats
        if stats is not None:
            stats.opened()
        if self._instruments is not None:
            self._instruments.open_streams.add(1, self._model_attrs())

    def attach(self) -> object:
        """Make the request's span the current one in this task (the tool loop's client
        spans then go under it); returns the token for `detach`, None when not tracing."""
        if self.span is None:
            return None
        from opentelemetry import context, trace

        return context.attach(trace.set_span_in_context(self.span))

    def detach(self, token: object) -> None:
        """Undo `attach` (in the same task)."""
        if token is not None:
            from opentelemetry import context

            context.detach(token)  # type: ignore[arg-type]

    def upstream_headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The passthrough is calling upstream with `headers`: start its CLIENT span, and
        return the headers to send (a copy with `traceparent` when tracing)."""
        self._upstream_started = time.monotonic()
        telemetry = self._telemetry
        if telemetry is None or telemetry.tracer is None or self.span is None:
            return headers
        from opentelemetry import propagate, trace

        address, port = self._owner.server
        attrs: Attrs = {**self._attrs, "gen_ai.provider.name": self._owner.provider}
        attrs["server.address"] = address
        if port is not None:
            attrs["server.port"] = port
        attrs["gen_ai.request.stream"] = self.stream
        if self._messages is not None:
            attrs["gen_ai.input.messages"] = input_messages(self._messages)
        span = self._upstream = telemetry.tracer.start_span(
            f"chat {self.model or ''}".rstrip(),
            context=trace.set_span_in_context(self.span),
            kind=trace.SpanKind.CLIENT,
            attributes=attrs,
        )
        copy = dict(headers)
        propagate.inject(copy, context=trace.set_span_in_context(span))
        return copy

    def upstream_ended(self, turn: Turn) -> None:
        """The passthrough's exchange ended (also when cancelled): end the CLIENT span and
        record the GenAI client metrics of the upstream call."""
        try:
            self._upstream_end(turn)
        except Exception:  # telemetry never breaks a response
            logger.exception("telemetry failed request_id=%s", turn.request_id)

    def _upstream_end(self, turn: Turn) -> None:
        telemetry = self._telemetry
        if telemetry is None or turn.collector is None:
            return
        summary = turn.collector.summary()
        duration = time.monotonic() - self._upstream_started
        failure = self._upstream_error(turn)
        attrs: Attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._owner.provider,
        }
        if self.model is not None:
            attrs["gen_ai.request.model"] = self.model
        address, port = self._owner.server
        attrs["server.address"] = address
        if port is not None:
            attrs["server.port"] = port
        if summary.response_model:
            attrs["gen_ai.response.model"] = summary.response_model
        first = summary.first_token_at
        first_chunk = None if first is None else max(0.0, first - self._upstream_started)
        if telemetry.meter is not None:
            _record_client_metrics(telemetry, attrs, summary, failure, duration, first_chunk)
        span = self._upstream
        if span is None:
            return
        self._upstream = None
        ended = _response_attributes(summary)
        if first_chunk is not None and self.stream:
            ended["gen_ai.response.time_to_first_chunk"] = first_chunk
        if telemetry.capture_content:
            ended["gen_ai.output.messages"] = output_messages(
                summary.message, summary.message.finish_reason
            )
        if self.upstream_status is not None:
            ended["http.response.status_code"] = self.upstream_status
        ended["tokenhub.outcome"] = turn.outcome
        _end_span(span, ended, failure, error=failure is not None)

    def _upstream_error(self, turn: Turn) -> str | None:
        status = self.upstream_status
        if status is not None and status >= 400:
            return str(status)
        if turn.outcome in ("upstream_error", "timeout"):
            return turn.outcome
        return None

    def ended(self, turn: Turn) -> None:
        """The request is over (`log_turn`): its stats, metrics and span, once."""
        if self._ended:
            return
        self._ended = True
        try:
            self._end(turn)
        except Exception:  # telemetry never breaks a (finished) response
            logger.exception("telemetry failed request_id=%s", turn.request_id)

    def _end(self, turn: Turn) -> None:
        summary = None if turn.collector is None else turn.collector.summary()
        usage = None if summary is None else (summary.usage or summary.estimated)
        estimated = summary is not None and summary.usage is None
        input_tokens = (usage.prompt_tokens or 0) if usage is not None else 0
        output_tokens = (usage.completion_tokens or 0) if usage is not None else 0
        ttft = turn.ttfb if turn.outcome != "rejected" else None
        output_seconds = None
        if summary is not None and summary.first_token_at is not None:
            end = summary.last_event_at or summary.first_token_at
            output_seconds = end - summary.first_token_at
        elif turn.ttfb is not None and self.stream:  # the tool loop: from its first byte
            output_seconds = time.perf_counter() - turn.started - turn.ttfb
        stats = self._owner.stats
        if stats is not None:
            stats.ended(
                outcome=turn.outcome,
                status=turn.status,
                opened=self._opened,
                ttft=ttft,
                output_seconds=output_seconds,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                bytes_sent=turn.bytes_sent,
                keepalives=turn.keepalives,
            )
        principal = self._principal(turn)
        instruments = self._instruments
        if instruments is not None:
            model = self._model_attrs()
            if self._opened:
                instruments.open_streams.add(-1, model)
            counted: Attrs = {**model, "tokenhub.outcome": turn.outcome}
            if turn.status:
                counted["http.response.status_code"] = turn.status
            if principal is not None:
                counted["enduser.id"] = principal
            instruments.turns.add(1, counted)
            if usage is not None:
                tokens: Attrs = {**model, "tokenhub.usage.estimated": estimated}
                if principal is not None:
                    tokens["enduser.id"] = principal
                if input_tokens:
                    instruments.tokens.add(input_tokens, {**tokens, "gen_ai.token.type": "input"})
                if output_tokens:
                    instruments.tokens.add(output_tokens, {**tokens, "gen_ai.token.type": "output"})
            if turn.bytes_sent:
                instruments.relayed.add(turn.bytes_sent, model)
            if turn.keepalives:
                instruments.keepalives.add(turn.keepalives, model)
            if ttft is not None:
                instruments.ttft.record(ttft, model)
        span = self.span
        if span is None:
            return
        ended: Attrs = {"tokenhub.outcome": turn.outcome, "tokenhub.request_id": turn.request_id}
        if turn.status:
            ended["http.response.status_code"] = turn.status
        if principal is not None:
            ended["enduser.id"] = principal
        if summary is not None:
            ended.update(_response_attributes(summary))
            if summary.usage is None and usage is not None:
                ended["tokenhub.usage.estimated"] = True
        if turn.ttfb is not None:
            ended["tokenhub.time_to_first_token"] = turn.ttfb
        ended["tokenhub.bytes_sent"] = turn.bytes_sent
        if turn.keepalives:
            ended["tokenhub.keepalives"] = turn.keepalives
        failure = None
        if turn.outcome == "rejected":
            failure = str(turn.status)
        elif turn.outcome in ("upstream_error", "timeout"):
            failure = turn.outcome
        # As HTTP servers report: a 4xx is the client's error, not the server's.
        _end_span(span, ended, failure, error=failure is not None and turn.status >= 500)

    def _model_attrs(self) -> Attrs:
        return {} if self.model is None else {"gen_ai.request.model": self.model}

    def _principal(self, turn: Turn) -> str | None:
        hook = self._owner.principal
        if hook is None or turn.principal is None:
            return None
        try:
            value = hook(turn.principal)
        except Exception:
            logger.exception("telemetry_principal failed request_id=%s", turn.request_id)
            return None
        return None if value is None else str(value)


def _request_span(tracer: Tracer, scope: Scope) -> Span:
    from opentelemetry import propagate, trace

    method = str(scope.get("method", "POST"))
    path = str(scope.get("path", ""))
    attrs: Attrs = {"http.request.method": method, "url.path": path}
    if trace.get_current_span().get_span_context().is_valid:
        # An ASGI instrumentation opened the server span already: ours goes under it.
        kind, context = trace.SpanKind.INTERNAL, None
    else:
        # We are the server span: continue the trace the caller sent, if any.
        kind, context = trace.SpanKind.SERVER, propagate.extract(_HeaderCarrier(scope))
    return tracer.start_span(f"{method} {path}", context=context, kind=kind, attributes=attrs)


class _HeaderCarrier(Mapping[str, str]):
    """The request's headers for `propagate.extract` (which reads `traceparent` and the
    other propagation headers by lower-case name)."""

    def __init__(self, scope: Scope) -> None:
        raw = scope.get("headers", ())
        self._headers: dict[str, str] = {}
        for name, value in raw if isinstance(raw, list | tuple) else ():
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def __getitem__(self, key: str) -> str:
        return self._headers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)


def _response_attributes(summary: TurnSummary) -> Attrs:
    out = usage_attributes(summary.usage)
    if summary.response_id:
        out["gen_ai.response.id"] = summary.response_id
    if summary.response_model:
        out["gen_ai.response.model"] = summary.response_model
    if summary.message.finish_reason:
        out["gen_ai.response.finish_reasons"] = (summary.message.finish_reason,)
    return out


def _record_client_metrics(
    telemetry: Telemetry,
    attrs: Attrs,
    summary: TurnSummary,
    failure: str | None,
    duration: float,
    first_chunk: float | None,
) -> None:
    assert telemetry.duration is not None and telemetry.tokens is not None
    telemetry.duration.record(
        duration, attrs if failure is None else {**attrs, "error.type": failure}
    )
    usage = summary.usage
    if usage is not None:
        if usage.prompt_tokens is not None:
            telemetry.tokens.record(usage.prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        if usage.completion_tokens is not None:
            telemetry.tokens.record(
                usage.completion_tokens, {**attrs, "gen_ai.token.type": "output"}
            )
    if first_chunk is not None and telemetry.first_chunk is not None:
        telemetry.first_chunk.record(first_chunk, attrs)
    first, last, chunks = summary.first_token_at, summary.last_event_at, summary.chunks
    if first is not None and last is not None and chunks > 1 and telemetry.per_chunk is not None:
        telemetry.per_chunk.record((last - first) / (chunks - 1), attrs)


def _end_span(span: Span, attrs: Attrs, failure: str | None, *, error: bool) -> None:
    if failure is not None:
        attrs["error.type"] = failure
        if error:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, failure))
    span.set_attributes(attrs)
    span.end()
