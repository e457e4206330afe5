"""Baseline: the four tables as node/queue.py and node/deliveries.py create them (2026-12).

Revision ID: 0001
Revises: (none)

A database written before migrations existed already has these tables (its ``CREATE TABLE
IF NOT EXISTS`` scripts ran) and no ``alembic_version``: ``node.store.migrate`` checks that
their columns are these and runs this revision, whose ``IF NOT EXISTS`` keeps what is there
and creates only what is missing. The shape is written out here, not taken from
``node.store.schema``, so that later changes there never rewrite history.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SECONDS: sa.types.TypeEngine[float] = sa.REAL[float]().with_variant(
    sa.DOUBLE_PRECISION(), "postgresql"
)
_ROW_ID: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TABLES = ("jobs", "instances", "results", "deliveries")


def _text(name: str, *, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _seconds(name: str, *, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, _SECONDS, nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        _text("study_instance_uid"),
        _text("state"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        _text("calling_ae"),
        _seconds("created_at"),
        _seconds("updated_at"),
        _text("reason", nullable=True),
        sqlite_autoincrement=True,
        if_not_exists=True,
    )
    op.create_index("jobs_state", "jobs", ["state", "id"], if_not_exists=True)
    op.create_index("jobs_study", "jobs", ["study_instance_uid"], if_not_exists=True)
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.Text(), primary_key=True),
        *(
            _text(name)
            for name in (
                "study_instance_uid",
                "series_instance_uid",
                "sop_class_uid",
                "transfer_syntax_uid",
                "modality",
                "body_part_examined",
                "view_position",
            )
        ),
        sa.Column("number_of_frames", sa.Integer(), nullable=False),
        _text("path"),
        _text("calling_ae"),
        _text("peer"),
        _seconds("received_at"),
        sa.Column("job_id", _ROW_ID, sa.ForeignKey("jobs.id"), nullable=True),
        _text("state"),
        _text("reason", nullable=True),
        if_not_exists=True,
    )
    op.create_index(
        "instances_pending", "instances", ["job_id", "study_instance_uid"], if_not_exists=True
    )
    op.create_table(
        "results",
        sa.Column("source_sop_instance_uid", sa.Text(), primary_key=True),
        _text("study_instance_uid"),
        *(
            _text(f"{kind}_{uid}_uid")
            for kind in ("seg", "sr", "pr", "sc")
            for uid in ("series", "instance")
        ),
        _seconds("created_at"),
        if_not_exists=True,
    )
    op.create_table(
        "deliveries",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        *(
            _text(name)
            for name in (
                "destination",
                "study_instance_uid",
                "sop_instance_uid",
                "sop_class_uid",
                "transfer_syntax_uid",
                "kind",
                "path",
                "state",
            )
        ),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        _text("last_error", nullable=True),
        _seconds("next_attempt_at"),
        _seconds("created_at"),
        _seconds("updated_at"),
        _seconds("delivered_at", nullable=True),
        sa.UniqueConstraint("sop_instance_uid", "destination"),
        sqlite_autoincrement=True,
        if_not_exists=True,
    )
    op.create_index(
        "deliveries_due",
        "deliveries",
        ["destination", "state", "next_attempt_at"],
        if_not_exists=True,
    )


def downgrade() -> None:
    for table in reversed(_TABLES):
        op.drop_table(table)
