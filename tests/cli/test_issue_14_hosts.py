"""Issue #14, finding 6: `tokenhub-stream serve` accepts only the hosts it listens as (the
DNS-rebinding guard) and can require a token.

The review reproduced the attack with `Host: evil.example:18090`: a page on a name the
attacker re-points at 127.0.0.1 loaded the chat page (and its cookie) and spent the key.
`create_app` is driven through `httpx.ASGITransport`, whose base URL sets the `Host`;
`run_serve` through a real socket in a thread.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tokenhub_stream.cli import build_parser, main
from tokenhub_stream.cli._serve import (
    COOKIE,
    LOCAL_HOSTS,
    TOKEN_COOKIE,
    TOKEN_ENV,
    _warn_exposed,
    create_app,
    run_serve,
    served_hosts,
)
from tokenhub_stream.store import ConversationStore
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, run_upstream

pytestmark = pytest.mark.timeout(30)

TOKEN = "tok-3b9d6c1f0a7e4b2d8c5f"
BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's async engine runs on asyncio only


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream()) as running:
        yield running


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ConversationStore]:
    async with ConversationStore(f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}") as store:
        yield store


def client(app: object, base_url: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url=base_url)


@pytest.mark.anyio
async def test_issue_14_serve_refuses_a_rebound_host_on_every_route(
    upstream: RunningUpstream, store: ConversationStore
) -> None:
    app = create_app(base_url=upstream.base_url, api_key=None, store=store)
    try:
        evil = "http://evil.example:18090"
        async with client(app, evil) as browser:
            with anyio.fail_after(10):
                refused = [
                    await browser.get("/"),  # the page, which would set the cookie
                    await browser.get("/chat.js"),
                    await browser.get("/config.json"),
                    await browser.get("/api/chat/models"),
                    await browser.post("/api/chat", content=BODY, headers={"origin": evil}),
                    await browser.get("/api/conversations"),
                    await browser.get(f"/api/chat/streams/{'a' * 24}"),
                    await browser.get("/nowhere"),
                ]
        for response in refused:
            assert response.status_code == 400, (response.request.url, response.status_code)
            assert response.json()["error"]["code"] == "host_not_allowed"
            assert "set-cookie" not in response.headers
        assert upstream.app.requests == []  # nothing was spent
        # The names the server is reached as on this machine all work.
        for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
            async with client(app, base) as browser:
                with anyio.fail_after(10):
                    page = await browser.get("/")
                    answer = await browser.post("/api/chat", content=BODY, headers={"origin": base})
            assert page.status_code == 200 and COOKIE in page.headers["set-cookie"]
            assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    finally:
        await app.state.proxy.aclose()


@pytest.mark.anyio
async def test_issue_14_serve_token_guards_every_route(upstream: RunningUpstream) -> None:
    app = create_app(base_url=upstream.base_url, api_key=None, token=TOKEN)
    try:
        async with client(app, "http://127.0.0.1:8000") as browser:
            with anyio.fail_after(10):
                refused = [
                    await browser.get("/"),
                    await browser.get("/chat.js"),
                    await browser.post("/api/chat", content=BODY),
                    await browser.get("/api/chat/models"),
                    await browser.get("/?token=tok-not-the-right-one-000"),
                    await browser.post(f"/?token={TOKEN}"),  # only a GET trades it
                    await browser.get("/", headers={"authorization": "Bearer wrong"}),
                ]
                assert upstream.app.requests == []
                # The printed URL: the token is traded for a cookie, then left behind.
                login = await browser.get(f"/?token={TOKEN}")
                assert login.status_code == 303
                assert login.headers["location"] == "http://127.0.0.1:8000/"
                cookie = login.headers["set-cookie"]
                attributes = {part.strip().lower() for part in cookie.split(";")}
                assert cookie.startswith(f"{TOKEN_COOKIE}={TOKEN};")
                assert {"httponly", "samesite=lax", "path=/"} <= attributes
                assert browser.cookies[TOKEN_COOKIE] == TOKEN
                page = await browser.get("/")
                answer = await browser.post("/api/chat", content=BODY)
        async with client(app, "http://127.0.0.1:8000") as script:
            bearer = await script.get(
                "/api/chat/models", headers={"authorization": f"Bearer {TOKEN}"}
            )
    finally:
        await app.state.proxy.aclose()
    for response in refused:
        assert response.status_code == 401, (response.request.url, response.status_code)
        assert response.json()["error"]["code"] == "token_required"
        assert TOKEN not in response.text
    assert page.status_code == 200 and "<script" in page.text
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    assert bearer.status_code == 200
    with pytest.raises(ValueError, match="token"):
        create_app(base_url=upstream.base_url, api_key=None, token="short")


def test_issue_14_serve_hosts_and_options() -> None:
    assert LOCAL_HOSTS == ("localhost", "127.0.0.1", "[::1]")
    assert served_hosts("127.0.0.1") == list(LOCAL_HOSTS)
    assert served_hosts("0.0.0.0") == list(LOCAL_HOSTS)  # no name a browser sends
    assert served_hosts("::", ["chat.lan"]) == [*LOCAL_HOSTS, "chat.lan"]
    assert served_hosts("192.168.1.5", ["*.lan"]) == [*LOCAL_HOSTS, "192.168.1.5", "*.lan"]
    args = build_parser().parse_args(
        ["serve", "--allowed-host", "chat.lan", "--allowed-host", "10.0.0.2", "--require-token"]
    )
    assert args.allowed_host == ["chat.lan", "10.0.0.2"] and args.require_token
    plain = build_parser().parse_args(["serve"])
    assert plain.allowed_host == [] and not plain.require_token


def test_issue_14_serve_command_passes_hosts_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def fake_run_serve(**options: object) -> int:
        calls.append(options)
        return 0

    monkeypatch.setattr("tokenhub_stream.cli._serve.run_serve", fake_run_serve)
    argv = ["serve", "--host", "0.0.0.0", "--allowed-host", "chat.lan", "--require-token"]
    assert main(argv) == 0
    assert calls[0]["allowed_hosts"] == ["chat.lan"] and calls[0]["require_token"] is True
    # A bad --allowed-host is a usage error before anything starts.
    monkeypatch.setattr("tokenhub_stream.cli._serve.run_serve", run_serve)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["serve", "--allowed-host", "http://chat.lan/", "--no-store"]) == 2
    assert "not a host name" in err.getvalue()


def test_issue_14_serve_warns_when_exposed(monkeypatch: pytest.MonkeyPatch) -> None:
    def warned(host: str, hosts: list[str], token: str | None) -> str:
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        _warn_exposed(host, hosts, token)
        return err.getvalue()

    assert warned("127.0.0.1", [], None) == "" and warned("localhost", [], None) == ""
    both = warned("0.0.0.0", [], None)
    assert "--allowed-host" in both and "--require-token" in both
    assert "--allowed-host" not in warned("0.0.0.0", ["chat.lan"], None)
    assert warned("0.0.0.0", ["chat.lan"], TOKEN) == ""


def test_issue_14_run_serve_accepts_only_its_hosts_and_prints_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
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
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    results: list[int] = []

    def target() -> None:
        results.append(
            run_serve(
                host="127.0.0.1",
                port=0,
                base_url=None,
                api_key=None,
                model=None,
                history=False,
                allowed_hosts=["chat.lan"],
            )
        )

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        # servers[0] is the local upstream's (run_upstream uses uvicorn too).
        while not (len(servers) == 2 and servers[1].started):
            assert time.monotonic() < deadline and thread.is_alive(), "run_serve did not start"
            time.sleep(0.01)
        printed = out.getvalue().strip()
        found = re.fullmatch(r"(http://127\.0\.0\.1:(\d+)/)\?token=(.+)", printed)
        assert found is not None, printed
        url, port, token = found.group(1), found.group(2), found.group(3)
        assert token == TOKEN  # the env's token, required without --require-token
        auth = {"authorization": f"Bearer {TOKEN}"}
        for host, status in (
            (f"127.0.0.1:{port}", 200),
            (f"localhost:{port}", 200),
            (f"chat.lan:{port}", 200),
            (f"evil.example:{port}", 400),
            ("evil.example:18090", 400),
        ):
            response = httpx.get(url + "config.json", headers={**auth, "host": host})
            assert response.status_code == status, host
        assert httpx.get(url + "config.json").status_code == 401  # no token
    finally:
        if len(servers) == 2:
            servers[1].should_exit = True
        thread.join(10)
    assert results == [0]
