from __future__ import annotations

import inspect

import pytest

import tokenhub_stream as ts
from tokenhub_stream import testing


def test_exports_all_is_sorted_and_complete() -> None:
    assert ts.__all__ == sorted(ts.__all__)
    public = {
        name
        for name, value in vars(ts).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", "tokenhub_stream").startswith("tokenhub_stream")
    }
    assert public - {"annotations"} <= set(ts.__all__)
    for name in ts.__all__:
        assert hasattr(ts, name), name


def test_exports_public_names_report_the_public_module() -> None:
    for name in ts.__all__:
        value = getattr(ts, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == "tokenhub_stream", name


def test_exports_testing_module_names() -> None:
    for name in (
        "FakeChatUpstream",
        "Script",
        "ReceivedRequest",
        "RunningUpstream",
        "run_upstream",
    ):
        assert hasattr(testing, name), name


def test_exports_py_typed_ships() -> None:
    from importlib.resources import files

    assert files("tokenhub_stream").joinpath("py.typed").is_file()


def test_exports_testing_names_report_the_public_module() -> None:
    for name in testing.__all__:
        value = getattr(testing, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == "tokenhub_stream.testing", name


def test_exports_testing_tool_call_is_a_deprecated_alias() -> None:
    # Renamed so that `ToolCall` means one thing: tokenhub_stream.ToolCall, the assembled call.
    assert "ToolCall" not in testing.__all__
    with pytest.warns(DeprecationWarning, match="ScriptedToolCall"):
        from tokenhub_stream.testing import ToolCall
    assert ToolCall is testing.ScriptedToolCall
    with pytest.raises(AttributeError):
        testing.NoSuchName  # noqa: B018


def test_exports_cli_upstream_is_a_deprecated_alias() -> None:
    # Renamed so that `Upstream` means one thing: the proxy's upstream protocol.
    from tokenhub_stream import cli

    assert "Upstream" not in cli.__all__ and "ResolvedUpstream" in cli.__all__
    with pytest.warns(DeprecationWarning, match="ResolvedUpstream"):
        from tokenhub_stream.cli import Upstream
    assert Upstream is cli.ResolvedUpstream
