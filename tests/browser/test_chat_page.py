"""The chat page of `tokenhub-stream serve` in a real chromium, against a real uvicorn.

Each test serves `create_app` on a random loopback port, in front of a `run_upstream`
local upstream, and drives the page with the keyboard or the mouse like a user would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tokenhub_stream.testing import DEFAULT_MODELS, FakeChatUpstream, RunningUpstream, Script

from .conftest import serve

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.timeout(30)

DEFAULT = "claude-3-5-sonnet-20241022"


@dataclass
class Chat:
    page: Page
    upstream: FakeChatUpstream
    url: str

    @property
    def answer(self) -> Locator:
        return self.page.locator(".msg.assistant").last

    def answer_text(self) -> str:
        return self.answer.locator("p.text").last.inner_text()

    def send(self, text: str) -> None:
        box = self.page.get_by_label("Message")
        box.fill(text)
        box.press("Enter")

    def wait_state(self, *states: str) -> str:
        selector = ", ".join(f'.msg.assistant[data-state="{s}"]' for s in states)
        self.page.locator(".msg.assistant").last.and_(self.page.locator(selector)).wait_for()
        return str(self.answer.get_attribute("data-state"))


@pytest.fixture
def chat(page: Page, upstream: RunningUpstream) -> Iterator[Chat]:
    from tokenhub_stream.cli._serve import create_app

    app = create_app(
        base_url=upstream.base_url,
        api_key=None,
        models=upstream.app.models,
        local=True,
        keepalive_interval=0.1,
    )
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with serve(app) as url:
        page.goto(url + "/")
        # The picker is filled once the models arrived: the page is ready.
        page.locator("#model:enabled").wait_for()
        yield Chat(page, upstream.app, url)
    assert errors == [], f"uncaught errors in the page: {errors}"


def test_chat_page_streams_tokens_as_they_arrive(chat: Chat) -> None:
    deltas = [f"word{i} " for i in range(12)]
    chat.upstream.enqueue(Script(deltas=deltas, delay=0.12))
    with chat.page.expect_request("**/api/chat") as request_info:
        chat.send("hello there")
    # The request is the tutorial's: no content type set, so the browser says text/plain.
    request = request_info.value
    assert request.headers["content-type"] == "text/plain;charset=UTF-8"
    assert json.loads(request.post_data or "") == {
        "messages": [{"role": "user", "content": "hello there"}],
        "model": DEFAULT,
    }

    chat.page.wait_for_function(
        "() => document.querySelector('.msg.assistant .text')?.textContent.length > 0"
    )
    partial = chat.answer_text()
    # More text arrives while the upstream is still sending: the page did not buffer.
    chat.page.wait_for_function(
        "n => document.querySelector('.msg.assistant .text').textContent.length > n",
        arg=len(partial),
    )
    grown = chat.answer_text()
    assert not chat.upstream.requests[-1].completed
    assert chat.answer.get_attribute("data-state") == "streaming"
    assert len(partial) < len(grown) < len("".join(deltas))

    assert chat.wait_state("done", "error", "stopped") == "done"
    assert chat.answer_text() == "".join(deltas)
    assert chat.page.locator(".msg.user .text").inner_text() == "hello there"
    meta = chat.answer.locator(".meta").inner_text()
    assert re.fullmatch(rf"{DEFAULT} · first token \d+ ms · [\d.]+ deltas/s", meta), meta
    rate = float(meta.split(" · ")[2].split()[0])
    assert 3 < rate < 20  # 0.12 s between deltas: about 8 per second
    assert chat.page.get_by_role("status").inner_text() == "Answer complete."


def test_chat_page_keeps_the_conversation(chat: Chat) -> None:
    chat.upstream.enqueue(Script(text="First answer."), Script(text="Second answer."))
    chat.send("one")
    chat.wait_state("done")
    chat.send("two")
    chat.page.locator(".msg.assistant").nth(1).and_(
        chat.page.locator('[data-state="done"]')
    ).wait_for()
    assert chat.upstream.requests[-1].json is not None
    assert chat.upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "two"},
    ]


def test_issue_19_chat_page_shows_a_refusal(chat: Chat) -> None:
    # OpenAI's structured-output refusal: `delta.refusal` deltas and no content. The page
    # shows it apart from an answer (a note, not the answer's text), as a complete turn,
    # and keeps it in the conversation as what the model said.
    refusal = "I can't help with that."
    chat.upstream.enqueue(Script(refusal=refusal), Script(text="Fine."))
    chat.send("Describe Mars")
    assert chat.wait_state("done", "error", "stopped") == "done"
    assert chat.answer.get_by_role("note", name="Refusal").inner_text() == refusal
    assert chat.answer_text() == ""
    assert chat.page.get_by_role("status").inner_text() == "Answer complete."
    chat.send("Then describe Venus")
    chat.page.locator(".msg.assistant").nth(1).and_(
        chat.page.locator('[data-state="done"]')
    ).wait_for()
    assert chat.upstream.requests[-1].json is not None
    assert chat.upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "Describe Mars"},
        {"role": "assistant", "content": refusal},
        {"role": "user", "content": "Then describe Venus"},
    ]
    assert chat.page.get_by_role("note", name="Refusal").count() == 1


def test_chat_page_stop_closes_the_upstream(chat: Chat) -> None:
    chat.upstream.enqueue(Script(deltas=["Let me think"], end="stall"))
    chat.send("a long question")
    chat.page.get_by_text("Let me think").wait_for()
    assert chat.answer.get_attribute("data-state") == "streaming"
    chat.page.get_by_role("button", name="Stop").click()
    assert chat.upstream.requests[-1].wait_disconnected(1.0)
    assert chat.wait_state("stopped") == "stopped"
    assert chat.answer_text() == "Let me think"  # the partial text stays
    assert chat.answer.locator(".meta").inner_text().endswith(" · stopped")
    assert chat.page.get_by_role("button", name="Send").is_enabled()
    assert chat.page.get_by_role("button", name="Stop").is_disabled()


def test_chat_page_escape_stops_before_the_first_token(chat: Chat) -> None:
    chat.upstream.enqueue(Script(deltas=["too late"], first_delay=30))
    chat.send("hello")
    assert chat.upstream.wait_for_requests(1, 5.0)
    chat.page.get_by_label("Message").press("Escape")
    assert chat.upstream.requests[-1].wait_disconnected(1.0)
    assert chat.wait_state("stopped") == "stopped"
    assert chat.answer_text() == ""
    # Nothing came back, so the question left the conversation again.
    chat.upstream.enqueue(Script(text="ok"))
    chat.send("again")
    chat.page.locator(".msg.assistant").nth(1).and_(
        chat.page.locator('[data-state="done"]')
    ).wait_for()
    assert chat.upstream.requests[-1].json is not None
    assert chat.upstream.requests[-1].json["messages"] == [{"role": "user", "content": "again"}]


def test_chat_page_shows_an_upstream_error_frame(chat: Chat) -> None:
    error = {"error": {"message": "The model is overloaded.", "type": "server_error"}}
    chat.upstream.enqueue(
        Script(deltas=["Partial", " answer"], error_frame=error, finish_reason=None, end="close")
    )
    chat.send("hi")
    assert chat.wait_state("error", "done") == "error"
    assert chat.answer_text() == "Partial answer"
    assert chat.answer.get_by_role("alert").inner_text() == "The model is overloaded."
    assert chat.answer.locator(".meta").inner_text().endswith(" · incomplete")


def test_chat_page_shows_the_proxy_error_frame_on_a_cut(chat: Chat) -> None:
    # The upstream drops the connection mid-answer: ChatProxy ends the stream with its own
    # error frame and no [DONE].
    chat.upstream.enqueue(Script(deltas=["Half an"], end="cut"))
    chat.send("hi")
    assert chat.wait_state("error", "done") == "error"
    assert chat.answer_text() == "Half an"
    assert chat.answer.get_by_role("alert").inner_text() != ""


def test_chat_page_shows_http_errors_with_their_message(chat: Chat) -> None:
    body = {"error": {"message": "Slow down, please.", "type": "rate_limit_error"}}
    chat.upstream.enqueue(Script(status=429, error=body, headers={"Retry-After": "2"}))
    chat.send("hi")
    assert chat.wait_state("error", "done") == "error"
    assert chat.answer.get_by_role("alert").inner_text() == "HTTP 429: Slow down, please."


def test_chat_page_flags_a_close_without_finish(chat: Chat) -> None:
    chat.upstream.enqueue(Script(deltas=["cut short"], finish_reason=None, end="close"))
    chat.send("hi")
    assert chat.wait_state("error", "done") == "error"
    assert chat.answer_text() == "cut short"
    assert "closed before the answer finished" in chat.answer.get_by_role("alert").inner_text()


def test_chat_page_bare_close_after_finish_is_complete(chat: Chat) -> None:
    chat.upstream.enqueue(Script(deltas=["All", " there"], end="close"))
    chat.send("hi")
    assert chat.wait_state("error", "done") == "done"
    assert chat.answer_text() == "All there"


def test_chat_page_streams_through_keepalive_comments(chat: Chat) -> None:
    # Comments from the upstream (every 0.03 s) and from the proxy (every 0.1 s of silence).
    chat.upstream.enqueue(
        Script(deltas=["slow", " but", " there"], first_delay=0.3, delay=0.25, keepalive=0.03)
    )
    chat.send("hi")
    assert chat.wait_state("error", "done") == "done"
    assert chat.answer_text() == "slow but there"


def test_chat_page_renders_model_output_as_text(chat: Chat) -> None:
    evil = [
        '<img src=x onerror="window.pwned=1">',
        " <b>bold</b>",
        " <script>window.pwned=2</script>",
    ]
    chat.upstream.enqueue(Script(deltas=evil))
    chat.send("<i>user html</i>")
    assert chat.wait_state("done") == "done"
    assert chat.answer_text() == "".join(evil)
    assert chat.page.locator(".msg.user .text").inner_text() == "<i>user html</i>"
    assert chat.page.locator(".msg img, .msg b, .msg i, .msg script").count() == 0
    assert chat.page.evaluate("() => window.pwned") is None


def test_chat_page_model_picker_lists_the_upstream_models(chat: Chat) -> None:
    picker = chat.page.get_by_label("Model")
    options = picker.locator("option").all_inner_texts()
    assert options == sorted(DEFAULT_MODELS)
    assert picker.input_value() == DEFAULT
    picker.select_option("gpt-4o")
    chat.upstream.enqueue(Script(text="Hi from four-o."))
    chat.send("hi")
    chat.wait_state("done")
    assert chat.upstream.requests[-1].json is not None
    assert chat.upstream.requests[-1].json["model"] == "gpt-4o"
    assert chat.answer.locator(".meta").inner_text().startswith("gpt-4o · ")


def test_chat_page_keyboard_only(chat: Chat) -> None:
    page = chat.page
    box = page.get_by_label("Message")
    assert page.evaluate("() => document.activeElement.id") == "prompt"
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    assert chat.upstream.requests == []
    chat.upstream.enqueue(Script(text="Two lines received."))
    box.press("Enter")
    assert chat.wait_state("done") == "done"
    assert page.locator(".msg.user .text").inner_text() == "line one\nline two"
    assert box.input_value() == ""
    # Tab reaches the buttons, and a focused element shows a visible outline.
    box.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "send"
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"


def test_chat_page_fits_a_phone_screen(chat: Chat) -> None:
    page = chat.page
    page.set_viewport_size({"width": 390, "height": 844})
    chat.upstream.enqueue(Script(text="A reply that is long enough to wrap " * 6))
    chat.send("hi")
    chat.wait_state("done")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390  # no sideways scrolling
    for name in ("Send", "Stop"):
        box = page.get_by_role("button", name=name).bounding_box()
        assert box is not None and box["x"] + box["width"] <= 390


SSE_SAMPLE = (
    ": keep-alive\r\n\r\n"
    'data: {"n":1}\r\n\r\n'
    "data: line one\ndata: line two\n\n"
    "data: crlf one\r\ndata: crlf two\r\n\r\n"
    ": comment\rdata:no-space\r\r"
    "event: ignored\nid: 7\nretry: 10\ndata: [DONE]\n\n"
    "data: never terminated"
)
SSE_EVENTS = ['{"n":1}', "line one\nline two", "crlf one\ncrlf two", "no-space", "[DONE]"]


def test_chat_page_sse_parser_every_split(chat: Chat) -> None:
    # The page's own parser, fed the sample cut at every offset and in single characters.
    result = chat.page.evaluate(
        """async (sample) => {
            const {SSEParser} = await import("/chat.js");
            const runs = [];
            const parse = (pieces) => {
                const p = new SSEParser();
                const out = [];
                for (const piece of pieces) out.push(...p.feed(piece));
                out.push(...p.end());
                return out;
            };
            for (let i = 0; i <= sample.length; i++) {
                runs.push(parse([sample.slice(0, i), sample.slice(i)]));
            }
            runs.push(parse(Array.from(sample)));
            return runs;
        }""",
        SSE_SAMPLE,
    )
    assert len(result) == len(SSE_SAMPLE) + 2
    for events in result:
        assert events == SSE_EVENTS
