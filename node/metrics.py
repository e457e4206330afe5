"""The node's Prometheus metrics, on one dedicated registry (never the process-global one).

Other modules import the metric objects and count what they do::

    from node import metrics
    metrics.ASSOCIATIONS.labels(outcome="accepted").inc()
    metrics.INSTANCES_REJECTED.labels(reason="sop_class").inc()
    with metrics.PIPELINE_SECONDS.time(): ...
    metrics.record_error("export_failed")      # feeds /health "last_error"
    metrics.set_model_loaded("shadowspot-lesion-unet", "1.0.0")

Jobs and deliveries by state are not counted in memory: they are read from the queue database
at scrape time (``DatabaseCollector``), so they are right after a restart and across workers.
``render(db_path)`` produces the text that ``/metrics`` serves.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS_DROPPED = Counter(
    "shadowspot_connections_dropped",
    "TCP connections closed by the listener's limits, by reason (idle_timeout, "
    "tls_handshake_failed, pending_limit, address_pending_limit, pdu_too_long, "
    "dataset_too_large, ...).",
    ["reason"],
    registry=REGISTRY,
)
ASSOCIATIONS = Counter(
    "shadowspot_associations",
    "Incoming associations by outcome (accepted, rejected, aborted).",
    ["outcome"],
    registry=REGISTRY,
)
INSTANCES_RECEIVED = Counter(
    "shadowspot_instances_received",
    "Instances received by C-STORE and spooled durably.",
    registry=REGISTRY,
)
INSTANCES_REJECTED = Counter(
    "shadowspot_instances_rejected",
    "Instances refused by C-STORE, by reason (e.g. sop_class, header, disk_full, spool_error).",
    ["reason"],
    registry=REGISTRY,
)
PIPELINE_SECONDS = Histogram(
    "shadowspot_pipeline_seconds",
    "Wall time of the analysis pipeline (S100–S742) per image.",
    buckets=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0),
    registry=REGISTRY,
)
DELIVERY_ATTEMPTS = Counter(
    "shadowspot_delivery_attempts",
    "Export association attempts by outcome (delivered, retry, dead_letter).",
    ["outcome"],
    registry=REGISTRY,
)
ALERTS_RAISED = Counter(
    "shadowspot_alerts_raised",
    "Studies whose findings raised an S742 alert.",
    registry=REGISTRY,
)
ERRORS = Counter(
    "shadowspot_errors",
    "Errors logged by the node, by event name.",
    ["event"],
    registry=REGISTRY,
)
MODEL_LOADED = Gauge(
    "shadowspot_model_loaded",
    "1 once the analysis model is loaded and verified, else 0.",
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class LastError:
    """The most recent error the node recorded: its event name and when (Unix seconds)."""

    event: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    name: str
    version: str


class _NodeStatus:
    """The two facts /health needs that are not in the database; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_error: LastError | None = None
        self.model: ModelInfo | None = None

    def record_error(self, event: str) -> None:
        with self._lock:
            self.last_error = LastError(event=event, at=time.time())

    def set_model(self, model: ModelInfo | None) -> None:
        with self._lock:
            self.model = model


STATUS = _NodeStatus()


def record_error(event: str) -> None:
    """Count an error and remember it as the last one (shown by /health)."""
    ERRORS.labels(event=event).inc()
    STATUS.record_error(event)


def set_model_loaded(name: str, version: str) -> None:
    """Mark the analysis model as loaded (shown by /health and ``shadowspot_model_loaded``)."""
    STATUS.set_model(ModelInfo(name=name, version=version))
    MODEL_LOADED.set(1)


# Tables and their state columns, as owned by node/queue.py and node/deliveries.py.
_STATE_TABLES = (
    ("jobs", "shadowspot_jobs", "Study jobs in the queue database, by state."),
    ("deliveries", "shadowspot_deliveries", "Result deliveries in the database, by state."),
)


def open_readonly(db_path: Path) -> sqlite3.Connection | None:
    """A read-only connection to the queue database, or None if it does not exist yet."""
    if not db_path.is_file():
        return None
    try:
        return sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None


def count_by_state(connection: sqlite3.Connection, table: str) -> dict[str, int]:
    """``state → rows`` of ``table``; empty when the table does not exist (yet)."""
    if table not in {t for t, _, _ in _STATE_TABLES}:
        raise ValueError(f"not a state table: {table}")
    try:
        rows = connection.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")
        return {str(state): int(n) for state, n in rows}
    except sqlite3.Error:
        return {}


_OPEN_JOB_STATES = ("queued", "running", "waiting_for_pipeline")


def queue_depth(connection: sqlite3.Connection) -> int:
    """Instances waiting for their study to go quiet plus jobs not yet finished."""
    try:
        waiting = connection.execute("SELECT COUNT(*) FROM instances WHERE job_id IS NULL")
        n_instances = int(waiting.fetchone()[0])
        marks = ", ".join("?" * len(_OPEN_JOB_STATES))
        jobs = connection.execute(
            f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", _OPEN_JOB_STATES
        )
        return n_instances + int(jobs.fetchone()[0])
    except sqlite3.Error:
        return 0


class DatabaseCollector(Collector):
    """Gauges of jobs and deliveries by state, read from the database at each scrape."""

    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        connection = open_readonly(self._db_path)
        try:
            for table, name, documentation in _STATE_TABLES:
                family = GaugeMetricFamily(name, documentation, labels=["state"])
                counts = count_by_state(connection, table) if connection else {}
                for state, n in sorted(counts.items()):
                    family.add_metric([state], n)
                yield family
            depth = GaugeMetricFamily(
                "shadowspot_queue_depth",
                "Instances waiting for their study to go quiet plus unfinished jobs.",
                value=queue_depth(connection) if connection else 0,
            )
            yield depth
        finally:
            if connection is not None:
                connection.close()


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


def render(db_path: Path | None) -> tuple[bytes, str]:
    """The Prometheus text exposition of every node metric, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward(REGISTRY))
    if db_path is not None:
        registry.register(DatabaseCollector(db_path))
    return generate_latest(registry), CONTENT_TYPE_LATEST
