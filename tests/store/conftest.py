"""Fixtures of the store's tests: a real PostgreSQL server for the session, a fresh database
per test on it, and the engines of both backends.

The server is Debian's ``postgresql`` package (``make system-deps`` installs it): ``initdb``
into a temporary folder, ``pg_ctl start`` on 127.0.0.1 with a port that was free a moment
ago and its unix socket in that folder, trust authentication, stopped at the end. Debian
keeps ``initdb`` and ``pg_ctl`` in ``/usr/lib/postgresql/<version>/bin``, off PATH.
``initdb`` refuses to run as root: as root, the server runs as the ``postgres`` system user
the package creates. Without the binaries the PostgreSQL tests are skipped, saying why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine

from node.store.engine import open_engine
from tests.ports import free_port

SERVER_USER = "postgres"
"""The system user the server runs as when the tests run as root."""
DB_USER = "shadowspot"
"""The server's superuser (``initdb -U``), the role the tests connect as."""
_START_ATTEMPTS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresServer:
    """A running PostgreSQL on 127.0.0.1."""

    port: int
    root: Path

    def url(self, database: str) -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"


def postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def _as_server_user() -> list[str]:
    """The prefix that runs a command as the server's user: none unless we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.skip(f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL as")
    if shutil.which("runuser") is None:
        pytest.skip("running as root and runuser (util-linux) is absent")
    return ["runuser", "-u", SERVER_USER, "--"]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def _start(bindir: Path, prefix: list[str], root: Path) -> int:
    """``pg_ctl start`` on a free port (again on another one if it was taken meanwhile)."""
    data, log = root / "data", root / "server.log"
    for _ in range(_START_ATTEMPTS):
        port = free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root}"
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60"]
        started = _run([*prefix, *pg_ctl, "-o", options, "start"], root)
        if started.returncode == 0:
            return port
    server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    pytest.fail(f"pg_ctl start failed {_START_ATTEMPTS} times:\n{started.stderr}\n{server_log}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, in a temporary folder removed at the end."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH nor in "
            "/usr/lib/postgresql/*/bin: install Debian's postgresql (make system-deps)"
        )
    prefix = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="shadowspot-pg-"))
    try:
        if prefix:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        initdb = [str(bindir / "initdb"), "-D", str(root / "data"), "-U", DB_USER]
        made = _run([*prefix, *initdb, "-A", "trust", "-E", "UTF8", "--no-locale", "-N"], root)
        if made.returncode != 0:
            pytest.fail(f"initdb failed:\n{made.stdout}\n{made.stderr}")
        port = _start(bindir, prefix, root)
        try:
            yield PostgresServer(port=port, root=root)
        finally:
            _run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"],
                root,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database on the session's server, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = postgres_server.url("postgres")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.url(name)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.network)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """``[database] url`` of an empty database on each backend (None: SQLite's default file)."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(backend_url: str | None, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database of each backend, disposed after the test."""
    made = open_engine(backend_url, storage=tmp_path / "storage")
    yield made
    made.dispose()
