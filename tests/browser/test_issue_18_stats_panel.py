"""Issue #18: the chat page of `tokenhub-stream serve` shows what the server is doing now
(open streams, p50/p95 time to first token, tokens/s) from `GET /api/chat/stats`, in a
small labelled panel; in a real chromium against a real uvicorn."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tokenhub_stream.testing import RunningUpstream, Script

from .conftest import serve

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def url(upstream: RunningUpstream) -> Iterator[str]:
    from tokenhub_stream.cli._serve import create_app

    app = create_app(base_url=upstream.base_url, api_key=None, models=upstream.app.models)
    with serve(app) as served:
        yield served


def _answered(page: Page) -> None:
    page.locator('.msg.assistant[data-state="done"]').wait_for()


def test_issue_18_stats_panel_shows_the_servers_numbers(
    page: Page, url: str, upstream: RunningUpstream
) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    panel = page.get_by_role("region", name="Server now")
    panel.wait_for()
    # Before any answer: nothing open, no samples yet.
    assert page.locator("#stats-open").inner_text() == "0"
    assert page.locator("#stats-ttft").inner_text() == "–"

    # While an answer streams, a refresh (here: the page becoming visible again) shows it.
    upstream.app.enqueue(Script(deltas=[f"w{i} " for i in range(20)], delay=0.1))
    box = page.get_by_label("Message")
    box.fill("count to twenty")
    box.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant .text')?.textContent.length > 0"
    )
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    page.wait_for_function("() => document.getElementById('stats-open').textContent === '1'")

    # After it, the panel is refreshed at once: the stream is closed, and it has numbers.
    _answered(page)
    page.wait_for_function("() => document.getElementById('stats-open').textContent === '0'")
    page.wait_for_function("() => document.getElementById('stats-rate').textContent !== '–'")
    ttft = page.locator("#stats-ttft").inner_text()
    assert re.fullmatch(r"\d+ ms / \d+ ms", ttft), ttft
    rate = page.locator("#stats-rate").inner_text()
    assert re.fullmatch(r"\d+", rate), rate
    assert 1 <= int(rate) <= 100  # 20 deltas 0.1 s apart: about 10 per second
    labels = panel.locator("dt").all_inner_texts()
    assert labels == ["Open streams", "First token p50 / p95", "Tokens/s"]
    assert errors == []


def test_issue_18_stats_panel_stays_hidden_without_stats(page: Page, url: str) -> None:
    asked: list[str] = []

    def refuse(route: Route) -> None:
        asked.append("stats")
        route.fulfill(status=404, body="")

    page.route("**/api/chat/stats", refuse)
    page.goto(url + "/")
    # The stats are asked for before the models, so both answers are in once the picker is.
    page.locator("#model:enabled").wait_for()
    assert asked == ["stats"]
    assert page.locator("#stats").is_hidden()
    # A 404 means no stats on this server: the page stops asking. (A refresh would fetch
    # before this script's own request, which is awaited.)
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    assert page.evaluate("fetch('/config.json').then((r) => r.ok)")
    assert asked == ["stats"]
    assert page.locator("#stats").is_hidden()
