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
``render(url, storage=...)`` produces the text that ``/metrics`` serves.
"""

from __future__ import annotations

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

from node.errors import DatabaseError
from node.store import reports

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


_STATE_TABLES = (
    ("jobs", "shadowspot_jobs", "Study jobs in the queue database, by state."),
    ("deliveries", "shadowspot_deliveries", "Result deliveries in the database, by state."),
)


class DatabaseCollector(Collector):
    """Gauges of jobs and deliveries by state, read from the database (``[database] url``;
    None: the SQLite file in ``storage``) at each scrape; zero while there is none or it
    cannot be read."""

    def __init__(self, url: str | None, *, storage: Path) -> None:
        self._url = url
        self._storage = storage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts: dict[str, dict[str, int]] = {}
        depth = 0
        try:
            with reports.reading(self._url, storage=self._storage) as database:
                if database is not None:
                    counts = {t: reports.count_by_state(database, t) for t, _, _ in _STATE_TABLES}
                    depth = reports.queue_depth(database)
        except DatabaseError:
            counts, depth = {}, 0
        for table, name, documentation in _STATE_TABLES:
            family = GaugeMetricFamily(name, documentation, labels=["state"])
            for state, n in sorted(counts.get(table, {}).items()):
                family.add_metric([state], n)
            yield family
        yield GaugeMetricFamily(
            "shadowspot_queue_depth",
            "Instances waiting for their study to go quiet plus unfinished jobs.",
            value=depth,
        )


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


def render(url: str | None, *, storage: Path | None) -> tuple[bytes, str]:
    """The Prometheus text exposition of every node metric, and its content type (without
    ``storage``, none of the database's)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward(REGISTRY))
    if storage is not None:
        registry.register(DatabaseCollector(url, storage=storage))
    return generate_latest(registry), CONTENT_TYPE_LATEST
