"""Leases on jobs: who holds a running job (``lease_owner``) and until when (``lease_expires``).

Revision ID: 0002
Revises: 0001

A worker that claims a job writes both and renews ``lease_expires`` by a heartbeat; a job
whose lease expired (``[database] lease_seconds``) goes back to the queue. Both are NULL for
a job nobody holds, so the rows of an older database need no values. ``jobs_lease`` serves
the sweep for expired leases (``state = 'running' AND lease_expires < now``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SECONDS: sa.types.TypeEngine[float] = sa.REAL[float]().with_variant(
    sa.DOUBLE_PRECISION(), "postgresql"
)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_owner", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("lease_expires", _SECONDS, nullable=True))
    op.create_index("jobs_lease", "jobs", ["state", "lease_expires"])


def downgrade() -> None:
    op.drop_index("jobs_lease", table_name="jobs")
    op.drop_column("jobs", "lease_expires")
    op.drop_column("jobs", "lease_owner")
