"""The queue's typed rows: instance and job states, what intake learnt of an instance, a job.

``node/store/jobs.py`` reads and writes them; ``node/queue.py`` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy import RowMapping


class JobState(StrEnum):
    """Where a study job is in its life (see ``node/queue.py``)."""

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
    """Why an instance will not be analysed unless someone re-queues it."""

    FAILED = "failed"
    """Its processing failed (``reason`` says why)."""
    STUCK = "stuck"
    """Unfinished, in a job that is over (done or failed) or gone."""


UNFINISHED = (InstanceState.RECEIVED, InstanceState.QUEUED)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class AbandonedInstance:
    """An instance ``requeue`` can take: failed, or stuck in a job that is over."""

    instance: Instance
    kind: Abandoned
    job_state: JobState | None
    """The state of its old job (None: the job no longer exists)."""


_HEADER_FIELDS = tuple(InstanceHeader.__dataclass_fields__)


def instance_of(row: RowMapping) -> Instance:
    return Instance(
        header=InstanceHeader(**{k: row[k] for k in _HEADER_FIELDS}),
        path=Path(row["path"]),
        calling_ae=row["calling_ae"],
        peer=row["peer"],
        received_at=float(row["received_at"]),
        job_id=row["job_id"],
        state=InstanceState(row["state"]),
        reason=row["reason"],
    )


def job_of(row: RowMapping) -> Job:
    values = {name: row[name] for name in Job.__dataclass_fields__}
    return Job(**{**values, "state": JobState(row["state"])})


def abandoned_of(row: RowMapping) -> AbandonedInstance:
    instance = instance_of(row)
    failed = instance.state is InstanceState.FAILED
    return AbandonedInstance(
        instance=instance,
        kind=Abandoned.FAILED if failed else Abandoned.STUCK,
        job_state=None if row["job_state"] is None else JobState(row["job_state"]),
    )
