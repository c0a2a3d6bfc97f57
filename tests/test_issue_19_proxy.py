"""#19, the proxy: a browser request with `response_format` reaches the upstream unchanged
and its JSON answer streams back as it grows; `ChatProxy(tools=...)` sends the same strict
schemas as the client (`strict_schemas=` deciding the field). The upstream is the local
one, under uvicorn on loopback; the browser is Starlette's TestClient.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.testclient import TestClient

from tokenhub_stream import SSEDecoder
from tokenhub_stream._partial_json import PartialJSON
from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, run_upstream
from tokenhub_stream.tools import tool

KEY = "sk-proxy-test-0123456789"

RECIPE = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "minutes": {"type": "integer", "minimum": 5},
    },
    "required": ["title", "steps", "minutes"],
    "additionalProperties": False,
}
FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "recipe", "schema": RECIPE, "strict": True},
}


class Place(BaseModel):
    city: str
    country: str = "NO"


booked: list[Place] = []


@tool
def book(place: Place) -> str:
    """Book a hotel."""
    booked.append(place)
    return f"booked in {place.city}"


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(api_key=KEY, delay=0)) as running:
        yield running


def deltas(body: str) -> list[str]:
    out = []
    for event in SSEDecoder().feed(body.encode()):
        if event.data.startswith("{"):
            for choice in json.loads(event.data)["choices"]:
                out.append(choice["delta"].get("content") or "")
    return [d for d in out if d]


def test_issue_19_proxy_response_format_passes_through(upstream: RunningUpstream) -> None:
    proxy = ChatProxy(api_key=KEY, base_url=upstream.base_url)
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    body = {
        "messages": [{"role": "user", "content": "Pancakes for breakfast"}],
        "stream": True,
        "response_format": FORMAT,
    }
    with TestClient(app) as page:
        answer = page.post("/api/chat", json=body)
    assert answer.status_code == 200
    sent = upstream.app.requests[-1].json
    assert sent is not None
    assert sent["response_format"] == FORMAT  # unchanged, strict and all
    # What the page does: the partial object as each delta arrives, then the whole.
    parser = PartialJSON()
    shown: list[str] = []
    for delta in deltas(answer.text):
        if parser.feed(delta):
            value = parser.value
            assert isinstance(value, dict)
            shown.append(json.dumps(value))
    final = parser.finish()
    assert final == {
        "title": "Pancakes",
        "steps": ["Pancakes", "breakfast", "Pancakes"],
        "minutes": 5,  # the schema's minimum
    }
    assert len(shown) > 5 and json.loads(shown[-1]) == final


@pytest.mark.parametrize("strict", [True, False])
def test_issue_19_proxy_tools_use_the_strict_schemas(
    upstream: RunningUpstream, strict: bool
) -> None:
    booked.clear()
    proxy = ChatProxy(api_key=KEY, base_url=upstream.base_url, tools=[book], strict_schemas=strict)
    app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    body = {"messages": [{"role": "user", "content": "Book a hotel in Oslo"}], "stream": True}
    with TestClient(app) as page:
        answer = page.post("/api/chat", json=body)
    assert answer.status_code == 200
    first = upstream.app.requests[0].json
    assert first is not None
    assert first["tools"] == [book.to_openai(strict=strict)]
    function = first["tools"][0]["function"]
    assert ("strict" in function) is strict
    assert function["parameters"]["required"] == ["place"]
    # The local upstream's call ($refs followed) was validated into a Place.
    assert booked == [Place(city="Oslo", country="Oslo")]
    assert "".join(deltas(answer.text)) == 'book returned "booked in Oslo".'
