"""Sans-I/O chat-completion stream parser: bytes in, text deltas or typed events out.

`ChunkParser` owns an `SSEDecoder` and assembles the assistant message whichever way
the stream is read. It never raises from `feed_*`: an error (bad frame, error frame,
oversized event) is stored in `.error` and processing stops, so the I/O shell can first
hand out the deltas decoded before it, then raise.

A whole non-streaming `chat.completion` body is read by `_completion.py`'s
`parse_completion`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from operator import length_hint
from typing import Any

from ._completion import thinking_text
from ._config import DEFAULT_MAX_EVENT_BYTES
from ._errors import error_from_frame
from ._exceptions import ProtocolError, TokenHubError, TruncatedStreamError
from ._json import JSON_BACKEND, Redact, loads
from ._models import (
    ChatMessage,
    ContentDelta,
    FinishEvent,
    ReasoningDelta,
    RefusalDelta,
    StreamEvent,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
)
from ._sse import SSEDecoder
from ._template import bulk_contents, scanstring, template_loop

__all__ = ["ChunkParser"]


def _stdlib_loads_event(data: str | bytes) -> Any:
    # `json.loads(bytes)` sniffs the encoding in Python (1.6 µs of a 4 µs parse of a
    # typical chunk) and decodes with "surrogatepass", letting encoded lone surrogates
    # through; a strict UTF-8 decode first is faster and rejects them (a ValueError:
    # the event is then decoded per the spec, U+FFFD, by `_reload_event`).
    if type(data) is bytes:
        data = data.decode()
    return json.loads(data)


# The parser of one event's data, raw bytes or text.
_loads_event: Callable[[str | bytes], Any] = (
    loads if JSON_BACKEND == "orjson" else _stdlib_loads_event
)


_UNPARSED: Any = object()  # `_feed_datas`: the first event is not parsed yet


# orjson rejects a lone surrogate escape (`\ud800`) where the stdlib keeps it: with
# orjson, a template hit whose content has a `\u` escape is parsed in full instead.
_TEMPLATE_U_ESCAPES = JSON_BACKEND == "stdlib"
_TEMPLATE_PROBE = "tokenhub-probe"
_TEMPLATE_EVERY = 16  # content deltas between two attempts to learn a template
# The fewest chunks `_template_run` hands to `bulk_contents` (below, the loop is cheaper),
# the most (its buffers stay in the CPU's cache: 3,000 chunks of 190 bytes cost 2.4x
# more per chunk than 1,300), and the content deltas it waits after a run it did not take.
_BULK_MIN = 5
_BULK_MAX = 1024
_BULK_BACKOFF = 64


def _is_blank(data: str | bytes) -> bool:
    # An event whose data is empty or only whitespace (`data:`, a bare `data` line): the
    # spec dispatches it with data "", but it carries no chunk, so it is passed over like
    # a keep-alive comment instead of failing as invalid JSON (issue #15). Only asked once
    # the JSON parser has refused the data, so well-formed events never pay for it. (The
    # hot path's raw bytes start with "{": never blank.)
    return isinstance(data, str) and not data.strip(" \t\n\r")


class _ToolCallBuilder:
    __slots__ = ("arguments", "extra", "id", "name", "type")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.type = "function"
        self.arguments: list[str] = []
        self.extra: dict[str, object] = {}

    def build(self) -> ToolCall:
        return ToolCall(self.id, self.name, "".join(self.arguments), self.type, dict(self.extra))


class ChunkParser:
    """Parses one chat-completion event stream.

    ```python
    parser = ChunkParser()
    for chunk in network_chunks:
        for text in parser.feed_text(chunk):
            print(text, end="")
        if parser.stopped:
            break
    parser.feed_eof()
    if parser.error:
        raise parser.error
    message = parser.message()
    ```
    """

    __slots__ = (
        "_batch_base",
        "_bulk_next",
        "_content",
        "_decoder",
        "_handout",
        "_last_tc",
        "_reasoning",
        "_redact",
        "_refusal",
        "_tc_by_index",
        "_template",
        "_template_next",
        "_tool_fragments",
        "_tool_calls",
        "_usage_raw",
        "clock",
        "_events_out",
        "done",
        "ended_at",
        "error",
        "finish_reason",
        "first_token_at",
        "last_event_at",
        "request_id",
        "response_id",
        "response_model",
        "role",
        "started_at",
        "stopped",
        "usage",
    )

    def __init__(
        self,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        strict: bool = False,
        clock: Callable[[], float] = time.monotonic,
        started_at: float | None = None,
        request_id: str | None = None,
        redact: Redact | None = None,
    ) -> None:
        self._decoder = SSEDecoder(max_event_bytes=max_event_bytes, strict=strict)
        self.clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.request_id = request_id
        self._redact = redact
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._refusal: list[str] = []
        self._tool_calls: list[_ToolCallBuilder] = []
        self._tc_by_index: dict[int, _ToolCallBuilder] = {}
        self._last_tc: _ToolCallBuilder | None = None
        self._tool_fragments = 0
        # (prefix, suffix) of the last plain content chunk around its content's string
        # literal; see `_learn_template`.
        self._template: tuple[bytes, bytes] | None = None
        self._template_next = 0
        self._bulk_next = 0
        # The deltas of the last `feed_text_batch` run, as handed out, and the length of
        # `_content` before the run's template deltas: see `_content_out`.
        self._handout: Iterator[str] | None = None
        self._batch_base = 0
        self._usage_raw: Mapping[str, object] | None = None
        self.usage: Usage | None = None
        self.role = "assistant"
        self.finish_reason: str | None = None
        self.done = False
        self.error: TokenHubError | None = None
        #: True after `[DONE]` or an error: nothing more will be decoded.
        self.stopped = False
        self._events_out = 0
        self.first_token_at: float | None = None
        self.last_event_at: float | None = None
        self.ended_at: float | None = None
        #: The chunks' `id` and `model`, read once, from the chunk that carries the
        #: finish_reason (or the usage): never per content chunk.
        self.response_id: str | None = None
        self.response_model: str | None = None

    @property
    def delivered(self) -> int:
        """Non-zero once `feed_*` handed out anything: from then on, no retry."""
        return self._events_out or len(self._content_out())

    @property
    def delta_count(self) -> int:
        """Deltas of every kind so far: content, reasoning, refusal and tool-call fragments."""
        return (
            len(self._content_out())
            + len(self._reasoning)
            + len(self._refusal)
            + self._tool_fragments
        )

    @property
    def refusal(self) -> str | None:
        """The model's refusal so far (`delta.refusal` fragments), or None if it sent none."""
        return "".join(self._refusal) if self._refusal else None

    def _content_out(self) -> list[str]:
        # The content deltas so far, but for the template deltas of the last
        # `feed_text_batch` run not taken from its iterator yet (a consumer that stops
        # part-way through a run has the message it would have had chunk by chunk).
        content = self._content
        handout = self._handout
        if handout is not None:
            left = length_hint(handout)
            if left:
                return content[: max(self._batch_base, len(content) - left)]
        return content

    @property
    def finished(self) -> bool:
        """True when the stream ended properly: `[DONE]` or a finish_reason was seen."""
        return self.done or self.finish_reason is not None

    def feed_text(self, chunk: bytes) -> list[str]:
        """Decode `chunk`; return the content deltas it completed."""
        decoder = self._decoder
        # Hottest path: the chunk is the last plain content chunk with only the content
        # string changed (an upstream repeats id, model, created, ... in every chunk).
        # The prefix and suffix were part of a whole event that parsed as a plain content
        # delta, and a JSON lexer is in the same state after the same prefix, so if the
        # middle is one valid string literal body, the event is that same object with
        # this content: only the literal needs decoding, not the ~200 bytes around it.
        template = self._template
        if (
            template is not None
            and chunk.startswith(template[0])
            and chunk.endswith(template[1])
            and decoder.at_event_start
            and not self.stopped
            and len(chunk) - 8 <= decoder.max_event_bytes
        ):
            start = len(template[0])
            stop = len(chunk) - len(template[1]) + 1  # after the closing quote
            if stop > start:
                try:
                    literal = chunk[start:stop].decode()
                    content, end = scanstring(literal, 0)
                except ValueError:  # invalid UTF-8, a control character, a bad escape
                    pass  # the paths below report it, or decode it as the spec says
                else:
                    if end == len(literal) and (_TEMPLATE_U_ESCAPES or "\\u" not in literal):
                        self.last_event_at = now = self.clock()
                        if not content:
                            return []
                        self._content.append(content)
                        if self.first_token_at is None:
                            self.first_token_at = now
                        return [content]
        # Hot path: one whole `data: {...}` event per chunk, no partial state pending
        # (SSEDecoder.feed_data's guard, inlined to save a call per event), holding one
        # plain content delta for choice 0 and nothing else. The JSON parser reads the
        # bytes as they are; anything else (invalid UTF-8, another shape, a wrong type)
        # leaves this path before any state changed and takes the general one below.
        if (
            decoder.at_event_start
            and chunk.startswith(b"data: {")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk[-1] == 10  # "\n"
            and chunk.find(b"\r") < 0  # faster than `not in`
            and len(chunk) - 8 <= decoder.max_event_bytes
            and not self.stopped
        ):
            data = chunk[6:-2]
            try:
                obj = _loads_event(data)
            except (ValueError, RecursionError):  # the general path reports it
                return self._feed_datas((data,))
            try:
                (choice,) = obj["choices"]
                delta = choice["delta"]
                if (
                    len(delta) == 1
                    and type(content := delta["content"]) is str
                    and not choice.get("finish_reason")
                    and not choice.get("index")
                    and obj.get("usage") is None
                    and "error" not in obj
                    and "x_groq" not in obj
                ):
                    self.last_event_at = now = self.clock()
                    if len(self._content) >= self._template_next:
                        self._learn_template(chunk, content)
                    if not content:
                        return []
                    self._content.append(content)
                    if self.first_token_at is None:
                        self.first_token_at = now
                    return [content]
            except (KeyError, TypeError, ValueError):
                pass
            return self._feed_datas((data,), obj)
        datas = self._decode(chunk)
        return self._feed_datas(datas) if datas else []

    def feed_text_batch(self, chunks: Sequence[bytes], start: int = 0) -> tuple[Iterator[str], int]:
        """Decode a run of `chunks` from `chunks[start]` in one call, exactly as `feed_text`
        would chunk by chunk; return an iterator over the run's content deltas and the
        index of the first chunk not decoded yet.

        A run is `chunks[start]`, then every chunk after it that repeats the last plain
        content chunk but for its content (the template fast path, done in one loop for
        the run, with one clock reading: they arrived together). It ends before any other
        chunk, at the end of `chunks`, or once the parser `stopped`: call again from the
        returned index while it is below `len(chunks)` and the parser is not `stopped`.

        Until the iterator is exhausted, `message()`, `delivered` and `delta_count` count
        the run's first chunk and only the deltas taken from the iterator after it: a
        consumer that stops part-way through a run sees the message it would have had
        chunk by chunk (only a run's first chunk changes anything but the content). Take
        every delta before feeding the parser more, or feed it nothing more.
        """
        handout = self._handout
        if handout is not None and length_hint(handout):
            # The last run was not handed out in full: what was not is gone.
            content = self._content
            del content[max(self._batch_base, len(content) - length_hint(handout)) :]
        out: list[str] = []
        end = self._template_run(chunks, start, out)
        if end == start and end < len(chunks):
            out = self.feed_text(chunks[start])
            end += 1
            self._batch_base = len(self._content)
            if not self.stopped:
                end = self._template_run(chunks, end, out)
        else:
            self._batch_base = len(self._content) - len(out)
        self._handout = handout = iter(out)
        return handout, end

    def _template_run(self, chunks: Sequence[bytes], start: int, out: list[str]) -> int:
        # `feed_text`'s template path for each chunk from `chunks[start]` while it applies
        # (its checks of the parser's state hold for the whole run: a template hit changes
        # no state but the content); returns the index of the first chunk it did not take.
        template = self._template
        decoder = self._decoder
        if template is None or self.stopped or not decoder.at_event_start:
            return start
        prefix, suffix = template
        limit = decoder.max_event_bytes + 8
        before = len(out)
        end = start
        if len(chunks) - start >= _BULK_MIN and len(self._content) >= self._bulk_next:
            end = self._bulk_run(prefix, suffix, chunks, start, out, limit)
        if end == start:
            end = template_loop(prefix, suffix, chunks, start, out, limit, _TEMPLATE_U_ESCAPES)
        if end > start:
            self.last_event_at = now = self.clock()
            if len(out) > before:
                self._content.extend(out[before:] if before else out)
                if self.first_token_at is None:
                    self.first_token_at = now
        return end

    def _bulk_run(
        self,
        prefix: bytes,
        suffix: bytes,
        chunks: Sequence[bytes],
        start: int,
        out: list[str],
        limit: int,
    ) -> int:
        # `bulk_contents` over the longest run from `chunks[start]` that could be template
        # hits (its first and last chunk look like one); returns where the run ended, or
        # `start` if it did not take it. Then it waits _BULK_BACKOFF content deltas before
        # it tries again: its cost grows with the read, so a stream whose reads mix other
        # chunks in (a non-hit inside the run) keeps the per-chunk loop.
        first = chunks[start]
        if not (first.startswith(prefix) and first.endswith(suffix)):
            return start
        stop = min(len(chunks), start + _BULK_MAX)
        while not chunks[stop - 1].endswith(suffix):  # the finish chunk, [DONE], ...
            stop -= 1
        if stop - start < _BULK_MIN:
            return start
        run = chunks[start:stop] if start or stop < len(chunks) else chunks
        contents = bulk_contents(prefix, suffix, run, limit, _TEMPLATE_U_ESCAPES)
        if contents is None:
            self._bulk_next = len(self._content) + _BULK_BACKOFF
            return start
        out.extend(contents)
        return stop

    def _learn_template(self, chunk: bytes, content: str) -> None:
        # `chunk` is one whole event that parsed as a plain content delta for choice 0.
        # Find its content's string literal and keep what surrounds it, unless anything
        # is in doubt: the key written another way, or found somewhere else than
        # `choices[0].delta` (a probe with another literal in its place must parse to
        # that content), a repeated key.
        self._template_next = len(self._content) + _TEMPLATE_EVERY
        key = chunk.find(b'"content":')
        if key < 0:
            return
        start = key + 10
        while chunk[start] in b" \t":
            start += 1
        if chunk[start] != 34:  # '"': a string literal starts here
            return
        start += 1
        stop = start
        while True:  # the closing quote: the first one not escaped by a backslash
            stop = chunk.find(b'"', stop)
            if stop < 0:
                return
            escapes = 0
            while chunk[stop - 1 - escapes] == 92:  # "\\"
                escapes += 1
            if escapes % 2 == 0:
                break
            stop += 1
        prefix, suffix = chunk[:start], chunk[stop:]
        probe = prefix[6:] + _TEMPLATE_PROBE.encode() + suffix[:-2]
        try:
            literal = chunk[start : stop + 1].decode()
            if scanstring(literal, 0) != (content, len(literal)):
                return
            obj = _loads_event(probe)
            if obj["choices"][0]["delta"]["content"] != _TEMPLATE_PROBE:
                return
        except (KeyError, TypeError, ValueError, IndexError, RecursionError):
            return
        self._template = (prefix, suffix)

    def _decode(self, chunk: bytes) -> list[str]:
        # The data of the events `chunk` completed; none once stopped, or when the decoder
        # refuses the chunk (the error is recorded).
        if self.stopped:
            return []
        try:
            return self._decoder.feed_data(chunk)
        except ProtocolError as exc:
            self.error, self.stopped = exc, True
            return []

    def _feed_datas(
        self,
        datas: tuple[bytes] | list[str],
        parsed: object = _UNPARSED,
        events: list[StreamEvent] | None = None,
    ) -> list[str]:
        # The general path: every event's data, any shape; returns the content deltas,
        # and appends the typed events to `events` when given (feed_events). `parsed` is
        # the first event's JSON when feed_text's hot path already parsed it.
        out: list[str] = []
        before = self.last_event_at
        self.last_event_at = self.clock()
        blank = 0
        for data in datas:
            if data == "[DONE]":
                self.done = self.stopped = True
                break
            try:
                if parsed is not _UNPARSED:
                    obj, parsed = parsed, _UNPARSED
                else:
                    try:
                        obj = _loads_event(data)
                    except ValueError as exc:
                        if _is_blank(data):
                            blank += 1
                            continue
                        obj = self._reload_event(data, exc)
                text = self._apply(obj, events)
            except TokenHubError as exc:
                self.error, self.stopped = exc, True
                break
            except (ValueError, RecursionError) as exc:
                self.error, self.stopped = ProtocolError(f"invalid JSON in data frame: {exc}"), True
                break
            if text:
                out.append(text)
        if blank == len(datas):
            self.last_event_at = before  # blank events only: no progress, as a comment
        if not self.stopped:
            self._take_deferred()
        return out

    def _reload_event(self, data: bytes | str, error: ValueError) -> Any:
        # The hot path handed the JSON parser raw bytes and it failed: if they are not
        # valid UTF-8, decode them as the spec says and parse again; otherwise re-raise.
        if not isinstance(data, bytes):
            raise ProtocolError(f"invalid JSON in data frame: {error}")
        try:
            text = data.decode("utf-8", self._decoder.utf8_errors)
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"invalid UTF-8 in event data: {exc.reason}") from None
        return loads(text)

    def _take_deferred(self) -> None:
        # The decoder returned the events before a bad line of the same chunk and kept
        # the error for later: record it now, not when the next chunk (if any) arrives.
        failed = self._decoder.deferred_error
        if failed is not None:
            self.error, self.stopped = failed, True

    def feed_events(self, chunk: bytes) -> list[StreamEvent]:
        """Decode `chunk`; return the typed events it completed."""
        out: list[StreamEvent] = []
        datas = self._decode(chunk)
        if datas:
            self._feed_datas(datas, events=out)
            self._events_out += len(out)
        return out

    def feed_eof(self) -> None:
        """Signal that the body ended; records `TruncatedStreamError` if it ended early."""
        try:
            self._decoder.flush()
        except ProtocolError as exc:
            if self.error is None:
                self.error, self.stopped = exc, True
        if self.ended_at is None:
            self.ended_at = self.clock()
        if self.error is None and not self.finished:
            self.error = TruncatedStreamError(
                "the stream ended with neither [DONE] nor a finish_reason"
            )

    def _apply(self, obj: object, events: list[StreamEvent] | None) -> str | None:
        if type(obj) is not dict:
            raise ProtocolError("data frame is not a JSON object")
        if "error" in obj or obj.get("object") == "error":
            raise error_from_frame(obj, request_id=self.request_id, redact=self._redact)
        text = None
        choices = obj.get("choices")
        if choices:
            if type(choices) is not list:
                raise ProtocolError("'choices' is not a list")
            for choice in choices:
                if type(choice) is not dict:
                    raise ProtocolError("a choice is not an object")
                if choice.get("index"):
                    continue  # only choice 0 is streamed
                delta = choice.get("delta")
                if delta:
                    if type(delta) is not dict:
                        raise ProtocolError("'delta' is not an object")
                    content = delta.get("content")
                    if content:
                        if type(content) is not str:
                            text = self._apply_parts(content, events)
                        else:
                            self._content.append(content)
                            text = content
                            if self.first_token_at is None:
                                self.first_token_at = self.last_event_at
                            if events is not None:
                                events.append(ContentDelta(content))
                    if len(delta) > 1 or content is None:
                        self._apply_rare(delta, events)
                reason = choice.get("finish_reason")
                if reason:
                    self.finish_reason = str(reason)
                    if self.response_id is None:
                        self._learn_ids(obj)
                    if self.first_token_at is None:
                        self.first_token_at = self.last_event_at
                    if events is not None:
                        events.append(FinishEvent(self.finish_reason))
        usage = obj.get("usage")
        if usage is None:
            x_groq = obj.get("x_groq")
            if type(x_groq) is dict:
                usage = x_groq.get("usage")
        if usage and type(usage) is dict and usage != self._usage_raw:
            self._usage_raw = usage
            if self.response_id is None:
                self._learn_ids(obj)
            self.usage = Usage.from_dict(usage)
            if events is not None:
                events.append(UsageEvent(self.usage))
        return text

    def _learn_ids(self, obj: dict[str, object]) -> None:
        ident, model = obj.get("id"), obj.get("model")
        self.response_id = ident if type(ident) is str else ""
        if type(model) is str:
            self.response_model = model

    def _apply_parts(self, parts: object, events: list[StreamEvent] | None) -> str | None:
        # `delta.content` as a list of typed parts (Mistral's magistral, directly and
        # through gateways): `text` parts are content, `thinking` parts reasoning, and
        # other types (references, images, ...) are skipped; the proxy relays the event
        # as it came. Consecutive parts of one kind make one delta. Off the hot path.
        if type(parts) is not list:
            raise ProtocolError("'delta.content' is neither a string nor a list of parts")
        texts: list[str] = []
        run: list[str] = []
        kind = ""
        for part in parts:
            if type(part) is not dict:
                continue
            part_type = part.get("type")
            if part_type == "text":
                piece = part.get("text")
            elif part_type == "thinking":
                piece = thinking_text(part.get("thinking"))
            else:
                continue
            if type(piece) is not str or not piece:
                continue
            if part_type != kind:
                if run:
                    self._part_delta(kind, "".join(run), texts, events)
                    run.clear()
                kind = part_type
            run.append(piece)
        if run:
            self._part_delta(kind, "".join(run), texts, events)
        return "".join(texts) if texts else None

    def _part_delta(
        self, kind: str, piece: str, texts: list[str], events: list[StreamEvent] | None
    ) -> None:
        if kind == "text":
            self._content.append(piece)
            texts.append(piece)
            if events is not None:
                events.append(ContentDelta(piece))
        else:
            self._reasoning.append(piece)
            if events is not None:
                events.append(ReasoningDelta(piece))
        if self.first_token_at is None:
            self.first_token_at = self.last_event_at

    def _apply_rare(self, delta: dict[str, object], events: list[StreamEvent] | None) -> None:
        # Everything but plain content: role, reasoning, refusal, tool calls. Off the hot
        # path: a delta with any key but `content` never takes feed_text's fast ones.
        role = delta.get("role")
        if isinstance(role, str) and role:
            self.role = role
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            if type(reasoning) is not str:
                raise ProtocolError("reasoning delta is not a string")
            self._reasoning.append(reasoning)
            if self.first_token_at is None:
                self.first_token_at = self.last_event_at
            if events is not None:
                events.append(ReasoningDelta(reasoning))
        refusal = delta.get("refusal")
        if refusal:
            # OpenAI's structured outputs: the model declined, in place of the content
            # (kept apart from it, so a refusal is never parsed as the output).
            if type(refusal) is not str:
                raise ProtocolError("refusal delta is not a string")
            self._refusal.append(refusal)
            if self.first_token_at is None:
                self.first_token_at = self.last_event_at
            if events is not None:
                events.append(RefusalDelta(refusal))
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            if type(tool_calls) is not list:
                raise ProtocolError("'tool_calls' is not a list")
            if self.first_token_at is None:
                self.first_token_at = self.last_event_at
            for fragment in tool_calls:
                self._merge_tool_call(fragment, events)

    def _merge_tool_call(self, fragment: object, events: list[StreamEvent] | None) -> None:
        if type(fragment) is not dict:
            raise ProtocolError("a tool call fragment is not an object")
        function = fragment.get("function") or {}
        if type(function) is not dict:
            raise ProtocolError("'function' of a tool call is not an object")
        name = function.get("name") or None
        arguments = function.get("arguments") or ""
        call_id = fragment.get("id") or None
        if not isinstance(arguments, str) or not isinstance(name, str | None):
            raise ProtocolError("tool call name/arguments are not strings")
        if not isinstance(call_id, str | None):
            raise ProtocolError("tool call id is not a string")
        index = fragment.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            builder = self._tc_by_index.get(index)
            if builder is None:
                builder = self._new_tool_call()
                self._tc_by_index[index] = builder
        else:
            # Gemini and Ollama omit `index`: a new non-empty id or a name starts a
            # new call; any other fragment continues the last one.
            last = self._last_tc
            if last is None or name or (call_id and call_id != last.id):
                builder = self._new_tool_call()
            else:
                builder = last
        self._last_tc = builder
        self._tool_fragments += 1
        if call_id:
            builder.id = call_id
        if name and not builder.name:
            builder.name = name
        kind = fragment.get("type")
        if isinstance(kind, str) and kind:
            builder.type = kind
        if arguments:
            builder.arguments.append(arguments)
        for key, value in fragment.items():
            if key not in ("index", "id", "type", "function"):
                builder.extra[key] = value
        if events is not None:
            events.append(ToolCallDelta(self._tool_calls.index(builder), call_id, name, arguments))

    def _new_tool_call(self) -> _ToolCallBuilder:
        builder = _ToolCallBuilder()
        self._tool_calls.append(builder)
        return builder

    def message(self) -> ChatMessage:
        """The assistant message assembled so far."""
        return ChatMessage(
            role=self.role,
            content="".join(self._content_out()),
            reasoning="".join(self._reasoning) if self._reasoning else None,
            tool_calls=tuple(b.build() for b in self._tool_calls),
            finish_reason=self.finish_reason,
            refusal=self.refusal,
        )
