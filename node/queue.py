"""The persistent job queue, in the node's database (``[database] url``: the SQLite file
``<storage>/shadowspot.db`` by default, or PostgreSQL); its statements are in
``node/store/jobs.py``, which also defines the rows and states re-exported here.

Two tables (``node/deliveries.py`` has ``results`` and ``deliveries``):

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

Crash safety: every state change is one committed transaction. A claimed job is leased to its
claimer for ``[database] lease_seconds``, renewed by the worker's heartbeat; a job whose lease
expired (its worker or node died) is put back to ``queued`` at the next claim of any worker,
no restart needed. ``recover()`` at start-up does the same at once (on SQLite, which one node
owns, for every running job). Instances already finished inside such a job keep their final
state, so a re-run only processes what was not finished.

Abandoned instances (``Abandoned``): ``failed`` ones, and ``stuck`` ones (received or queued,
but in a job that is done or failed, or that no longer exists). ``requeue`` (``shadowspot retry
--instances``) and ``readmit`` (the sender resent one) take them out of their old job and back
to ``received``: the worker groups them into a new job with its full ``max_attempts``. The old
job then ends ``done`` if what it still holds finished well, and is deleted if it holds
nothing. Both only write the database, so they work the same whether a node runs or not.
"""

from __future__ import annotations

from pathlib import Path

from node.store.database import Database, Schema, open_database
from node.store.jobs import (
    Abandoned,
    AbandonedInstance,
    Instance,
    InstanceHeader,
    InstanceState,
    Job,
    JobState,
    JobStore,
)

__all__ = [
    "Abandoned",
    "AbandonedInstance",
    "Instance",
    "InstanceHeader",
    "InstanceState",
    "Job",
    "JobState",
    "Queue",
]


class Queue(JobStore):
    """The ``instances`` and ``jobs`` tables. Thread-safe.

    On ``database`` (shared with the node's other stores, closed by its opener), else on
    ``url`` (None: the SQLite file in ``storage``), opened here (SQLite: upgraded; PostgreSQL:
    checked) and closed by ``close()``."""

    def __init__(
        self,
        storage: Path,
        *,
        study_quiet_seconds: float,
        max_attempts: int = 3,
        database: Database | None = None,
        url: str | None = None,
        lease_seconds: float = 60.0,
    ) -> None:
        self._owns_database = database is None
        if database is None:
            database = open_database(url, storage=storage, schema=Schema.AUTO)
        super().__init__(
            database,
            study_quiet_seconds=study_quiet_seconds,
            max_attempts=max_attempts,
            lease_seconds=lease_seconds,
        )

    def close(self) -> None:
        if self._owns_database:
            self.database.close()
