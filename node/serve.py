"""``shadowspot serve``: start the node and stop it cleanly.

Start-up order: logging → storage folders → database (``[database] url``; SQLite: its schema
upgraded, PostgreSQL: checked, refused with ``SchemaError`` until ``shadowspot migrate`` ran) →
queue (recover jobs whose lease expired, on SQLite every job a dead process left running;
adopt spooled files a crash left unrecorded) → worker threads → Storage SCP. SIGTERM/SIGINT:
stop accepting associations, finish the C-STOREs in flight, let the workers hand back their
jobs, close the database.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import pydicom
import structlog
from pydicom import Dataset

from node import __version__, health, metrics, results
from node.alerts import AlertNotifier
from node.config import Config
from node.deliveries import DeliveryStore
from node.errors import IngestError
from node.export import Exporter
from node.logs import configure_logging
from node.queue import Instance, Job, Queue
from node.retention import RetentionThread
from node.scp import StorageSCP
from node.spool import Spool, inspect
from node.store.database import Schema, open_database
from node.worker import AnalyseFile, PipelineHooks, Worker
from pipeline.errors import ModelError, PipelineError
from pipeline.result import AnalysisResult

log = structlog.stdlib.get_logger("node.serve")

SHUTDOWN_GRACE_SECONDS = 10.0


class ModelUnavailable(ModelError):
    """``serve`` with ``[node] require_model = true`` and no model it can load."""


def load_analyser(config: Config) -> AnalyseFile | None:
    """The pipeline's ``analyse_file`` with the model loaded once, or None (logged) when the
    model cannot be loaded: the node still receives, and jobs wait for a pipeline."""
    from node.analysis import Analyser  # imports onnxruntime and SimpleITK: only for serve
    from node.decode import max_pixels

    try:
        analyser = Analyser(
            config.pipeline,
            max_pixels=max_pixels(config),
            decode_memory_mb=config.node.decode_memory_mb,
        )
        return analyser.analyse_file
    except PipelineError as exc:
        log.error("pipeline_unavailable", reason=str(exc), model_dir=str(config.pipeline.model_dir))
        metrics.record_error("pipeline_unavailable")
        return None


class Node:
    """Queue, spool, workers and SCP of one running node (what ``serve`` runs; tests use it)."""

    def __init__(self, config: Config, *, analyse_file: AnalyseFile | None) -> None:
        self.config = config
        storage = config.node.storage
        storage.mkdir(parents=True, exist_ok=True)
        self.database = open_database(
            config.database.url_or_default, storage=storage, schema=Schema.AUTO
        )
        """SQLite: upgraded to this version's schema; PostgreSQL: checked (``SchemaError``
        unless ``shadowspot migrate`` brought it there)."""
        self.queue = Queue(
            storage,
            study_quiet_seconds=config.node.study_quiet_seconds,
            database=self.database,
            lease_seconds=config.database.lease_seconds,
        )
        self.spool = Spool(storage, min_free_bytes=int(config.node.min_free_mb * 1_000_000))
        self.deliveries = DeliveryStore(
            storage,
            retry_schedule_seconds=config.export.retry_schedule_seconds,
            database=self.database,
        )
        self.exporter = Exporter(config, self.deliveries)
        self.alerts = AlertNotifier(config.alerts)
        self.hooks = (
            None
            if analyse_file is None
            else PipelineHooks(analyse_file=analyse_file, publish=self._publish)
        )
        self.port: int | None = None
        """The bound port, once started."""
        self.scp = StorageSCP(config, spool=self.spool, queue=self.queue)
        self._stop = threading.Event()
        self.workers = [
            Worker(
                self.queue,
                self.hooks,
                stop=self._stop,
                name=f"worker-{i + 1}",
                min_age_years=config.node.min_patient_age_years,
            )
            for i in range(config.node.analysis_workers)
        ]

    def _publish(
        self, *, dataset: Dataset, result: AnalysisResult, job: Job, instance: Instance
    ) -> None:
        """The worker's publish hook: ``node.results.publish`` with this node's outbound parts."""
        results.publish(
            source=dataset,
            result=result,
            config=self.config,
            store=self.deliveries,
            calling_ae=job.calling_ae or None,
            alerts=self.alerts,
            wake=self.exporter.wake,
        )

    def start(self) -> int:
        """Recover, start exporter, workers and the SCP; returns the bound port."""
        requeued, failed = self.queue.recover()
        adopted = self.adopt_orphans()
        waiting = self.queue.requeue_waiting() if self.hooks is not None else 0
        log.info(
            "queue_recovered",
            requeued_jobs=requeued,
            failed_jobs=failed,
            adopted_instances=adopted,
            requeued_waiting=waiting,
            pending_instances=self.queue.pending_instances(),
            **{f"jobs_{k}": v for k, v in self.queue.job_counts().items()},
        )
        _, self.port = self.scp.start()  # first: a port in use stops the start here (ListenError)
        self.exporter.start()
        for worker in self.workers:
            worker.start()
        return self.port

    def adopt_orphans(self) -> int:
        """Record spooled files that a crash left between rename and database commit.

        A file that can never be recorded (its content is not a valid instance, or its SOP
        Instance UID is recorded in another study) goes to the quarantine with its reason and
        a log line, so no later start parses it again."""
        known = self.queue.known_paths()
        adopted = 0
        for path in self.spool.files():
            if path in known:
                continue
            try:
                data = path.read_bytes()
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                sop_instance = str(ds.SOPInstanceUID)
                header = inspect(
                    data, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=sop_instance
                )
            except OSError as exc:  # e.g. permissions: the file may be fine; leave it
                log.error("orphan_unreadable", path=str(path), error=type(exc).__name__)
                continue
            except (IngestError, pydicom.errors.InvalidDicomError, AttributeError) as exc:
                self._quarantine_orphan(path, "unreadable", f"cannot be read: {type(exc).__name__}")
                continue
            if self.queue.add_instance(
                header, path=path, calling_ae="", peer="", received_at=path.stat().st_mtime
            ):
                adopted += 1
                continue
            recorded = self.queue.instance(sop_instance)
            if (
                recorded is not None
                and recorded.header.study_instance_uid != header.study_instance_uid
            ):
                self._quarantine_orphan(
                    path,
                    "uid_in_another_study",
                    "its SOP Instance UID is recorded in another study",
                    sop_instance_uid=sop_instance,
                )
        return adopted

    def _quarantine_orphan(self, path: Path, why: str, reason: str, **context: str) -> None:
        try:
            moved = self.spool.quarantine_file(
                path, reason=f"unrecorded spool file: {reason}", context=context
            )
        except OSError as exc:
            log.error("orphan_unreadable", path=str(path), error=type(exc).__name__)
            return
        log.warning("orphan_quarantined", path=str(path), quarantined=str(moved), reason=why)

    def stop(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, drain the C-STOREs in flight, stop the workers, close the queue."""
        self.scp.stop(grace_seconds)
        self._stop.set()
        for worker in self.workers:
            if worker.is_alive():
                worker.join()
        self.exporter.stop(timeout=grace_seconds)
        self.alerts.close()
        self.queue.close()
        self.deliveries.close()
        self.database.close()


