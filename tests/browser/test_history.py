"""Past conversations on the `tokenhub-stream serve` page, in a real chromium (issue #5).

Each test serves `create_app(store=...)` (a SQLite file in tmp_path) on a random loopback
port in front of a `run_upstream` local upstream, and drives the page like a user would.
What the page shows is checked against what the store holds, read through a second
`ConversationStore` on the same file in a thread of its own (Playwright's sync API keeps an
event loop running in this one).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from tokenhub_stream.cli._serve import COOKIE, create_app, principal_of
from tokenhub_stream.store import Conversation, ConversationStore
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script

from .conftest import TIMEOUT_MS, serve

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Locator, Page

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


def in_thread(call: Callable[[], Awaitable[T]], timeout: float = 10) -> T:
    """Run `call()` on an event loop of its own in a worker thread; return its result."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(asyncio.run(asyncio.wait_for(_awaited(call), timeout)))
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout + 5)
    assert not thread.is_alive(), "the store did not answer"
    if errors:
        raise errors[0]
    return results[0]


async def _awaited(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


@dataclass
class History:
    browser: Browser
    page: Page
    upstream: FakeChatUpstream
    url: str
    store_url: str

    # --- the page ---------------------------------------------------------------------------

    def open(self, page: Page) -> Page:
        page.goto(self.url + "/")
        page.locator("#model:enabled").wait_for()
        return page

    def send(self, text: str, page: Page | None = None) -> None:
        box = (page or self.page).get_by_label("Message")
        box.fill(text)
        box.press("Enter")

    def wait_done(self, count: int, page: Page | None = None) -> None:
        page = page or self.page
        done = page.locator('.msg.assistant[data-state="done"]')
        page.locator(".msg.assistant").nth(count - 1).and_(done).wait_for()

    def items(self, page: Page | None = None) -> Locator:
        return (page or self.page).locator("#history-list button.open")

    def item(self, title: str, page: Page | None = None) -> Locator:
        return self.items(page).filter(has_text=title)

    def texts(self, page: Page | None = None) -> list[tuple[str, str]]:
        page = page or self.page
        boxes = page.locator(".msg")
        return [
            (
                "user" if "user" in str(boxes.nth(i).get_attribute("class")) else "assistant",
                boxes.nth(i).locator("p.text").last.inner_text(),
            )
            for i in range(boxes.count())
        ]

    # --- the store --------------------------------------------------------------------------

    def principal(self, context: BrowserContext) -> str:
        [cookie] = [c for c in context.cookies() if c.get("name") == COOKIE]
        return principal_of(str(cookie.get("value")))

    def stored(self, principal: str) -> list[Conversation]:
        async def read() -> list[Conversation]:
            async with ConversationStore(self.store_url) as store:
                summaries = await store.list_conversations(principal)
                full = [await store.get_conversation(principal, c.id) for c in summaries]
                return [c for c in full if c is not None]

        return in_thread(read)


@pytest.fixture
def history(browser: Browser, upstream: RunningUpstream, tmp_path: Path) -> Iterator[History]:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"
    app = create_app(
        base_url=upstream.base_url,
        api_key=None,
        models=upstream.app.models,
        local=True,
        store=ConversationStore(store_url),
    )
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        with serve(app) as url:
            chat = History(browser, page, upstream.app, url, store_url)
            chat.open(page)
            yield chat
    finally:
        context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def test_history_reload_reopen_and_continue(history: History) -> None:
    page = history.page
    page.get_by_text("No past conversations yet.").wait_for()
    history.upstream.enqueue(Script(text="Trams and custard tarts."))
    history.send("Plan a day in Lisbon")
    history.wait_done(1)
    # The list refreshes once the answer has ended, and marks the open conversation.
    history.item("Plan a day in Lisbon").wait_for()
    assert history.item("Plan a day in Lisbon").get_attribute("aria-current") == "true"

    page.reload()
    page.locator("#model:enabled").wait_for()
    history.item("Plan a day in Lisbon").wait_for()
    assert page.locator(".msg").count() == 0
    # Reopened with the keyboard: Tab to it, Enter.
    history.item("Plan a day in Lisbon").focus()
    page.keyboard.press("Enter")
    page.locator(".msg.assistant").first.wait_for()
    assert history.texts() == [
        ("user", "Plan a day in Lisbon"),
        ("assistant", "Trams and custard tarts."),
    ]
    assert history.item("Plan a day in Lisbon").get_attribute("aria-current") == "true"
    assert page.evaluate("() => document.activeElement.id") == "prompt"

    # Continuing it sends the whole history and appends to the same conversation.
    history.upstream.enqueue(Script(text="Take the 28 tram."))
    history.send("And after lunch?")
    history.wait_done(2)
    request = history.upstream.requests[-1].json
    assert request is not None
    messages = request["messages"]
    assert isinstance(messages, list)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Plan a day in Lisbon"),
        ("assistant", "Trams and custard tarts."),
        ("user", "And after lunch?"),
    ]
    assert "conversation_id" not in request  # taken out before forwarding
    page.wait_for_function(
        "() => document.querySelectorAll('#history-list button.open').length === 1"
    )
    [conversation] = history.stored(history.principal(page.context))
    assert conversation.title == "Plan a day in Lisbon"
    assert [(m.role, m.content, m.outcome) for m in conversation.messages] == [
        ("user", "Plan a day in Lisbon", None),
        ("assistant", "Trams and custard tarts.", "completed"),
        ("user", "And after lunch?", None),
        ("assistant", "Take the 28 tram.", "completed"),
    ]

    # Another browser (another cookie) sees none of it, and cannot read it by id.
    other = history.browser.new_context(viewport={"width": 1000, "height": 800})
    try:
        other.set_default_timeout(TIMEOUT_MS)
        stranger = history.open(other.new_page())
        stranger.get_by_text("No past conversations yet.").wait_for()
        assert history.items(stranger).count() == 0
        assert history.principal(other) != history.principal(page.context)
        response = other.request.get(f"{history.url}/api/conversations/{conversation.id}")
        assert response.status == 404
        assert other.request.get(f"{history.url}/api/conversations").json() == {"conversations": []}
        # Its own chat is its own conversation.
        history.upstream.enqueue(Script(text="Hello."))
        history.send("Hi from elsewhere", stranger)
        history.wait_done(1, stranger)
        history.item("Hi from elsewhere", stranger).wait_for()
        assert history.items(stranger).count() == 1
        assert [c.title for c in history.stored(history.principal(other))] == ["Hi from elsewhere"]
    finally:
        other.close()
    page.reload()
    page.locator("#model:enabled").wait_for()
    history.item("Plan a day in Lisbon").wait_for()
    assert history.items().all_inner_texts()[0].startswith("Plan a day in Lisbon")
    assert history.items().count() == 1


