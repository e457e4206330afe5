"""The outbound queue: ``results`` and ``deliveries`` in ``<storage>/shadowspot.db``.

``node/queue.py`` owns ``instances`` and ``jobs`` in the same database; each module opens its
own connection and creates its own tables idempotently.

- ``results``: the UIDs of the objects built for one analysed source instance, generated once
  (``result_uids``) and reused on every retry, so re-analysing never makes a duplicate.
- ``deliveries``: one row per result object per destination (unique on both), with its state,
  attempts, last error and the time of the next attempt.

Delivery life cycle (``DeliveryState``)::

    pending ──claim──▶ sending ──▶ delivered
       ▲                  │
       │    retryable,    ├──────▶ pending (attempts+1, next attempt after the schedule's wait)
       │    schedule left │
       │                  └──────▶ dead     not retryable, or the schedule is used up
       └──── retry (``shadowspot retry``) / recover() at start-up (sending → pending)
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from node.db import SqliteStore
from node.encode.common import ObjectUIDs, ResultUIDs

_SCHEMA = """
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


class DeliveryState(StrEnum):
    """Where a delivery is in its life (see the module docstring)."""

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


def _delivery(row: sqlite3.Row) -> Delivery:
    values = dict(row)
    values["path"] = Path(values["path"])
    values["state"] = DeliveryState(values["state"])
    return Delivery(**values)


