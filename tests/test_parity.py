"""The sync and async shells stay in step: same methods, same signatures."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import tokenhub_stream as ts
from tokenhub_stream.tools._loop import arun_tools
from tokenhub_stream.tools._loop_sync import run_tools_sync

ROOT = Path(__file__).resolve().parent.parent


def _methods(cls: type) -> dict[str, inspect.Signature]:
    out = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__init__",):
            continue
        if callable(member):
            out[name.replace("aclose", "close")] = inspect.signature(member)
    return out


def _normalise(sig: inspect.Signature) -> str:
    text = str(sig)
    for a, s in (
        ("AsyncChatStream", "ChatStream"),
        ("AsyncClient", "Client"),
        ("AsyncIterator", "Iterator"),
        ("AsyncToolLoop", "ToolLoop"),
        ("AsyncStreamingClient", "StreamingClient"),
        ("AsyncTurnStream", "TurnStream"),
    ):
        text = text.replace(a, s)
    return text


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [
        (ts.Client, ts.AsyncClient),
        (ts.ChatStream, ts.AsyncChatStream),
        (ts.ToolLoop, ts.AsyncToolLoop),
    ],
)
def test_parity_methods_and_signatures(sync_cls: type, async_cls: type) -> None:
    sync, asyn = _methods(sync_cls), _methods(async_cls)
    assert sync.keys() == asyn.keys()
    for name in sync:
        assert _normalise(sync[name]) == _normalise(asyn[name]), name


@pytest.mark.parametrize(
    ("sync_fn", "async_fn"),
    [
        (ts.stream_chat_sync, ts.stream_chat),
        (run_tools_sync, arun_tools),
        (ts.Client.run_tools, ts.AsyncClient.run_tools),
    ],
)
def test_parity_module_functions(
    sync_fn: Callable[..., object], async_fn: Callable[..., object]
) -> None:
    a = inspect.signature(async_fn)
    s = inspect.signature(sync_fn)
    assert list(a.parameters) == list(s.parameters)
    assert [p.default for p in a.parameters.values()] == [p.default for p in s.parameters.values()]
    assert _normalise(s) == _normalise(a)


def test_parity_sync_shell_is_generated_and_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
