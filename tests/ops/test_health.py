"""The health and metrics endpoint, served for real on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import metrics
from node.config import Config, HttpConfig, NodeSection
from node.health import HealthServer
from node.queue import InstanceHeader, Queue

pytestmark = pytest.mark.network

CR = "1.2.840.10008.5.1.4.1.1.1"


def _config(storage: Path, *, min_free_mb: float = 0.0) -> Config:
    return Config(
        node=NodeSection(port=0, storage=storage, min_free_mb=min_free_mb),
        http=HttpConfig(host="127.0.0.1", port=0),
    )


@pytest.fixture
def model_loaded() -> Iterator[None]:
    metrics.set_model_loaded("shadowspot-lesion-unet", "1.0.0")
    try:
        yield
    finally:
        metrics.STATUS.set_model(None)
        metrics.MODEL_LOADED.set(0)


def _get(server: HealthServer, path: str) -> tuple[int, bytes, str]:
    host, port = server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers["Content-Type"]


def _serve(config: Config) -> HealthServer:
    return HealthServer(config).start()


def _add(queue: Queue, study: str, sop: str) -> None:
    header = InstanceHeader(
        sop_instance_uid=sop,
        sop_class_uid=CR,
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR",
    )
    queue.add_instance(header, path=Path("/nonexistent") / sop, calling_ae="MOD", peer="x")


def test_healthy_node_answers_200_with_queue_depth(tmp_path: Path, model_loaded: None) -> None:
    """With writable storage, free space and a model, /health is 200 and counts queued work."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0)
    try:
        _add(queue, "1.2.3", "1.2.3.1.1")
        _add(queue, "1.2.3", "1.2.3.1.2")
        queue.form_jobs(now=1e12)  # study 1.2.3 becomes one queued job
        _add(queue, "1.2.4", "1.2.4.1.1")  # still waiting for its study to go quiet
    finally:
        queue.close()
    server = _serve(_config(tmp_path))
    try:
        code, body, content_type = _get(server, "/health")
    finally:
        server.shutdown()
    report = json.loads(body)
    assert (code, content_type) == (200, "application/json")
    assert report["status"] == "ok" and report["problems"] == []
    assert report["storage_writable"] is True and report["free_mb"] > 0
    assert report["queue_depth"] == 2  # one queued job + one waiting instance
    assert report["model"] == {"name": "shadowspot-lesion-unet", "version": "1.0.0"}


def test_no_model_is_503(tmp_path: Path) -> None:
    """Before the model is loaded the node cannot analyse: /health is 503 and says why."""
    server = _serve(_config(tmp_path))
    try:
        code, body, _ = _get(server, "/health")
    finally:
        server.shutdown()
    assert code == 503
    assert json.loads(body)["problems"] == ["no analysis model loaded"]


def test_storage_gone_and_disk_full_are_503(tmp_path: Path, model_loaded: None) -> None:
    """Unwritable storage and free space under min_free_mb each make the node unhealthy."""
    storage = tmp_path / "var"
    storage.mkdir()
    server = _serve(_config(storage, min_free_mb=1e12))
    try:
        shutil.rmtree(storage)
        code, body, _ = _get(server, "/health")
    finally:
        server.shutdown()
    report = json.loads(body)
    assert code == 503
    assert report["storage_writable"] is False
    assert any("is not writable" in p for p in report["problems"])
    assert any("free space" in p for p in report["problems"])


def test_last_error_is_reported(tmp_path: Path, model_loaded: None) -> None:
    """An error recorded by any part of the node shows in /health without making it unhealthy."""
    metrics.record_error("export_failed")
    server = _serve(_config(tmp_path))
    try:
        code, body, _ = _get(server, "/health")
    finally:
        server.shutdown()
    assert code == 200
    assert json.loads(body)["last_error"]["event"] == "export_failed"


def test_metrics_are_prometheus_text(tmp_path: Path) -> None:
    """/metrics serves our counters and the jobs-by-state gauge read from the real database."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0)
    try:
        _add(queue, "1.2.5", "1.2.5.1.1")
        queue.form_jobs(now=1e12)
    finally:
        queue.close()
    sample = ("shadowspot_instances_rejected_total", {"reason": "sop_class"})
    before = metrics.REGISTRY.get_sample_value(*sample) or 0.0
    metrics.INSTANCES_REJECTED.labels(reason="sop_class").inc()
    metrics.PIPELINE_SECONDS.observe(1.5)
    server = _serve(_config(tmp_path))
    try:
        code, body, content_type = _get(server, "/metrics")
        missing, _, _ = _get(server, "/nope")
    finally:
        server.shutdown()
    text = body.decode()
    assert code == 200 and content_type.startswith("text/plain")
    assert f'shadowspot_instances_rejected_total{{reason="sop_class"}} {before + 1}' in text
    assert 'shadowspot_jobs{state="queued"} 1.0' in text
    assert "shadowspot_queue_depth 1.0" in text
    assert 'shadowspot_pipeline_seconds_bucket{le="2.0"}' in text
    assert "# TYPE shadowspot_deliveries gauge" in text
    assert missing == 404


def test_http_listens_on_loopback_by_default() -> None:
    """The endpoint is not exposed to the network unless the site asks for it."""
    assert Config().http.host == "127.0.0.1"


def test_half_sent_requests_are_dropped_and_do_not_hold_the_endpoint(
    tmp_path: Path, model_loaded: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 connections that send half a request: /health still answers, and each of them is
    closed after the request timeout instead of holding a thread for ever."""
    import socket
    import threading
    import time

    from node import health

    monkeypatch.setattr(health._Handler, "timeout", 1.0)
    server = _serve(_config(tmp_path))
    try:
        host, port = server.address
        before = threading.active_count()
        half = []
        for _ in range(300):
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
            half.append(s)
        time.sleep(0.2)
        assert threading.active_count() - before <= health.MAX_CONNECTIONS + 2
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and threading.active_count() - before > 2:
            time.sleep(0.1)
        assert threading.active_count() - before <= 2  # every half request timed out
        status, _, _ = _get(server, "/health")
        assert status == 200
        for s in half:
            s.close()
    finally:
        server.shutdown()
