"""What a received dataset becomes: a new instance, a duplicate, a resend, or a refusal.

The C-STORE handler (``node.scp``) hands each encoded dataset to ``Intake.receive``, which
parses it (``node.spool.inspect``), then, holding the lock of its SOP Instance UID, looks the
UID up, writes the spool and records the queue. Two associations sending the same UID at
once are thus served one after the other: the second sees the first's row, and no file is
ever left in the spool without one.

=====================================  ===========================================  ==========
The SOP Instance UID is                what happens                                 outcome
=====================================  ===========================================  ==========
unknown                                spooled and recorded as received             spooled
known in the same study                nothing is written; not analysed twice       duplicate
known, same study, abandoned (failed   the new copy replaces the spooled file; the  resent
or stuck, see ``node.queue``)          instance is received again, in a new job
known in another study                 refused: Duplicate SOP Instance (0111),      (refused)
                                       nothing written (one UID, two images)
=====================================  ===========================================  ==========
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from node.dimse import Status
from node.errors import IngestError
from node.queue import AbandonedInstance, InstanceHeader, Queue
from node.spool import Spool, inspect


class Received(StrEnum):
    """What ``Intake.receive`` did with an accepted dataset (the log event is
    ``instance_<value>``)."""

    SPOOLED = "spooled"
    DUPLICATE = "duplicate"
    RESENT = "resent"


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """The outcome of one accepted dataset."""

    outcome: Received
    header: InstanceHeader
    previous: AbandonedInstance | None = None
    """For a resend: what the instance was before (failed or stuck)."""


class UidLocks:
    """One lock per key, alive while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class Intake:
    """Spool and queue behind one decision per SOP Instance UID (module docstring)."""

    def __init__(self, spool: Spool, queue: Queue) -> None:
        self._spool = spool
        self._queue = queue
        self._locks = UidLocks()

    def receive(
        self,
        data: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_ae: str,
        peer: str,
    ) -> Receipt:
        """Keep ``data`` (or not); raises ``IngestError`` with the status to refuse it with."""
        header = inspect(data, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid)
        with self._locks.hold(sop_instance_uid):
            known = self._queue.instance(sop_instance_uid)
            if known is None:
                path = self._spool.write(data, header)
                added = self._queue.add_instance(
                    header, path=path, calling_ae=calling_ae, peer=peer
                )
                if not added:  # recorded meanwhile by another process: keep only its file
                    self._discard_unrecorded(path, sop_instance_uid)
                    return Receipt(outcome=Received.DUPLICATE, header=header)
                return Receipt(outcome=Received.SPOOLED, header=header)
            if known.header.study_instance_uid != header.study_instance_uid:
                raise IngestError(
                    "this SOP Instance UID was already received in another study",
                    status=Status.DUPLICATE_SOP_INSTANCE,
                )
            if not self._queue.abandoned(sop_instance_uids=[sop_instance_uid]):
                return Receipt(outcome=Received.DUPLICATE, header=header)
            path = self._spool.write(data, header)
            previous = self._queue.readmit(header, path=path, calling_ae=calling_ae, peer=peer)
        if previous is None:
            return Receipt(outcome=Received.DUPLICATE, header=header)
        if previous.instance.path != path:
            previous.instance.path.unlink(missing_ok=True)  # the old copy, recorded no more
        return Receipt(outcome=Received.RESENT, header=header, previous=previous)

    def _discard_unrecorded(self, path: Path, sop_instance_uid: str) -> None:
        recorded = self._queue.instance(sop_instance_uid)
        if recorded is None or recorded.path != path:
            path.unlink(missing_ok=True)
