"""Issue #16, the core: one retry driver, written once and pure (`_retry.py`), that both
shells drive for `stream_chat` and `chat()` (the behaviour end to end is in
tests/test_client.py and tests/reliability/test_client_faults.py); and the one exception
tree, drawn in `_exceptions.py`, as the classes are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tokenhub_stream import (
    ProtocolError,
    RateLimitError,
    ServerError,
    TokenHubError,
    TransportError,
)
from tokenhub_stream._retry import Retries
from tokenhub_stream.store import StoreError
from tokenhub_stream.tools import MaxTurnsExceeded


def test_issue_16_retries_back_off_with_jitter_up_to_max_retries() -> None:
    retries = Retries(max_retries=5, max_wait=60.0)
    error = ServerError("down", status_code=503)
    delays = [retries.next_delay(error) for _ in range(6)]
    assert delays[-1] is None and retries.attempt == 5
    for n, delay in enumerate(delays[:-1]):
        base = min(8.0, 0.5 * 2.0**n)
        assert delay is not None and base / 2 <= delay <= base


def test_issue_16_retries_only_what_is_retryable() -> None:
    retries = Retries(max_retries=3, max_wait=60.0)
    assert retries.next_delay(ProtocolError("not a stream")) is None
    assert retries.next_delay(TransportError("read failed")) is None
    assert retries.next_delay(TransportError("refused", retryable=True)) is not None
    assert retries.attempt == 1


def test_issue_16_retries_never_after_a_delta() -> None:
    retries = Retries(max_retries=3, max_wait=60.0)
    assert retries.next_delay(ServerError("down", status_code=502), delivered=True) is None
    assert retries.attempt == 0


@pytest.mark.parametrize(("retry_after", "expected"), [(0.0, 0.0), (2.5, 2.5), (60.0, 60.0)])
def test_issue_16_retries_honour_retry_after_up_to_max_wait(
    retry_after: float, expected: float
) -> None:
    retries = Retries(max_retries=1, max_wait=60.0)
    error = RateLimitError("slow down", status_code=429, retry_after=retry_after)
    assert retries.next_delay(error) == expected


def test_issue_16_retries_give_up_on_a_longer_retry_after() -> None:
    retries = Retries(max_retries=3, max_wait=10.0)
    error = RateLimitError("slow down", status_code=429, retry_after=10.5)
    assert retries.next_delay(error) is None and retries.attempt == 0


def _drawing() -> list[tuple[int, str, list[str]]]:
    """(depth, branch glyph, class names) per branch line of `_exceptions`' drawn tree."""
    import tokenhub_stream._exceptions as exceptions

    assert exceptions.__doc__ is not None
    drawing = exceptions.__doc__.split("```")[1].strip("\n").splitlines()
    root = drawing[0].split()[0]
    rows = [(0, "", [root])]
    for line in drawing[1:]:
        match = re.match(r"^((?:[│ ]   )*)([├└])── (.*)$", line)
        if match is None:
            continue  # a description's second line
        segments = re.split(r" {2,}", match.group(3))
        names = [s.split()[0] for s in segments if re.fullmatch(r"[A-Z]\w+( \(.*\))?", s)]
        rows.append((len(match.group(1)) // 4 + 1, match.group(2), names))
    return rows


def _error_classes() -> dict[str, type[BaseException]]:
    # The subclasses defined elsewhere (`StoreError`, `MaxTurnsExceeded`) are imported
    # at the top of this file.
    found: dict[str, type[BaseException]] = {}
    todo: list[type[BaseException]] = [TokenHubError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("tokenhub_stream"):
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def test_issue_16_exception_tree_drawing_matches_the_classes() -> None:
    classes = _error_classes()
    rows = _drawing()
    drawn: dict[str, str | None] = {}
    parents: list[str] = []  # the first class at each depth so far
    for index, (depth, glyph, names) in enumerate(rows):
        del parents[depth:]
        for name in names:
            drawn[name] = parents[-1] if parents else None
        parents.append(names[0])
        if depth:
            # The last branch under a parent is drawn "└──", the others "├──".
            later = [d for d, _, _ in rows[index + 1 :]]
            last = next((d for d in later if d <= depth), 0) < depth
            assert glyph == ("└" if last else "├"), (names, glyph)
    assert {StoreError.__name__, MaxTurnsExceeded.__name__} <= set(classes)
    assert set(drawn) == set(classes), set(drawn) ^ set(classes)
    for name, parent in drawn.items():
        if parent is not None:
            assert classes[parent] in classes[name].__bases__, (name, parent)


def test_issue_16_exception_tree_in_the_docs_is_the_drawn_one() -> None:
    import tokenhub_stream._exceptions as exceptions

    assert exceptions.__doc__ is not None
    drawing = exceptions.__doc__.split("```")[1].strip("\n")
    page = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    assert f"```text\n{drawing}\n```" in page
