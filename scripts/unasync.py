"""Generate the sync shells from the async ones: src/tokenhub_stream/_sync_client.py
from _async_client.py, and tools/_loop_sync.py from tools/_loop.py.

python scripts/unasync.py          # write the sync files
python scripts/unasync.py --check  # exit 1 if one is out of date (CI)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "tokenhub_stream"
PAIRS = [
    (SRC / "_async_client.py", SRC / "_sync_client.py"),
    (SRC / "tools" / "_loop.py", SRC / "tools" / "_loop_sync.py"),
]
#: The line each async shell carries, and what its generated twin says instead.
HEADER = "The async I/O shell; edit this file, then run scripts/unasync.py."

# Whole-word replacements, applied in order.
SUBS = [
    ("AsyncChatStream", "ChatStream"),
    ("_AsyncStreamCore", "_StreamCore"),
    ("AsyncToolLoop", "ToolLoop"),
    ("AsyncGenerator[ToolLoopEvent, None]", "Generator[ToolLoopEvent, None, None]"),
    ("AsyncGenerator", "Generator"),
    ("arun_tools", "run_tools_sync"),
    ("AsyncStreamingClient", "StreamingClient"),
    ("AsyncTurnStream", "TurnStream"),
    ("arun_calls", "run_calls"),
    ("from .tools._loop import", "from .tools._loop_sync import"),
    ("sync=False", "sync=True"),
    ("async for event in client.run_tools", "for event in client.run_tools"),
    ("AsyncClient", "Client"),
    ("AsyncAnswer", "SyncAnswer"),
    ("._engine._http", "._engine._sync"),
    ("HttpEngine", "SyncEngine"),
    ("HttpResponse", "SyncResponse"),
    ("engine_runs_async", "engine_runs_sync"),
    ("aiter_batches", "iter_batches"),
    ("AsyncHTTPTransport", "HTTPTransport"),
    ("handle_async_request", "handle_request"),
    ("AsyncShield", "SyncShield"),
    ("async_sleep", "sync_sleep"),
    ("AsyncIterator", "Iterator"),
    ("AsyncIterable", "Iterable"),
    ("aiter(", "iter("),
    ("__aenter__", "__enter__"),
    ("__aexit__", "__exit__"),
    ("__aiter__", "__iter__"),
    ("__anext__", "__next__"),
    ("anext()", "next()"),
    ("StopAsyncIteration", "StopIteration"),
    ("aiter_raw", "iter_raw"),
    ("aiter_bytes", "iter_bytes"),
    ("aread", "read"),
    ("aclose", "close"),
    ("async def", "def"),
    ("async with", "with"),
    ("async for", "for"),
    ("await ", ""),
    ("The async tool loop", "The sync tool loop"),
    (
        "in a task group (sync tools in worker threads)",
        "a thread each (a single call in the calling thread)",
    ),
    ("an async iterator", "an iterator"),
    ("an async\n    context manager", "a\n    context manager"),
    ("async context manager", "context manager"),
    ("An async client", "A sync client"),
    ("cancelling the task", "Ctrl-C"),
]


def unasync(text: str, src: Path) -> str:
    text = text.replace(HEADER, f"GENERATED from {src.name} by scripts/unasync.py: do not edit.")
    for old, new in SUBS:
        if old[0].isalnum() or old[0] == "_":
            text = re.sub(rf"\b{re.escape(old)}", new, text)
        else:
            text = text.replace(old, new)
    return text


def tidy(text: str, path: Path) -> str:
    """Sort imports and format with the project's ruff settings."""
    ruff = [sys.executable, "-m", "ruff"]
    for args in (
        ["check", "--fix", "--unsafe-fixes", "--select", "I,UP028", "--exit-zero", "-q"],
        ["format", "-q"],
    ):
        text = subprocess.run(
            [*ruff, *args, "--stdin-filename", str(path), "-"],
            input=text,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return text


def main() -> int:
    check = "--check" in sys.argv
    stale = []
    for src, dst in PAIRS:
        out = tidy(unasync(src.read_text(), src), dst)
        if check:
            if not dst.exists() or dst.read_text() != out:
                stale.append(dst)
        else:
            dst.write_text(out)
    for path in stale:
        print(f"{path} is out of date: run python scripts/unasync.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
