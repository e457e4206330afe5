"""The persistent job queue: SQLite in WAL mode at ``<storage>/shadowspot.db``.

Two tables, owned here (``node/deliveries.py`` owns ``results`` and ``deliveries``):

- ``instances``: one row per received SOP instance (primary key: SOP Instance UID), written by
  the C-STORE handler right after the file is durable in the spool. A second copy of a known
  instance is not inserted (``add_instance`` returns False): it is never processed twice,
  unless the known one was abandoned (below), when ``readmit`` receives it again.
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
        /interrupted                                     interrupted max_attempts times

A job that ends ``failed`` (``finish_job``, ``interrupted``, ``recover``) fails each of its
unfinished instances with the reason in the same transaction: no instance is left ``queued``
in a job nobody will run.

Crash safety: every state change is one committed transaction. ``recover()`` (at start-up)
puts jobs a dead process left ``running`` back to ``queued``; instances already finished inside
such a job keep their final state, so a re-run only processes what was not finished.

Abandoned instances (``Abandoned``): ``failed`` ones, and ``stuck`` ones (received or queued,
but in a job that is done or failed, or that no longer exists). ``requeue`` (``shadowspot retry
--instances``) and ``readmit`` (the sender resent one) take them out of their old job and back
to ``received``: the worker groups them into a new job with its full ``max_attempts``. The old
job then ends ``done`` if what it still holds finished well, and is deleted if it holds
nothing. Both only write the database, so they work the same whether a node runs or not.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Sequence
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


class Abandoned(StrEnum):
    """Why an instance will not be analysed unless someone re-queues it (module docstring)."""

    FAILED = "failed"
    """Its processing failed (``reason`` says why)."""
    STUCK = "stuck"
    """Unfinished, in a job that is over (done or failed) or gone."""


_LIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.WAITING_FOR_PIPELINE)
_UNFINISHED = (InstanceState.RECEIVED, InstanceState.QUEUED)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class AbandonedInstance:
    """An instance ``requeue`` can take: failed, or stuck in a job that is over."""

    instance: Instance
    kind: Abandoned
    job_state: JobState | None
    """The state of its old job (None: the job no longer exists)."""


_ABANDONED_SQL = (
    f"SELECT {', '.join('i.' + c for c in _INSTANCE_COLUMNS.split(', '))}, j.state AS job_state "
    "FROM instances i LEFT JOIN jobs j ON j.id = i.job_id "
    "WHERE i.job_id IS NOT NULL AND (j.id IS NULL OR j.state IN (?, ?)) "
    "AND i.state IN (?, ?, ?)"
)
_ABANDONED_PARAMS: tuple[str, ...] = (
    JobState.DONE,
    JobState.FAILED,
    InstanceState.FAILED,
    *_UNFINISHED,
)


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


def _abandoned(row: sqlite3.Row) -> AbandonedInstance:
    instance = _instance(row)
    failed = instance.state is InstanceState.FAILED
    return AbandonedInstance(
        instance=instance,
        kind=Abandoned.FAILED if failed else Abandoned.STUCK,
        job_state=None if row["job_state"] is None else JobState(row["job_state"]),
    )


def _row_values(
    header: InstanceHeader, *, path: Path, calling_ae: str, peer: str, at: float | None
) -> tuple[object, ...]:
    """The ``_INSTANCE_COLUMNS`` of a newly received instance (no job yet)."""
    return (
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
        time.time() if at is None else at,
        None,
        InstanceState.RECEIVED.value,
        None,
    )


def _fail_unfinished(db: sqlite3.Connection, job_id: int, reason: str) -> None:
    """Fail the instances of ``job_id`` that are not finished, with ``reason``."""
    db.execute(
        "UPDATE instances SET state = ?, reason = ? WHERE job_id = ? AND state IN (?, ?)",
        (InstanceState.FAILED, reason, job_id, *_UNFINISHED),
    )


def _settle_old_jobs(db: sqlite3.Connection, job_ids: Collection[int], why: str) -> None:
    """After instances left these finished jobs: delete the empty ones, and mark ``done`` the
    ones whose remaining instances were all analysed or skipped."""
    now = time.time()
    for job_id in job_ids:
        left = {
            InstanceState(r["state"])
            for r in db.execute("SELECT state FROM instances WHERE job_id = ?", (job_id,))
        }
        if not left:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        elif left <= {InstanceState.ANALYSED, InstanceState.SKIPPED}:
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (JobState.DONE, why, now, job_id),
            )


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

    def instance(self, sop_instance_uid: str) -> Instance | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        return None if row is None else _instance(row)

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
        values = _row_values(header, path=path, calling_ae=calling_ae, peer=peer, at=received_at)
        with self._transaction() as db:
            cursor = db.execute(
                f"INSERT OR IGNORE INTO instances ({_INSTANCE_COLUMNS}) "
                f"VALUES ({', '.join('?' * len(values))})",
                values,
            )
        return cursor.rowcount == 1

    def readmit(
        self, header: InstanceHeader, *, path: Path, calling_ae: str, peer: str
    ) -> AbandonedInstance | None:
        """A sender resent an abandoned instance (same study): record the new copy as received
        now, out of its old job. Returns what it was, or None when it is not abandoned (then
        it is a plain duplicate and nothing changed)."""
        values = _row_values(header, path=path, calling_ae=calling_ae, peer=peer, at=None)
        with self._transaction() as db:
            row = db.execute(
                _ABANDONED_SQL + " AND i.sop_instance_uid = ? AND i.study_instance_uid = ?",
                (*_ABANDONED_PARAMS, header.sop_instance_uid, header.study_instance_uid),
            ).fetchone()
            if row is None:
                return None
            columns = _INSTANCE_COLUMNS.split(", ")
            db.execute(
                f"UPDATE instances SET {', '.join(c + ' = ?' for c in columns[1:])} "
                "WHERE sop_instance_uid = ?",
                (*values[1:], header.sop_instance_uid),
            )
            _settle_old_jobs(db, [int(row["job_id"])], "an instance was resent: in a new job")
        return _abandoned(row)

    def abandoned(
        self,
        *,
        sop_instance_uids: Sequence[str] = (),
        study_instance_uids: Sequence[str] = (),
        kinds: Collection[Abandoned] = tuple(Abandoned),
    ) -> list[AbandonedInstance]:
        """The abandoned instances, optionally only these UIDs, studies and kinds."""
        query, params = _ABANDONED_SQL, list[object](_ABANDONED_PARAMS)
        for column, wanted in (
            ("i.sop_instance_uid", sop_instance_uids),
            ("i.study_instance_uid", study_instance_uids),
        ):
            if wanted:
                query += f" AND {column} IN ({', '.join('?' * len(wanted))})"
                params += list(wanted)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY i.received_at", params).fetchall()
        found = [_abandoned(r) for r in rows]
        return [a for a in found if a.kind in kinds]

    def requeue(self, sop_instance_uids: Sequence[str]) -> list[AbandonedInstance]:
        """Put these instances, those of them still abandoned, back to ``received`` (their
        received time kept, so they form a new job at the worker's next look). Returns what
        each was; the rest are left as they are."""
        if not sop_instance_uids:
            return []
        marks = ", ".join("?" * len(sop_instance_uids))
        with self._transaction() as db:
            rows = db.execute(
                _ABANDONED_SQL + f" AND i.sop_instance_uid IN ({marks}) ORDER BY i.received_at",
                (*_ABANDONED_PARAMS, *sop_instance_uids),
            ).fetchall()
            db.executemany(
                "UPDATE instances SET job_id = NULL, state = ?, reason = NULL "
                "WHERE sop_instance_uid = ?",
                [(InstanceState.RECEIVED, r["sop_instance_uid"]) for r in rows],
            )
            old_jobs = {int(r["job_id"]) for r in rows}
            _settle_old_jobs(db, old_jobs, "re-queued instances are in a new job")
        return [_abandoned(r) for r in rows]

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
        """Leave ``running`` for done, failed, waiting_for_pipeline (or queued: a release).

        ``failed`` also fails the job's unfinished instances, with the job's reason."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state = ?",
                (state, reason, time.time(), job_id, JobState.RUNNING),
            )
            if cursor.rowcount != 1:
                raise ValueError(f"job {job_id} is not running")
            if state is JobState.FAILED:
                _fail_unfinished(db, job_id, f"job failed: {reason or 'no reason given'}")

    def interrupted(self, job_id: int, reason: str) -> JobState | None:
        """A running job whose processing raised (the worker loop caught it): queued again
        while it has attempts left, else failed with its unfinished instances. Returns the new
        state (None: the job was not running)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT attempts FROM jobs WHERE id = ? AND state = ?", (job_id, JobState.RUNNING)
            ).fetchone()
            if row is None:
                return None
            attempts = int(row["attempts"])
            state = JobState.QUEUED if attempts < self.max_attempts else JobState.FAILED
            if state is JobState.FAILED:
                reason = f"{reason}; gave up after {attempts} attempts"
                _fail_unfinished(db, job_id, f"job failed: {reason}")
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (state, reason, time.time(), job_id),
            )
        return state

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
