"""Issue #17: the template fast path in bulk (`_template.bulk_contents`), the C-call form of
`feed_text_batch`'s run for a read of many chunks.

As in test_issue_17_batch.py, every test compares `feed_text_batch` with `feed_text`
chunk by chunk (the reference): the same deltas, message, error and timings. Here the
reads are long enough for the bulk path (`_BULK_MIN` chunks or more), and one chunk of a run is
odd in every way the bulk path's checks exist for, at the start, inside and at the end of
the run. A spy shows the bulk path does take the runs it should (the benchmark's stream,
a whole short answer in one read) and backs off after a run it could not take.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_issue_17_batch import (
    DONE,
    USAGE,
    Batches,
    bench_chunk,
    bench_stream,
    groups,
    json_backend,
    plain,
    same,
)
from tokenhub_stream import ProtocolError, _chunks
from tokenhub_stream._template import bulk_contents

__all__ = ["json_backend"]  # the fixture, shared with test_issue_17_batch.py

PREFIX_END = b'"content":"'


def with_literal(literal: bytes) -> bytes:
    """A plain chunk whose content's literal body is `literal`, as raw bytes."""
    return plain("a").replace(b'"content":"a"', PREFIX_END + literal + b'"')


def ascii_escaped(content: str) -> bytes:
    chunk = plain(content)
    return b"data: " + json.dumps(json.loads(chunk[6:]), separators=(",", ":")).encode() + b"\n\n"


def short_literal() -> bytes:
    # The template's prefix and its suffix but for the closing quote, which the prefix's
    # last byte stands in for: shorter than prefix + suffix, an invalid event.
    chunk = plain("a")
    start = chunk.index(PREFIX_END) + len(PREFIX_END)
    return chunk[:start] + chunk[start + 2 :]


ODD: dict[str, bytes] = {
    "quote": plain('say "hi"'),
    "newline": plain("line\nbreak"),
    "backslash": plain("back\\slash\\"),
    "u-escape": ascii_escaped("café"),
    "surrogate-pair": ascii_escaped("\U0001f600"),
    "lone-surrogate": with_literal(b"x\\ud800y"),
    "empty": plain(""),
    "raw-nul": with_literal(b"x\x00y"),
    "raw-control": with_literal(b"x\x01y"),
    "bad-escape": with_literal(b"x\\qy"),
    "bare-quote": with_literal(b'x"y'),
    "trailing-backslash": with_literal(b"x\\"),
    "invalid-utf8": with_literal(b"x\xffy"),
    "encoded-surrogate": with_literal(b"x\xed\xa0\x80y"),
    "other-choice": plain("a").replace(b'"index":0', b'"index":1'),
    "other-created": plain("a", created=1700000001),
    "short": short_literal(),
    "crlf": plain("a").replace(b"\n\n", b"\r\n\r\n"),
    "usage": plain("u", usage=USAGE),
}


def answer(n: int, odd: bytes | None = None, at: int = 0) -> list[bytes]:
    """A role chunk, `n` plain content chunks (the one at `at` replaced by `odd`), the
    finish chunk and [DONE]."""
    contents = [plain(f" t{i}") for i in range(n)]
    if odd is not None:
        contents[at] = odd
    return [bench_chunk({"role": "assistant", "content": ""}), *contents] + [
        bench_chunk({}, "stop"),
        DONE,
    ]


@pytest.mark.parametrize("kind", list(ODD))
@pytest.mark.parametrize("at", [0, 1, 9, 38, 39])
def test_issue_17_bulk_odd_chunk_in_a_run(kind: str, at: int, json_backend: str) -> None:
    # the template is learnt from chunk 1 (the first content chunk) when the odd one is
    # not there; runs start at 2, so at 0 and 1 the odd chunk comes before any run
    chunks = answer(40, ODD[kind], at)
    for size in (8, 13, 42, len(chunks)):
        same(groups(chunks, size))


def test_issue_17_bulk_raw_control_characters_stop_the_stream(json_backend: str) -> None:
    for kind in ("raw-nul", "raw-control"):
        out, parser, _ = same([answer(40, ODD[kind], 20)])
        assert len(out) == 20 and isinstance(parser.error, ProtocolError), kind


