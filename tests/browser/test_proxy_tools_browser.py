"""The tutorial's page reads a tool-using answer from ChatProxy(tools=...) as one answer.

The page (`tutorial_page.html`, kept as the tutorial wrote it) knows nothing of tools or
comments: it parses `data: ` lines and appends `choices[0].delta.content`. With the loop
run server-side it must show the final answer, streamed, and nothing of the tool plumbing.
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
from tokenhub_stream.testing import RunningUpstream, Script, ScriptedToolCall
from tokenhub_stream.tools import tool

from .conftest import HERE, serve

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.timeout(30)

KEY = "sk-browser-tools-canary-41d9"
DELTAS = ["It is", " 18 degrees", " and sunny", " in", " Paris", "."]
cities: list[str] = []


@tool
def get_weather(city: str) -> str:
    """The current weather in a city.

    Args:
        city: the city name.
    """
    cities.append(city)
    return f"18 degrees and sunny in {city}"


def tool_turn() -> Script:
    call = ScriptedToolCall(name="get_weather", arguments=json.dumps({"city": "Paris"}))
    return Script(deltas=[], tool_calls=[call], first_delay=0.2)


# The answer turn is paced so the page is seen mid-answer; the proxy adds keep-alives.
ANSWER = Script(deltas=DELTAS, first_delay=0.2, delay=0.15)


@pytest.fixture
def site(upstream: RunningUpstream) -> Iterator[str]:
    html = (HERE / "tutorial_page.html").read_text(encoding="utf-8")

    async def homepage(request: Request) -> HTMLResponse:
        return HTMLResponse(html)

    proxy = ChatProxy(
        api_key=KEY, base_url=upstream.base_url, tools=[get_weather], keepalive_interval=0.05
    )
    app = Starlette(
        routes=[Route("/", homepage), *proxy.routes("/api/chat")], lifespan=proxy.lifespan
    )
    cities.clear()
    with serve(app) as url:
        yield url


def test_tutorial_page_reads_a_tool_answer_as_one_ordinary_answer(
    site: str, upstream: RunningUpstream, page: Page
) -> None:
    # The same scripted exchange, read raw first: the comments really are in the stream.
    upstream.app.enqueue(tool_turn(), ANSWER, tool_turn(), ANSWER)
    body = json.dumps({"messages": [{"role": "user", "content": "Weather in Paris?"}]})
    raw = httpx.post(f"{site}/api/chat", content=body, timeout=10).text
    assert ": tool get_weather running\n\n" in raw and ": tool get_weather done\n\n" in raw
    assert raw.count("data: [DONE]") == 1 and raw.endswith("data: [DONE]\n\n")
    assert "tool_calls" not in raw and KEY not in raw

    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(site + "/")
    with page.expect_request("**/api/chat") as request_info:
        page.locator("#input").fill("Weather in Paris?")
        page.locator("#send").click()
    assert request_info.value.headers["content-type"] == "text/plain;charset=UTF-8"

    output = page.locator("#output")
    page.wait_for_function("() => document.getElementById('output').textContent.length > 0")
    partial = output.inner_text()
    assert len(partial) < len("".join(DELTAS))  # streamed, not delivered at the end
    assert not upstream.app.requests[-1].completed

    page.wait_for_function(
        "text => document.getElementById('output').textContent === text", arg="".join(DELTAS)
    )
    assert output.inner_text() == "".join(DELTAS)
    assert cities == ["Paris", "Paris"]
    requests = upstream.app.requests
    assert len(requests) == 4  # two turns for the raw read, two for the page
    page_turns = [r.json for r in requests[2:]]
    assert all(j is not None and j["model"] == "gpt-4o" for j in page_turns)
    assert page_turns[0] is not None and "tools" in page_turns[0]
    assert KEY not in page.content()
    assert errors == []
