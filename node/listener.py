"""The listening socket of the Storage SCP: no connection may hold it, none may hog memory.

pynetdicom's ``ThreadedAssociationServer`` performs the TLS handshake in its single accept
thread and starts an association thread (one of ``max_associations``) for every TCP
connection, before the peer has said a word. A socket that never sends a ClientHello would
then stop every new association; sixteen that never send an A-ASSOCIATE-RQ would fill every
slot. ``GuardedServer`` changes the order:

1. the accept thread only accepts; each connection waits in a thread of its own, counted by
   ``PendingConnections`` (past ``max_pending_connections``, or a quarter of it from one
   address, the longest-silent connection is closed: a modality sends its request at once, a
   silent socket is always the oldest);
2. in that thread the TLS handshake and the whole A-ASSOCIATE-RQ PDU must arrive within
   ``idle_timeout_seconds`` (DICOM's ARTIM timer), or the connection is closed;
3. only then does pynetdicom's association start, reading the request from what was read
   (``GuardedSocket``): it counts against ``max_associations`` from here on.

``GuardedSocket`` also enforces, as PDUs arrive, the maximum PDU length we announce and the
largest C-STORE dataset we accept (``max_store_mb``): a peer that exceeds either gets an
A-ABORT and the connection closes before the data is held in memory.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import structlog
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node import metrics

log = structlog.stdlib.get_logger("node.listener")

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
MAX_ASSOCIATE_RQ_BYTES = 1 << 20
"""A larger A-ASSOCIATE-RQ is no modality's: the connection is closed."""
PDU_OVERHEAD = 6 + 6
"""PDU header (type, reserved, length) and one PDV item header (length, context, control)."""
A_ABORT_INVALID_PDU_PARAMETER = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6))
"""A-ABORT PDU, source: service provider (2), reason: invalid PDU parameter value (6)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one connection may do before and after its association starts."""

    idle_timeout: float
    max_pending: int
    max_pdu_bytes: int
    """0 = unlimited."""
    max_store_bytes: int


class Dropped(Exception):
    """A connection closed before its association started; ``reason`` is logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PendingConnections:
    """Connections waiting for their A-ASSOCIATE-RQ, oldest first; past the global or the
    per-address cap the oldest (of the address, else of all) is shut down to make room."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.per_address = max(1, max_pending // 4)
        self._lock = threading.Lock()
        self._waiting: OrderedDict[int, tuple[socket.socket, str]] = OrderedDict()
        self._next = 0

    def admit(self, sock: socket.socket, address: str) -> int:
        with self._lock:
            same = [k for k, (_, a) in self._waiting.items() if a == address]
            if len(same) >= self.per_address:
                self._evict(same[0], "address_pending_limit")
            elif len(self._waiting) >= self.max_pending:
                self._evict(next(iter(self._waiting)), "pending_limit")
            self._next += 1
            self._waiting[self._next] = (sock, address)
            return self._next

    def release(self, ticket: int) -> None:
        with self._lock:
            self._waiting.pop(ticket, None)

    def __len__(self) -> int:
        return len(self._waiting)

    def _evict(self, ticket: int, reason: str) -> None:
        sock, address = self._waiting.pop(ticket)
        log.warning("connection_evicted", reason=reason, peer=address)
        metrics.CONNECTIONS_DROPPED.labels(reason=reason).inc()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the thread waiting on it


def _read_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Dropped("idle_timeout")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError as exc:
            raise Dropped("idle_timeout") from exc
        except OSError as exc:
            raise Dropped("closed_before_request") from exc
        if not chunk:
            raise Dropped("closed_before_request")
        data += chunk
    return bytes(data)


