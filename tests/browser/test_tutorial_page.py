"""The usual tutorial's page (`tutorial_page.html`, kept as written) streams through ChatProxy.

That page splits the body on blank lines and parses every `data: ` line it finds, so it
only works if whatever the proxy adds (keep-alive comments) lands between whole events, and
the request it sends (JSON with no content type, so `text/plain;charset=UTF-8`) is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.testing import RunningUpstream, Script

from .conftest import HERE, serve

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.timeout(30)

DELTAS = ["Streams", " arrive", " one", " piece", " at", " a", " time", "."]
# The upstream pauses before the first token and between tokens, writing its own keep-alive
# comments every 0.03 s; the proxy adds its own after 0.05 s of silence.
SLOW = Script(deltas=DELTAS, first_delay=0.3, delay=0.15, keepalive=0.03)


@pytest.fixture
def site(upstream: RunningUpstream) -> Iterator[str]:
    html = (HERE / "tutorial_page.html").read_text(encoding="utf-8")

    async def homepage(request: Request) -> HTMLResponse:
        return HTMLResponse(html)

    proxy = ChatProxy(api_key="sk-test", base_url=upstream.base_url, keepalive_interval=0.05)
    app = Starlette(
        routes=[Route("/", homepage), *proxy.routes("/api/chat")], lifespan=proxy.lifespan
    )
    with serve(app) as url:
        yield url


def test_tutorial_page_streams_through_chat_proxy_with_keepalives(
    site: str, upstream: RunningUpstream, page: Page
) -> None:
    # The same scripted answer, read raw first: comments really are in the stream.
    upstream.app.enqueue(SLOW, SLOW)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    raw = httpx.post(f"{site}/api/chat", content=body, timeout=10).text
    assert raw.count(": keep-alive\n\n") >= 5
    assert raw.endswith("data: [DONE]\n\n")

    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(site + "/")
    with page.expect_request("**/api/chat") as request_info:
        page.locator("#input").fill("Tell me about streams")
        page.locator("#send").click()
    assert request_info.value.headers["content-type"] == "text/plain;charset=UTF-8"

    output = page.locator("#output")
    page.wait_for_function("() => document.getElementById('output').textContent.length > 0")
    partial = output.inner_text()
    assert not upstream.app.requests[-1].completed
    assert len(partial) < len("".join(DELTAS))

    page.wait_for_function(
        "text => document.getElementById('output').textContent === text", arg="".join(DELTAS)
    )
    assert upstream.app.requests[-1].wait_finished(2.0)
    assert upstream.app.requests[-1].completed
    assert upstream.app.requests[-1].json is not None
    assert upstream.app.requests[-1].json["model"] == "gpt-4o"
    assert errors == []
