"""A database as the code before ``node.store`` wrote it (up to 92296b3): its two
``CREATE TABLE IF NOT EXISTS`` scripts, verbatim from ``node/queue.py`` and
``node/deliveries.py`` of then, run by ``sqlite3`` with its pragmas, and rows written with the
statements it used: a finished job with an analysed and a skipped instance, an instance still
waiting, a job left running by a dead process, result UIDs, a delivered and a failed delivery.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

STUDY = "1.2.826.0.1.3680043.10.1234.1"
DESTINATION = "PACS"
QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    calling_ae TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_instance_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    body_part_examined TEXT NOT NULL,
    view_position TEXT NOT NULL,
    number_of_frames INTEGER NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer TEXT NOT NULL,
    received_at REAL NOT NULL,
    job_id INTEGER REFERENCES jobs (id),
    state TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS instances_pending ON instances (job_id, study_instance_uid);
"""
DELIVERIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    source_sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    seg_series_uid TEXT NOT NULL,
    seg_instance_uid TEXT NOT NULL,
    sr_series_uid TEXT NOT NULL,
    sr_instance_uid TEXT NOT NULL,
    pr_series_uid TEXT NOT NULL,
    pr_instance_uid TEXT NOT NULL,
    sc_series_uid TEXT NOT NULL,
    sc_instance_uid TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_attempt_at);
"""
_INSTANCE = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
    "series_instance_uid, transfer_syntax_uid, modality, body_part_examined, view_position, "
    "number_of_frames, path, calling_ae, peer, received_at, job_id, state, reason) "
    "VALUES (?, '1.2.840.10008.5.1.4.1.1.1.1', ?, ?, '1.2.840.10008.1.2.1', 'DX', 'CHEST', "
    "'PA', 1, ?, 'MODALITY', '127.0.0.1', ?, ?, ?, ?)"
)
_JOB = (
    "INSERT INTO jobs (id, study_instance_uid, state, attempts, calling_ae, created_at, "
    "updated_at, reason) VALUES (?, ?, ?, ?, 'MODALITY', ?, ?, ?)"
)
_DELIVERY = (
    "INSERT INTO deliveries (destination, study_instance_uid, sop_instance_uid, sop_class_uid, "
    "transfer_syntax_uid, kind, path, state, attempts, last_error, next_attempt_at, "
    "created_at, updated_at, delivered_at) VALUES (?, ?, ?, '1.2.840.10008.5.1.4.1.1.66.4', "
    "'1.2.840.10008.1.2.1', ?, ?, ?, 1, ?, ?, ?, ?, ?)"
)
T0 = 1_700_000_000.0


def connect(storage: Path, *schemas: str) -> sqlite3.Connection:
    """The old ``SqliteStore``'s connection: WAL, FULL, foreign keys, its scripts run."""
    storage.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(storage / "shadowspot.db", isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        db.execute(f"PRAGMA {pragma}")
    for schema in schemas:
        db.executescript(schema)
    return db


def write_legacy(storage: Path, *, deliveries: bool = True) -> None:
    """The database of a node of the old code that ran, received and sent (module docstring);
    without ``deliveries`` one where only the queue ever ran."""
    scripts = (QUEUE_SCHEMA, DELIVERIES_SCHEMA) if deliveries else (QUEUE_SCHEMA,)
    db = connect(storage, *scripts)
    try:
        db.execute(_JOB, (1, STUDY, "done", 1, T0, T0 + 5, "1 analysed, 1 skipped"))
        db.execute(_JOB, (2, STUDY, "running", 1, T0 + 10, T0 + 11, None))
        rows = [
            (1, 1, "analysed", None),
            (2, 1, "skipped", "lateral"),
            (3, 2, "queued", None),
            (4, None, "received", None),
        ]
        for n, job_id, state, reason in rows:
            db.execute(
                _INSTANCE,
                (
                    f"{STUDY}.{n}",
                    STUDY,
                    f"{STUDY}.100",
                    str(storage / f"{n}.dcm"),
                    T0 + n,
                    job_id,
                    state,
                    reason,
                ),
            )
        if deliveries:
            uids = [f"{STUDY}.9{n}" for n in range(8)]
            db.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (f"{STUDY}.1", STUDY, *uids, T0 + 3),
            )
            db.execute(
                _DELIVERY,
                (
                    DESTINATION,
                    STUDY,
                    uids[1],
                    "seg",
                    str(storage / "seg.dcm"),
                    "delivered",
                    None,
                    T0 + 4,
                    T0 + 4,
                    T0 + 5,
                    T0 + 5,
                ),
            )
            db.execute(
                _DELIVERY,
                (
                    DESTINATION,
                    STUDY,
                    uids[3],
                    "sr",
                    str(storage / "sr.dcm"),
                    "pending",
                    "association rejected",
                    T0 + 40,
                    T0 + 4,
                    T0 + 10,
                    None,
                ),
            )
    finally:
        db.close()
