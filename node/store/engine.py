"""``[database] url`` → a SQLAlchemy ``Engine``, with the connection settings each backend needs.

- none: ``sqlite:///<storage>/shadowspot.db``, the file today's node writes;
- ``sqlite:///<path>``: another SQLite file;
- ``postgresql://user@host:port/db``: PostgreSQL through psycopg 3 (``postgresql+psycopg``).

SQLite gets the pragmas of ``node/db.py`` on every connection (WAL, ``synchronous=FULL``:
a committed transaction survives a power loss; foreign keys; a 30 s busy timeout), and every
transaction starts with ``BEGIN IMMEDIATE``: the one writer takes the write lock at the
start, so no transaction has to upgrade a read lock later (which fails at once instead of
waiting). PostgreSQL keeps its default, READ COMMITTED, which ``FOR UPDATE SKIP LOCKED`` needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from node.errors import DatabaseError

DB_NAME = "shadowspot.db"
BUSY_TIMEOUT_MS = 30_000

_SQLITE_PRAGMAS = (
    # First, so that the journal-mode switch too waits for another process's lock instead
    # of failing with "database is locked" (two nodes starting on one new file).
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)
_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}


def database_url(url: str | None, *, storage: Path) -> URL:
    """The URL to connect to: ``url`` with its driver made explicit, or the default SQLite file.

    Raises ``DatabaseError`` for a URL that does not parse or names another backend."""
    if url is None:
        return URL.create("sqlite", database=str(storage / DB_NAME))
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseError(f"[database] url {url!r} is not a database URL") from exc
    backend = parsed.get_backend_name()
    if backend not in _DRIVERS or parsed.drivername not in (backend, _DRIVERS[backend]):
        raise DatabaseError(
            f"[database] url {parsed.render_as_string()!r}: ShadowSpot speaks SQLite "
            "(sqlite:///path) or PostgreSQL (postgresql://user@host:port/db)"
        )
    return parsed.set(drivername=_DRIVERS[backend])


def describe(url: URL) -> str:
    """The URL for logs and messages, its password hidden."""
    return url.render_as_string(hide_password=True)


def open_engine(url: str | None, *, storage: Path) -> Engine:
    """An engine for ``[database] url`` (None: the SQLite file in ``storage``, created with
    its folder when missing). One per process; ``dispose()`` it at shutdown."""
    resolved = database_url(url, storage=storage)
    if resolved.get_backend_name() == "sqlite":
        return _sqlite_engine(resolved)
    return create_engine(resolved, pool_pre_ping=True)


def _sqlite_engine(url: URL) -> Engine:
    if url.database in (None, "", ":memory:"):
        raise DatabaseError("[database] url: SQLite needs a file (sqlite:///path), not memory")
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    """Apply the pragmas; leave BEGIN to us (the sqlite3 module's own is not PEP 249's)."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _on_sqlite_begin(connection: Connection) -> None:
    """``BEGIN IMMEDIATE``; a plain ``BEGIN`` for a connection marked read-only (execution
    option ``shadowspot_read_only``): a reader never waits for the write lock."""
    read_only = connection.get_execution_options().get("shadowspot_read_only", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