def test_issue_19_history_reopens_a_refusal(history: History) -> None:
    # A refused turn (a structured output's `refusal`, no content) is stored with its
    # refusal and shown again as one when the conversation is reopened.
    page = history.page
    refusal = "I can't help with that."
    history.upstream.enqueue(Script(refusal=refusal))
    history.send("Describe Mars")
    history.wait_done(1)
    history.item("Describe Mars").wait_for()
    page.reload()
    page.locator("#model:enabled").wait_for()
    history.item("Describe Mars").click()
    page.locator(".msg.assistant").first.wait_for()
    note = page.locator(".msg.assistant").first.get_by_role("note", name="Refusal")
    assert note.inner_text() == refusal
    assert page.locator('.msg.assistant[data-state="done"]').count() == 1


def test_history_new_chat_starts_a_new_conversation(history: History) -> None:
    page = history.page
    history.upstream.enqueue(Script(text="One."))
    history.send("first question")
    history.wait_done(1)
    history.item("first question").wait_for()
    page.get_by_role("button", name="New chat").click()
    assert page.locator(".msg").count() == 0
    assert history.item("first question").get_attribute("aria-current") is None
    history.upstream.enqueue(Script(text="Two."))
    history.send("second question")
    history.wait_done(1)
    history.item("second question").wait_for()
    # Newest first.
    titles = [t.split("\n")[0] for t in history.items().all_inner_texts()]
    assert titles == ["second question", "first question"]
    stored = history.stored(history.principal(page.context))
    assert [(c.title, c.message_count) for c in stored] == [
        ("second question", 2),
        ("first question", 2),
    ]
    # Back to the first one: its answer, and a turn that goes to it.
    history.item("first question").click()
    page.locator(".msg.user").filter(has_text="first question").wait_for()
    history.upstream.enqueue(Script(text="Three."))
    history.send("follow-up")
    history.wait_done(2)
    page.wait_for_function(
        "() => document.querySelector('#history-list button.open')"
        ".textContent.startsWith('first question')"
    )
    stored = history.stored(history.principal(page.context))
    assert [(c.title, c.message_count) for c in stored] == [
        ("first question", 4),
        ("second question", 2),
    ]


