"""The study queue's SQL: ``instances`` and ``jobs``, as typed rows (``node/queue.py`` tells
the life cycle; this module is its statements).

Claiming is ``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL (two claimers never take the
same job, neither waits for the other); on SQLite the one writer (``BEGIN IMMEDIATE``) does
the same. A claim writes ``lease_owner`` (the claiming ``JobStore``'s ``owner``) and
``lease_expires`` (now + ``lease_seconds``); ``heartbeat`` moves ``lease_expires`` on while
the owner still holds the job. ``sweep`` (at every claim, and ``recover`` at start) puts
running jobs whose lease expired back to ``queued`` (or fails them after ``max_attempts``):
their finished instances keep their state, the others are run by whoever claims the job next.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from node.store.database import Database
from node.store.rows import (
    UNFINISHED,
    abandoned_of,
    instance_of,
    job_of,
)
from node.store.rows import (
    Abandoned as Abandoned,
)
from node.store.rows import (
    AbandonedInstance as AbandonedInstance,
)
from node.store.rows import (
    Instance as Instance,
)
from node.store.rows import (
    InstanceHeader as InstanceHeader,
)
from node.store.rows import (
    InstanceState as InstanceState,
)
from node.store.rows import (
    Job as Job,
)
from node.store.rows import (
    JobState as JobState,
)
from node.store.schema import instances as I
from node.store.schema import jobs as J

_HEADER_FIELDS = tuple(InstanceHeader.__dataclass_fields__)
_JOB_COLUMNS = tuple(J.c[name] for name in Job.__dataclass_fields__)


def _abandoned_query(*where: ColumnElement[bool]) -> Select[Any]:
    """Instances in a job that is over (or gone) and failed or unfinished, with the job's state."""
    return (
        select(I, J.c.state.label("job_state"))
        .select_from(I.outerjoin(J, J.c.id == I.c.job_id))
        .where(
            I.c.job_id.is_not(None),
            or_(J.c.id.is_(None), J.c.state.in_([JobState.DONE, JobState.FAILED])),
            I.c.state.in_([InstanceState.FAILED, *UNFINISHED]),
            *where,
        )
    )


def _received_values(
    header: InstanceHeader, *, path: Path, calling_ae: str, peer: str, at: float | None
) -> dict[str, object]:
    """The columns of a newly received instance (no job yet)."""
    return {
        **{k: getattr(header, k) for k in _HEADER_FIELDS},
        "path": str(path),
        "calling_ae": calling_ae,
        "peer": peer,
        "received_at": time.time() if at is None else at,
        "job_id": None,
        "state": InstanceState.RECEIVED.value,
        "reason": None,
    }


def _fail_unfinished(db: Connection, job_ids: ColumnElement[bool], reason: str) -> None:
    """Fail the unfinished instances of the jobs ``job_ids`` selects, with ``reason``."""
    db.execute(
        update(I)
        .where(job_ids, I.c.state.in_(UNFINISHED))
        .values(state=InstanceState.FAILED, reason=reason)
    )


def _settle_old_jobs(db: Connection, job_ids: Collection[int], why: str) -> None:
    """After instances left these finished jobs: delete the empty ones, and mark ``done`` the
    ones whose remaining instances were all analysed or skipped."""
    now = time.time()
    for job_id in job_ids:
        left = {
            InstanceState(state)
            for state in db.scalars(select(I.c.state).where(I.c.job_id == job_id))
        }
        if not left:
            db.execute(delete(J).where(J.c.id == job_id))
        elif left <= {InstanceState.ANALYSED, InstanceState.SKIPPED}:
            db.execute(
                update(J)
                .where(J.c.id == job_id)
                .values(state=JobState.DONE, reason=why, updated_at=now)
            )


