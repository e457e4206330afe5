"""The outbound queue: ``results`` and ``deliveries`` in the node's database (``[database]
url``); the statements, rows and states are in ``node/store/deliveries.py``, re-exported here.

``node/queue.py`` has ``instances`` and ``jobs`` in the same database.

- ``results``: the UIDs of the objects built for one analysed source instance, generated once
  (``result_uids``) and reused on every retry, so re-analysing never makes a duplicate.
- ``deliveries``: one row per result object per destination (unique on both), with its state,
  attempts, last error and the time of the next attempt.

Delivery life cycle (``DeliveryState``)::

    pending ──claim──▶ sending ──▶ delivered
       ▲                  │
       │    retryable,    ├──────▶ pending (attempts+1, next attempt after the schedule's wait)
       │    schedule left │
       │                  └──────▶ dead     not retryable, or the schedule is used up
       └──── retry (``shadowspot retry``) / recover() at start-up (sending → pending)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from node.store.database import Database, Schema, open_database
from node.store.deliveries import Delivery, DeliveryState, DeliveryTables, NewDelivery

__all__ = ["Delivery", "DeliveryState", "DeliveryStore", "NewDelivery"]


class DeliveryStore(DeliveryTables):
    """The ``results`` and ``deliveries`` tables. Thread-safe.

    On ``database`` (shared with the node's other stores, closed by its opener), else on
    ``url`` (None: the SQLite file in ``storage``), opened here (SQLite: upgraded; PostgreSQL:
    checked) and closed by ``close()``."""

    def __init__(
        self,
        storage: Path,
        *,
        retry_schedule_seconds: Sequence[float],
        database: Database | None = None,
        url: str | None = None,
    ) -> None:
        self.storage = storage
        """The storage folder (the exporter keeps its per-destination locks there)."""
        self._owns_database = database is None
        if database is None:
            database = open_database(url, storage=storage, schema=Schema.AUTO)
        super().__init__(database, retry_schedule_seconds=retry_schedule_seconds)

    def close(self) -> None:
        if self._owns_database:
            self.database.close()
