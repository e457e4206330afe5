"""``shadowspot status``: what the node is doing, read from the node's database
(``[database] url``, by default ``<storage>/shadowspot.db``).

Reads in read transactions (a running node keeps writing; on SQLite WAL lets us read beside it) and
prints the queue depth, jobs and deliveries by state, the most recent studies with their
outcome and latency (first instance received → job finished), and the dead-letter deliveries
that need a person. ``--json`` prints the same as one JSON object for scripts.

Only UIDs, AE titles, states, counts and times are shown: never patient data.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from node.config import Config
from node.errors import NodeError
from node.store import reports
from node.store.engine import DB_NAME
from node.store.reports import DeadLetter

__all__ = ["DeadLetter", "NodeStatus", "StudyLine", "format_status", "read_status", "run"]


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
class NodeStatus:
    database: str
    queue_depth: int
    jobs: dict[str, int]
    deliveries: dict[str, int]
    recent_studies: list[StudyLine]
    dead_letters: list[DeadLetter]


_FINISHED_JOB_STATES = ("done", "failed")


def read_status(db_path: Path, *, limit: int = 10, url: str | None = None) -> NodeStatus:
    """Everything ``shadowspot status`` shows, from ``url`` (None: the SQLite file
    ``db_path``); raises NodeError if there is no database or it cannot be read."""
    with reports.reading(url, storage=db_path.parent) as database:
        if database is None:
            raise NodeError(f"no queue database at {db_path}: has the node run with this storage?")
        return NodeStatus(
            database=str(db_path) if url is None else database.describe(),
            queue_depth=reports.queue_depth(database),
            jobs=reports.count_by_state(database, "jobs"),
            deliveries=reports.count_by_state(database, "deliveries"),
            recent_studies=[_line(job) for job in reports.recent_jobs(database, limit)],
            dead_letters=reports.dead_letters(database, limit),
        )


def _line(job: reports.RecentJob) -> StudyLine:
    finished = job.updated_at if job.state in _FINISHED_JOB_STATES else None
    received = job.received_at
    latency = finished - received if finished and received is not None else None
    return StudyLine(
        job_id=job.id,
        study_instance_uid=job.study_instance_uid,
        calling_ae=job.calling_ae,
        state=job.state,
        instances=job.instances,
        deliveries=job.deliveries,
        received_at=received,
        finished_at=finished,
        latency_seconds=round(latency, 1) if latency is not None else None,
        reason=job.reason,
    )


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
    status = read_status(
        config.node.storage / DB_NAME, limit=args.limit, url=config.database.url_or_default
    )
    if args.json:
        print(json.dumps(asdict(status), indent=2))
    else:
        print(format_status(status))
    return 1 if status.dead_letters else 0
