"""Sans-I/O Server-Sent Events decoder: bytes in, events out.

Follows the WHATWG event-stream rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

- lines end in LF, CR or CRLF; a CRLF split across `feed()` calls is one line end, empty
  chunks between its CR and LF included;
- a leading UTF-8 BOM is ignored (httpx-sse 0.4.3 drops the first event instead);
- one space after the colon is stripped, multi-line `data` is joined with "\\n";
- unknown fields are ignored, comment lines (":") are keep-alives and dropped;
- an event is dispatched only at a blank line; an incomplete event at EOF is discarded;
- invalid UTF-8 decodes to U+FFFD (or raises `ProtocolError` with `strict=True`).

Decoding is linear in the input: bytes without a line end are kept as a list of
pieces and joined once, never re-scanned, and both an unfinished line and an
unfinished event are bounded by `max_event_bytes`.
"""

from __future__ import annotations

from ._config import DEFAULT_MAX_EVENT_BYTES
from ._exceptions import ProtocolError

__all__ = ["SSEDecoder", "ServerSentEvent"]

_BOM = b"\xef\xbb\xbf"


class ServerSentEvent:
    """One dispatched event: `event` type ("message" unless set), `data`, `id`, `retry`."""

    __slots__ = ("data", "event", "id", "retry")

    def __init__(
        self, data: str = "", event: str = "message", id: str = "", retry: int | None = None
    ) -> None:
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServerSentEvent):
            return NotImplemented
        return (self.data, self.event, self.id, self.retry) == (
            other.data,
            other.event,
            other.id,
            other.retry,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={value!r}"
            for name, value, default in (
                ("event", self.event, "message"),
                ("id", self.id, ""),
                ("retry", self.retry, None),
            )
            if value != default
        )
        return f"ServerSentEvent(data={self.data!r}{extra})"


