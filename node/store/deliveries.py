"""The outbound queue's SQL: ``results`` and ``deliveries``, as typed rows (``node/deliveries.py``
tells the life cycle; this module is its statements).

``claim_due`` takes the due rows with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (SQLite: the
one writer), so no two exporters send the same row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, RowMapping, case, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from node.encode.common import ObjectUIDs, ResultUIDs
from node.store.database import Database
from node.store.schema import deliveries as D
from node.store.schema import results as R

_KINDS = ("seg", "sr", "pr", "sc")


class DeliveryState(StrEnum):
    """Where a delivery is in its life (see ``node/deliveries.py``)."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One result object on its way to one destination."""

    id: int
    destination: str
    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    kind: str
    path: Path
    state: DeliveryState
    attempts: int
    last_error: str | None
    next_attempt_at: float
    created_at: float
    updated_at: float
    delivered_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewDelivery:
    """What ``enqueue`` needs to know about one written result object."""

    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    kind: str
    path: Path


def _delivery(row: RowMapping) -> Delivery:
    values = dict(row)
    values["path"] = Path(values["path"])
    values["state"] = DeliveryState(values["state"])
    return Delivery(**values)


def _insert(db: Connection) -> Any:
    """The dialect's INSERT, which has ``ON CONFLICT`` (both backends spell it alike)."""
    return pg_insert if db.dialect.name == "postgresql" else sqlite_insert


def _uids(row: RowMapping) -> ResultUIDs:
    pairs = {
        kind: ObjectUIDs(
            series_instance_uid=row[f"{kind}_series_uid"],
            sop_instance_uid=row[f"{kind}_instance_uid"],
        )
        for kind in _KINDS
    }
    return ResultUIDs(**pairs)


