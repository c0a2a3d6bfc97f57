"""Coverage-guided fuzzing of the frame layer with atheris (libFuzzer), if it installs.

    python benchmarks/soak/fuzz_atheris.py -runs=1000000          # or -max_total_time=300

Targets, all fed the same input cut at fuzzer-chosen offsets: `SSEDecoder` (may raise only
`ProtocolError`), `ChunkParser` (never raises; its stored error is a `TokenHubError`) and
the proxy's `EventSplitter` (never raises; returns exactly what it was fed, cut at event
boundaries). Any other exception or a failed check is a crash: atheris prints the input
and exits non-zero.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]

with atheris.instrument_imports():
    from tokenhub_stream._chunks import ChunkParser
    from tokenhub_stream._exceptions import ProtocolError, TokenHubError
    from tokenhub_stream._sse import SSEDecoder
    from tokenhub_stream.asgi._wire import EventSplitter

# Every (line end, empty line end) pair; a CR is a line end alone when no LF follows it.
_BOUNDARY_ENDS = (
    *(b"\n\n", b"\n\r", b"\n\r\n"),
    *(b"\r\r", b"\r\r\n"),
    *(b"\r\n\n", b"\r\n\r", b"\r\n\r\n"),
)

_DICTIONARY = [
    b"data: ",
    b"data:",
    b"event: ",
    b"id: ",
    b"retry: ",
    b": keep-alive",
    b"\n\n",
    b"\r\n",
    b"\r",
    b"[DONE]",
    b'{"choices":[{"index":0,"delta":{"content":"',
    b'"}}]}',
    b'{"error":{"message":"x","code":"server_error"}}',
    b'"finish_reason":"stop"',
    b'"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"',
    b'"usage":{"prompt_tokens":1,"completion_tokens":2}',
    b'"reasoning_content":"',
    b"\xef\xbb\xbf",
    b"\xc3",
    b"\xff",
]


def _chunks(fdp: atheris.FuzzedDataProvider) -> list[bytes]:
    cuts = sorted(fdp.ConsumeIntInRange(0, 512) for _ in range(fdp.ConsumeIntInRange(0, 6)))
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    pieces, last = [], 0
    for cut in cuts:
        cut = min(cut, len(body))
        pieces.append(body[last:cut])
        last = cut
    pieces.append(body[last:])
    return pieces


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    strict = fdp.ConsumeBool()
    limit = fdp.ConsumeIntInRange(1, 1 << 16)
    chunks = _chunks(fdp)

    decoder = SSEDecoder(max_event_bytes=limit, strict=strict)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
        decoder.flush()
    except ProtocolError:
        pass

    for events in (False, True):
        parser = ChunkParser(max_event_bytes=limit, strict=strict)
        for chunk in chunks:
            if events:
                parser.feed_events(chunk)
            else:
                parser.feed_text(chunk)
            if parser.stopped:
                break
        else:
            parser.feed_eof()
        if parser.error is not None and not isinstance(parser.error, TokenHubError):
            raise AssertionError(f"ChunkParser stored {parser.error!r}")
        parser.message()

    splitter = EventSplitter()
    out = []
    for chunk in chunks:
        piece = splitter.feed(chunk)
        if piece and not piece.endswith(_BOUNDARY_ENDS):
            raise AssertionError(f"EventSplitter cut mid-event: {piece[-8:]!r}")
        out.append(piece)
    out.append(splitter.flush())
    if b"".join(out) != b"".join(chunks):
        raise AssertionError("EventSplitter lost or invented bytes")


def main() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".dict", delete=False) as f:
        for token in _DICTIONARY:  # libFuzzer's format: "..." with \xHH escapes
            text = "".join(
                chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02X}" for b in token
            )
            f.write(f'"{text}"\n')
    try:
        atheris.Setup([*sys.argv, f"-dict={f.name}"], test_one_input)
        atheris.Fuzz()
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    main()
