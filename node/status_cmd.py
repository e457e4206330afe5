"""``shadowspot status``: what the node is doing, read from ``<storage>/shadowspot.db``.

Opens the database read-only (a running node keeps writing; WAL lets us read beside it) and
prints the queue depth, jobs and deliveries by state, the most recent studies with their
outcome and latency (first instance received → job finished), and the dead-letter deliveries
that need a person. ``--json`` prints the same as one JSON object for scripts.

Only UIDs, AE titles, states, counts and times are shown: never patient data.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from node import metrics
from node.config import Config
from node.db import DB_NAME
from node.errors import NodeError


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyLine:
    """One recent study job."""

    job_id: int
    study_instance_uid: str
    calling_ae: str
    state: str
    instances: dict[str, int]
    """Instance states within the job (analysed, skipped, failed, queued)."""
    deliveries: dict[str, int]
    """Delivery states of the study's result objects."""
    received_at: float | None
    finished_at: float | None
    latency_seconds: float | None
    reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    id: int
    destination: str
    study_instance_uid: str
    kind: str
    attempts: int
    last_error: str | None
    updated_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStatus:
    database: str
    queue_depth: int
    jobs: dict[str, int]
    deliveries: dict[str, int]
    recent_studies: list[StudyLine]
    dead_letters: list[DeadLetter]


_FINISHED_JOB_STATES = ("done", "failed")


def read_status(db_path: Path, *, limit: int = 10) -> NodeStatus:
    """Everything ``shadowspot status`` shows; raises NodeError if there is no database."""
    connection = metrics.open_readonly(db_path)
    if connection is None:
        raise NodeError(f"no queue database at {db_path}: has the node run with this storage?")
    connection.row_factory = sqlite3.Row
    try:
        return NodeStatus(
            database=str(db_path),
            queue_depth=metrics.queue_depth(connection),
            jobs=metrics.count_by_state(connection, "jobs"),
            deliveries=metrics.count_by_state(connection, "deliveries"),
            recent_studies=_recent_studies(connection, limit),
            dead_letters=_dead_letters(connection, limit),
        )
    except sqlite3.Error as exc:
        raise NodeError(f"cannot read {db_path}: {exc}") from exc
    finally:
        connection.close()


def _has_table(connection: sqlite3.Connection, table: str) -> bool:
    row = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return row is not None


def _recent_studies(connection: sqlite3.Connection, limit: int) -> list[StudyLine]:
    if not _has_table(connection, "jobs"):
        return []
    jobs = connection.execute(
        "SELECT id, study_instance_uid, calling_ae, state, updated_at, reason FROM jobs "
        "ORDER BY updated_at DESC, id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    with_deliveries = _has_table(connection, "deliveries")
    lines = []
    for job in jobs:
        instances = {
            str(r["state"]): int(r["n"])
            for r in connection.execute(
                "SELECT state, COUNT(*) AS n FROM instances WHERE job_id = ? GROUP BY state",
                (job["id"],),
            )
        }
        received = connection.execute(
            "SELECT MIN(received_at) FROM instances WHERE job_id = ?", (job["id"],)
        ).fetchone()[0]
        deliveries: dict[str, int] = {}
        if with_deliveries:
            deliveries = {
                str(r["state"]): int(r["n"])
                for r in connection.execute(
                    "SELECT state, COUNT(*) AS n FROM deliveries WHERE study_instance_uid = ? "
                    "GROUP BY state",
                    (job["study_instance_uid"],),
                )
            }
        finished = float(job["updated_at"]) if job["state"] in _FINISHED_JOB_STATES else None
        latency = finished - float(received) if finished and received is not None else None
        lines.append(
            StudyLine(
                job_id=int(job["id"]),
                study_instance_uid=str(job["study_instance_uid"]),
                calling_ae=str(job["calling_ae"]),
                state=str(job["state"]),
                instances=instances,
                deliveries=deliveries,
                received_at=float(received) if received is not None else None,
                finished_at=finished,
                latency_seconds=round(latency, 1) if latency is not None else None,
                reason=job["reason"],
            )
        )
    return lines


def _dead_letters(connection: sqlite3.Connection, limit: int) -> list[DeadLetter]:
    if not _has_table(connection, "deliveries"):
        return []
    rows = connection.execute(
        "SELECT id, destination, study_instance_uid, kind, attempts, last_error, updated_at "
        "FROM deliveries WHERE state = 'dead' ORDER BY updated_at DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [DeadLetter(**dict(r)) for r in rows]


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {n}" for state, n in sorted(counts.items())) or "none"


def format_status(status: NodeStatus) -> str:
    """The human-readable report."""
    out = [
        f"database: {status.database}",
        f"queue depth: {status.queue_depth}",
        f"jobs: {_counts(status.jobs)}",
        f"deliveries: {_counts(status.deliveries)}",
        "",
        f"recent studies ({len(status.recent_studies)}):",
    ]
    if status.recent_studies:
        out.append(
            f"  {'job':>5}  {'state':<20} {'latency':>8}  {'finished':<19}  "
            "caller            study / instances / deliveries"
        )
    for s in status.recent_studies:
        latency = f"{s.latency_seconds:.1f}s" if s.latency_seconds is not None else "-"
        out.append(
            f"  {s.job_id:>5}  {s.state:<20} {latency:>8}  {_when(s.finished_at):<19}  "
            f"{s.calling_ae:<16}  {s.study_instance_uid}"
        )
        out.append(
            f"  {'':>5}  instances: {_counts(s.instances)}; deliveries: {_counts(s.deliveries)}"
            + (f"; reason: {s.reason}" if s.reason else "")
        )
    out += ["", f"dead-letter deliveries ({len(status.dead_letters)}):"]
    for d in status.dead_letters:
        out.append(
            f"  #{d.id} {d.kind} → {d.destination}, study {d.study_instance_uid}, "
            f"{d.attempts} attempt(s), last {_when(d.updated_at)}: {d.last_error or '-'}"
        )
    if not status.dead_letters:
        out.append("  none")
    return "\n".join(out)


def run(args: argparse.Namespace, config: Config) -> int:
    """``shadowspot status [--limit N] [--json]``; exits 1 while dead letters exist."""
    status = read_status(config.node.storage / DB_NAME, limit=args.limit)
    if args.json:
        print(json.dumps(asdict(status), indent=2))
    else:
        print(format_status(status))
    return 1 if status.dead_letters else 0
