"""The exporter: sends queued result objects to their destinations by C-STORE.

One thread per configured destination, so a destination that is down (connect timeouts,
rejections) only ever delays its own deliveries, never another destination's or intake. Each
pass claims the due deliveries of its destination, groups them by study and sends each study
over **one** association that proposes exactly the (SOP class, transfer syntax) pairs of what
is sent. Outcomes go back to ``node.deliveries``: delivered, retried after the configured
backoff, or dead-lettered.

At most one association per destination at a time, across processes: a pass holds the
destination's lock (``flock`` on ``<storage>/locks/export-<name>.lock``) while it claims and
sends, and a pass that finds the lock held (a running node's exporter and ``shadowspot retry``
at once) sends nothing; its rows stay pending for the holder's or its own next pass.

``open_association`` is the one place an outbound association is made (TLS included), so
transport options are added there and nowhere else.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, build_context
from pynetdicom.association import Association

from node import metrics, tls
from node.config import Config, DestinationConfig
from node.deliveries import Delivery, DeliveryState, DeliveryStore
from node.dimse import Status
from node.errors import ExportError
from node.logs import get_logger

_OUT_OF_RESOURCES = range(0xA700, 0xA800)
_WARNING = range(0xB000, 0xC000)
BUSY_WAIT_SECONDS = 0.5
"""How long an exporter thread waits after finding its destination's lock held."""


def lock_path(storage: Path, destination: str) -> Path:
    """The lock file of one destination (a name that is not a safe file name is hashed in)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", destination)
    if safe != destination:
        safe += "-" + hashlib.sha256(destination.encode()).hexdigest()[:8]
    return storage / "locks" / f"export-{safe}.lock"


@contextmanager
def sending_to(storage: Path, destination: str) -> Iterator[bool]:
    """Hold the destination's lock if it is free: yields True, or False when another pass
    (in this or another process) holds it. Released when the block ends or the process dies."""
    path = lock_path(storage, destination)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What happened to one delivery in one attempt."""

    delivery_id: int
    sop_instance_uid: str
    state: DeliveryState
    error: str | None = None


def open_association(
    config: Config, destination: DestinationConfig, contexts: Sequence[tuple[str, str]]
) -> Association:
    """Associate with ``destination`` proposing exactly ``contexts`` ((SOP class, transfer
    syntax) pairs). Raises a retryable ``ExportError`` when it cannot be established."""
    ae = AE(ae_title=config.node.ae_title)
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in contexts]
    ae.acse_timeout = destination.timeout_seconds
    ae.dimse_timeout = destination.timeout_seconds
    ae.network_timeout = destination.timeout_seconds
    ae.connection_timeout = destination.timeout_seconds
    tls_args = tls.tls_args(config, destination.host) if destination.tls else None
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise ExportError(f"association rejected by {destination.name}", retryable=True)
    raise ExportError(
        f"no association with {destination.name} at {destination.host}:{destination.port}",
        retryable=True,
    )


def _classify(status: int) -> tuple[DeliveryState | None, bool, str | None]:
    """C-STORE status → (delivered?, retryable, error text)."""
    if status == Status.SUCCESS or status in _WARNING:
        return DeliveryState.DELIVERED, False, None
    try:
        name = Status(status).name
    except ValueError:
        name = f"0x{status:04X}"
    retryable = status in _OUT_OF_RESOURCES or status == Status.PROCESSING_FAILURE
    return None, retryable, f"C-STORE failed: {name}"