class DeliveryTables:
    """The ``results`` and ``deliveries`` tables of ``database``; thread-safe."""

    def __init__(self, database: Database, *, retry_schedule_seconds: Sequence[float]) -> None:
        self.database = database
        self.retry_schedule = tuple(retry_schedule_seconds)

    # Result UIDs ------------------------------------------------------------------------------

    def result_uids(self, source_sop_instance_uid: str, study_instance_uid: str) -> ResultUIDs:
        """The UIDs of the results of a source instance: the stored ones, or new ones stored
        now. Two callers racing for the same instance get the same UIDs."""
        fresh = ResultUIDs.new()
        values: dict[str, object] = {
            "source_sop_instance_uid": source_sop_instance_uid,
            "study_instance_uid": study_instance_uid,
            "created_at": time.time(),
        }
        for kind in _KINDS:
            objects: ObjectUIDs = getattr(fresh, kind)
            values[f"{kind}_series_uid"] = objects.series_instance_uid
            values[f"{kind}_instance_uid"] = objects.sop_instance_uid
        with self.database.write() as db:
            db.execute(_insert(db)(R).values(values).on_conflict_do_nothing())
            row = db.execute(
                select(R).where(R.c.source_sop_instance_uid == source_sop_instance_uid)
            ).one()
        return _uids(row._mapping)

    # Deliveries -------------------------------------------------------------------------------

    def enqueue(self, destination: str, items: Sequence[NewDelivery]) -> list[int]:
        """Add deliveries (pending, due now). An object already queued for the destination is
        not queued twice: its row is re-armed (pending, due now) unless already delivered, and
        its file path updated. Returns the ids of the rows."""
        now = time.time()
        ids: list[int] = []
        with self.database.write() as db:
            for item in items:
                statement = _insert(db)(D).values(
                    destination=destination,
                    study_instance_uid=item.study_instance_uid,
                    sop_instance_uid=item.sop_instance_uid,
                    sop_class_uid=item.sop_class_uid,
                    transfer_syntax_uid=item.transfer_syntax_uid,
                    kind=item.kind,
                    path=str(item.path),
                    state=DeliveryState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
                excluded = statement.excluded
                delivered = D.c.state == DeliveryState.DELIVERED.value
                statement = statement.on_conflict_do_update(
                    index_elements=[D.c.sop_instance_uid, D.c.destination],
                    set_={
                        "path": excluded.path,
                        "transfer_syntax_uid": excluded.transfer_syntax_uid,
                        "state": case((delivered, D.c.state), else_=DeliveryState.PENDING.value),
                        "next_attempt_at": excluded.next_attempt_at,
                        "updated_at": excluded.updated_at,
                    },
                )
                db.execute(statement)
                ids.append(
                    int(
                        db.execute(
                            select(D.c.id).where(
                                D.c.sop_instance_uid == item.sop_instance_uid,
                                D.c.destination == destination,
                            )
                        ).scalar_one()
                    )
                )
        return ids

    def claim_due(self, destination: str, now: float | None = None) -> list[Delivery]:
        """Mark every pending delivery of ``destination`` that is due as ``sending`` and return
        them, oldest first. Claiming is atomic: no two exporters send the same row."""
        now = time.time() if now is None else now
        with self.database.write() as db:
            rows = db.execute(
                select(D)
                .where(
                    D.c.destination == destination,
                    D.c.state == DeliveryState.PENDING.value,
                    D.c.next_attempt_at <= now,
                )
                .order_by(D.c.id)
                .with_for_update(skip_locked=True)
            ).all()
            picked = [r.id for r in rows]
            if picked:
                db.execute(
                    update(D)
                    .where(D.c.id.in_(picked))
                    .values(state=DeliveryState.SENDING.value, updated_at=now)
                )
        return [_delivery(r._mapping) for r in rows]

    def mark_delivered(self, delivery_id: int) -> None:
        now = time.time()
        with self.database.write() as db:
            db.execute(
                update(D)
                .where(D.c.id == delivery_id)
                .values(
                    state=DeliveryState.DELIVERED.value,
                    attempts=D.c.attempts + 1,
                    last_error=None,
                    delivered_at=now,
                    updated_at=now,
                )
            )

    def mark_failed(self, delivery_id: int, error: str, *, retryable: bool) -> DeliveryState:
        """Record a failed attempt: back to pending after the schedule's next wait, or dead
        when not retryable or the schedule is used up. Returns the new state."""
        now = time.time()
        with self.database.write() as db:
            attempts = int(
                db.execute(select(D.c.attempts).where(D.c.id == delivery_id)).scalar_one()
            )
            attempts += 1
            if retryable and attempts <= len(self.retry_schedule):
                state, due = DeliveryState.PENDING, now + self.retry_schedule[attempts - 1]
            else:
                state, due = DeliveryState.DEAD, now
            db.execute(
                update(D)
                .where(D.c.id == delivery_id)
                .values(
                    state=state.value,
                    attempts=attempts,
                    last_error=error[:2000],
                    next_attempt_at=due,
                    updated_at=now,
                )
            )
        return state

    def recover(self) -> int:
        """At start-up: deliveries a dead process left ``sending`` are pending again (due now).
        The object may have arrived; sending it again is harmless because the PACS keys it by
        its SOP Instance UID, which never changes.

        Only on SQLite, which one node owns: on a shared database another node's exporter
        may be sending them (deliveries have no leases yet), so none is touched."""
        if self.database.shared:
            return 0
        now = time.time()
        with self.database.write() as db:
            return db.execute(
                update(D)
                .where(D.c.state == DeliveryState.SENDING.value)
                .values(state=DeliveryState.PENDING.value, next_attempt_at=now, updated_at=now)
            ).rowcount

    def retry(
        self,
        ids: Sequence[int] = (),
        *,
        states: Sequence[DeliveryState] = (DeliveryState.DEAD,),
        study_instance_uids: Sequence[str] = (),
    ) -> list[int]:
        """Re-arm deliveries for sending now, with a fresh retry schedule: the given ids (any
        state but delivered and sending), or else every delivery in ``states``; with
        ``study_instance_uids``, only those of these studies."""
        now = time.time()
        if ids:
            where = [
                D.c.id.in_(ids),
                D.c.state.in_([DeliveryState.PENDING.value, DeliveryState.DEAD.value]),
            ]
        else:
            where = [D.c.state.in_([s.value for s in states])]
        if study_instance_uids:
            where.append(D.c.study_instance_uid.in_(study_instance_uids))
        with self.database.write() as db:
            picked = [int(i) for i in db.scalars(select(D.c.id).where(*where))]
            if picked:
                db.execute(
                    update(D)
                    .where(D.c.id.in_(picked))
                    .values(
                        state=DeliveryState.PENDING.value,
                        attempts=0,
                        next_attempt_at=now,
                        updated_at=now,
                    )
                )
        return picked

    def deliveries(
        self, *, state: DeliveryState | None = None, destination: str | None = None
    ) -> list[Delivery]:
        query = select(D).order_by(D.c.id)
        if state is not None:
            query = query.where(D.c.state == state.value)
        if destination is not None:
            query = query.where(D.c.destination == destination)
        with self.database.read() as db:
            return [_delivery(r._mapping) for r in db.execute(query)]

    def next_due(self, destination: str) -> float | None:
        """When the next pending delivery of ``destination`` is due (None: nothing pending)."""
        with self.database.read() as db:
            due = db.scalar(
                select(func.min(D.c.next_attempt_at)).where(
                    D.c.destination == destination, D.c.state == DeliveryState.PENDING.value
                )
            )
        return None if due is None else float(due)

    def counts(self) -> dict[DeliveryState, int]:
        with self.database.read() as db:
            rows = db.execute(select(D.c.state, func.count()).group_by(D.c.state)).all()
        return {DeliveryState(state): int(n) for state, n in rows}

    def close(self) -> None:
        """Nothing of its own to close: the caller closes the database."""
