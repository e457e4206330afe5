"""``shadowspot status`` and ``shadowspot cleanup`` on a real queue database and storage."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from node.cli import main
from node.deliveries import DeliveryStore, NewDelivery
from node.queue import InstanceHeader, InstanceState, JobState, Queue

CR = "1.2.840.10008.5.1.4.1.1.1"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
DAY = 86400.0


def _write_config(tmp_path: Path, storage: Path, *, spool_days: float, results_days: float) -> Path:
    path = tmp_path / "shadowspot.toml"
    path.write_text(
        f'[node]\nstorage = "{storage}"\n'
        f"[retention]\nspool_days = {spool_days}\nresults_days = {results_days}\n",
        encoding="utf-8",
    )
    return path


def _receive(queue: Queue, storage: Path, study: str, sop: str, *, at: float) -> Path:
    path = storage / "spool" / study / f"{sop}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"DICM" * 64)
    os.utime(path, (at, at))
    header = InstanceHeader(
        sop_instance_uid=sop,
        sop_class_uid=CR,
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR",
    )
    queue.add_instance(header, path=path, calling_ae="MODALITY1", peer="10.0.0.5", received_at=at)
    return path


def _result(store: DeliveryStore, storage: Path, study: str, sop: str, *, at: float) -> Path:
    path = storage / "results" / study / f"{sop}.seg.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"SEG" * 100)
    os.utime(path, (at, at))
    item = NewDelivery(
        study_instance_uid=study,
        sop_instance_uid=sop,
        sop_class_uid=SEG,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        kind="seg",
        path=path,
    )
    store.enqueue("PACS", [item])
    return path


def _files(storage: Path) -> list[Path]:
    """Every file under storage except the database (a reader may create its -shm/-wal)."""
    return sorted(
        p for p in storage.rglob("*") if p.is_file() and not p.name.startswith("shadowspot.db")
    )


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """A storage folder with an old finished study (delivered, one delivery dead), an old
    study still waiting to be analysed, and an old study whose result is still pending."""
    storage = tmp_path / "var"
    now = time.time()
    old = now - 40 * DAY
    queue = Queue(storage, study_quiet_seconds=1.0)
    store = DeliveryStore(storage, retry_schedule_seconds=())
    try:
        _receive(queue, storage, "1.2.1", "1.2.1.1.1", at=old)
        _receive(queue, storage, "1.2.1", "1.2.1.1.2", at=old)
        [job] = queue.form_jobs(now=old + 5)
        claimed = queue.claim()
        assert claimed is not None and claimed.id == job.id
        for sop in ("1.2.1.1.1", "1.2.1.1.2"):
            queue.finish_instance(sop, InstanceState.ANALYSED, None)
        queue.finish_job(job.id, JobState.DONE)
        _result(store, storage, "1.2.1", "1.2.1.9.1", at=old)
        _result(store, storage, "1.2.1", "1.2.1.9.2", at=old)
        first, second = store.claim_due("PACS")
        store.mark_delivered(first.id)
        store.mark_failed(second.id, "association rejected", retryable=False)
        _receive(queue, storage, "1.2.2", "1.2.2.1.1", at=old)  # not yet analysed: keep
        _result(store, storage, "1.2.3", "1.2.3.9.1", at=old)  # delivery pending: keep
    finally:
        store.close()
        queue.close()
    (storage / "quarantine").mkdir(exist_ok=True)
    for name, age in (("bad-old.dcm", 40 * DAY), ("bad-new.dcm", DAY)):
        quarantined = storage / "quarantine" / name
        quarantined.write_bytes(b"x" * 10)
        os.utime(quarantined, (now - age, now - age))
    return storage


def test_status_reports_queue_studies_and_dead_letters(
    storage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status shows the queue depth, the finished study with its latency, and the dead letter;
    it exits 1 while a dead letter exists."""
    config = _write_config(tmp_path, storage, spool_days=30, results_days=30)
    assert main(["status", "--config", str(config), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["queue_depth"] == 1  # study 1.2.2 waits to go quiet
    assert report["jobs"] == {"done": 1}
    assert report["deliveries"] == {"dead": 1, "delivered": 1, "pending": 1}
    [study] = report["recent_studies"]
    assert study["study_instance_uid"] == "1.2.1" and study["state"] == "done"
    assert study["instances"] == {"analysed": 2}
    assert study["deliveries"] == {"dead": 1, "delivered": 1}
    assert study["latency_seconds"] > 39 * DAY  # received 40 days ago, finished just now
    [dead] = report["dead_letters"]
    assert (dead["destination"], dead["kind"]) == ("PACS", "seg")
    assert dead["last_error"] == "association rejected"

    assert main(["status", "--config", str(config)]) == 1
    text = capsys.readouterr().out
    assert "queue depth: 1" in text and "1.2.1" in text
    assert "dead-letter deliveries (1):" in text and "association rejected" in text


def test_status_without_database_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a storage folder the node never used, status says so and exits 1."""
    config = _write_config(tmp_path, tmp_path / "empty", spool_days=30, results_days=30)
    assert main(["status", "--config", str(config)]) == 1
    assert "no queue database" in capsys.readouterr().err


def test_cleanup_removes_old_files_but_keeps_work_in_progress(
    storage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old spool files of finished studies, old quarantine files and old delivered result
    folders go; the input of a study not yet analysed and a result still pending stay."""
    config = _write_config(tmp_path, storage, spool_days=30, results_days=30)
    before = _files(storage)

    assert main(["cleanup", "--config", str(config), "--dry-run"]) == 0
    assert "would remove: 2 spool file(s), 1 quarantined file(s), 1 result folder(s)" in (
        capsys.readouterr().out
    )
    assert _files(storage) == before

    assert main(["cleanup", "--config", str(config)]) == 0
    assert "kept 2 still in use" in capsys.readouterr().out
    assert not (storage / "spool" / "1.2.1").exists()
    assert (storage / "spool" / "1.2.2" / "1.2.2.1.1.dcm").is_file()
    assert not (storage / "results" / "1.2.1").exists()
    assert (storage / "results" / "1.2.3" / "1.2.3.9.1.seg.dcm").is_file()
    assert not (storage / "quarantine" / "bad-old.dcm").exists()
    assert (storage / "quarantine" / "bad-new.dcm").is_file()
    assert (storage / "shadowspot.db").is_file()


def test_retention_zero_keeps_everything(
    storage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """spool_days = results_days = 0 means keep for ever: nothing is removed."""
    config = _write_config(tmp_path, storage, spool_days=0, results_days=0)
    before = _files(storage)
    assert main(["cleanup", "--config", str(config)]) == 0
    assert "removed: 0 spool file(s), 0 quarantined file(s), 0 result folder(s)" in (
        capsys.readouterr().out
    )
    assert _files(storage) == before
