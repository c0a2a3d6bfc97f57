"""Fixtures for the real-browser tests: Debian's chromium driven by Playwright (sync API).

Playwright's Python package bundles its driver; the browser is the system's
`/usr/bin/chromium` (`apt-get install chromium`), never a Playwright browser download. When
either is missing the tests skip, and `tests/conftest.py` turns that skip into a failure
under `CI=true`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import servers
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, run_upstream

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page
    from starlette.types import ASGIApp

CHROMIUM = os.environ.get("TOKENHUB_CHROMIUM", "/usr/bin/chromium")
#: The flags this sandbox needs (no GPU, no QUIC, no calls home); Playwright adds a fresh
#: temporary --user-data-dir and --headless itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The longest any single browser wait may take.
TIMEOUT_MS = 10_000


def chromium_path() -> str | None:
    path = CHROMIUM if os.path.isabs(CHROMIUM) else shutil.which(CHROMIUM)
    return path if path and os.access(path, os.X_OK) else None


# Package scope, not session: the sync API keeps an asyncio loop running in the main thread
# while it is open, and the anyio tests elsewhere in the suite cannot start their own then.
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    executable = chromium_path()
    if executable is None:
        pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def serve(app: ASGIApp) -> contextlib.AbstractContextManager[str]:
    """Serve `app` with uvicorn on a random loopback port; yield `http://127.0.0.1:<port>`.

    A page may hold a stream open at the end of a test: the server waits 1 s for it.
    """
    return servers.serve(app, lifespan="auto", timeout_graceful_shutdown=1)


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        yield running


HERE = Path(__file__).resolve().parent
