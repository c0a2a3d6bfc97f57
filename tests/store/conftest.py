"""Fixtures for the conversation store: SQLite in tmp_path, and a real PostgreSQL server.

The PostgreSQL server is Debian's (`apt-get install postgresql`), started once per test
session in a temporary directory on a free loopback port, as an unprivileged user when
the tests run as root (`initdb` refuses root), and stopped at the end. Each test gets a
database of its own. Without the binaries (or asyncpg) those tests skip, which
tests/conftest.py turns into failures under CI=true.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import servers
from tokenhub_stream.store import ConversationStore

BACKENDS = ["sqlite", "postgresql"]
_STARTUP_TIMEOUT = 10.0
_COMMAND_TIMEOUT = 30.0


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's async engine (and aiosqlite, asyncpg) run on asyncio only.
    return "asyncio"


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The directory of Debian's PostgreSQL server binaries (newest version), if installed."""
    candidates: list[Path] = []
    override = os.environ.get("TOKENHUB_PG_BIN")
    if override:
        candidates.append(Path(override))
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    return None


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)


@dataclass
class PostgresServer:
    bin_dir: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "postgres"

    def __post_init__(self) -> None:
        self._names = itertools.count()

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        subprocess.run(
            [str(self.bin_dir / "createdb"), *self._conn_args(), name],
            check=True,
            capture_output=True,
            timeout=_COMMAND_TIMEOUT,
        )
        return self.url(name)

    def _conn_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("no unprivileged user (postgres or nobody) to run PostgreSQL as")


@contextlib.contextmanager
def run_postgres(bin_dir: Path) -> Iterator[PostgresServer]:
    """initdb in a temp dir, start `postgres` on a free loopback port, stop it at exit."""
    tmp = Path(tempfile.mkdtemp(prefix="tokenhub-pg-"))
    as_user: dict[str, object] = {}
    if os.geteuid() == 0:
        entry = _unprivileged_user()
        os.chown(tmp, entry.pw_uid, entry.pw_gid)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    data = tmp / "data"
    log_path = tmp / "postgres.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
            + ["-E", "UTF8", "--no-locale", "--no-sync"],
            check=True,
            capture_output=True,
            cwd=tmp,
            timeout=_COMMAND_TIMEOUT,
            **as_user,  # type: ignore[call-overload]
        )
        server = PostgresServer(bin_dir=bin_dir, port=0)
        for _ in range(3):  # the free port may be taken between the probe and the bind
            server.port = _free_port()
            with log_path.open("ab") as log:
                process = subprocess.Popen(  # type: ignore[call-overload]
                    [str(bin_dir / "postgres"), "-D", str(data), "-p", str(server.port)]
                    + ["-k", str(tmp), "-h", server.host, "-F"]
                    + ["-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=tmp,
                    start_new_session=True,
                    **as_user,
                )
            assert process is not None
            if _wait_ready(server, process):
                break
            _stop(process)
            process = None
        else:
            raise RuntimeError(f"PostgreSQL did not start:\n{log_path.read_text()[-2000:]}")
        yield server
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_ready(server: PostgresServer, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    isready = [str(server.bin_dir / "pg_isready"), *server._conn_args(), "-t", "1"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        probe = subprocess.run(isready, capture_output=True, timeout=5)
        if probe.returncode == 0:
            return True
        time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # "fast" shutdown
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql")
    if importlib.util.find_spec("asyncpg") is None:
        pytest.skip("asyncpg is not installed: pip install 'tokenhub_stream[postgres]'")
    with run_postgres(bin_dir) as server:
        yield server


# --- the store under test ---------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A URL to an empty database of `backend`."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'conversations.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[ConversationStore]:
    async with ConversationStore(store_url) as conversation_store:
        yield conversation_store


# --- a real server for the proxy --------------------------------------------------------------


# `serve(app)`: uvicorn (h11) on a random loopback port, lifespan on; yields its base URL.
serve = servers.serve
