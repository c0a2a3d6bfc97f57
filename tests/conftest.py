from __future__ import annotations

import faulthandler
import importlib.util
import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

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


# A test that hangs until pytest-timeout ends it takes its worker process down with it
# (timeout_method = "thread" ends the process), and the stacks that plugin prints go to
# the worker's captured stderr, which dies with it: xdist then reports only "worker
# crashed". So a few seconds before a test's timeout every thread's stack is written to a
# file of this run (one per process, the test's id on top), and the terminal summary
# prints the files that got one.
_HANG_DIR = "TOKENHUB_TEST_HANG_DIR"
_hang_file: IO[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and _HANG_DIR not in os.environ:
        os.environ[_HANG_DIR] = tempfile.mkdtemp(prefix="tokenhub-test-hangs-")


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    value = marker.args[0] if marker is not None and marker.args else None
    if value is None:
        value = item.config.getini("timeout") or 0
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    global _hang_file
    directory = os.environ.get(_HANG_DIR)
    limit = _timeout_of(item)
    if directory is None or limit <= 5:
        return (yield)
    if _hang_file is None:
        _hang_file = open(os.path.join(directory, f"{os.getpid()}.txt"), "w+")
    _hang_file.seek(0)
    _hang_file.truncate()
    _hang_file.write(f"{item.nodeid} was still running after {limit - 3:.0f} s:\n")
    _hang_file.flush()
    faulthandler.dump_traceback_later(limit - 3, file=_hang_file)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _hang_file
    if _hang_file is not None:
        _hang_file.close()
        _hang_file = None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    directory = os.environ.get(_HANG_DIR)
    if directory is None or not os.path.isdir(directory):
        return
    for path in sorted(Path(directory).glob("*.txt")):
        text = path.read_text(errors="replace")
        if "Thread 0x" in text or "Current thread" in text:
            terminalreporter.section("a test that hung (stacks before its timeout)")
            terminalreporter.write(text)


class Telemetry:
    """The OpenTelemetry SDK's in-memory span exporter and metric reader, given to
    `tokenhub_stream.instrument()` (issue #18): `spans()`, `points(name)`."""

    def __init__(self, capture_content: bool) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.capture_content = capture_content

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans, oldest first (only those called `name`, if given)."""
        spans = list(self.exporter.get_finished_spans())
        return [s for s in spans if name is None or s.name == name]

    def span(self, name: str | None = None) -> ReadableSpan:
        """The one finished span (called `name`, if given)."""
        spans = self.spans(name)
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]

    @staticmethod
    def attrs(span: ReadableSpan) -> dict[str, Any]:
        """A span's attributes, as a plain dict."""
        return dict(span.attributes or {})

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of the metric `name` collected now."""
        out: list[tuple[dict[str, Any], Any]] = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        out += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
        return out


@pytest.fixture
def telemetry() -> Generator[Telemetry, None, None]:
    """This library's spans and metrics into memory for one test (content not captured)."""
    import tokenhub_stream

    recorded = Telemetry(capture_content=False)
    tokenhub_stream.instrument(
        tracer_provider=recorded.tracer_provider,
        meter_provider=recorded.meter_provider,
        capture_content=False,
    )
    try:
        yield recorded
    finally:
        tokenhub_stream.instrument()  # back to the default: the (unset) global providers
        recorded.tracer_provider.shutdown()
        recorded.meter_provider.shutdown()
