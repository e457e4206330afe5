"""Where the node's default database is: ``<storage>/shadowspot.db`` (SQLite).

Everything else about the database is ``node.store`` (engine, schema, migrations, every
statement); this module only keeps the file's name for the code and tests that name it.
"""

from __future__ import annotations

from pathlib import Path

from node.store.engine import DB_NAME

__all__ = ["DB_NAME", "database_path"]


def database_path(storage: Path) -> Path:
    return storage / DB_NAME