class Exporter:
    """Background delivery of queued results, one thread per destination."""

    def __init__(self, config: Config, store: DeliveryStore, *, poll_seconds: float = 5.0) -> None:
        self.config = config
        self.store = store
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._wake = {d.name: threading.Event() for d in config.destinations}
        self._threads: list[threading.Thread] = []
        self._log = get_logger("node.export")

    def start(self) -> None:
        """Put deliveries a dead process left ``sending`` back in line, start the threads."""
        recovered = self.store.recover()
        if recovered:
            self._log.info("deliveries_recovered", count=recovered)
        for destination in self.config.destinations:
            thread = threading.Thread(
                target=self._loop,
                args=(destination,),
                name=f"export-{destination.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def wake(self, destination: str) -> None:
        """New deliveries for ``destination``: look now instead of at the next poll."""
        event = self._wake.get(destination)
        if event is not None:
            event.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for event in self._wake.values():
            event.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _loop(self, destination: DestinationConfig) -> None:
        event = self._wake[destination.name]
        while not self._stop.is_set():
            busy = False
            try:
                busy = self.run_once(destination) is None
            except Exception:  # the exporter thread must survive; the rows stay queued
                self._log.exception("export_pass_failed", destination=destination.name)
            due = self.store.next_due(destination.name)
            wait = self.poll_seconds if due is None else due - time.time()
            floor = BUSY_WAIT_SECONDS if busy else 0.05
            event.wait(min(max(wait, floor), self.poll_seconds))
            event.clear()

    def run_once(self, destination: DestinationConfig) -> list[Outcome] | None:
        """One pass: send every due delivery of ``destination``, one association per study,
        one study after the other. None: another pass holds the destination (module
        docstring), so this one sent nothing."""
        with sending_to(self.store.storage, destination.name) as ours:
            if not ours:
                return None
            by_study: dict[str, list[Delivery]] = defaultdict(list)
            for delivery in self.store.claim_due(destination.name):
                by_study[delivery.study_instance_uid].append(delivery)
            outcomes: list[Outcome] = []
            for study_uid, deliveries in by_study.items():
                outcomes.extend(self._send_study(destination, study_uid, deliveries))
            return outcomes

    def _fail(self, delivery: Delivery, error: str, *, retryable: bool) -> Outcome:
        state = self.store.mark_failed(delivery.id, error, retryable=retryable)
        dead = state is DeliveryState.DEAD
        metrics.DELIVERY_ATTEMPTS.labels(outcome="dead_letter" if dead else "retry").inc()
        if dead:
            metrics.record_error("delivery_dead")
        return Outcome(
            delivery_id=delivery.id,
            sop_instance_uid=delivery.sop_instance_uid,
            state=state,
            error=error,
        )

    def _send_study(
        self, destination: DestinationConfig, study_uid: str, deliveries: list[Delivery]
    ) -> list[Outcome]:
        log = self._log.bind(destination=destination.name, study_instance_uid=study_uid)
        outcomes: list[Outcome] = []
        ready: list[tuple[Delivery, Dataset]] = []
        for delivery in deliveries:
            try:
                ready.append((delivery, pydicom.dcmread(delivery.path)))
            except (OSError, InvalidDicomError) as exc:
                outcomes.append(
                    self._fail(delivery, f"cannot read {delivery.path}: {exc}", retryable=False)
                )
        if not ready:
            return outcomes
        contexts = sorted({(d.sop_class_uid, d.transfer_syntax_uid) for d, _ in ready})
        try:
            assoc = open_association(self.config, destination, contexts)
        except ExportError as exc:
            log.warning("export_association_failed", error=str(exc), objects=len(ready))
            return outcomes + [self._fail(d, str(exc), retryable=exc.retryable) for d, _ in ready]
        try:
            for delivery, dataset in ready:
                outcomes.append(self._store(assoc, delivery, dataset))
        finally:
            if assoc.is_established:
                assoc.release()
        delivered = sum(o.state is DeliveryState.DELIVERED for o in outcomes)
        log.info("results_delivered", delivered=delivered, failed=len(outcomes) - delivered)
        return outcomes

    def _store(self, assoc: Association, delivery: Delivery, dataset: Dataset) -> Outcome:
        if not assoc.is_established:
            return self._fail(delivery, "association lost before C-STORE", retryable=True)
        try:
            response = assoc.send_c_store(dataset)
        except (RuntimeError, ValueError) as exc:
            return self._fail(delivery, f"C-STORE not sent: {exc}", retryable=True)
        status = getattr(response, "Status", None)
        if status is None:
            return self._fail(delivery, "no C-STORE response (timeout or abort)", retryable=True)
        state, retryable, error = _classify(int(status))
        if state is DeliveryState.DELIVERED:
            self.store.mark_delivered(delivery.id)
            metrics.DELIVERY_ATTEMPTS.labels(outcome="delivered").inc()
            return Outcome(
                delivery_id=delivery.id, sop_instance_uid=delivery.sop_instance_uid, state=state
            )
        return self._fail(delivery, error or "C-STORE failed", retryable=retryable)
