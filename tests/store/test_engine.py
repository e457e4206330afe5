"""``[database] url`` → engine: the default SQLite file, its pragmas, PostgreSQL's driver."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from node.errors import DatabaseError
from node.store.engine import BUSY_TIMEOUT_MS, database_url, describe, open_engine


def test_default_is_the_sqlite_file_under_storage(tmp_path: Path) -> None:
    """No URL means today's file, ``<storage>/shadowspot.db``; its folder is made if missing."""
    storage = tmp_path / "not" / "yet"
    engine = open_engine(None, storage=storage)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
    finally:
        engine.dispose()
    assert engine.url.drivername == "sqlite"
    assert (storage / "shadowspot.db").is_file()


def test_sqlite_connections_get_the_pragmas_of_node_db(tmp_path: Path) -> None:
    """Every SQLite connection is WAL, synchronous=FULL, with foreign keys and a busy timeout."""
    engine = open_engine(None, storage=tmp_path)
    try:
        with engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        engine.dispose()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "busy_timeout": BUSY_TIMEOUT_MS,
    }


def test_a_sqlite_transaction_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    """``BEGIN IMMEDIATE``: while a transaction is open, even before it writes, no other
    connection can start writing (one writer; no lock upgrade that fails mid-transaction)."""
    engine = open_engine(None, storage=tmp_path)
    other = sqlite3.connect(tmp_path / "shadowspot.db", timeout=0, isolation_level=None)
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT 1"))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://shadowspot@db.example:5433/shadowspot",
        "postgresql+psycopg://shadowspot@db.example:5433/shadowspot",
    ],
)
def test_postgresql_urls_use_psycopg_3(url: str, tmp_path: Path) -> None:
    """``postgresql://`` is PostgreSQL through psycopg 3, whatever driver SQLAlchemy assumes."""
    resolved = database_url(url, storage=tmp_path)
    assert resolved.drivername == "postgresql+psycopg"
    assert (resolved.host, resolved.port, resolved.database) == ("db.example", 5433, "shadowspot")


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root@localhost/shadowspot",
        "postgresql+psycopg2://shadowspot@localhost/shadowspot",
        "postgres://shadowspot@localhost/shadowspot",
        "not a url",
        "sqlite://",
        "sqlite:///:memory:",
    ],
)
def test_other_urls_are_refused_naming_the_url(url: str, tmp_path: Path) -> None:
    """A URL of another backend or driver, or of no file, is a ``DatabaseError`` naming it."""
    with pytest.raises(DatabaseError, match=r"\[database\] url"):
        open_engine(url, storage=tmp_path)


def test_described_urls_hide_the_password(tmp_path: Path) -> None:
    """What logs and messages show of a URL never includes its password."""
    resolved = database_url("postgresql://node:s3cret@db.example/shadowspot", storage=tmp_path)
    assert "s3cret" not in describe(resolved)
    assert "node" in describe(resolved)
