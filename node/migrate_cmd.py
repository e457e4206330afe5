"""``shadowspot migrate``: upgrade the database of ``[database] url`` to this version's schema.

Prints the revision found and the one it is at now. A database written by a newer ShadowSpot
is refused untouched (``SchemaError``, exit 1); so is one whose upgrade fails (nothing is
changed). Safe to run while nodes run, and by several at once: upgrades take a lock.
"""

from __future__ import annotations

import argparse

from node.config import Config
from node.store.database import Schema, open_database
from node.store.migrate import Upgrade


def describe_upgrade(where: str, done: Upgrade) -> str:
    """One line: the database, the revision before (or what it was) and after."""
    before = done.before or ("written before schema versions" if done.adopted else "empty")
    if not done.changed:
        return f"database {where}: at schema revision {done.after}, nothing to do"
    return f"database {where}: schema revision {before} → {done.after} ({done.seconds:.2f} s)"


def run(_args: argparse.Namespace, config: Config) -> int:
    """``shadowspot migrate [--config FILE]``."""
    url = config.database.url_or_default
    database = open_database(url, storage=config.node.storage, schema=Schema.AS_IS)
    try:
        print(describe_upgrade(database.describe(), database.upgrade()))
    finally:
        database.close()
    return 0
