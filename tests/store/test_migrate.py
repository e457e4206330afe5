"""The schema's versions on both backends: an empty database upgraded to head matches the
metadata, a newer one is refused untouched, every revision goes down and up again, and two
upgrades at once upgrade once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text

from node.errors import DatabaseError, SchemaError
from node.store import migrate
from node.store.engine import open_engine
from node.store.schema import metadata
from tests.ports import free_port

NEWER = "9999_from_a_newer_shadowspot"


def test_an_empty_database_is_upgraded_to_head_matching_the_metadata(engine: Engine) -> None:
    """Every revision runs on an empty database; its tables are then exactly the metadata."""
    done = migrate.upgrade(engine)
    assert (done.before, done.after, done.adopted) == (None, migrate.head(), False)
    with engine.connect() as connection:
        assert migrate.current(connection) == migrate.head()
        assert migrate.differences(connection) == []
        assert set(metadata.tables) <= set(inspect(connection).get_table_names())
    assert migrate.check(engine) == migrate.head()


def test_a_second_upgrade_changes_nothing(engine: Engine) -> None:
    """At head, upgrading again runs no revision."""
    migrate.upgrade(engine)
    again = migrate.upgrade(engine)
    assert (again.before, again.after, again.changed) == (migrate.head(), migrate.head(), False)


def test_check_refuses_a_database_not_yet_upgraded(engine: Engine) -> None:
    """Opening an empty or older database without upgrading is a ``SchemaError`` that says
    which revision is needed and how to get there."""
    with pytest.raises(SchemaError, match=r"has no ShadowSpot schema.*shadowspot migrate"):
        migrate.check(engine)
    with engine.begin() as connection:
        command.upgrade(migrate.alembic_config(connection), "0001")
    with pytest.raises(SchemaError, match=r"at schema revision 0001.*needs revision 0002"):
        migrate.check(engine)


def test_a_newer_database_is_refused_and_left_as_it_is(engine: Engine) -> None:
    """A revision this code does not know (a newer ShadowSpot wrote it) is a ``SchemaError``
    from both ``upgrade`` and ``check``; the database keeps that revision and its tables."""
    migrate.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": NEWER})
    with pytest.raises(SchemaError, match=r"does not know.*newer ShadowSpot.*never downgraded"):
        migrate.upgrade(engine)
    with pytest.raises(SchemaError, match=NEWER):
        migrate.check(engine)
    with engine.connect() as connection:
        assert migrate.current(connection) == NEWER
        assert migrate.differences(connection) == []


def test_every_revision_goes_down_and_up_again(engine: Engine) -> None:
    """Each downgrade undoes its upgrade: head → base leaves no table, base → head matches."""
    migrate.upgrade(engine)
    with engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "0001")
        assert "lease_owner" not in {c["name"] for c in inspect(connection).get_columns("jobs")}
        command.downgrade(migrate.alembic_config(connection), "base")
        assert set(inspect(connection).get_table_names()) & set(metadata.tables) == set()
    migrate.upgrade(engine)
    with engine.connect() as connection:
        assert migrate.differences(connection) == []


def test_two_upgrades_at_once_upgrade_once(backend_url: str | None, tmp_path: Path) -> None:
    """Two processes starting together on one empty database: the migration lock makes one
    run every revision and the other find the database at head."""
    engines = [open_engine(backend_url, storage=tmp_path / "storage") for _ in range(2)]
    done: list[migrate.Upgrade] = []
    failed: list[BaseException] = []

    def run(engine: Engine) -> None:
        try:
            done.append(migrate.upgrade(engine))
        except BaseException as exc:  # handed to the test thread, which fails on it
            failed.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for engine in engines:
        engine.dispose()
    assert failed == []
    assert sorted(str(u.before) for u in done) == sorted([str(None), migrate.head()])


def test_a_database_out_of_reach_is_a_database_error(tmp_path: Path) -> None:
    """No server on the URL's port: ``DatabaseError`` naming the database, not a driver error."""
    url = f"postgresql://shadowspot@127.0.0.1:{free_port()}/shadowspot"
    engine = open_engine(url, storage=tmp_path)
    try:
        with pytest.raises(DatabaseError, match=r"127\.0\.0\.1.*cannot be used"):
            migrate.upgrade(engine)
        with pytest.raises(DatabaseError, match=r"cannot be used"):
            migrate.check(engine)
    finally:
        engine.dispose()
