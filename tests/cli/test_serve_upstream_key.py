"""What `tokenhub-stream serve` sends upstream as the key (issue #16).

An upstream without a key (vLLM, Ollama, the local upstream) gets no `Authorization`
header at all: `ChatProxy` takes `api_key=None`, so no placeholder token is made up.
"""

from __future__ import annotations

import httpx
import pytest

from servers import serve
from tokenhub_stream.cli._serve import create_app
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

BODY = {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}


@pytest.mark.parametrize("key", [None, "", "sk-serve-test-key"], ids=["none", "empty", "key"])
def test_issue_16_serve_sends_the_key_it_has_and_no_placeholder(key: str | None) -> None:
    upstream = FakeChatUpstream(delay=0)
    upstream.enqueue(Script(text="hello"))
    with run_upstream(upstream) as running:
        app = create_app(base_url=running.base_url, api_key=key)
        with serve(app) as url, httpx.Client(timeout=10) as client:
            response = client.post(f"{url}/api/chat", json=BODY)
    assert response.status_code == 200, response.text
    assert "hello" in response.text
    (received,) = upstream.requests
    if not key:
        assert "authorization" not in received.headers
    else:
        assert received.headers["authorization"] == f"Bearer {key}"
