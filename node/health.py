"""The health and metrics endpoint: a small HTTP server on ``[http]`` (loopback by default).

- ``GET /health``: JSON with storage writable, free space, queue depth, model loaded and the
  last error; HTTP 200 when the node can take and process images, 503 otherwise (storage not
  writable, free space under ``node.min_free_mb``, or no model loaded). The container's
  HEALTHCHECK and load balancers read the status code; people read the JSON.
- ``GET /metrics``: every node metric in the Prometheus text format (``node.metrics``).

The server runs in its own daemon threads; ``HealthServer.shutdown()`` stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog

from node import metrics
from node.config import Config
from node.errors import DatabaseError
from node.store import reports

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthReport:
    """What ``/health`` answers. ``healthy`` is False when ``problems`` is not empty."""

    healthy: bool
    problems: tuple[str, ...]
    storage: str
    storage_writable: bool
    free_mb: float
    min_free_mb: float
    queue_depth: int | None
    """Instances waiting for their study to be quiet + jobs queued, running or waiting."""
    model_loaded: bool
    model: dict[str, str] | None
    last_error: dict[str, Any] | None

    def to_json(self) -> bytes:
        body = {"status": "ok" if self.healthy else "unhealthy", **asdict(self)}
        return json.dumps(body, indent=2).encode("utf-8")


def check(config: Config) -> HealthReport:
    """Look at the node now: storage, free space, queue database, model, last error."""
    storage = config.node.storage
    writable = _storage_writable(storage)
    free_mb = _free_mb(storage)
    depth = _queue_depth(config)
    status = metrics.STATUS
    model, last = status.model, status.last_error
    problems = []
    if not writable:
        problems.append(f"storage {storage} is not writable")
    if free_mb < config.node.min_free_mb:
        problems.append(f"free space {free_mb:.0f} MB is under {config.node.min_free_mb:.0f} MB")
    if model is None:
        problems.append("no analysis model loaded")
    return HealthReport(
        healthy=not problems,
        problems=tuple(problems),
        storage=str(storage),
        storage_writable=writable,
        free_mb=round(free_mb, 1),
        min_free_mb=config.node.min_free_mb,
        queue_depth=depth,
        model_loaded=model is not None,
        model={"name": model.name, "version": model.version} if model else None,
        last_error={"event": last.event, "at": last.at} if last else None,
    )


def _storage_writable(storage: Path) -> bool:
    """True when a file can be created, synced and removed in the storage folder."""
    try:
        with tempfile.NamedTemporaryFile(dir=storage, prefix=".health-", delete=True) as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError:
        return False
    return True


def _free_mb(storage: Path) -> float:
    try:
        return shutil.disk_usage(storage).free / 1e6
    except OSError:
        return 0.0


def _queue_depth(config: Config) -> int | None:
    """Work not yet done, from the queue database; 0 before it exists, None if unreadable."""
    try:
        with reports.reading(
            config.database.url_or_default, storage=config.node.storage
        ) as database:
            return 0 if database is None else reports.queue_depth(database)
    except DatabaseError:
        return None


REQUEST_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 32


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ShadowSpot"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_SECONDS  # a request not sent whole by then is dropped

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            report = check(self.server.config)
            code = HTTPStatus.OK if report.healthy else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(code, report.to_json(), "application/json")
        elif path == "/metrics":
            body, content_type = metrics.render(
                self.server.config.database.url_or_default,
                storage=self.server.config.node.storage,
            )
            self._send(HTTPStatus.OK, body, content_type)
        else:
            self._send(HTTPStatus.NOT_FOUND, b'{"error": "not found"}\n', "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, code: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request_served", request=format % args)


class _Server(ThreadingHTTPServer):
    """At most ``MAX_CONNECTIONS`` requests at once, each bounded by the handler's timeout:
    half-sent requests can neither pile up threads nor hold the endpoint."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config: Config) -> None:
        self.config = config
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((config.http.host, config.http.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("http_request_refused", reason="too many open requests")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HealthServer:
    """The running endpoint. ``address`` is the bound (host, port): port 0 picks a free one."""

    def __init__(self, config: Config) -> None:
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="shadowspot-http",
            daemon=True,
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> HealthServer:
        self._thread.start()
        host, port = self.address
        log.info("http_started", host=host, port=port)
        return self

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start(config: Config) -> HealthServer | None:
    """Start the endpoint if ``[http] enabled``; None otherwise."""
    if not config.http.enabled:
        return None
    return HealthServer(config).start()
