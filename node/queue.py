"""The persistent job queue: SQLite in WAL mode at ``<storage>/shadowspot.db``.

Two tables, owned here (``node/deliveries.py`` owns ``results`` and ``deliveries``):

- ``instances``: one row per received SOP instance (primary key: SOP Instance UID), written by
  the C-STORE handler right after the file is durable in the spool. A second copy of a known
  instance is not inserted (``add_instance`` returns False): it is never processed twice.
- ``jobs``: one row per study job. Received instances of a study wait (``job_id IS NULL``) until
  no instance of that study arrived for ``study_quiet_seconds``; ``form_jobs`` then groups them
  into one new ``queued`` job. An instance that arrives after its study's job was formed starts
  a new job for that study holding only the late instances.

Job life cycle (``JobState``)::

    queued ──claim──▶ running ──▶ done                 every instance analysed or skipped
      ▲                 │  └────▶ waiting_for_pipeline no pipeline in this process: kept, and
      │                 │                               put back to queued by requeue_waiting()
      │                 │                               when a process with a pipeline starts
      └──release/recover┘  └────▶ failed               an error no retry can fix, or
                                                         interrupted max_attempts times

Crash safety: every state change is one committed transaction. ``recover()`` (at start-up)
puts jobs a dead process left ``running`` back to ``queued``; instances already finished inside
such a job keep their final state, so a re-run only processes what was not finished.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from node.db import SqliteStore

_SCHEMA = """
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


class JobState(StrEnum):
    """Where a study job is in its life (see the module docstring)."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING_FOR_PIPELINE = "waiting_for_pipeline"
    DONE = "done"
    FAILED = "failed"


class InstanceState(StrEnum):
    """Where one received instance is: waiting in a study, in a job, or finished."""

    RECEIVED = "received"
    """Spooled; its study is not yet quiet, so it is in no job yet."""
    QUEUED = "queued"
    """In a job, not yet processed."""
    ANALYSED = "analysed"
    SKIPPED = "skipped"
    """Not a chest radiograph (``reason`` says why); stored, not analysed."""
    FAILED = "failed"
    """Processing raised an error no retry can fix (``reason`` says which)."""

    @property
    def finished(self) -> bool:
        return self in (InstanceState.ANALYSED, InstanceState.SKIPPED, InstanceState.FAILED)


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceHeader:
    """What intake learnt from an instance's header; no patient data."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    body_part_examined: str = ""
    view_position: str = ""
    number_of_frames: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    """One row of ``instances``."""

    header: InstanceHeader
    path: Path
    calling_ae: str
    peer: str
    received_at: float
    job_id: int | None
    state: InstanceState
    reason: str | None

    @property
    def sop_instance_uid(self) -> str:
        return self.header.sop_instance_uid


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One row of ``jobs``: a study's instances, processed together."""

    id: int
    study_instance_uid: str
    state: JobState
    attempts: int
    calling_ae: str
    created_at: float
    updated_at: float
    reason: str | None


_INSTANCE_COLUMNS = (
    "sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
    "transfer_syntax_uid, modality, body_part_examined, view_position, number_of_frames, "
    "path, calling_ae, peer, received_at, job_id, state, reason"
)
_JOB_COLUMNS = "id, study_instance_uid, state, attempts, calling_ae, created_at, updated_at, reason"


def _instance(row: sqlite3.Row) -> Instance:
    header = InstanceHeader(**{k: row[k] for k in InstanceHeader.__dataclass_fields__})
    return Instance(
        header=header,
        path=Path(row["path"]),
        calling_ae=row["calling_ae"],
        peer=row["peer"],
        received_at=row["received_at"],
        job_id=row["job_id"],
        state=InstanceState(row["state"]),
        reason=row["reason"],
    )


def _job(row: sqlite3.Row) -> Job:
    return Job(**{**dict(row), "state": JobState(row["state"])})


