"""ChatProxy in front of a server that needs no key (vLLM, Ollama): api_key=None."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

from .conftest import serve


def test_proxy_without_key_sends_no_authorization_and_passes_bytes_unchanged() -> None:
    import httpx

    frames = [
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    upstream = FakeChatUpstream(delay=0.001)
    upstream.enqueue(Script(raw=frames, delay=0))
    with run_upstream(upstream) as running:
        proxy = ChatProxy(api_key=None, base_url=running.base_url, keepalive_interval=None)
        app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
        with serve(app) as url:
            with httpx.Client(timeout=10) as client:
                response = client.post(
                    url + "/api/chat", json={"messages": [{"role": "user", "content": "hi"}]}
                )
    assert response.status_code == 200
    # byte-exact: an empty key must not turn the redaction into an insert-everywhere
    assert response.content == b"".join(frames)
    received = upstream.requests[-1]
    assert "authorization" not in received.headers


def test_proxy_rejects_an_empty_key_string() -> None:
    with pytest.raises(ValueError, match="None for no key"):
        ChatProxy(api_key="", base_url="http://127.0.0.1:1/v1")
