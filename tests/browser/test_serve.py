"""`create_app` and `run_serve` without a browser: routes, headers, the upstream rule, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tokenhub_stream._config import DEFAULT_BASE_URL
from tokenhub_stream.cli._serve import (
    _display_url,
    _fetch_models,
    _resolve,
    create_app,
    run_serve,
)
from tokenhub_stream.cli._upstream import ResolvedUpstream
from tokenhub_stream.testing import DEFAULT_MODELS, FakeChatUpstream, RunningUpstream, run_upstream

from .conftest import serve

pytestmark = pytest.mark.timeout(30)


def test_serve_app_serves_the_page_and_the_proxy(upstream: RunningUpstream) -> None:
    app = create_app(base_url=upstream.base_url, api_key=None, models=["gpt-4o", "deepseek-chat"])
    with serve(app) as url:
        page = httpx.get(url + "/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="/chat.js"></script>' in page.text
        assert httpx.get(url + "/chat.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "/chat.css").headers["content-type"].startswith("text/css")
        # The model list was given without the default model: the first one is the default.
        assert httpx.get(url + "/config.json").json() == {
            "default_model": "gpt-4o",
            "local": False,
        }
        models = httpx.get(url + "/api/chat/models").json()["data"]
        assert [m["id"] for m in models] == ["deepseek-chat", "gpt-4o"]
        # The browser's request: exact path (no 307), text/plain, no model.
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        response = httpx.post(
            url + "/api/chat", content=body, headers={"content-type": "text/plain;charset=UTF-8"}
        )
        assert response.status_code == 200
        assert response.text.endswith("data: [DONE]\n\n")
        assert upstream.app.requests[-1].json is not None
        assert upstream.app.requests[-1].json["model"] == "gpt-4o"
        # Only the upstream's models may be asked for.
        other = json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "o9"})
        assert httpx.post(url + "/api/chat", content=other).status_code == 400
        assert httpx.post(url + "/").status_code == 405


def test_serve_app_keeps_an_explicit_model_the_list_lacks(upstream: RunningUpstream) -> None:
    app = create_app(
        base_url=upstream.base_url, api_key="sk-x", model="my-model", models=["gpt-4o"]
    )
    with serve(app) as url:
        assert httpx.get(url + "/config.json").json()["default_model"] == "my-model"
        ids = [m["id"] for m in httpx.get(url + "/api/chat/models").json()["data"]]
        assert ids == ["gpt-4o", "my-model"]


def test_serve_fetch_models_lists_the_upstream_models() -> None:
    with run_upstream(FakeChatUpstream(api_key="sk-test")) as running:
        assert _fetch_models(ResolvedUpstream(running.base_url, "sk-test", False)) == list(
            DEFAULT_MODELS
        )
        assert _fetch_models(ResolvedUpstream(running.base_url, "wrong", False)) is None
        assert _fetch_models(ResolvedUpstream(running.base_url + "/nowhere", None, False)) is None


def test_serve_resolve_upstream_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENHUB_KEY", raising=False)
    monkeypatch.delenv("TOKENHUB_BASE_URL", raising=False)
    with _resolve("http://127.0.0.1:9/v1/", None) as upstream:
        assert upstream == ResolvedUpstream("http://127.0.0.1:9/v1", None, False)
    with _resolve(None, "sk-given") as upstream:
        assert upstream == ResolvedUpstream(DEFAULT_BASE_URL, "sk-given", False)
    monkeypatch.setenv("TOKENHUB_KEY", "sk-env")
    with _resolve(None, None) as upstream:
        assert upstream == ResolvedUpstream(DEFAULT_BASE_URL, "sk-env", False)
    monkeypatch.delenv("TOKENHUB_KEY")
    with _resolve(None, None) as upstream:
        assert upstream.local
        assert httpx.get(upstream.base_url + "/models").status_code == 200


def test_serve_run_serve_prints_the_url_and_stops_on_ctrl_c() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHUB_")}
    code = (
        "from tokenhub_stream.cli._serve import run_serve\n"
        "raise SystemExit(run_serve(host='127.0.0.1', port=0, base_url=None, api_key=None,"
        " model=None))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        deadline = time.monotonic() + 10
        while True:
            try:
                page = httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.05)
        assert page.status_code == 200
        assert httpx.get(url + "config.json").json()["local"] is True
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert process.stderr is not None
        notices = [
            line for line in process.stderr.read().splitlines() if "local test upstream" in line
        ]
        assert len(notices) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_serve_display_url() -> None:
    assert _display_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert _display_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/"
    assert _display_url("::1", 8000) == "http://[::1]:8000/"


def test_serve_run_serve_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # In a thread, so uvicorn installs no signal handlers; stopped through the Server.
    import uvicorn

    servers: list[uvicorn.Server] = []

    class Recording(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recording)
    monkeypatch.delenv("TOKENHUB_KEY", raising=False)
    monkeypatch.delenv("TOKENHUB_BASE_URL", raising=False)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    results: list[int] = []

    def target() -> None:
        results.append(
            run_serve(host="127.0.0.1", port=0, base_url=None, api_key=None, model="gpt-4o")
        )

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    # servers[0] is the local upstream's (run_upstream uses uvicorn too).
    while not (len(servers) == 2 and servers[1].started):
        assert time.monotonic() < deadline and thread.is_alive(), "run_serve did not start"
        time.sleep(0.01)
    url = out.getvalue().strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), url
    assert httpx.get(url + "config.json").json() == {"default_model": "gpt-4o", "local": True}
    servers[1].should_exit = True
    thread.join(10)
    assert results == [0]
