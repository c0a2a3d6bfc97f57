"""Every ```python block in docs/*.md and README.md runs, against the local upstream.

Blocks run in page order, and the blocks of one page share one namespace, as in a
doctest session: a later block may use names an earlier block of the same page defined.
`TOKENHUB_BASE_URL` points at a `run_upstream()` started once for this module and
`TOKENHUB_KEY` is unset, so the examples need no key and no network.

A block that cannot run here has `<!-- no-run: <reason> -->` on the line before its
fence, with one of the reasons in `SKIP_REASONS`; keep those rare. Shell, config and
output blocks use other fences (```sh, ```nginx, ```text) and are not collected.

Also checked: the API table (docs/api.md) lists every public name.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import tokenhub_stream
from tokenhub_stream import testing
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, run_upstream

# Also the project default; a hung block fails alone instead of stalling the run.
pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

#: The only accepted reasons for `<!-- no-run: <reason> -->`.
SKIP_REASONS: dict[str, str] = {
    "needs-real-upstream": "needs a real provider or key the local upstream cannot stand in for",
    "server": "starts a server that runs until stopped",
    "signature": "a call signature shown for reference, not a statement",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(?P<reason>[\w-]+)\s*-->\s*$")
_PYTHON = {"python", "py", "python3"}


@dataclass(frozen=True)
class Block:
    page: Path
    index: int  # position among the page's python blocks
    line: int  # 1-based line of the first code line
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract_blocks(page: Path) -> list[Block]:
    """The ```python blocks of a markdown page, with the no-run reason of each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        language = (match["info"].strip().split() or [""])[0].lstrip("{.").rstrip("}")
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if language.lower() in _PYTHON:
            previous = next((s for s in reversed(lines[:i]) if s.strip()), "")
            marker = _NO_RUN.match(previous)
            body = [s[len(indent) :] if s.startswith(indent) else s for s in lines[start:end]]
            blocks.append(
                Block(
                    page=page,
                    index=len(blocks),
                    line=start + 1,
                    code="\n".join(body) + "\n",
                    skip=marker["reason"] if marker else None,
                )
            )
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in extract_blocks(page)]


@dataclass
class _PageSession:
    namespace: dict[str, object] = field(default_factory=dict)
    ran: int = 0  # blocks of the page executed so far
    failed: str | None = None  # the id of an earlier block that raised


_sessions: dict[Path, _PageSession] = {}


def _execute(block: Block, namespace: dict[str, object]) -> None:
    # Pad with blank lines so tracebacks carry the markdown file's own line numbers.
    source = "\n" * (block.line - 1) + block.code
    namespace.setdefault("__name__", "__main__")
    exec(compile(source, str(block.page), "exec"), namespace)


def _run(block: Block) -> None:
    session = _sessions.get(block.page)
    if session is None or session.ran > block.index:
        session = _sessions[block.page] = _PageSession()
    page_blocks = [b for b in BLOCKS if b.page == block.page]
    # Replay earlier blocks not run yet (e.g. under `pytest -k`); their own tests report them.
    for earlier in page_blocks[session.ran : block.index]:
        if earlier.skip is None:
            try:
                _execute(earlier, session.namespace)
            except Exception:
                session.failed = session.failed or earlier.id
    session.ran = block.index + 1
    try:
        _execute(block, session.namespace)
    except Exception as exc:
        error = exc
    else:
        return
    note = f" (an earlier block failed: {session.failed})" if session.failed else ""
    session.failed = session.failed or block.id
    shown = "".join(traceback.format_exception(error)[-12:])
    pytest.fail(f"{block.id} raised{note}:\n{block.code}\n{shown}", pytrace=False)


@pytest.fixture(scope="module")
def local_upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        yield running


@pytest.fixture(autouse=True)
def _docs_env(local_upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENHUB_BASE_URL", local_upstream.base_url)
    monkeypatch.delenv("TOKENHUB_KEY", raising=False)


# `no-run` blocks are not collected at all (a skip would fail the run under CI=true);
# test_docs_no_run_reasons_are_known checks their markers instead.
RUNNABLE = [b for b in BLOCKS if b.skip is None]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_docs_block_runs(block: Block) -> None:
    _run(block)


def test_docs_no_run_reasons_are_known() -> None:
    for block in BLOCKS:
        if block.skip is not None:
            assert block.skip in SKIP_REASONS, f"{block.id}: unknown no-run reason {block.skip!r}"


def test_docs_blocks_found() -> None:
    pages = {block.page.name for block in BLOCKS}
    assert {"quickstart.md", "streaming.md", "errors.md", "configuration.md"} <= pages


def _public_names() -> list[str]:
    from tokenhub_stream import asgi

    names = [n for n in tokenhub_stream.__all__ if n != "__version__"]
    names += [f"testing.{n}" for n in testing.__all__]
    names += [f"asgi.{n}" for n in asgi.__all__]
    from tokenhub_stream import store

    names += [f"store.{n}" for n in store.__all__]
    return names + ["__version__"]


@pytest.mark.parametrize("name", _public_names())
def test_docs_api_table_lists_name(name: str) -> None:
    table = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    # One table row per name: | `name` | description | [where](page.md#anchor) |
    row = re.compile(rf"^\| `{re.escape(name)}` \| [^|]*\S[^|]* \| \[[^\]]+\]\([^)]+\) \|$", re.M)
    assert row.search(table), f"docs/api.md has no table row for `{name}`"


def test_docs_skip_markers_are_rare() -> None:
    skipped = [block.id for block in BLOCKS if block.skip is not None]
    assert len(skipped) <= max(3, len(BLOCKS) // 10), skipped