class Queue(SqliteStore):
    """The ``instances`` and ``jobs`` tables. Thread-safe: one connection behind a lock."""

    def __init__(self, storage: Path, *, study_quiet_seconds: float, max_attempts: int = 3) -> None:
        super().__init__(storage, _SCHEMA)
        self.study_quiet_seconds = study_quiet_seconds
        self.max_attempts = max_attempts

    # Intake ------------------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return row is not None

    def add_instance(
        self,
        header: InstanceHeader,
        *,
        path: Path,
        calling_ae: str,
        peer: str,
        received_at: float | None = None,
    ) -> bool:
        """Record a durable spooled instance; False if this SOP Instance UID is already known."""
        values = (
            header.sop_instance_uid,
            header.sop_class_uid,
            header.study_instance_uid,
            header.series_instance_uid,
            header.transfer_syntax_uid,
            header.modality,
            header.body_part_examined,
            header.view_position,
            header.number_of_frames,
            str(path),
            calling_ae,
            peer,
            time.time() if received_at is None else received_at,
            None,
            InstanceState.RECEIVED.value,
            None,
        )
        with self._transaction() as db:
            cursor = db.execute(
                f"INSERT OR IGNORE INTO instances ({_INSTANCE_COLUMNS}) "
                f"VALUES ({', '.join('?' * len(values))})",
                values,
            )
        return cursor.rowcount == 1

    def known_paths(self) -> set[Path]:
        with self._lock:
            rows = self._db.execute("SELECT path FROM instances").fetchall()
        return {Path(r["path"]) for r in rows}

    # Grouping ----------------------------------------------------------------------------------

    def form_jobs(self, now: float | None = None) -> list[Job]:
        """Group the waiting instances of every quiet study into one new queued job each."""
        now = time.time() if now is None else now
        cutoff = now - self.study_quiet_seconds
        created: list[Job] = []
        with self._transaction() as db:
            studies = db.execute(
                "SELECT study_instance_uid, MIN(calling_ae) AS calling_ae FROM instances "
                "WHERE job_id IS NULL GROUP BY study_instance_uid "
                "HAVING MAX(received_at) <= ? ORDER BY MIN(received_at)",
                (cutoff,),
            ).fetchall()
            for study in studies:
                cursor = db.execute(
                    "INSERT INTO jobs (study_instance_uid, state, calling_ae, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?)",
                    (study["study_instance_uid"], JobState.QUEUED, study["calling_ae"], now, now),
                )
                job_id = cursor.lastrowid
                db.execute(
                    "UPDATE instances SET job_id = ?, state = ? "
                    "WHERE job_id IS NULL AND study_instance_uid = ?",
                    (job_id, InstanceState.QUEUED, study["study_instance_uid"]),
                )
                row = db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                created.append(_job(row))
        return created

    # Work --------------------------------------------------------------------------------------

    def claim(self) -> Job | None:
        """Take the oldest queued job: it becomes running and its attempt count goes up."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY id LIMIT 1", (JobState.QUEUED,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE id = ?",
                (JobState.RUNNING, time.time(), row["id"]),
            )
            job = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (row["id"],))
            return _job(job.fetchone())

    def instances_of(self, job_id: int) -> list[Instance]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE job_id = ? "
                "ORDER BY received_at, sop_instance_uid",
                (job_id,),
            ).fetchall()
        return [_instance(r) for r in rows]

    def finish_instance(
        self, sop_instance_uid: str, state: InstanceState, reason: str | None
    ) -> None:
        if not state.finished:
            raise ValueError(f"{state} is not a final instance state")
        with self._transaction() as db:
            db.execute(
                "UPDATE instances SET state = ?, reason = ? WHERE sop_instance_uid = ?",
                (state, reason, sop_instance_uid),
            )

    def finish_job(self, job_id: int, state: JobState, reason: str | None = None) -> None:
        """Leave ``running`` for done, failed, waiting_for_pipeline (or queued: a release)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state = ?",
                (state, reason, time.time(), job_id, JobState.RUNNING),
            )
            if cursor.rowcount != 1:
                raise ValueError(f"job {job_id} is not running")

    def release(self, job_id: int) -> None:
        """Give a running job back to the queue unfinished (graceful shutdown)."""
        self.finish_job(job_id, JobState.QUEUED, "released at shutdown")

    def recover(self) -> tuple[int, int]:
        """At start-up: requeue jobs a dead process left running; fail those interrupted too often.

        Returns (requeued, failed).
        """
        now = time.time()
        reason = f"interrupted {self.max_attempts} times"
        with self._transaction() as db:
            # Their unfinished instances fail with them, with the reason (never left queued).
            db.execute(
                "UPDATE instances SET state = ?, reason = ? WHERE state NOT IN (?, ?, ?) "
                "AND job_id IN (SELECT id FROM jobs WHERE state = ? AND attempts >= ?)",
                (
                    InstanceState.FAILED,
                    f"job {reason}",
                    InstanceState.ANALYSED,
                    InstanceState.SKIPPED,
                    InstanceState.FAILED,
                    JobState.RUNNING,
                    self.max_attempts,
                ),
            )
            failed = db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? "
                "WHERE state = ? AND attempts >= ?",
                (
                    JobState.FAILED,
                    reason,
                    now,
                    JobState.RUNNING,
                    self.max_attempts,
                ),
            ).rowcount
            requeued = db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE state = ?",
                (JobState.QUEUED, "interrupted; run again", now, JobState.RUNNING),
            ).rowcount
        return requeued, failed

    def requeue_waiting(self) -> int:
        """Put jobs that waited for a pipeline back in the queue (a pipeline is now available)."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE jobs SET state = ?, reason = NULL, updated_at = ? WHERE state = ?",
                (JobState.QUEUED, time.time(), JobState.WAITING_FOR_PIPELINE),
            ).rowcount

    # Inspection --------------------------------------------------------------------------------

    def jobs(self, study_instance_uid: str | None = None) -> list[Job]:
        query = f"SELECT {_JOB_COLUMNS} FROM jobs"
        params: tuple[str, ...] = ()
        if study_instance_uid is not None:
            query += " WHERE study_instance_uid = ?"
            params = (study_instance_uid,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", params).fetchall()
        return [_job(r) for r in rows]

    def instances(self) -> list[Instance]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances ORDER BY received_at"
            ).fetchall()
        return [_instance(r) for r in rows]

    def job_counts(self) -> dict[JobState, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            found = {JobState(r["state"]): r["n"] for r in rows.fetchall()}
        return {s: found.get(s, 0) for s in JobState}

    def pending_instances(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM instances WHERE job_id IS NULL")
            return int(row.fetchone()[0])
