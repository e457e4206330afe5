"""A SQLite database written by the code before migrations (``node/queue.py`` and
``node/deliveries.py`` with their ``CREATE TABLE IF NOT EXISTS`` scripts) is recognised as
the baseline and upgraded keeping every row; one that only looks like it is refused
untouched; and today's code keeps working on an upgraded database."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from node.deliveries import DeliveryState, DeliveryStore, NewDelivery
from node.errors import SchemaError
from node.queue import InstanceHeader, InstanceState, JobState, Queue
from node.store import migrate
from node.store.engine import open_engine

STUDY = "1.2.826.0.1.3680043.10.1234.1"
DESTINATION = "PACS"
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


def _write_as_today(storage: Path) -> None:
    """Rows in every table through today's API: instances in a finished job and one still
    waiting, result UIDs, a delivered and a failed delivery."""
    queue = Queue(storage, study_quiet_seconds=0)
    deliveries = DeliveryStore(storage, retry_schedule_seconds=[30.0])
    try:
        for n in (1, 2):
            queue.add_instance(
                _header(n), path=storage / f"{n}.dcm", calling_ae="MODALITY", peer="127.0.0.1"
            )
        (job,) = queue.form_jobs()
        claimed = queue.claim()
        assert claimed is not None and claimed.id == job.id
        queue.finish_instance(f"{STUDY}.1", InstanceState.ANALYSED, None)
        queue.finish_instance(f"{STUDY}.2", InstanceState.SKIPPED, "lateral")
        queue.finish_job(job.id, JobState.DONE, "2 instances")
        queue.add_instance(
            _header(3), path=storage / "3.dcm", calling_ae="MODALITY", peer="127.0.0.1"
        )
        uids = deliveries.result_uids(f"{STUDY}.1", STUDY)
        items = [
            NewDelivery(
                study_instance_uid=STUDY,
                sop_instance_uid=objects.sop_instance_uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                kind=kind,
                path=storage / f"{kind}.dcm",
            )
            for kind, objects in (("seg", uids.seg), ("sr", uids.sr))
        ]
        first, second = deliveries.enqueue(DESTINATION, items)
        deliveries.claim_due(DESTINATION)
        deliveries.mark_delivered(first)
        deliveries.mark_failed(second, "association rejected", retryable=True)
    finally:
        queue.close()
        deliveries.close()


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
    _write_as_today(storage)
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
    Queue(storage, study_quiet_seconds=0).close()
    done = migrate.upgrade(engine)
    assert done.adopted
    with engine.connect() as connection:
        assert migrate.differences(connection) == []


def test_tables_of_another_shape_are_refused_and_left_unchanged(
    storage: Path, engine: Engine
) -> None:
    """Tables named like ours but shaped otherwise are not the baseline: ``SchemaError``,
    and the upgrade's one transaction leaves no trace (no version, no lease columns)."""
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
    """Until the queue and the deliveries move onto the store, they open a database at head
    (adopted, or created by the migrations) and read and write it as before."""
    if written_before:
        _write_as_today(storage)
    migrate.upgrade(engine)
    engine.dispose()
    queue = Queue(storage, study_quiet_seconds=0)
    deliveries = DeliveryStore(storage, retry_schedule_seconds=[30.0])
    try:
        assert queue.add_instance(
            _header(4), path=storage / "4.dcm", calling_ae="MODALITY", peer="127.0.0.1"
        )
        assert queue.form_jobs() and queue.claim() is not None
        uids = deliveries.result_uids(f"{STUDY}.4", STUDY)
        assert uids == deliveries.result_uids(f"{STUDY}.4", STUDY)
        (delivery_id,) = deliveries.enqueue(
            DESTINATION,
            [
                NewDelivery(
                    study_instance_uid=STUDY,
                    sop_instance_uid=uids.seg.sop_instance_uid,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    kind="seg",
                    path=storage / "seg4.dcm",
                )
            ],
        )
        assert [d.id for d in deliveries.claim_due(DESTINATION)] == [delivery_id]
        assert deliveries.counts()[DeliveryState.SENDING] == 1
    finally:
        queue.close()
        deliveries.close()