class DeliveryStore(SqliteStore):
    """The ``results`` and ``deliveries`` tables. Thread-safe: one connection behind a lock."""

    def __init__(self, storage: Path, *, retry_schedule_seconds: Sequence[float]) -> None:
        super().__init__(storage, _SCHEMA)
        self.retry_schedule = tuple(retry_schedule_seconds)

    # Result UIDs ------------------------------------------------------------------------------

    def result_uids(self, source_sop_instance_uid: str, study_instance_uid: str) -> ResultUIDs:
        """The UIDs of the results of a source instance: the stored ones, or new ones stored
        now. Two callers racing for the same instance get the same UIDs."""
        fresh = ResultUIDs.new()
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    source_sop_instance_uid,
                    study_instance_uid,
                    *_pair(fresh.seg),
                    *_pair(fresh.sr),
                    *_pair(fresh.pr),
                    *_pair(fresh.sc),
                    time.time(),
                ),
            )
            row = db.execute(
                "SELECT * FROM results WHERE source_sop_instance_uid = ?",
                (source_sop_instance_uid,),
            ).fetchone()
        return ResultUIDs(
            seg=ObjectUIDs(
                series_instance_uid=row["seg_series_uid"], sop_instance_uid=row["seg_instance_uid"]
            ),
            sr=ObjectUIDs(
                series_instance_uid=row["sr_series_uid"], sop_instance_uid=row["sr_instance_uid"]
            ),
            pr=ObjectUIDs(
                series_instance_uid=row["pr_series_uid"], sop_instance_uid=row["pr_instance_uid"]
            ),
            sc=ObjectUIDs(
                series_instance_uid=row["sc_series_uid"], sop_instance_uid=row["sc_instance_uid"]
            ),
        )

    # Deliveries -------------------------------------------------------------------------------

    def enqueue(self, destination: str, items: Sequence[NewDelivery]) -> list[int]:
        """Add deliveries (pending, due now). An object already queued for the destination is
        not queued twice: its row is re-armed (pending, due now) unless already delivered, and
        its file path updated. Returns the ids of the rows."""
        now = time.time()
        ids: list[int] = []
        with self._transaction() as db:
            for item in items:
                db.execute(
                    """INSERT INTO deliveries (destination, study_instance_uid, sop_instance_uid,
                        sop_class_uid, transfer_syntax_uid, kind, path, state, attempts,
                        next_attempt_at, created_at, updated_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)
                    ON CONFLICT (sop_instance_uid, destination) DO UPDATE SET
                        path = excluded.path, transfer_syntax_uid = excluded.transfer_syntax_uid,
                        state = CASE WHEN state = 'delivered' THEN state ELSE 'pending' END,
                        next_attempt_at = excluded.next_attempt_at,
                        updated_at = excluded.updated_at""",
                    (
                        destination,
                        item.study_instance_uid,
                        item.sop_instance_uid,
                        item.sop_class_uid,
                        item.transfer_syntax_uid,
                        item.kind,
                        str(item.path),
                        DeliveryState.PENDING.value,
                        now,
                        now,
                        now,
                    ),
                )
                row = db.execute(
                    "SELECT id FROM deliveries WHERE sop_instance_uid = ? AND destination = ?",
                    (item.sop_instance_uid, destination),
                ).fetchone()
                ids.append(int(row["id"]))
        return ids

    def claim_due(self, destination: str, now: float | None = None) -> list[Delivery]:
        """Mark every pending delivery of ``destination`` that is due as ``sending`` and return
        them, oldest first. Claiming is atomic: no two exporters send the same row."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            rows = db.execute(
                """SELECT * FROM deliveries WHERE destination = ? AND state = 'pending'
                   AND next_attempt_at <= ? ORDER BY id""",
                (destination, now),
            ).fetchall()
            db.executemany(
                "UPDATE deliveries SET state = 'sending', updated_at = ? WHERE id = ?",
                [(now, r["id"]) for r in rows],
            )
        return [_delivery(r) for r in rows]

    def mark_delivered(self, delivery_id: int) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                """UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,
                   last_error = NULL, delivered_at = ?, updated_at = ? WHERE id = ?""",
                (now, now, delivery_id),
            )

    def mark_failed(self, delivery_id: int, error: str, *, retryable: bool) -> DeliveryState:
        """Record a failed attempt: back to pending after the schedule's next wait, or dead
        when not retryable or the schedule is used up. Returns the new state."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT attempts FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
            attempts = int(row["attempts"]) + 1
            waits_left = attempts <= len(self.retry_schedule)
            if retryable and waits_left:
                state, due = DeliveryState.PENDING, now + self.retry_schedule[attempts - 1]
            else:
                state, due = DeliveryState.DEAD, now
            db.execute(
                """UPDATE deliveries SET state = ?, attempts = ?, last_error = ?,
                   next_attempt_at = ?, updated_at = ? WHERE id = ?""",
                (state.value, attempts, error[:2000], due, now, delivery_id),
            )
        return state

    def recover(self) -> int:
        """At start-up: deliveries a dead process left ``sending`` are pending again (due now).
        The object may have arrived; sending it again is harmless because the PACS keys it by
        its SOP Instance UID, which never changes."""
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                """UPDATE deliveries SET state = 'pending', next_attempt_at = ?, updated_at = ?
                   WHERE state = 'sending'""",
                (now, now),
            )
        return cur.rowcount

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
        with self._transaction() as db:
            if ids:
                marks = ",".join("?" * len(ids))
                where = f"id IN ({marks}) AND state IN ('pending', 'dead')"
                params: list[object] = list(ids)
            else:
                marks = ",".join("?" * len(states))
                where, params = f"state IN ({marks})", [s.value for s in states]
            if study_instance_uids:
                where += f" AND study_instance_uid IN ({','.join('?' * len(study_instance_uids))})"
                params += list(study_instance_uids)
            rows = db.execute(f"SELECT id FROM deliveries WHERE {where}", params).fetchall()
            picked = [int(r["id"]) for r in rows]
            db.executemany(
                """UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,
                   updated_at = ? WHERE id = ?""",
                [(now, now, i) for i in picked],
            )
        return picked

    def deliveries(
        self, *, state: DeliveryState | None = None, destination: str | None = None
    ) -> list[Delivery]:
        sql, params = "SELECT * FROM deliveries WHERE 1 = 1", list[object]()
        if state is not None:
            sql, params = sql + " AND state = ?", [*params, state.value]
        if destination is not None:
            sql, params = sql + " AND destination = ?", [*params, destination]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", params).fetchall()
        return [_delivery(r) for r in rows]

    def next_due(self, destination: str) -> float | None:
        """When the next pending delivery of ``destination`` is due (None: nothing pending)."""
        with self._lock:
            row = self._db.execute(
                """SELECT MIN(next_attempt_at) AS due FROM deliveries
                   WHERE destination = ? AND state = 'pending'""",
                (destination,),
            ).fetchone()
        return None if row["due"] is None else float(row["due"])

    def counts(self) -> dict[DeliveryState, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state"
            ).fetchall()
        return {DeliveryState(r["state"]): int(r["n"]) for r in rows}


def _pair(uids: ObjectUIDs) -> tuple[str, str]:
    return (uids.series_instance_uid, uids.sop_instance_uid)
