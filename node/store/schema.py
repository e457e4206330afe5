"""The tables, as SQLAlchemy Core metadata: the schema at the newest migration (head).

Today's four tables, column for column as ``node/queue.py`` and ``node/deliveries.py`` create
them (their order too: ``INSERT INTO results VALUES (...)`` relies on it), plus what the
migrations added since:

- ``jobs``, ``instances`` (the study queue), ``results`` (the UIDs of each source instance's
  result objects), ``deliveries`` (result objects on their way to a destination);
- ``jobs.lease_owner``, ``jobs.lease_expires`` (0002): who holds a running job and until when;
  a job whose lease expired goes back to the queue.

Types keep SQLite's declarations (TEXT, INTEGER, REAL). On PostgreSQL a time is DOUBLE
PRECISION (its REAL is 4 bytes: a Unix time would lose minutes) and a row id BIGINT.
Constraints stay unnamed, as in the SQLite scripts; PostgreSQL names them itself
(``deliveries_sop_instance_uid_destination_key``, ``instances_job_id_fkey``, ``<table>_pkey``).
A migration's tests compare the upgraded database with this module (no difference allowed),
so a change here without its migration fails them.
"""

from __future__ import annotations

from sqlalchemy import (
    DOUBLE_PRECISION,
    REAL,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeEngine

Seconds: TypeEngine[float] = REAL[float]().with_variant(DOUBLE_PRECISION(), "postgresql")
"""A Unix time in seconds (``time.time()``)."""
RowId: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")
"""A generated row id: SQLite's ``INTEGER PRIMARY KEY`` (the rowid itself), BIGINT elsewhere."""

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("calling_ae", Text, nullable=False),
    Column("created_at", Seconds, nullable=False),
    Column("updated_at", Seconds, nullable=False),
    Column("reason", Text),
    Column("lease_owner", Text),
    Column("lease_expires", Seconds),
    Index("jobs_state", "state", "id"),
    Index("jobs_study", "study_instance_uid"),
    Index("jobs_lease", "state", "lease_expires"),
    sqlite_autoincrement=True,
)

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", Text, primary_key=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("series_instance_uid", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("transfer_syntax_uid", Text, nullable=False),
    Column("modality", Text, nullable=False),
    Column("body_part_examined", Text, nullable=False),
    Column("view_position", Text, nullable=False),
    Column("number_of_frames", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("peer", Text, nullable=False),
    Column("received_at", Seconds, nullable=False),
    Column("job_id", RowId, ForeignKey("jobs.id")),
    Column("state", Text, nullable=False),
    Column("reason", Text),
    Index("instances_pending", "job_id", "study_instance_uid"),
)

results = Table(
    "results",
    metadata,
    Column("source_sop_instance_uid", Text, primary_key=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("seg_series_uid", Text, nullable=False),
    Column("seg_instance_uid", Text, nullable=False),
    Column("sr_series_uid", Text, nullable=False),
    Column("sr_instance_uid", Text, nullable=False),
    Column("pr_series_uid", Text, nullable=False),
    Column("pr_instance_uid", Text, nullable=False),
    Column("sc_series_uid", Text, nullable=False),
    Column("sc_instance_uid", Text, nullable=False),
    Column("created_at", Seconds, nullable=False),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("destination", Text, nullable=False),
    Column("study_instance_uid", Text, nullable=False),
    Column("sop_instance_uid", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("transfer_syntax_uid", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("next_attempt_at", Seconds, nullable=False),
    Column("created_at", Seconds, nullable=False),
    Column("updated_at", Seconds, nullable=False),
    Column("delivered_at", Seconds),
    UniqueConstraint("sop_instance_uid", "destination"),
    Index("deliveries_due", "destination", "state", "next_attempt_at"),
    sqlite_autoincrement=True,
)
