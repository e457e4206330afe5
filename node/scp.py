"""The node's Application Entity: Verification SCP and Storage SCP for chest radiographs.

Refuse at negotiation what we cannot handle: the called AE title must be ours, the caller must
be listed in ``[[callers]]`` (AE title and, where given, host; none listed = anyone; a listed
AE title from another address is logged as ``calling_address_not_allowed``, on the wire it is
"calling AE title not recognized", the standard having no reason for an address), at most
``max_associations`` at once and ``max_associations_per_address`` from one address, and only
the storage SOP classes below, in any transfer syntax pydicom decodes with the pylibjpeg
plugins, accepted as the caller proposes them. Before negotiation, ``node.listener`` keeps
silent and slow connections from holding the port or a slot, and bounds PDUs and datasets.

The C-STORE handler checks free space and hands ``event.encoded_dataset()`` to
``node.intake``, which parses it, writes it durably to the spool and records it in the queue
(or finds it is a duplicate, a resend of an abandoned instance, or a UID already used by
another study); only then does the handler answer.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import structlog
from pydicom import uid
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE

from node import metrics
from node.config import Config
from node.dimse import VERIFICATION_SOP_CLASS, RejectReason, RejectResult, RejectSource, Status
from node.errors import IngestError, ListenError
from node.intake import Intake, Received
from node.listener import GuardedServer, Limits
from node.queue import Queue
from node.spool import Spool
from node.tls import server_context

_config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's per-PDU narration; we log one line per event

STORAGE_SOP_CLASSES: tuple[uid.UID, ...] = (
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)
"""CR, DX for presentation and for processing, Secondary Capture (incl. grey multi-frame)."""

TRANSFER_SYNTAXES: tuple[uid.UID, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
)
"""Every transfer syntax pydicom decodes with pylibjpeg (+ -libjpeg, -openjpeg, -rle)."""

log = structlog.stdlib.get_logger("node.scp")

LOCAL_LIMIT_EXCEEDED = 0x02
"""A-ASSOCIATE-RJ reason for source 3 (service provider, presentation): local limit exceeded."""


_REJECT_REASON = {
    Status.OUT_OF_RESOURCES: "disk_full",
    Status.CANNOT_UNDERSTAND: "unparseable",
    Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "header",
    Status.DUPLICATE_SOP_INSTANCE: "uid_in_another_study",
}
"""The ``reason`` label of ``shadowspot_instances_rejected`` for each refusal status."""


def _addresses(host: str) -> frozenset[str]:
    """The IP addresses ``host`` (an address or a name) stands for."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        log.warning("caller_host_unresolved", host=host)
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


