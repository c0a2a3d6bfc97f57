"""Fixtures for the Redis tests: a private redis-server, and proxies in separate processes.

This directory is `tests/redis_tests/`, not `tests/redis/`: pytest (rootdir-relative
package names) and mypy would import a `tests/redis/__init__.py` as the top-level package
`redis`, shadowing redis-py.

- `redis_server` (session): Debian's `redis-server`, started once in a temp dir on a free
  loopback port with no persistence (`--save "" --appendonly no`), stopped at the end.
  Without the binary or redis-py the tests skip, which tests/conftest.py turns into
  failures under CI=true.
- `redis_url` (session): `redis://127.0.0.1:<port>/0` of that server.
- `_clean_redis` (autouse): FLUSHALL before every test in this directory, so each test
  starts from an empty keyspace.
- `run_redis()`: a context manager starting another private server, for tests that stop
  or kill it (Redis down) without disturbing the shared one.
- `proxy_process(factory, env)`: runs `python -m uvicorn --factory <module:function>` in a
  separate OS process on a free loopback port; yields its base URL. The factories live in
  `redis_tests/apps.py` (configured from environment variables), importable in the child
  because `tests/` is put on its PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import servers

TESTS_DIR = Path(__file__).resolve().parent.parent
_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


def redis_server_binary() -> str | None:
    """Debian's redis-server (or `TOKENHUB_REDIS_SERVER`), if installed."""
    override = os.environ.get("TOKENHUB_REDIS_SERVER")
    if override:
        return override if Path(override).is_file() else None
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A private redis-server process on loopback."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers PING (a raw RESP round trip, no client library)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.process)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@contextlib.contextmanager
def run_redis(binary: str | None = None, *, port: int | None = None) -> Iterator[RedisServer]:
    """Start a private redis-server on a free loopback port (or `port`); stop it at exit."""
    binary = binary or redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed: apt-get install redis-server")
    tmp = Path(tempfile.mkdtemp(prefix="tokenhub-redis-"))
    server: RedisServer | None = None
    try:
        for _ in range(1 if port else 3):  # a free port may be taken before the bind
            listen = port or free_port()
            log_path = tmp / f"redis-{listen}.log"
            process = subprocess.Popen(
                [binary, "--port", str(listen), "--bind", "127.0.0.1", "--save", ""]
                + ["--appendonly", "no", "--dir", str(tmp), "--logfile", str(log_path)]
                + ["--daemonize", "no", "--databases", "16"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=tmp,
                start_new_session=True,
            )
            candidate = RedisServer(port=listen, process=process, log_path=log_path)
            if _wait_ping(candidate):
                server = candidate
                break
            candidate.stop()
        if server is None:
            raise RuntimeError(f"redis-server did not start:\n{candidate.log()}")
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_ping(server: RedisServer) -> bool:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        if server.ping(timeout=0.5):
            return True
        time.sleep(0.02)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT)


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client runs on asyncio only (uvicorn's and gunicorn's loop).
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server")
    if importlib.util.find_spec("redis") is None:
        pytest.skip("redis-py is not installed: pip install 'tokenhub_stream[redis]'")
    with run_redis(binary) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """`redis://127.0.0.1:<port>/0` of the session's private server."""
    return redis_server.url


@pytest.fixture(autouse=True)
def _clean_redis(redis_server: RedisServer) -> None:
    # Every test in this directory starts from an empty keyspace (all databases).
    import redis

    with redis.Redis(host=redis_server.host, port=redis_server.port) as client:
        client.flushall()


# --- a proxy in this process -----------------------------------------------------------------


# `serve(app)`: uvicorn (h11) on a random loopback port, lifespan on; yields its base URL.
serve = servers.serve


# --- proxies in their own processes -----------------------------------------------------------


class ProxyProcessError(RuntimeError):
    """The proxy process did not start (the message carries the end of its output)."""


@contextlib.contextmanager
def proxy_process(
    factory: str, env: dict[str, str], *, startup_timeout: float = 20.0
) -> Iterator[str]:
    """Run `uvicorn --factory <factory>` in a separate process on a free loopback port.

    ```python
    with proxy_process("redis_tests.apps:limited_proxy", {"UPSTREAM_URL": url}) as base_url:
        httpx.post(base_url + "/api/chat", json=body)
    ```

    `env` is added to this process's environment; `tests/` is put first on PYTHONPATH so
    `redis_tests.apps` imports in the child. Waits (bounded) until the port accepts
    connections; at exit sends SIGTERM, then SIGKILL after a bounded wait.

    Raises:
        ProxyProcessError: the process exited or did not listen within `startup_timeout`.
    """
    child_env = {**os.environ, **env}
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="tokenhub-proxy-") as tmp:
        log_path = Path(tmp) / "uvicorn.log"
        process: subprocess.Popen[bytes] | None = None
        for _ in range(3):  # the free port may be taken between the probe and the bind
            port = free_port()
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--factory", factory]
                    + ["--host", "127.0.0.1", "--port", str(port)]
                    + ["--log-level", "warning", "--no-access-log", "--lifespan", "on"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    cwd=tmp,
                    start_new_session=True,
                )
            if _wait_listening(process, port, startup_timeout):
                break
            _stop(process)
            process = None
        if process is None:
            output = log_path.read_text(errors="replace")[-3000:]
            raise ProxyProcessError(f"{factory} did not start:\n{output}")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            _stop(process)


def _wait_listening(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        time.sleep(0.05)
    return False
