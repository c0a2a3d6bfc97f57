"""Issue #16, the core: one retry driver, written once and pure (`_retry.py`), that both
shells drive for `stream_chat` and `chat()`; the behaviour end to end is in
tests/test_client.py and tests/reliability/test_client_faults.py."""

from __future__ import annotations

import pytest

from tokenhub_stream import ProtocolError, RateLimitError, ServerError, TransportError
from tokenhub_stream._retry import Retries


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