def _normalise(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class Refusal(StrEnum):
    """Why an association request is rejected; values are the ``reason`` of the
    ``association_rejected`` log event (no AE title, address or patient data in them)."""

    CALLED_AE_TITLE_NOT_RECOGNIZED = "called_ae_title_not_recognized"
    CALLING_AE_TITLE_NOT_RECOGNIZED = "calling_ae_title_not_recognized"
    CALLING_ADDRESS_NOT_ALLOWED = "calling_address_not_allowed"

    @property
    def reject_reason(self) -> RejectReason:
        """The A-ASSOCIATE-RJ reason (service user) sent to the caller."""
        if self is Refusal.CALLED_AE_TITLE_NOT_RECOGNIZED:
            return RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED
        return RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerPolicy:
    """Who may associate: our called AE title and the ``[[callers]]`` list."""

    ae_title: str
    callers: dict[str, frozenset[str] | None]
    """Calling AE title → allowed addresses (None: any address)."""

    @classmethod
    def from_config(cls, config: Config) -> CallerPolicy:
        callers = {
            c.ae_title: (None if c.host is None else _addresses(c.host)) for c in config.callers
        }
        return cls(ae_title=config.node.ae_title, callers=callers)

    @property
    def open_to_anyone(self) -> bool:
        return not self.callers

    def check(self, *, called_ae: str, calling_ae: str, address: str) -> Refusal | None:
        """Why to reject this association request, or None to go on negotiating."""
        if called_ae.strip() != self.ae_title:
            return Refusal.CALLED_AE_TITLE_NOT_RECOGNIZED
        if self.open_to_anyone:
            return None
        calling = calling_ae.strip()
        if calling not in self.callers:
            return Refusal.CALLING_AE_TITLE_NOT_RECOGNIZED
        allowed = self.callers[calling]
        if allowed is not None and _normalise(address) not in allowed:
            return Refusal.CALLING_ADDRESS_NOT_ALLOWED
        return None


class StorageSCP:
    """The listening AE. ``start()`` binds and returns at once; ``stop()`` drains and closes."""

    def __init__(self, config: Config, *, spool: Spool, queue: Queue) -> None:
        self._config = config
        self._spool = spool
        self._intake = Intake(spool, queue)
        self.policy = CallerPolicy.from_config(config)
        self._server: Any = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closing = False
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        node = self._config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.acse_timeout = node.network_timeout_seconds
        ae.dimse_timeout = node.network_timeout_seconds
        ae.network_timeout = node.network_timeout_seconds
        ae.require_called_aet = False  # checked in _on_requested, with logging
        ae.add_supported_context(
            VERIFICATION_SOP_CLASS, [uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian]
        )
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    # Life cycle --------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Listen on the configured host and port; returns the bound (host, port)."""
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        node = self._config.node
        limits = Limits(
            idle_timeout=node.idle_timeout_seconds,
            max_pending=node.max_pending_connections,
            max_pdu_bytes=node.max_pdu_bytes,
            max_store_bytes=int(node.max_store_mb * 2**20),
        )
        try:
            server = self.ae.make_server(
                (node.host, node.port),
                evt_handlers=handlers,
                ssl_context=server_context(self._config),
                server_class=GuardedServer,
                limits=limits,
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {node.host}:{node.port}: {exc.strerror or exc} (another "
                "node or DICOM server on that port? set [node] port)"
            ) from exc
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        self._server = server
        host, port = server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    def active_associations(self) -> int:
        return 0 if self._server is None else len(self._server.active_associations)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let associations end (up to ``grace_seconds``), finish every C-STORE
        in flight, then abort what is still open."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()  # closes the listening socket: no new associations
        deadline = time.monotonic() + grace_seconds
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            self._closing = True
        while self._in_flight and time.monotonic() < deadline + grace_seconds:
            time.sleep(0.02)
        open_now = server.active_associations
        for assoc in open_now:
            assoc.abort()
        log.info("scp_stopped", aborted_associations=len(open_now))

    # Association events ------------------------------------------------------------------------

    def _on_connection(self, event: evt.Event) -> None:
        """Bound every read on this connection by the network timeout.

        pynetdicom leaves accepted sockets blocking and reads a PDU with ``recv`` until it is
        complete, so a peer that sent part of a PDU and went silent would hold the association
        thread (and one of ``max_associations``) for ever. With a timeout the read fails and
        pynetdicom closes the connection."""
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            sock.settimeout(self._config.node.network_timeout_seconds)

    def _on_requested(self, event: evt.Event) -> None:
        primitive = event.assoc.requestor.primitive
        assert primitive is not None  # set by pynetdicom before EVT_REQUESTED
        calling_ae = str(primitive.calling_ae_title).strip()
        called_ae = str(primitive.called_ae_title).strip()
        address = str(event.assoc.requestor.address)
        structlog.contextvars.bind_contextvars(
            association_id=uuid.uuid4().hex[:12],
            calling_ae=calling_ae,
            peer=f"{address}:{event.assoc.requestor.port}",
        )
        refusal = self.policy.check(called_ae=called_ae, calling_ae=calling_ae, address=address)
        if refusal is None:
            self._check_address_limit(event, address)
            return
        log.warning("association_rejected", reason=refusal.value, called_ae=called_ae)
        metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
        event.assoc.acse.send_reject(
            RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_USER, refusal.reject_reason
        )
        event.assoc.kill()

    def _check_address_limit(self, event: evt.Event, address: str) -> None:
        """Reject (transient, local limit exceeded) past ``max_associations_per_address``."""
        limit = self._config.node.max_associations_per_address
        server = self._server
        if server is None:
            return
        same = [a for a in server.active_associations if str(a.requestor.address) == address]
        if len(same) <= limit:
            return
        log.warning("association_refused_by_address_limit", max_per_address=limit)
        metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
        event.assoc.acse.send_reject(
            RejectResult.REJECTED_TRANSIENT,
            RejectSource.SERVICE_PROVIDER_PRESENTATION,
            LOCAL_LIMIT_EXCEEDED,
        )
        event.assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        structlog.contextvars.bind_contextvars(
            calling_ae=str(requestor.ae_title).strip(),
            peer=f"{requestor.address}:{requestor.port}",
        )
        log.info("association_established")
        metrics.ASSOCIATIONS.labels(outcome="accepted").inc()

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("association_refused_by_limit", max_associations=self.ae.maximum_associations)
        metrics.ASSOCIATIONS.labels(outcome="rejected").inc()

    def _on_ended(self, event: evt.Event, how: str) -> None:
        log.info(f"association_{how}")
        if how == "aborted":
            metrics.ASSOCIATIONS.labels(outcome="aborted").inc()
        structlog.contextvars.clear_contextvars()

    def _on_c_echo(self, event: evt.Event) -> int:
        log.info("echo_answered")
        return int(Status.SUCCESS)

    # C-STORE -----------------------------------------------------------------------------------

    def _on_c_store(self, event: evt.Event) -> int:
        with self._lock:
            if self._closing:
                log.warning("instance_refused", reason="node shutting down")
                return int(Status.OUT_OF_RESOURCES)
            self._in_flight += 1
        sop_instance = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        try:
            with structlog.contextvars.bound_contextvars(sop_instance_uid=sop_instance):
                return int(self._store(event))
        except Exception:  # the one catch-all of intake: answer a failure, keep serving
            log.exception("instance_failed")
            metrics.INSTANCES_REJECTED.labels(reason="error").inc()
            metrics.record_error("instance_failed")
            return int(Status.PROCESSING_FAILURE)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _store(self, event: evt.Event) -> Status:
        request = cast(C_STORE, event.request)
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        started = time.monotonic()
        data = b""
        try:
            data = event.encoded_dataset()
            self._spool.check_space(len(data))
            receipt = self._intake.receive(
                data,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                calling_ae=str(event.assoc.requestor.ae_title).strip(),
                peer=str(event.assoc.requestor.address),
            )
        except IngestError as exc:
            return self._refuse(event, data, exc, sop_class, sop_instance)
        except OSError as exc:
            log.error("instance_refused", reason=f"cannot write: {exc.strerror}")
            metrics.INSTANCES_REJECTED.labels(reason="spool_error").inc()
            metrics.record_error("instance_refused")
            return Status.OUT_OF_RESOURCES
        if receipt.outcome is not Received.DUPLICATE:
            metrics.INSTANCES_RECEIVED.inc()
        previous = receipt.previous
        log.info(
            f"instance_{receipt.outcome}",
            study_instance_uid=receipt.header.study_instance_uid,
            sop_class=uid.UID(sop_class).name,
            transfer_syntax=uid.UID(receipt.header.transfer_syntax_uid).name,
            bytes=len(data),
            ms=round((time.monotonic() - started) * 1000, 1),
            **({} if previous is None else {"was": previous.kind.value}),
        )
        return Status.SUCCESS

    def _refuse(
        self, event: evt.Event, data: bytes, exc: IngestError, sop_class: str, sop_instance: str
    ) -> Status:
        status = Status(exc.status)
        fields: dict[str, Any] = {"status": f"0x{status.value:04X}", "reason": str(exc)}
        metrics.INSTANCES_REJECTED.labels(reason=_REJECT_REASON.get(status, "header")).inc()
        if status is Status.OUT_OF_RESOURCES:
            log.error("instance_refused", **fields)
            return status
        if status is Status.DUPLICATE_SOP_INSTANCE:  # valid, but its UID is taken: not kept
            log.warning("instance_refused", **fields)
            return status
        if status is Status.CANNOT_UNDERSTAND:
            fields["reason"] = "the dataset cannot be parsed"  # parser text may quote values
        path = self._spool.quarantine(
            data,
            status=status,
            reason=str(exc),
            context={
                "calling_ae": str(event.assoc.requestor.ae_title).strip(),
                "peer": str(event.assoc.requestor.address),
                "sop_class_uid": sop_class,
                "sop_instance_uid": sop_instance,
            },
        )
        log.warning("instance_quarantined", path=str(path), **fields)
        return status
