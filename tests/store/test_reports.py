"""The read-only readers (``shadowspot status``, ``/metrics``, ``/health``, retention) on both
backends, through ``node.store.reports``: they see what the queue and the deliveries wrote,
and a SQLite file that does not exist yet is not created by looking."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from node.config import DatabaseConfig
from node.deliveries import NewDelivery
from node.health import check
from node.metrics import render
from node.queue import InstanceHeader, InstanceState, JobState
from node.retention import cleanup
from node.status_cmd import read_status
from node.store import reports
from node.store.database import Database, Schema, open_database
from node.store.deliveries import DeliveryTables
from node.store.engine import DB_NAME
from node.store.jobs import JobStore
from tests.node.conftest import make_config

STUDY = "1.2.826.0.1.3680043.10.1234.9"


def _write(database: Database, storage: Path) -> None:
    """One analysed job of two instances and a dead delivery, one instance still waiting."""
    queue = JobStore(database, study_quiet_seconds=0.0)
    for n in (1, 2, 3):
        header = InstanceHeader(
            sop_instance_uid=f"{STUDY}.{n}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            study_instance_uid=STUDY,
            series_instance_uid=f"{STUDY}.0",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        queue.add_instance(header, path=storage / f"{n}.dcm", calling_ae="M1", peer="::1")
        if n == 2:
            (job,) = queue.form_jobs()
            assert queue.claim() is not None
            for done in (1, 2):
                queue.finish_instance(f"{STUDY}.{done}", InstanceState.ANALYSED, None)
            queue.finish_job(job.id, JobState.DONE, "2 analysed")
    store = DeliveryTables(database, retry_schedule_seconds=())
    item = NewDelivery(
        study_instance_uid=STUDY,
        sop_instance_uid=f"{STUDY}.90",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        kind="seg",
        path=storage / "results" / "seg.dcm",
    )
    (delivery_id,) = store.enqueue("PACS", [item])
    store.mark_failed(delivery_id, "refused", retryable=False)


def test_readers_see_what_was_written(backend_url: str | None, tmp_path: Path) -> None:
    """Status, metrics, health and retention read the same database the node writes."""
    storage = tmp_path / "storage"
    database = open_database(backend_url, storage=storage, schema=Schema.UPGRADE)
    try:
        _write(database, storage)
    finally:
        database.close()
    status = read_status(storage / DB_NAME, url=backend_url)
    assert status.queue_depth == 1 and status.jobs == {"done": 1}
    assert status.deliveries == {"dead": 1}
    (line,) = status.recent_studies
    assert (line.state, line.instances, line.deliveries) == ("done", {"analysed": 2}, {"dead": 1})
    assert [d.last_error for d in status.dead_letters] == ["refused"]
    config = make_config(storage)
    config = dataclasses.replace(config, database=DatabaseConfig(url=backend_url or ""))
    text = render(config.database.url_or_default, storage=storage)[0].decode()
    assert 'shadowspot_jobs{state="done"} 1.0' in text and "shadowspot_queue_depth 1.0" in text
    assert check(config).queue_depth == 1
    with reports.reading(backend_url, storage=storage) as found:
        assert found is not None
        inputs, results = reports.paths_in_use(found)
    assert inputs == {(storage / "3.dcm").resolve()} and results == set()
    assert cleanup(config, dry_run=True).kept_in_use == 0


def test_looking_creates_no_sqlite_file(tmp_path: Path) -> None:
    """Before the node ever ran there is nothing to read, and reading makes nothing."""
    storage = tmp_path / "storage"
    with reports.reading(None, storage=storage) as found:
        assert found is None
    assert "shadowspot_queue_depth 0.0" in render(None, storage=storage)[0].decode()
    assert not (storage / DB_NAME).exists()