def await_request(
    sock: socket.socket, context: ssl.SSLContext | None, idle_timeout: float
) -> tuple[socket.socket, bytes]:
    """The (TLS-wrapped) socket and its whole A-ASSOCIATE-RQ PDU, read within ``idle_timeout``
    of the connection; ``Dropped`` when the handshake fails or the request does not come."""
    deadline = time.monotonic() + idle_timeout
    if context is not None:
        sock.settimeout(idle_timeout)
        try:
            sock = context.wrap_socket(sock, server_side=True)
        except TimeoutError as exc:
            raise Dropped("idle_timeout") from exc
        except (ssl.SSLError, OSError) as exc:
            raise Dropped(f"tls_handshake_failed: {getattr(exc, 'reason', None) or exc}") from exc
    try:
        header = _read_exactly(sock, 6, deadline)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type != A_ASSOCIATE_RQ or length > MAX_ASSOCIATE_RQ_BYTES:
            raise Dropped(f"not_an_associate_request: PDU type 0x{pdu_type:02X}, {length} bytes")
        return sock, header + _read_exactly(sock, length, deadline)
    except Dropped:
        if context is not None:
            sock.close()  # the TLS socket holds the connection now, not the accepted one
        raise


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket, fed first with the A-ASSOCIATE-RQ already read, and watching every
    PDU that follows: a P-DATA-TF longer than the announced maximum, or datasets whose
    fragments add up past ``max_store_bytes``, abort the association."""

    prefix: bytearray
    limits: Limits
    _pdu_type: int | None
    _dataset_bytes: int

    @classmethod
    def adopt(cls, base: AssociationSocket, prefix: bytes, limits: Limits) -> GuardedSocket:
        """The same socket (state and all) with the guard's behaviour."""
        guarded = cls.__new__(cls)
        guarded.__dict__.update(base.__dict__)
        guarded.prefix = bytearray(prefix)
        guarded.limits = limits
        guarded._pdu_type = None
        guarded._dataset_bytes = 0
        return guarded

    @property
    def ready(self) -> bool:
        return bool(self.prefix) or bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom reads a PDU as its 6-byte header, then its body: check both."""
        if self.prefix:
            out, self.prefix = self.prefix[:nr_bytes], self.prefix[nr_bytes:]
            return out
        if self._pdu_type is None and nr_bytes == 6:
            header = super().recv(6)
            if len(header) == 6:
                self._pdu_type, _, length = struct.unpack(">BBL", header)
                self._check_pdu(length)
            return header
        pdu_type, self._pdu_type = self._pdu_type, None
        body = super().recv(nr_bytes)
        if pdu_type == P_DATA_TF:
            self._count_datasets(body)
        return body

    def _check_pdu(self, length: int) -> None:
        limit = self.limits.max_pdu_bytes
        if self._pdu_type == P_DATA_TF and limit and length > limit + PDU_OVERHEAD:
            self._abort("pdu_too_long", pdu_bytes=length, max_pdu_bytes=limit)

    def _count_datasets(self, body: bytearray) -> None:
        """Sum the dataset fragments of the message under way (PDV items: length, context ID,
        message control header: bit 0 command, bit 1 last fragment)."""
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack(">L", body[offset : offset + 4])
            control = body[offset + 5]
            if not control & 0x01:
                self._dataset_bytes += max(0, item_length - 2)
                if self._dataset_bytes > self.limits.max_store_bytes:
                    self._abort(
                        "dataset_too_large",
                        received_bytes=self._dataset_bytes,
                        max_store_bytes=self.limits.max_store_bytes,
                    )
                if control & 0x02:
                    self._dataset_bytes = 0
            offset += 4 + item_length

    def _abort(self, reason: str, **fields: Any) -> None:
        log.warning("association_aborted_by_limit", reason=reason, **fields)
        metrics.CONNECTIONS_DROPPED.labels(reason=reason).inc()
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(A_ABORT_INVALID_PDU_PARAMETER)
        raise OSError(f"association aborted: {reason}")


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler; ``request`` is (socket, A-ASSOCIATE-RQ bytes)."""

    server: GuardedServer

    def _create_association(self) -> Any:
        sock, prefix = self.request
        self.request = sock
        assoc = super()._create_association()
        assert assoc.dul.socket is not None  # set by the base class
        assoc.dul.socket = GuardedSocket.adopt(assoc.dul.socket, prefix, self.server.limits)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """A ``ThreadedAssociationServer`` whose accept thread only accepts (module docstring)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        self.limits = limits
        self.pending = PendingConnections(limits.max_pending)
        kwargs["request_handler"] = GuardedRequestHandler
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        ticket = self.pending.admit(request, address)
        try:
            sock, prefix = await_request(request, self.ssl_context, self.limits.idle_timeout)
        except Dropped as dropped:
            log.info("connection_dropped", reason=dropped.reason, peer=address)
            reason = dropped.reason.split(":")[0]
            metrics.CONNECTIONS_DROPPED.labels(reason=reason).inc()
            self.shutdown_request(request)
            return
        finally:
            self.pending.release(ticket)
        try:
            self.finish_request(cast(Any, (sock, prefix)), client_address)
        except Exception:  # as pynetdicom's own thread does: log, close, keep serving
            log.exception("connection_failed", peer=address)
            self.shutdown_request(sock)