def test_issue_17_bulk_oversized_event_in_a_run(json_backend: str) -> None:
    long = plain("x" * 60)
    limit = len(answer(1)[0]) + 4  # every other chunk of the answer fits, `long` does not
    out, parser, _ = same([answer(40, long, 20)], max_event_bytes=limit)
    assert len(out) == 20 and isinstance(parser.error, ProtocolError)


class Spy:
    """Counts `bulk_contents` calls and the chunks of the runs it took."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.taken = 0
        real = bulk_contents

        def spy(prefix: bytes, suffix: bytes, chunks: Any, *rest: Any) -> list[str] | None:
            self.calls += 1
            contents = real(prefix, suffix, chunks, *rest)
            if contents is not None:
                self.taken += len(chunks)
            return contents

        monkeypatch.setattr(_chunks, "bulk_contents", spy)


def test_issue_17_bulk_takes_a_whole_answer_in_one_read(
    json_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    out, parser, runs = same([answer(50)])
    assert len(out) == 50 and parser.finish_reason == "stop" and parser.done
    # the role chunk, the first content chunk (it teaches the template), then one run of
    # the other 49 up to the finish chunk; the finish chunk and [DONE] chunk by chunk
    assert (spy.taken, runs) == (49, 4)


def test_issue_17_bulk_takes_the_benchmark_stream(
    json_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    reference = [" naïve" if i % 100 == 99 else f" word{i % 1000}" for i in range(2_000)]
    out, _, _ = same(groups(bench_stream(2_000), 300))
    assert out == reference
    assert spy.taken >= 2_000 - 20


def test_issue_17_bulk_cuts_a_long_read_into_runs_of_bulk_max(
    json_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    monkeypatch.setattr(_chunks, "_BULK_MAX", 100)
    out, _, runs = same([bench_stream(450)])
    assert len(out) == 450
    # role, first content chunk, then runs of at most 100 (the 5th ends at the finish chunk)
    assert (spy.calls, spy.taken, runs) == (5, 449, 8)


def test_issue_17_bulk_backs_off_after_a_run_it_could_not_take(
    json_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    first = [plain(f" a{i}") for i in range(20)]
    first[10] = plain("x", created=1700000001)  # not a template hit: not in bulk
    later = [[plain(f" b{i}") for i in range(20)] for _ in range(5)]
    _, parser, _ = same([first, *later])
    assert parser.delta_count == 120
    # batched: one try in the first read that fails, then none until _BULK_BACKOFF (64)
    # more content deltas came (reads 2-4 by the loop), then reads 5 and 6 in bulk; the
    # reference run (chunk by chunk) never calls it
    assert spy.calls == 3 and spy.taken == 40


# --- generated streams of long reads ------------------------------------------------------

_contents = st.one_of(
    st.text(max_size=6),
    st.sampled_from(['"', "\\", "\n", "\\u0041", "\ud800", "\U0001f600", "", "é", "\x00"]),
)
_odd = st.sampled_from(list(ODD.values()))
# Mostly plain content chunks, so that long runs of template hits occur.
_kinds: st.SearchStrategy[bytes] = st.one_of(
    *[_contents.map(plain)] * 12,
    _contents.map(ascii_escaped),
    _odd,
)


@st.composite
def _long_reads(draw: st.DrawFn) -> Batches:
    events = [plain(" first"), *draw(st.lists(_kinds, min_size=8, max_size=90))]
    events += draw(st.sampled_from([[], [bench_chunk({}, "stop"), DONE], [DONE]]))
    batches: Batches = []
    while events:
        size = draw(st.integers(8, 40))
        batches.append(events[:size])
        events = events[size:]
    return batches


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=_long_reads(), limit=st.sampled_from([None, 200]))
def test_issue_17_bulk_matches_chunk_by_chunk_on_generated_long_reads(
    json_backend: str, batches: Batches, limit: int | None
) -> None:
    kw = {} if limit is None else {"max_event_bytes": limit}
    same(batches, **kw)