class SSEDecoder:
    """Incremental event-stream decoder.

    ```python
    decoder = SSEDecoder()
    for chunk in network_chunks:
        for event in decoder.feed(chunk):
            print(event.data)
    decoder.flush()  # at EOF: the unfinished event, if any, is discarded
    ```

    Args:
        max_event_bytes: the largest event (or single line) accepted; beyond it
            `feed()` raises `ProtocolError`.
        strict: raise `ProtocolError` on invalid UTF-8 instead of decoding it to U+FFFD.
    """

    __slots__ = (
        "_bom_head",
        "_data",
        "_data_bytes",
        "_event",
        "_last_id",
        "_pending",
        "_pending_bytes",
        "_retry",
        "_skip_lf",
        "at_event_start",
        "deferred_error",
        "max_event_bytes",
        "utf8_errors",
    )

    #: The internal interface of `ChunkParser` (`_chunks.py`), which inlines `feed_data`'s
    #: fast-path guard in its own hot path (a call per event saved) and finishes what the
    #: decoder began: read these, never set them.
    #:
    #: - `at_event_start`: nothing is pending (no partial line or event, no BOM check, no
    #:   CR waiting for its LF, no deferred error), so a chunk holding exactly one whole
    #:   `data: ...\n\n` event may be decoded without the line machinery.
    #: - `max_event_bytes`: the largest event accepted (the constructor's argument).
    #: - `utf8_errors`: the UTF-8 error handler, "strict" or "replace" (`strict=`).
    #: - `deferred_error`: the `ProtocolError` met after other events of the same chunk
    #:   had completed, raised by the next `feed()` or `flush()`; None otherwise.
    at_event_start: bool
    max_event_bytes: int
    utf8_errors: str
    deferred_error: ProtocolError | None

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, strict: bool = False):
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self.max_event_bytes = max_event_bytes
        self.utf8_errors = "strict" if strict else "replace"
        self._bom_head: bytes | None = b""  # None once the BOM check is done
        self._pending: list[bytes] = []  # pieces of an unfinished line
        self._pending_bytes = 0
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF is its CRLF
        self._data: list[str] = []
        self._data_bytes = 0
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None
        self.at_event_start = False  # the BOM check is still to come
        # Events completed before it are returned first (see the interface above).
        self.deferred_error = None

    @property
    def has_pending(self) -> bool:
        """True while an event (or a line of one) has started but not been dispatched."""
        return bool(self._pending or self._data or self._event or self._bom_head)

    def feed_data(self, chunk: bytes) -> list[str]:
        """Like `feed()`, but return only each event's `data` (the chat parser's hot path).

        Real upstreams write one whole `data: ...\n\n` event per network chunk; that
        shape, with no partial state pending, is decoded without the line machinery.
        """
        if not self.at_event_start and self._bom_head == b"" and chunk and chunk[0] != 0xEF:
            # The stream's first bytes are no BOM: the check is done, and the first
            # event may take the fast path too.
            self._bom_head = None
            self.at_event_start = not (
                self._pending
                or self._data
                or self._event
                or self._skip_lf
                or self.deferred_error is not None
            )
        if (
            self.at_event_start
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk[-1] == 10  # "\n"
            and chunk.find(b"\r") < 0  # faster than `not in`
            and len(chunk) - 8 <= self.max_event_bytes
        ):
            try:
                return [chunk[6:-2].decode("utf-8", self.utf8_errors)]
            except UnicodeDecodeError as exc:
                raise ProtocolError(f"invalid UTF-8 in event data: {exc.reason}") from None
        return [event.data for event in self.feed(chunk)]

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode `chunk` and return the events it completed (often none, one, or a few).

        When a line of `chunk` is invalid after other events of it completed, those
        events are returned and the `ProtocolError` is raised by the next call.
        """
        if self.deferred_error is not None:
            raise self.deferred_error
        if not chunk:
            # A transport may hand over an empty read: it holds no byte, so a CR that
            # ended the previous chunk still waits for the LF of its CRLF (issue #15).
            return []
        events = self._feed(chunk)
        self.at_event_start = not (
            self._pending
            or self._data
            or self._event
            or self._skip_lf
            or self._bom_head is not None
            or self.deferred_error is not None
        )
        return events

    def _feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._bom_head is not None:
            head = self._bom_head + chunk
            if len(head) < 3 and _BOM.startswith(head):
                self._bom_head = head
                return []
            self._bom_head = None
            chunk = head[3:] if head.startswith(_BOM) else head
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk[-1:] == b"\r":
                self._skip_lf = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = chunk.rfind(b"\n")
        if end < 0:
            if chunk:
                self._pending.append(chunk)
                self._pending_bytes += len(chunk)
                if self._pending_bytes + self._data_bytes > self.max_event_bytes:
                    raise ProtocolError(f"event exceeds max_event_bytes ({self.max_event_bytes})")
            return []
        if self._pending:
            self._pending.append(chunk[: end + 1])
            block = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
        else:
            block = chunk[: end + 1] if end + 1 < len(chunk) else chunk
        rest = chunk[end + 1 :]
        events = self._lines(block)
        if rest and self.deferred_error is None:
            self._pending.append(rest)
            self._pending_bytes = len(rest)
            if self._pending_bytes + self._data_bytes > self.max_event_bytes:
                error = ProtocolError(f"event exceeds max_event_bytes ({self.max_event_bytes})")
                if not events:
                    raise error
                self.deferred_error = error
        return events

    def flush(self) -> list[ServerSentEvent]:
        """Signal EOF. Per the spec an unfinished event is discarded, so this returns [].

        Raises the `ProtocolError` that `feed()` deferred, if any.
        """
        if self.deferred_error is not None:
            raise self.deferred_error
        self._pending.clear()
        self._pending_bytes = 0
        self._data.clear()
        self._data_bytes = 0
        self._event = ""
        self._bom_head = None
        self.at_event_start = not self._skip_lf
        return []

    def _lines(self, block: bytes) -> list[ServerSentEvent]:
        # `block` ends in "\n" and holds whole lines only.
        events: list[ServerSentEvent] = []
        data = self._data
        errors = self.utf8_errors
        try:
            self._lines_into(block, events, data, errors)
        except ProtocolError as exc:
            # Events of this block before the bad line are valid: hand them out first
            # (issue #6: deltas before an error are delivered, however chunks coalesce).
            if not events:
                raise
            self.deferred_error = exc
        return events

    def _lines_into(
        self, block: bytes, events: list[ServerSentEvent], data: list[str], errors: str
    ) -> None:
        for line in block.split(b"\n")[:-1]:
            if not line:
                if data:
                    events.append(
                        ServerSentEvent(
                            data[0] if len(data) == 1 else "\n".join(data),
                            self._event or "message",
                            self._last_id,
                            self._retry,
                        )
                    )
                    data.clear()
                    self._data_bytes = 0
                self._event = ""
                continue
            if line[:6] == b"data: ":
                value = line[6:]
            elif line[:1] == b":":
                continue
            else:
                field, colon, value = line.partition(b":")
                if colon and value[:1] == b" ":
                    value = value[1:]
                if field != b"data":
                    self._other_field(field, value)
                    continue
            self._data_bytes += len(value)
            if self._data_bytes > self.max_event_bytes:
                raise ProtocolError(f"event exceeds max_event_bytes ({self.max_event_bytes})")
            try:
                data.append(value.decode("utf-8", errors))
            except UnicodeDecodeError as exc:
                raise ProtocolError(f"invalid UTF-8 in event data: {exc.reason}") from None

    def _other_field(self, field: bytes, value: bytes) -> None:
        try:
            text = value.decode("utf-8", self.utf8_errors)
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"invalid UTF-8 in event field: {exc.reason}") from None
        if field == b"event":
            self._event = text
        elif field == b"id":
            if "\0" not in text:
                self._last_id = text
        elif field == b"retry":
            if text.isascii() and text.isdigit():
                self._retry = int(text)
