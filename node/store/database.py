"""An open database, as the rest of the node holds it: ``Database`` wraps the engine.

Nothing outside ``node.store`` sees SQLAlchemy; it passes a ``Database`` to the store's
classes (``node.store.jobs``, ``node.store.deliveries``) and readers (``node.store.reports``).
``open_database`` opens ``[database] url`` and brings its schema to head or checks it:

- ``Schema.UPGRADE``: upgrade (``shadowspot migrate``; ``serve`` on SQLite, where the node
  owns the file; the queue's own SQLite file when opened without a database);
- ``Schema.CHECK``: refuse with ``SchemaError`` unless at head (``serve`` on PostgreSQL,
  which ``shadowspot migrate`` upgrades once for every node);
- ``Schema.AUTO``: upgrade on SQLite, check on PostgreSQL;
- ``Schema.AS_IS``: neither (``shadowspot migrate`` upgrades itself, to print the revisions).

A reader that must never create the SQLite file asks ``open_existing``: None when there is
no such file yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from node.errors import DatabaseError
from node.store import migrate
from node.store.engine import database_url, describe, open_engine

READ_ONLY = "shadowspot_read_only"
"""Execution option: on SQLite, begin with a plain (deferred) ``BEGIN``, not ``IMMEDIATE``."""


class Schema(Enum):
    """What ``open_database`` does with the schema (module docstring)."""

    UPGRADE = "upgrade"
    CHECK = "check"
    AUTO = "auto"
    AS_IS = "as_is"
    """Neither: the caller upgrades (``shadowspot migrate``, to print what it did)."""


class Database:
    """One engine on the node's database; thread-safe (a pool of connections)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._reader = engine.execution_options(**{READ_ONLY: True})

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    @property
    def shared(self) -> bool:
        """Several nodes may use it at once (PostgreSQL); SQLite is one node's file."""
        return self.backend != "sqlite"

    def describe(self) -> str:
        """The URL for logs and messages, its password hidden."""
        return describe(self._engine.url)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One transaction (SQLite: ``BEGIN IMMEDIATE``), committed at the end, rolled back
        on any exception; SQLAlchemy's errors become ``DatabaseError``."""
        with _translated(self), self._engine.begin() as connection:
            yield connection

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read transaction (SQLite: deferred, beside a writer thanks to WAL)."""
        with _translated(self), self._reader.begin() as connection:
            yield connection

    def upgrade(self) -> migrate.Upgrade:
        return migrate.upgrade(self._engine)

    def check(self) -> str:
        return migrate.check(self._engine)

    def close(self) -> None:
        self._engine.dispose()


def open_database(url: str | None, *, storage: Path, schema: Schema) -> Database:
    """``[database] url`` (None: ``<storage>/shadowspot.db``) opened, its schema handled as
    ``schema`` says; closed again if that fails."""
    database = Database(open_engine(url, storage=storage))
    if schema is Schema.AS_IS:
        return database
    try:
        if schema is Schema.UPGRADE or (schema is Schema.AUTO and not database.shared):
            database.upgrade()
        else:
            database.check()
    except BaseException:
        database.close()
        raise
    return database


def open_existing(url: str | None, *, storage: Path) -> Database | None:
    """The database for a reader, without creating or upgrading anything: None when it is
    the SQLite file and that does not exist yet."""
    resolved = database_url(url, storage=storage)
    if resolved.get_backend_name() == "sqlite" and not Path(str(resolved.database)).is_file():
        return None
    return Database(open_engine(url, storage=storage))


@contextmanager
def _translated(database: Database) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseError(f"the database {database.describe()} failed: {cause}") from exc