def run(args: argparse.Namespace, config: Config) -> int:
    """Run the node until SIGTERM or SIGINT."""
    log_dir = config.node.storage / "logs" if config.logging.file else None
    log_file = configure_logging(
        fmt=args.log_format or config.logging.format, level=config.logging.level, log_dir=log_dir
    )
    stop = threading.Event()

    received: list[int] = []

    def on_signal(signum: int, _: FrameType | None) -> None:
        # Only set the flag: a handler that logged could interrupt the main thread's own
        # write to stderr ("reentrant call") and raise before the flag was set.
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not config.callers:
        log.warning("callers_unrestricted", detail="no [[callers]] listed: any AE may send")
    analyse_file = load_analyser(config)
    if analyse_file is None and config.node.require_model:
        raise ModelUnavailable(
            f"no usable model in {config.pipeline.model_dir} (see the pipeline_unavailable log "
            "line); set [node] require_model = false to receive and queue without one"
        )
    http = health.start(config)
    retention = RetentionThread(config)
    retention.start()
    node = Node(config, analyse_file=analyse_file)
    port = node.start()
    log.info(
        "node_started",
        version=__version__,
        ae_title=config.node.ae_title,
        host=config.node.host,
        port=port,
        storage=str(config.node.storage.resolve()),
        log_file=str(log_file) if log_file else None,
        config=config.source,
        pipeline="ready" if node.hooks else "waiting (model not loaded)",
        destinations=[d.name for d in config.destinations],
    )
    while not stop.wait(0.5):
        pass
    log.info("shutdown_requested", signal=signal.Signals(received[0]).name if received else None)
    started = time.monotonic()
    node.stop()
    retention.stop()
    if http is not None:
        http.shutdown()
    log.info("node_stopped", ms=round((time.monotonic() - started) * 1000, 1))
    return 0


def storage_paths(config: Config) -> dict[str, Path]:
    """Where the node keeps things (for the README and ``status``-like tools)."""
    root = config.node.storage
    return {
        "spool": root / "spool",
        "quarantine": root / "quarantine",
        "database": root / "shadowspot.db",
        "results": root / "results",
        "logs": root / "logs",
    }