def new_owner() -> str:
    """A lease owner name, unique among processes and stores: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobStore:
    """The ``instances`` and ``jobs`` tables of ``database``; thread-safe."""

    def __init__(
        self,
        database: Database,
        *,
        study_quiet_seconds: float,
        max_attempts: int = 3,
        lease_seconds: float = 60.0,
        owner: str | None = None,
    ) -> None:
        self.database = database
        self.study_quiet_seconds = study_quiet_seconds
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.owner = new_owner() if owner is None else owner
        """Who this store's claims are leased to."""

    # Intake ------------------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        return self.instance(sop_instance_uid) is not None

    def instance(self, sop_instance_uid: str) -> Instance | None:
        with self.database.read() as db:
            row = db.execute(select(I).where(I.c.sop_instance_uid == sop_instance_uid)).first()
        return None if row is None else instance_of(row._mapping)

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
        values = _received_values(
            header, path=path, calling_ae=calling_ae, peer=peer, at=received_at
        )
        with self.database.write() as db:
            dialect_insert = pg_insert if db.dialect.name == "postgresql" else sqlite_insert
            statement = (
                dialect_insert(I)
                .values(values)
                .on_conflict_do_nothing()
                .returning(I.c.sop_instance_uid)
            )
            # the row it returns says it was inserted (psycopg's rowcount here is -1)
            return db.execute(statement).first() is not None

    def readmit(
        self, header: InstanceHeader, *, path: Path, calling_ae: str, peer: str
    ) -> AbandonedInstance | None:
        """A sender resent an abandoned instance (same study): record the new copy as received
        now, out of its old job. Returns what it was, or None when it is not abandoned."""
        values = _received_values(header, path=path, calling_ae=calling_ae, peer=peer, at=None)
        del values["sop_instance_uid"]
        with self.database.write() as db:
            row = db.execute(
                _abandoned_query(
                    I.c.sop_instance_uid == header.sop_instance_uid,
                    I.c.study_instance_uid == header.study_instance_uid,
                )
            ).first()
            if row is None:
                return None
            db.execute(
                update(I).where(I.c.sop_instance_uid == header.sop_instance_uid).values(values)
            )
            _settle_old_jobs(db, [int(row.job_id)], "an instance was resent: in a new job")
        return abandoned_of(row._mapping)

    def abandoned(
        self,
        *,
        sop_instance_uids: Sequence[str] = (),
        study_instance_uids: Sequence[str] = (),
        kinds: Collection[Abandoned] = tuple(Abandoned),
    ) -> list[AbandonedInstance]:
        """The abandoned instances, optionally only these UIDs, studies and kinds."""
        where = []
        if sop_instance_uids:
            where.append(I.c.sop_instance_uid.in_(sop_instance_uids))
        if study_instance_uids:
            where.append(I.c.study_instance_uid.in_(study_instance_uids))
        with self.database.read() as db:
            rows = db.execute(_abandoned_query(*where).order_by(I.c.received_at)).all()
        found = [abandoned_of(r._mapping) for r in rows]
        return [a for a in found if a.kind in kinds]

    def requeue(self, sop_instance_uids: Sequence[str]) -> list[AbandonedInstance]:
        """Put these instances, those of them still abandoned, back to ``received``."""
        if not sop_instance_uids:
            return []
        with self.database.write() as db:
            rows = db.execute(
                _abandoned_query(I.c.sop_instance_uid.in_(sop_instance_uids)).order_by(
                    I.c.received_at
                )
            ).all()
            picked = [r.sop_instance_uid for r in rows]
            if picked:
                db.execute(
                    update(I)
                    .where(I.c.sop_instance_uid.in_(picked))
                    .values(job_id=None, state=InstanceState.RECEIVED, reason=None)
                )
            old_jobs = {int(r.job_id) for r in rows}
            _settle_old_jobs(db, old_jobs, "re-queued instances are in a new job")
        return [abandoned_of(r._mapping) for r in rows]

    def known_paths(self) -> set[Path]:
        with self.database.read() as db:
            return {Path(p) for p in db.scalars(select(I.c.path))}

    # Grouping ----------------------------------------------------------------------------------

    def form_jobs(self, now: float | None = None) -> list[Job]:
        """Group the waiting instances of every quiet study into one new queued job each."""
        now = time.time() if now is None else now
        cutoff = now - self.study_quiet_seconds
        created: list[Job] = []
        with self.database.write() as db:
            studies = db.execute(
                select(I.c.study_instance_uid, func.min(I.c.calling_ae).label("calling_ae"))
                .where(I.c.job_id.is_(None))
                .group_by(I.c.study_instance_uid)
                .having(func.max(I.c.received_at) <= cutoff)
                .order_by(func.min(I.c.received_at))
            ).all()
            for study in studies:
                job_id = db.execute(
                    insert(J)
                    .values(
                        study_instance_uid=study.study_instance_uid,
                        state=JobState.QUEUED,
                        calling_ae=study.calling_ae,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(J.c.id)
                ).scalar_one()
                db.execute(
                    update(I)
                    .where(I.c.job_id.is_(None), I.c.study_instance_uid == study.study_instance_uid)
                    .values(job_id=job_id, state=InstanceState.QUEUED)
                )
                created.append(_job_row(db, job_id))
        return created

    # Work --------------------------------------------------------------------------------------

    def claim(self) -> Job | None:
        """Take the oldest queued job (expired leases swept back first): it becomes running,
        leased to ``owner`` for ``lease_seconds``, and its attempt count goes up."""
        self.sweep()
        now = time.time()
        with self.database.write() as db:
            job_id = db.scalar(
                select(J.c.id)
                .where(J.c.state == JobState.QUEUED)
                .order_by(J.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if job_id is None:
                return None
            db.execute(
                update(J)
                .where(J.c.id == job_id)
                .values(
                    state=JobState.RUNNING,
                    attempts=J.c.attempts + 1,
                    updated_at=now,
                    lease_owner=self.owner,
                    lease_expires=now + self.lease_seconds,
                )
            )
            return _job_row(db, job_id)

    def heartbeat(self, job_id: int) -> bool:
        """Renew the lease on a job this store holds; False when it no longer holds it (the
        lease expired and the job went back to the queue, or it is not running)."""
        with self.database.write() as db:
            renewed = db.execute(
                update(J)
                .where(_held(job_id, self.owner))
                .values(lease_expires=time.time() + self.lease_seconds)
            )
            return renewed.rowcount == 1

    def holder(self, job_id: int) -> tuple[str | None, float | None]:
        """Who holds a job's lease and until when (None, None: nobody)."""
        with self.database.read() as db:
            row = db.execute(
                select(J.c.lease_owner, J.c.lease_expires).where(J.c.id == job_id)
            ).first()
        return (None, None) if row is None else (row.lease_owner, row.lease_expires)

    def instances_of(self, job_id: int) -> list[Instance]:
        with self.database.read() as db:
            rows = db.execute(
                select(I)
                .where(I.c.job_id == job_id)
                .order_by(I.c.received_at, I.c.sop_instance_uid)
            ).all()
        return [instance_of(r._mapping) for r in rows]

    def finish_instance(
        self, sop_instance_uid: str, state: InstanceState, reason: str | None
    ) -> None:
        if not state.finished:
            raise ValueError(f"{state} is not a final instance state")
        with self.database.write() as db:
            db.execute(
                update(I)
                .where(I.c.sop_instance_uid == sop_instance_uid)
                .values(state=state, reason=reason)
            )

    def finish_job(self, job_id: int, state: JobState, reason: str | None = None) -> None:
        """Leave ``running`` for done, failed, waiting_for_pipeline (or queued: a release),
        the lease given up. ``failed`` also fails the job's unfinished instances.

        ``ValueError`` unless the job is running under this store's lease (or under none)."""
        with self.database.write() as db:
            ended = db.execute(
                update(J)
                .where(_held(job_id, self.owner, or_unleased=True))
                .values(
                    state=state,
                    reason=reason,
                    updated_at=time.time(),
                    lease_owner=None,
                    lease_expires=None,
                )
            )
            if ended.rowcount != 1:
                raise ValueError(f"job {job_id} is not running under this lease")
            if state is JobState.FAILED:
                _fail_unfinished(
                    db, I.c.job_id == job_id, f"job failed: {reason or 'no reason given'}"
                )

    def interrupted(self, job_id: int, reason: str) -> JobState | None:
        """A running job whose processing raised: queued again while it has attempts left,
        else failed with its unfinished instances. None: not running under this lease."""
        with self.database.write() as db:
            attempts = db.scalar(
                select(J.c.attempts).where(_held(job_id, self.owner, or_unleased=True))
            )
            if attempts is None:
                return None
            state = JobState.QUEUED if attempts < self.max_attempts else JobState.FAILED
            if state is JobState.FAILED:
                reason = f"{reason}; gave up after {attempts} attempts"
                _fail_unfinished(db, I.c.job_id == job_id, f"job failed: {reason}")
            db.execute(
                update(J)
                .where(J.c.id == job_id)
                .values(
                    state=state,
                    reason=reason,
                    updated_at=time.time(),
                    lease_owner=None,
                    lease_expires=None,
                )
            )
        return state

    def release(self, job_id: int) -> None:
        """Give a running job back to the queue unfinished (graceful shutdown)."""
        self.finish_job(job_id, JobState.QUEUED, "released at shutdown")

    def sweep(self, *, every_lease: bool = False) -> tuple[int, int]:
        """Running jobs whose lease expired (or that hold none: a node before leases; with
        ``every_lease``, all running jobs) go back to the queue, or fail with their
        unfinished instances once interrupted ``max_attempts`` times. Returns (requeued,
        failed)."""
        now = time.time()
        expired = J.c.state == JobState.RUNNING
        if not every_lease:
            expired = and_(expired, or_(J.c.lease_expires.is_(None), J.c.lease_expires < now))
        with self.database.write() as db:
            rows = db.execute(
                select(J.c.id, J.c.attempts).where(expired).with_for_update(skip_locked=True)
            ).all()
            spent = [r.id for r in rows if r.attempts >= self.max_attempts]
            again = [r.id for r in rows if r.attempts < self.max_attempts]
            gone = {"lease_owner": None, "lease_expires": None, "updated_at": now}
            if spent:
                reason = f"interrupted {self.max_attempts} times"
                _fail_unfinished(db, I.c.job_id.in_(spent), f"job {reason}")
                db.execute(
                    update(J)
                    .where(J.c.id.in_(spent))
                    .values(state=JobState.FAILED, reason=reason, **gone)
                )
            if again:
                db.execute(
                    update(J)
                    .where(J.c.id.in_(again))
                    .values(state=JobState.QUEUED, reason="interrupted; run again", **gone)
                )
        return len(again), len(spent)

    def recover(self) -> tuple[int, int]:
        """At start-up: on SQLite (one node owns the file) every running job was left by a
        dead process; on a shared database only those whose lease expired. Requeued, or
        failed when interrupted too often. Returns (requeued, failed)."""
        return self.sweep(every_lease=not self.database.shared)

    def requeue_waiting(self) -> int:
        """Put jobs that waited for a pipeline back in the queue (a pipeline is now available)."""
        with self.database.write() as db:
            return db.execute(
                update(J)
                .where(J.c.state == JobState.WAITING_FOR_PIPELINE)
                .values(state=JobState.QUEUED, reason=None, updated_at=time.time())
            ).rowcount

    # Inspection --------------------------------------------------------------------------------

    def jobs(self, study_instance_uid: str | None = None) -> list[Job]:
        query = select(*_JOB_COLUMNS).order_by(J.c.id)
        if study_instance_uid is not None:
            query = query.where(J.c.study_instance_uid == study_instance_uid)
        with self.database.read() as db:
            return [job_of(r._mapping) for r in db.execute(query)]

    def instances(self) -> list[Instance]:
        with self.database.read() as db:
            rows = db.execute(select(I).order_by(I.c.received_at)).all()
        return [instance_of(r._mapping) for r in rows]

    def job_counts(self) -> dict[JobState, int]:
        with self.database.read() as db:
            rows = db.execute(select(J.c.state, func.count()).group_by(J.c.state)).all()
        found = {JobState(state): int(n) for state, n in rows}
        return {s: found.get(s, 0) for s in JobState}

    def pending_instances(self) -> int:
        with self.database.read() as db:
            return int(
                db.scalar(select(func.count()).select_from(I).where(I.c.job_id.is_(None))) or 0
            )

    def close(self) -> None:
        """Nothing of its own to close: the caller closes the database."""


def _held(job_id: int, owner: str, *, or_unleased: bool = False) -> ColumnElement[bool]:
    """Job ``job_id`` is running under ``owner``'s lease (or, ``or_unleased``, under none)."""
    holder = J.c.lease_owner == owner
    if or_unleased:
        holder = or_(holder, J.c.lease_owner.is_(None))
    return and_(J.c.id == job_id, J.c.state == JobState.RUNNING, holder)


def _job_row(db: Connection, job_id: int) -> Job:
    return job_of(db.execute(select(*_JOB_COLUMNS).where(J.c.id == job_id)).one()._mapping)
