"""The node's database: one store, two backends, chosen by ``[database] url``.

In: a URL (none: the SQLite file ``<storage>/shadowspot.db``, or ``postgresql://user@host:port/db``).
Out: a SQLAlchemy ``Engine`` (``engine``), the tables as SQLAlchemy Core metadata (``schema``) and
the schema's versions as Alembic migrations (``migrations/``), applied and checked by
``migrate``. Nothing outside this package imports SQLAlchemy, Alembic or psycopg (an
import-linter contract in pyproject.toml says so); every SQL statement is to live here.
"""
