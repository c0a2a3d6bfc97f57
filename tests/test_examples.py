"""Smoke test: each script in examples/ runs on its own, as its docstring says.

With no TOKENHUB_* variable set, an example must start the local upstream in-process and
say so in one line on stderr; with TOKENHUB_BASE_URL set, it must talk to that upstream.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, run_upstream

pytestmark = pytest.mark.timeout(60)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

#: Examples that serve until stopped; they have smoke tests of their own.
SERVERS = {"starlette_app.py", "fastapi_app.py"}

EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*.py") if p.name not in SERVERS)
TIMEOUT = 30.0
LOCAL_NOTICE = "using the local test upstream"


def _run(example: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHUB_")}
    return subprocess.run(
        [sys.executable, str(example)],
        env={**clean, **env},
        cwd=EXAMPLES_DIR.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_examples_found() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"stream.py", "stream_sync.py", "events.py"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_without_key_or_network(example: Path) -> None:
    result = _run(example)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the example printed nothing"
    notices = [line for line in result.stderr.splitlines() if LOCAL_NOTICE in line]
    assert len(notices) == 1, result.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_docstring_gives_the_command(example: Path) -> None:
    source = example.read_text(encoding="utf-8")
    assert source.startswith('"""'), "no module docstring"
    assert f"python examples/{example.name}" in source.split('"""')[1]


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        yield running


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_uses_tokenhub_base_url(example: Path, upstream: RunningUpstream) -> None:
    before = len(upstream.app.requests)
    result = _run(example, TOKENHUB_BASE_URL=upstream.base_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert LOCAL_NOTICE not in result.stderr
    assert len(upstream.app.requests) > before
