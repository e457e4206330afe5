"""Alembic's entry point, run by ``node.store.migrate`` on a connection it already holds.

``migrate`` opens one transaction, takes the migration lock and passes the connection in
``config.attributes["connection"]``; every revision runs inside that transaction (SQLite and
PostgreSQL both have transactional DDL), so a failed upgrade leaves the database as it was.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from node.store.schema import metadata


def _run() -> None:
    if context.is_offline_mode():
        raise RuntimeError("ShadowSpot's migrations run on a database, not as an SQL script")
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("run migrations through node.store.migrate, which passes a connection")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_run()
