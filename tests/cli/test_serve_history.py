"""The history API of `tokenhub-stream serve` without a browser (issue #5).

`create_app(store=...)` through `httpx.ASGITransport` (which runs each request, the
proxy's `on_complete` included, to its end before it returns), in front of the local
upstream; plus how `run_serve` and the command line choose the store.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest

from tokenhub_stream.cli import _serve, build_parser, main
from tokenhub_stream.cli._serve import (
    COOKIE,
    STORE_URL_ENV,
    _open_store,
    _Written,
    create_app,
    default_store_url,
    principal_of,
    run_serve,
)
from tokenhub_stream.store import ConversationStore, Turn
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's async engine runs on asyncio only.
    return "asyncio"


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream()) as running:
        yield running


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ConversationStore]:
    async with ConversationStore(f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}") as store:
        yield store


@pytest.fixture
async def app(upstream: RunningUpstream, store: ConversationStore) -> AsyncIterator[object]:
    app = create_app(base_url=upstream.base_url, api_key=None, store=store)
    try:
        yield app
    finally:
        await app.state.proxy.aclose()  # ASGITransport runs no lifespan


def browser(app: object) -> httpx.AsyncClient:
    """A client that keeps its cookies, like one browser."""
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000")


async def chat(client: httpx.AsyncClient, text: str, conversation_id: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}], "conversation_id": conversation_id}
    with anyio.fail_after(10):
        return await client.post("/api/chat", content=json.dumps(body))


@pytest.mark.anyio
async def test_serve_history_page_sets_the_browser_cookie(app: object) -> None:
    async with browser(app) as client:
        page = await client.get("/")
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        attributes = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=lax", "path=/"} <= attributes
        assert "secure" not in attributes  # plain http on loopback
        assert f"max-age={_serve.COOKIE_MAX_AGE}" in attributes
        first = client.cookies[COOKIE]
        # A reload keeps the id (and renews it); an invalid one is replaced.
        await client.get("/")
        assert client.cookies[COOKIE] == first
    async with browser(app) as client:
        replaced = await client.get("/", headers={"cookie": f"{COOKIE}=bad;"})
        value = replaced.cookies[COOKIE]
        assert value != first and len(value) >= 32
        # The style and script are not personal: no cookie there.
        assert "set-cookie" not in (await client.get("/chat.js")).headers


@pytest.mark.anyio
async def test_serve_history_lists_reads_and_isolates_browsers(
    app: object, store: ConversationStore, upstream: RunningUpstream
) -> None:
    async with browser(app) as alice, browser(app) as bob:
        await alice.get("/")
        await bob.get("/")
        upstream.app.enqueue(Script(text="Hello Alice."))
        response = await chat(alice, "Hi, I am Alice", "alice-chat-1")
        assert response.status_code == 200
        assert response.text.endswith("data: [DONE]\n\n")
        assert "conversation_id" not in (upstream.app.requests[-1].json or {})

        listed = await alice.get("/api/conversations")
        assert listed.status_code == 200
        assert listed.headers["cache-control"] == "no-store"
        [summary] = listed.json()["conversations"]
        assert summary["id"] == "alice-chat-1"
        assert summary["title"] == "Hi, I am Alice"
        assert summary["message_count"] == 2
        assert summary["created"].endswith("+00:00")

        full = (await alice.get("/api/conversations/alice-chat-1")).json()
        assert full["id"] == "alice-chat-1"
        assert full["messages"] == [
            {"role": "user", "content": "Hi, I am Alice"},
            {
                "role": "assistant",
                "content": "Hello Alice.",
                "model": upstream.app.requests[-1].json["model"],  # type: ignore[index]
                "outcome": "completed",
                "error": None,
                "finish_reason": "stop",
            },
        ]

        # Bob sees nothing of it, cannot read it, and cannot delete it.
        assert (await bob.get("/api/conversations")).json() == {"conversations": []}
        assert (await bob.get("/api/conversations/alice-chat-1")).status_code == 404
        assert (await bob.delete("/api/conversations/alice-chat-1")).status_code == 404
        # Bob reusing Alice's id gets a conversation of his own, not a place in hers.
        upstream.app.enqueue(Script(text="Hello Bob."))
        assert (await chat(bob, "Hi, I am Bob", "alice-chat-1")).status_code == 200
        [bobs] = (await bob.get("/api/conversations")).json()["conversations"]
        assert bobs["id"] != "alice-chat-1" and bobs["title"] == "Hi, I am Bob"
        alices = await store.get_conversation(principal_of(alice.cookies[COOKIE]), "alice-chat-1")
        assert alices is not None and alices.message_count == 2

        # Alice deletes hers.
        deleted = await alice.delete("/api/conversations/alice-chat-1")
        assert deleted.status_code == 204
        assert (await alice.get("/api/conversations/alice-chat-1")).status_code == 404
        assert (await alice.delete("/api/conversations/alice-chat-1")).status_code == 404
        assert (await alice.get("/api/conversations")).json() == {"conversations": []}
        assert len((await bob.get("/api/conversations")).json()["conversations"]) == 1


@pytest.mark.anyio
async def test_issue_19_history_shows_a_refusal(app: object, upstream: RunningUpstream) -> None:
    # A model that declined (a structured output) answers with a refusal, no content: the
    # reopened conversation says so instead of showing an empty answer.
    refusal = "I can't help with that."
    async with browser(app) as client:
        await client.get("/")
        upstream.app.enqueue(Script(refusal=refusal))
        response = await chat(client, "Describe Mars", "refused-1")
        assert response.status_code == 200
        assert response.text.endswith("data: [DONE]\n\n")
        full = await client.get("/api/conversations/refused-1")
    assert full.status_code == 200
    question, answer = full.json()["messages"]
    assert question == {"role": "user", "content": "Describe Mars"}  # no refusal key
    assert answer["refusal"] == refusal
    assert (answer["content"], answer["outcome"]) == ("", "completed")


@pytest.mark.anyio
async def test_serve_history_needs_the_browser_cookie(app: object) -> None:
    async with browser(app) as client:
        for method, path in [
            ("GET", "/api/conversations"),
            ("GET", "/api/conversations/some-id"),
            ("DELETE", "/api/conversations/some-id"),
            ("GET", "/api/chat/models"),
        ]:
            response = await client.request(method, path)
            assert response.status_code == 401, (method, path)
            assert "reload the chat page" in response.json()["error"]["message"]
        assert (await chat(client, "hi", "x")).status_code == 401
        client.cookies.set(COOKIE, "short")
        assert (await client.get("/api/conversations")).status_code == 401


@pytest.mark.anyio
async def test_serve_history_refuses_cross_site_deletes(
    app: object, upstream: RunningUpstream
) -> None:
    async with browser(app) as client:
        await client.get("/")
        await chat(client, "keep this", "keep-1")
        for headers in (
            {"sec-fetch-site": "cross-site"},
            {"origin": "https://evil.example"},
        ):
            response = await client.delete("/api/conversations/keep-1", headers=headers)
            assert response.status_code == 403
        same = {"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
        assert (await client.delete("/api/conversations/keep-1", headers=same)).status_code == 204


@pytest.mark.anyio
async def test_serve_history_invalid_ids_are_not_found(app: object) -> None:
    async with browser(app) as client:
        await client.get("/")
        for conversation_id in ("a" * 65, "semi;colon", "%2e%2e"):
            path = f"/api/conversations/{conversation_id}"
            assert (await client.get(path)).status_code == 404
            assert (await client.delete(path)).status_code == 404


@pytest.mark.anyio
async def test_serve_history_store_failure_is_a_503(
    app: object, store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("disk on fire at /secret/path")

    for name in ("list_conversations", "get_conversation", "delete_conversation"):
        monkeypatch.setattr(store, name, broken)
    async with browser(app) as client:
        await client.get("/")
        for method, path in [
            ("GET", "/api/conversations"),
            ("GET", "/api/conversations/abc"),
            ("DELETE", "/api/conversations/abc"),
        ]:
            response = await client.request(method, path)
            assert response.status_code == 503
            assert response.json()["error"]["message"] == "The conversation store failed."
            assert "secret" not in response.text


@pytest.mark.anyio
async def test_serve_history_after_waits_for_the_write(
    app: object, store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold the write back: a listing with ?after= must wait for it, not race it.
    writing, release = anyio.Event(), anyio.Event()
    request_ids: list[str | None] = []
    record_turn = store.record_turn

    async def slow_record(turn: Turn) -> str:
        request_ids.append(turn.messages[-1].request_id)
        writing.set()
        await release.wait()
        return await record_turn(turn)

    monkeypatch.setattr(store, "record_turn", slow_record)
    listings: list[list[str]] = []
    async with browser(app) as client, anyio.create_task_group() as tg:
        await client.get("/")
        tg.start_soon(chat, client, "wait for me", "waited-1")
        with anyio.fail_after(5):
            await writing.wait()
        # A plain listing does not see the turn yet...
        assert (await client.get("/api/conversations")).json() == {"conversations": []}

        async def list_after() -> None:
            params = {"after": str(request_ids[0])}
            listed = await client.get("/api/conversations", params=params)
            listings.append([c["id"] for c in listed.json()["conversations"]])

        tg.start_soon(list_after)
        await anyio.sleep(0.2)
        assert listings == []  # ...and one naming the turn waits for its write
        release.set()
    assert listings == [["waited-1"]]


@pytest.mark.anyio
async def test_serve_history_written_waits_are_bounded() -> None:
    written = _Written(size=2)
    with anyio.fail_after(2):
        await written.wait("never", 0.05)  # a bogus or rejected id: gives up
    assert written._waiting == {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(written.wait, "r1", 5.0)
        with anyio.fail_after(1):
            while True:  # until the waiter is registered
                if "r1" in written._waiting:
                    break
                await anyio.lowlevel.checkpoint()
        written.mark("r1")  # wakes the waiter at once
    with anyio.fail_after(1):
        await written.wait("r1", 5.0)  # already written
    written.mark("r2")
    written.mark("r3")
    assert list(written._done) == ["r2", "r3"]  # bounded


@pytest.mark.anyio
async def test_serve_history_absent_without_a_store(upstream: RunningUpstream) -> None:
    app = create_app(base_url=upstream.base_url, api_key=None, store=None)
    async with app.state.proxy, browser(app) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert "set-cookie" not in page.headers
        assert (await client.get("/api/conversations")).status_code == 404
        # No cookie needed: the proxy serves anyone, as before.
        assert (await chat(client, "hi", "ignored")).status_code == 200
        assert "conversation_id" not in (upstream.app.requests[-1].json or {})


# --- choosing the store -------------------------------------------------------------------


def test_serve_default_store_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    expected = tmp_path / "data" / "tokenhub_stream" / "conversations.db"
    assert default_store_url() == f"sqlite+aiosqlite:///{expected}"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / ".local" / "share" / "tokenhub_stream" / "conversations.db"
    for relative in ("relative/dir", ""):  # the XDG spec: not absolute means not set
        monkeypatch.setenv("XDG_DATA_HOME", relative)
        assert default_store_url() == f"sqlite+aiosqlite:///{home}"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_store_url() == f"sqlite+aiosqlite:///{home}"


def test_serve_open_store_chooses_the_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    store = _open_store(None)
    assert store is not None
    default = tmp_path / "tokenhub_stream" / "conversations.db"
    assert store.url.database == str(default)
    assert capsys.readouterr().err == (
        f"tokenhub-stream: conversations are kept in {default} (--no-store: off)\n"
    )
    assert not default.exists()  # created on first use, not before
    monkeypatch.setenv(STORE_URL_ENV, f"sqlite:///{tmp_path / 'env.db'}")
    store = _open_store(None)
    assert store is not None and store.url.database == str(tmp_path / "env.db")
    assert store.url.drivername == "sqlite+aiosqlite"
    store = _open_store(f"sqlite:///{tmp_path / 'flag.db'}")
    assert store is not None and store.url.database == str(tmp_path / "flag.db")
    # A PostgreSQL URL is announced without its password.
    pytest.importorskip("asyncpg")
    store = _open_store("postgresql://me:hunter2@db.example/chats")
    assert store is not None
    err = capsys.readouterr().err
    assert "db.example/chats" in err and "hunter2" not in err
    with pytest.raises(ValueError, match="not a database URL"):
        _open_store("not a url")


def test_serve_open_store_without_the_store_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tokenhub_stream.store", None)
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    assert _open_store(None) is None
    assert "pip install 'tokenhub_stream[store]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"tokenhub_stream\[store\]"):
        _open_store("sqlite:///x.db")


def test_serve_cli_store_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert (args.store_url, args.no_store) == (None, False)
    args = parser.parse_args(["serve", "--store-url", "sqlite:///x.db"])
    assert args.store_url == "sqlite:///x.db"
    assert parser.parse_args(["serve", "--no-store"]).no_store is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert main(["serve", "--no-store", "--store-url", "sqlite:///x.db"]) == 2
    # A bad URL is a usage error, reported before anything starts.
    monkeypatch.setattr(sys, "stderr", err := io.StringIO())
    assert main(["serve", "--store-url", "not a url"]) == 2
    assert "not a database URL" in err.getvalue()
    # The flags reach run_serve.
    calls: list[dict[str, object]] = []

    def fake_run_serve(**kwargs: object) -> int:
        calls.append(kwargs)
        return 0

    monkeypatch.setattr(_serve, "run_serve", fake_run_serve)
    assert main(["serve", "--no-store"]) == 0
    assert main(["serve", "--store-url", "sqlite:///y.db"]) == 0
    assert [(c["store_url"], c["history"]) for c in calls] == [
        (None, False),
        ("sqlite:///y.db", True),
    ]


@pytest.mark.parametrize("history", [True, False])
def test_serve_run_serve_plugs_the_store_in(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, history: bool
) -> None:
    import uvicorn

    apps: list[object] = []

    class NotServing:
        def __init__(self, config: uvicorn.Config) -> None:
            apps.append(config.app)

        def run(self, sockets: object = None) -> None:
            pass

    with run_upstream(FakeChatUpstream()) as running, monkeypatch.context() as patch:
        # Patched once the upstream runs: run_upstream uses uvicorn.Server too.
        patch.setattr(uvicorn, "Server", NotServing)
        patch.setattr(sys, "stdout", io.StringIO())
        patch.setattr(sys, "stderr", io.StringIO())
        url = f"sqlite+aiosqlite:///{tmp_path / 'run.db'}"
        code = run_serve(
            host="127.0.0.1",
            port=0,
            base_url=running.base_url,
            api_key=None,
            model=None,
            store_url=url,
            history=history,
        )
    assert code == 0
    [app] = apps
    store = app.state.store  # type: ignore[attr-defined]
    if history:
        assert isinstance(store, ConversationStore)
        assert store.url.database == str(tmp_path / "run.db")
        assert app.state.proxy.authorize is not None  # type: ignore[attr-defined]
    else:
        assert store is None
