"""The schema's version: upgrade a database to this code's head, or check that it is there.

``upgrade`` (for ``shadowspot migrate``, and for ``serve`` at start on SQLite) runs in one
transaction, under a lock (SQLite: the write lock of ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory lock), so two nodes starting together upgrade once and a failure changes nothing.
Four cases, by what ``alembic_version`` holds:

- nothing, and none of our tables: an empty database; every revision runs;
- nothing, but some of our tables: written by the code before migrations. It is the
  baseline (0001, whose ``IF NOT EXISTS`` keeps the tables and their rows); after the
  upgrade its tables must match ``node.store.schema`` exactly, else ``SchemaError`` and
  nothing is kept;
- a revision this code knows: the revisions after it run (none at head);
- a revision this code does not know: written by a newer ShadowSpot; ``SchemaError``,
  untouched. We never downgrade on our own.

``check`` (every process that opens the database without upgrading it) raises
``SchemaError`` unless the database is at head.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from node.errors import DatabaseError, SchemaError
from node.store.schema import metadata

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_LOCK_KEY = 0x5EAD_5907  # pg_advisory_xact_lock key: "ShadowSpot migrations"


@dataclass(frozen=True, slots=True, kw_only=True)
class Upgrade:
    """What ``upgrade`` did."""

    before: str | None
    """The revision found (None: no ``alembic_version``: empty, or from before migrations)."""
    after: str
    adopted: bool
    """The database was written before migrations (it had our tables, no version)."""
    seconds: float

    @property
    def changed(self) -> bool:
        return self.before != self.after


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration, without an ini file, for migrations on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision this code knows."""
    revision = _scripts().get_current_head()
    if revision is None:  # only an empty versions folder has none
        raise SchemaError(f"no migrations in {MIGRATIONS}")
    return revision


def current(connection: Connection) -> str | None:
    """The database's revision (None: it has no ``alembic_version``)."""
    return MigrationContext.configure(connection).get_current_revision()


def differences(connection: Connection) -> list[Any]:
    """How our tables in the database differ from ``node.store.schema`` (Alembic's
    autogenerate comparison: types, nullability, defaults, indexes, constraints); other
    tables are not looked at, nor, on SQLite, whether a primary key column says NOT NULL
    (``_without_pk_nullability``). Empty when they match."""
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_name": _ours,
        },
    )
    found = compare_metadata(context, metadata)
    if connection.dialect.name == "sqlite":
        found = [kept for diff in found if (kept := _without_pk_nullability(diff))]
    return list(found)


def upgrade(engine: Engine) -> Upgrade:
    """Bring the database to ``head()`` (module docstring); ``SchemaError`` if it is newer
    than this code or an adopted one does not match, ``DatabaseError`` if a revision fails.
    Either way nothing was changed."""
    started = time.perf_counter()
    with _translated(engine), engine.begin() as connection:
        _lock(connection)
        before = current(connection)
        _refuse_unknown(connection, before)
        adopted = before is None and bool(_our_tables(connection))
        try:
            command.upgrade(alembic_config(connection), "head")
        except SQLAlchemyError as exc:
            raise _failed(connection, before, adopted, exc) from exc
        if adopted:
            _require_match(connection)
    return Upgrade(
        before=before, after=head(), adopted=adopted, seconds=time.perf_counter() - started
    )


def check(engine: Engine) -> str:
    """The database's revision, which is ``head()``; else ``SchemaError`` saying what to do."""
    with _translated(engine), engine.connect() as connection:
        revision = current(connection)
        legacy = revision is None and bool(_our_tables(connection))
    _refuse_unknown(engine, revision)
    if revision == head():
        return revision
    where = _name(engine)
    if legacy:
        found = "was written before schema versions"
    elif revision is None:
        found = "has no ShadowSpot schema"
    else:
        found = f"is at schema revision {revision}"
    raise SchemaError(
        f"the database {where} {found}; this ShadowSpot needs revision {head()}: "
        "run `shadowspot migrate`"
    )


@cache
def _scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config)


def _known(revision: str) -> bool:
    return any(script.revision == revision for script in _scripts().walk_revisions())


def _refuse_unknown(bound: Connection | Engine, revision: str | None) -> None:
    if revision is None or _known(revision):
        return
    raise SchemaError(
        f"the database {_name(bound)} is at schema revision {revision!r}, which this "
        f"ShadowSpot does not know (its newest is {head()}): a newer ShadowSpot wrote it. "
        "Run that version, or restore a backup made for this one; it is never downgraded"
    )


def _require_match(connection: Connection) -> None:
    found = differences(connection)
    if found:
        listed = "; ".join(str(d) for d in found[:5])
        raise _misshapen(connection, f"{len(found)} difference(s): {listed}")


@contextmanager
def _translated(engine: Engine) -> Iterator[None]:
    """SQLAlchemy's errors (cannot connect, refused, locked too long) as ``DatabaseError``."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise DatabaseError(f"the database {_name(engine)} cannot be used: {_cause(exc)}") from exc


def _cause(exc: SQLAlchemyError) -> str:
    """The driver's own message, first line (SQLAlchemy adds the statement and a link)."""
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


def _failed(
    connection: Connection, before: str | None, adopted: bool, exc: SQLAlchemyError
) -> DatabaseError:
    """The error a failed revision becomes (its transaction is rolled back)."""
    cause = _cause(exc)
    if adopted:
        return _misshapen(connection, cause)
    return DatabaseError(
        f"upgrading the database {_name(connection)} from revision {before} failed, "
        f"nothing was changed: {cause}"
    )


def _misshapen(connection: Connection, why: str) -> SchemaError:
    return SchemaError(
        f"the database {_name(connection)} has ShadowSpot's tables but not their shape "
        f"before schema versions ({why}); left unchanged"
    )


def _without_pk_nullability(diff: Any) -> Any:
    """A diff less "primary key column may be NULL": SQLite's ``TEXT PRIMARY KEY`` (and
    ``INTEGER PRIMARY KEY``, the rowid) does not imply NOT NULL, so the tables today's code
    created say nullable where ours say NOT NULL. Both are the primary key; ours never
    writes NULL there (and the rowid cannot be NULL)."""
    if not isinstance(diff, list):  # a table, index or constraint: kept as it is
        return diff
    return [
        change
        for change in diff
        if not (
            change[0] == "modify_nullable"
            and change[3] in metadata.tables[change[2]].primary_key.columns
        )
    ]


def _lock(connection: Connection) -> None:
    """Serialise upgrades: SQLite's ``BEGIN IMMEDIATE`` already holds the write lock."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})


def _our_tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) & set(metadata.tables)


def _ours(name: str | None, type_: str, _parent_names: object) -> bool:
    return type_ != "table" or name in metadata.tables


def _name(bound: Connection | Engine) -> str:
    return bound.engine.url.render_as_string(hide_password=True)
