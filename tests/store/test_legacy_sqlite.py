"""A SQLite database written by the code before migrations (``tests/store/legacy.py``: its
``CREATE TABLE IF NOT EXISTS`` scripts and statements) is recognised as the baseline and
upgraded keeping every row; one that only looks like it is refused untouched; the queue and
the deliveries carry on on an upgraded one; ``shadowspot migrate`` says what it did."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from node.cli import main
from node.deliveries import DeliveryState, DeliveryStore, NewDelivery
from node.errors import SchemaError
from node.queue import InstanceHeader, JobState, Queue
from node.store import migrate
from node.store.engine import open_engine
from tests.store.legacy import DESTINATION, STUDY, write_legacy

_KEYS = {"jobs": "id", "instances": "sop_instance_uid", "results": "source_sop_instance_uid"}
_KEYS["deliveries"] = "id"


def _header(n: int) -> InstanceHeader:
    return InstanceHeader(
        sop_instance_uid=f"{STUDY}.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.100",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="DX",
        body_part_examined="CHEST",
        view_position="PA",
    )


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the four tables, in the columns today's code wrote, by primary key."""
    with sqlite3.connect(path) as db:
        rows = {}
        for table, key in _KEYS.items():
            columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            baseline = [c for c in columns if not c.startswith("lease_")]
            query = f"SELECT {', '.join(baseline)} FROM {table} ORDER BY {key}"
            rows[table] = db.execute(query).fetchall()
    db.close()
    return rows


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def engine(storage: Path) -> Iterator[Engine]:
    made = open_engine(None, storage=storage)
    yield made
    made.dispose()


def test_a_database_of_today_is_adopted_and_keeps_its_rows(storage: Path, engine: Engine) -> None:
    """No ``alembic_version`` but our tables: recognised as the baseline, upgraded to head;
    every row is still there, jobs hold no lease, and the tables match the metadata."""
    write_legacy(storage)
    before = _rows(storage / "shadowspot.db")
    with pytest.raises(SchemaError, match="written before schema versions"):
        migrate.check(engine)
    done = migrate.upgrade(engine)
    assert (done.before, done.after, done.adopted) == (None, migrate.head(), True)
    assert _rows(storage / "shadowspot.db") == before
    assert all(len(rows) > 0 for rows in before.values())
    with engine.connect() as connection:
        assert migrate.differences(connection) == []
        leases = connection.exec_driver_sql("SELECT lease_owner, lease_expires FROM jobs")
        assert set(leases.all()) == {(None, None)}
    assert migrate.check(engine) == migrate.head()


def test_a_database_with_only_the_queue_gets_the_missing_tables(
    storage: Path, engine: Engine
) -> None:
    """A database where only the queue ever ran: adopted; the delivery tables are created."""
    write_legacy(storage, deliveries=False)
    done = migrate.upgrade(engine)
    assert done.adopted
    with engine.connect() as connection:
        assert migrate.differences(connection) == []


def test_tables_of_another_shape_are_refused_and_left_unchanged(
    storage: Path, engine: Engine
) -> None:
    """Tables named like ours but shaped otherwise are not the baseline: ``SchemaError``,
    and the upgrade's one transaction leaves no trace (no version, no lease columns)."""
    storage.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(storage / "shadowspot.db") as db:
        db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT NOT NULL)")
    db.close()
    with pytest.raises(SchemaError, match=r"not their shape.*left unchanged"):
        migrate.upgrade(engine)
    with sqlite3.connect(storage / "shadowspot.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    db.close()
    assert tables == {"jobs"}
    assert columns == {"id", "state"}


@pytest.mark.parametrize("written_before", [True, False], ids=["adopted", "created"])
def test_todays_code_keeps_working_on_an_upgraded_database(
    storage: Path, engine: Engine, written_before: bool
) -> None:
    """The queue and the deliveries work on a database at head (adopted, or created by the
    migrations): the job the old node left running is recovered with its unfinished
    instance, a new instance is grouped and claimed, result UIDs kept."""
    if written_before:
        write_legacy(storage)
    migrate.upgrade(engine)
    engine.dispose()
    queue = Queue(storage, study_quiet_seconds=0)
    deliveries = DeliveryStore(storage, retry_schedule_seconds=[30.0])
    try:
        if written_before:
            assert queue.recover() == (1, 0)
            assert deliveries.counts()[DeliveryState.DELIVERED] == 1
            claimed = queue.claim()
            assert claimed is not None and claimed.id == 2 and claimed.attempts == 2
            assert [i.sop_instance_uid for i in queue.instances_of(2)] == [f"{STUDY}.3"]
            queue.finish_job(2, JobState.DONE)
        assert queue.add_instance(
            _header(5), path=storage / "5.dcm", calling_ae="MODALITY", peer="127.0.0.1"
        )
        assert queue.form_jobs() and queue.claim() is not None
        uids = deliveries.result_uids(f"{STUDY}.5", STUDY)
        assert uids == deliveries.result_uids(f"{STUDY}.5", STUDY)
        (delivery_id,) = deliveries.enqueue(
            DESTINATION,
            [
                NewDelivery(
                    study_instance_uid=STUDY,
                    sop_instance_uid=uids.seg.sop_instance_uid,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    kind="seg",
                    path=storage / "seg5.dcm",
                )
            ],
        )
        due = [d.id for d in deliveries.claim_due(DESTINATION)]
        assert due == ([2, delivery_id] if written_before else [delivery_id])  # 2: its retry
        assert deliveries.counts()[DeliveryState.SENDING] == len(due)
    finally:
        queue.close()
        deliveries.close()


def test_migrate_command_upgrades_an_old_database_and_says_from_what(
    storage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``shadowspot migrate --config FILE`` on the old code's database: upgraded, every row
    kept, the revisions printed; run again, it has nothing to do."""
    write_legacy(storage)
    before = _rows(storage / "shadowspot.db")
    config = tmp_path / "shadowspot.toml"
    config.write_text(f'[node]\nstorage = "{storage}"\n', encoding="utf-8")
    assert main(["migrate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"written before schema versions → {migrate.head()}" in out
    assert _rows(storage / "shadowspot.db") == before
    assert main(["migrate", "--config", str(config)]) == 0
    assert f"at schema revision {migrate.head()}, nothing to do" in capsys.readouterr().out
