from __future__ import annotations

import importlib.util
import os
from collections.abc import Generator

import pytest

_BACKENDS = ["asyncio"] + (["trio"] if importlib.util.find_spec("trio") else [])


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _private_data_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `tokenhub-stream serve` keeps history under $XDG_DATA_HOME: tests never touch ~.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Under CI nothing may be skipped silently: a missing browser, database or optional
    # dependency must fail the run, not hide behind an "s".
    report = yield
    if report.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        if not hasattr(report, "wasxfail"):
            report.outcome = "failed"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            report.longrepr = f"skipped under CI=true (not allowed): {reason}"
    return report
