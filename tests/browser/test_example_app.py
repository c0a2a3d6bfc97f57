"""`examples/chat_app/app.py`: the chat page and ChatProxy wired up by hand, in chromium."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import httpx
import pytest

from tokenhub_stream.testing import RunningUpstream, Script

from .conftest import serve

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.timeout(30)

APP = Path(__file__).resolve().parents[2] / "examples" / "chat_app" / "app.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chat_app_example", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_chat_app_streams_in_the_browser(upstream: RunningUpstream, page: Page) -> None:
    app = _load_example().build_app(upstream.base_url, None, local=True)
    upstream.app.enqueue(Script(deltas=["Hello", " from", " the", " example"], delay=0.05))
    with serve(app) as url:
        page.goto(url + "/")
        picker = page.get_by_label("Model")
        page.locator("#model:enabled").wait_for()
        assert picker.input_value() == upstream.app.models[0]
        assert page.locator("#notice").is_visible()
        box = page.get_by_label("Message")
        box.fill("hi")
        box.press("Enter")
        page.locator('.msg.assistant[data-state="done"]').wait_for()
        assert page.locator(".msg.assistant .text").inner_text() == "Hello from the example"


def test_example_chat_app_runs_with_one_command() -> None:
    assert "python examples/chat_app/app.py" in APP.read_text(encoding="utf-8").split('"""')[1]
    with socket.socket() as probe:  # a free port (the example binds it itself)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHUB_")}
    process = subprocess.Popen(
        [sys.executable, str(APP), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 10
        while True:
            try:
                models = httpx.get(url + "api/chat/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the example did not answer"
                time.sleep(0.05)
        assert models.status_code == 200
        assert len(models.json()["data"]) > 1
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert process.stderr is not None
        assert "using the local test upstream" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
