"""The node's one database file, ``<storage>/shadowspot.db`` (SQLite, WAL).

``node/queue.py`` owns the ``instances`` and ``jobs`` tables and ``node/deliveries.py`` the
``results`` and ``deliveries`` tables; both are ``SqliteStore`` subclasses, each with its own
connection. Readers that must never write (health, metrics, ``shadowspot status``, retention)
open it with ``connect_read_only``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_NAME = "shadowspot.db"


def database_path(storage: Path) -> Path:
    return storage / DB_NAME


class SqliteStore:
    """One read-write connection to the database behind a lock, with the schema applied.

    ``synchronous=FULL`` in WAL mode: a committed transaction survives a crash or power loss.
    Schema scripts must be idempotent (``CREATE TABLE IF NOT EXISTS``).
    """

    def __init__(self, storage: Path, schema: str) -> None:
        storage.mkdir(parents=True, exist_ok=True)
        self.path = database_path(storage)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