def test_history_stopped_answer_is_kept_and_shown_stopped(history: History) -> None:
    page = history.page
    history.upstream.enqueue(Script(deltas=[f"w{i} " for i in range(200)], delay=0.05))
    history.send("a long story")
    page.locator('.msg.assistant[data-state="streaming"]').wait_for()
    # Stopped once two deltas are in (at the first one, only "w0 " would be kept).
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant .text')?.textContent.includes('w1')"
    )
    page.get_by_role("button", name="Stop").click()
    page.locator('.msg.assistant[data-state="stopped"]').wait_for()
    history.item("a long story").wait_for()
    page.reload()
    page.locator("#model:enabled").wait_for()
    history.item("a long story").click()
    answer = page.locator(".msg.assistant")
    answer.wait_for()
    assert answer.get_attribute("data-state") == "stopped"
    assert answer.locator(".meta").inner_text().endswith("stopped")
    assert answer.locator("p.text").inner_text().startswith("w0 w1")
    [conversation] = history.stored(history.principal(page.context))
    assert conversation.messages[-1].outcome == "client-disconnected"


def test_history_renders_titles_and_messages_as_text(history: History) -> None:
    page = history.page
    evil = '<img src=x onerror="window.pwned=1">'
    history.upstream.enqueue(Script(text="<b>bold?</b><script>window.pwned=2</script>"))
    history.send(evil)
    history.wait_done(1)
    history.item(evil).wait_for()
    page.reload()
    page.locator("#model:enabled").wait_for()
    history.item(evil).click()
    page.locator(".msg.assistant").wait_for()
    assert history.texts() == [
        ("user", evil),
        ("assistant", "<b>bold?</b><script>window.pwned=2</script>"),
    ]
    assert page.locator(".msg img, .msg b, .msg script, #history img").count() == 0
    assert page.evaluate("() => window.pwned") is None


def test_history_delete_from_the_list(history: History) -> None:
    page = history.page
    for n, question in enumerate(["keep me", "drop me"]):
        history.upstream.enqueue(Script(text=f"answer {n}"))
        if n:
            page.get_by_role("button", name="New chat").click()
        history.send(question)
        history.wait_done(1)
        history.item(question).wait_for()
    page.get_by_role("button", name="Delete “drop me”").click()
    history.item("drop me").wait_for(state="detached")
    # It was the open one: the page starts over, and the focus lands on the next item.
    assert page.locator(".msg").count() == 0
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')") == (
        "Delete “keep me”"
    )
    stored = history.stored(history.principal(page.context))
    assert [c.title for c in stored] == ["keep me"]


def test_history_collapses_on_a_phone(history: History) -> None:
    page = history.page
    history.upstream.enqueue(Script(text="Small screen answer."))
    history.send("from my phone")
    history.wait_done(1)
    history.item("from my phone").wait_for()
    page.set_viewport_size({"width": 390, "height": 844})
    toggle = page.get_by_role("button", name="History")
    assert toggle.is_visible()
    assert toggle.get_attribute("aria-expanded") == "false"
    assert not page.locator("#history").is_visible()
    page.get_by_role("button", name="New chat").click()
    # Open it with the keyboard; the first conversation gets the focus; Enter reopens it.
    toggle.focus()
    page.keyboard.press("Enter")
    assert toggle.get_attribute("aria-expanded") == "true"
    assert page.locator("#history").is_visible()
    assert page.evaluate("() => document.activeElement.dataset.id") is not None
    page.keyboard.press("Enter")
    page.locator(".msg.assistant").wait_for()
    assert toggle.get_attribute("aria-expanded") == "false"  # closed again after choosing
    assert not page.locator("#history").is_visible()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    # Escape closes an open list and gives the focus back to its button.
    toggle.click()
    page.keyboard.press("Escape")
    assert toggle.get_attribute("aria-expanded") == "false"
    assert page.evaluate("() => document.activeElement.id") == "history-toggle"
    # On a wide screen the list is always there and the button is not.
    page.set_viewport_size({"width": 1000, "height": 800})
    assert page.locator("#history").is_visible()
    assert not toggle.is_visible()


def test_history_absent_without_a_store(page: Page, upstream: RunningUpstream) -> None:
    app = create_app(base_url=upstream.base_url, api_key=None, models=upstream.app.models)
    with serve(app) as url:
        page.goto(url + "/")
        page.locator("#model:enabled").wait_for()
        upstream.app.enqueue(Script(text="No history here."))
        box = page.get_by_label("Message")
        box.fill("hello")
        box.press("Enter")
        page.locator('.msg.assistant[data-state="done"]').wait_for()
        assert not page.locator("#history").is_visible()
        assert not page.get_by_role("button", name="History").is_visible()
        assert [c for c in page.context.cookies() if c.get("name") == COOKIE] == []
        request = upstream.app.requests[-1].json
        assert request is not None and "conversation_id" not in request
