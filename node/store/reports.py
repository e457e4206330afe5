"""The read-only questions of health, metrics, ``shadowspot status`` and retention, asked of
the database in read transactions (SQLite: deferred, beside the running node).

``reading`` opens the database of ``[database] url`` for one look without creating or
upgrading anything (None: the SQLite file does not exist yet). A table that is not there yet
(that part of the node never ran, or a database before ``shadowspot migrate``) reads empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, RowMapping, Table, func, inspect, select

from node.store.database import Database, open_existing
from node.store.schema import deliveries as D
from node.store.schema import instances as I
from node.store.schema import jobs as J

_OPEN_JOB_STATES = ("queued", "running", "waiting_for_pipeline")
_STATE_TABLES = {"jobs": J, "deliveries": D}


@dataclass(frozen=True, slots=True, kw_only=True)
class RecentJob:
    """One recent study job, with its instances' and deliveries' states."""

    id: int
    study_instance_uid: str
    calling_ae: str
    state: str
    updated_at: float
    reason: str | None
    instances: dict[str, int]
    deliveries: dict[str, int]
    received_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    id: int
    destination: str
    study_instance_uid: str
    kind: str
    attempts: int
    last_error: str | None
    updated_at: float


@contextmanager
def reading(url: str | None, *, storage: Path) -> Iterator[Database | None]:
    """The database for one look (module docstring), closed afterwards."""
    database = open_existing(url, storage=storage)
    try:
        yield database
    finally:
        if database is not None:
            database.close()


def _has(db: Connection, table: Table) -> bool:
    return inspect(db).has_table(table.name)


def count_by_state(database: Database, table: str) -> dict[str, int]:
    """``state → rows`` of ``jobs`` or ``deliveries``; empty when the table is not there."""
    found = _STATE_TABLES.get(table)
    if found is None:
        raise ValueError(f"not a state table: {table}")
    with database.read() as db:
        if not _has(db, found):
            return {}
        rows = db.execute(select(found.c.state, func.count()).group_by(found.c.state))
        return {str(state): int(n) for state, n in rows}


def queue_depth(database: Database) -> int:
    """Instances waiting for their study to go quiet plus jobs not yet finished."""
    with database.read() as db:
        if not (_has(db, I) and _has(db, J)):
            return 0
        waiting = db.scalar(select(func.count()).select_from(I).where(I.c.job_id.is_(None)))
        open_jobs = db.scalar(
            select(func.count()).select_from(J).where(J.c.state.in_(_OPEN_JOB_STATES))
        )
    return int(waiting or 0) + int(open_jobs or 0)


def recent_jobs(database: Database, limit: int) -> list[RecentJob]:
    """The ``limit`` jobs changed last, newest first."""
    with database.read() as db:
        if not (_has(db, I) and _has(db, J)):
            return []
        with_deliveries = _has(db, D)
        jobs = db.execute(
            select(J).order_by(J.c.updated_at.desc(), J.c.id.desc()).limit(limit)
        ).all()
        return [_recent(db, job._mapping, with_deliveries) for job in jobs]


def _recent(db: Connection, row: RowMapping, with_deliveries: bool) -> RecentJob:
    states = db.execute(
        select(I.c.state, func.count()).where(I.c.job_id == row["id"]).group_by(I.c.state)
    )
    received = db.scalar(select(func.min(I.c.received_at)).where(I.c.job_id == row["id"]))
    deliveries: dict[str, int] = {}
    if with_deliveries:
        sent = db.execute(
            select(D.c.state, func.count())
            .where(D.c.study_instance_uid == row["study_instance_uid"])
            .group_by(D.c.state)
        )
        deliveries = {str(s): int(n) for s, n in sent}
    return RecentJob(
        id=int(row["id"]),
        study_instance_uid=str(row["study_instance_uid"]),
        calling_ae=str(row["calling_ae"]),
        state=str(row["state"]),
        updated_at=float(row["updated_at"]),
        reason=row["reason"],
        instances={str(s): int(n) for s, n in states},
        deliveries=deliveries,
        received_at=None if received is None else float(received),
    )


def dead_letters(database: Database, limit: int) -> list[DeadLetter]:
    """The ``limit`` dead deliveries changed last, newest first."""
    with database.read() as db:
        if not _has(db, D):
            return []
        rows = db.execute(
            select(
                D.c.id,
                D.c.destination,
                D.c.study_instance_uid,
                D.c.kind,
                D.c.attempts,
                D.c.last_error,
                D.c.updated_at,
            )
            .where(D.c.state == "dead")
            .order_by(D.c.updated_at.desc())
            .limit(limit)
        ).all()
    return [
        DeadLetter(
            id=int(r.id),
            destination=str(r.destination),
            study_instance_uid=str(r.study_instance_uid),
            kind=str(r.kind),
            attempts=int(r.attempts),
            last_error=r.last_error,
            updated_at=float(r.updated_at),
        )
        for r in rows
    ]


def paths_in_use(database: Database) -> tuple[set[Path], set[Path]]:
    """Spool files of unfinished instances, result files of unfinished deliveries (resolved)."""
    found: list[set[Path]] = []
    with database.read() as db:
        for table, states in ((I, ("received", "queued")), (D, ("pending", "sending"))):
            if not _has(db, table):  # that part of the node never ran: nothing in use
                found.append(set())
                continue
            paths = db.scalars(select(table.c.path).where(table.c.state.in_(states)))
            found.append({Path(str(p)).resolve() for p in paths})
    return found[0], found[1]
