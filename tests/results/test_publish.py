"""publish(), the delivery queue and the alert webhook, on a real SQLite file and a real
HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pydicom
import pytest

from node.alerts import Alert, AlertNotifier
from node.config import (
    AlertsConfig,
    CallerConfig,
    Config,
    DestinationConfig,
    ExportConfig,
    NodeSection,
)
from node.deliveries import DeliveryState, DeliveryStore, NewDelivery
from node.encode import ObjectKind
from node.results import publish
from tests.results.helpers import generated_cr, result_of, two_findings, wait_for


def _config(storage: Path, *, send_to: str | None = "pacs") -> Config:
    return Config(
        node=NodeSection(storage=storage, ae_title="SHADOWSPOT"),
        callers=(CallerConfig(ae_title="MODALITY", send_results_to=send_to),),
        destinations=(DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=1),),
    )


def _store(storage: Path, schedule: tuple[float, ...] = (10.0, 30.0)) -> DeliveryStore:
    return DeliveryStore(storage, retry_schedule_seconds=schedule)


def test_publish_writes_the_objects_and_queues_one_delivery_each(tmp_path: Path) -> None:
    """Objects land under results/<study>/ and one pending delivery per object is queued."""
    source = generated_cr()
    store = _store(tmp_path)
    published = publish(
        source=source,
        result=two_findings(source),
        config=_config(tmp_path),
        store=store,
        calling_ae="MODALITY",
    )
    assert [o.kind for o in published.objects] == [ObjectKind.SEG, ObjectKind.SR, ObjectKind.PR]
    folder = tmp_path / "results" / source.StudyInstanceUID
    for obj in published.objects:
        assert obj.path.parent == folder
        assert pydicom.dcmread(obj.path).SOPInstanceUID == obj.sop_instance_uid
    deliveries = store.deliveries()
    assert [d.sop_instance_uid for d in deliveries] == [
        o.sop_instance_uid for o in published.objects
    ]
    assert {d.state for d in deliveries} == {DeliveryState.PENDING}
    assert published.destination == "pacs" and published.alert is not None
    assert not list(folder.glob(".tmp-*"))


def test_secondary_capture_when_configured_is_written_and_queued(tmp_path: Path) -> None:
    """[export] secondary_capture = true: a fourth object, an RGB Secondary Capture of the
    enhanced image with the contours drawn in their grade colours and the legend bar below,
    queued like the others."""
    source = generated_cr()
    result = two_findings(source)
    config = dataclasses.replace(_config(tmp_path), export=ExportConfig(secondary_capture=True))
    store = _store(tmp_path)
    published = publish(
        source=source, result=result, config=config, store=store, calling_ae="MODALITY"
    )
    kinds = [o.kind for o in published.objects]
    assert kinds == [ObjectKind.SEG, ObjectKind.SR, ObjectKind.PR, ObjectKind.SC]
    sc_obj = published.objects[-1]
    sc = pydicom.dcmread(sc_obj.path)
    assert sc.SOPClassUID == sc_obj.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    pixels = sc.pixel_array
    scale = sc.Columns // source.Columns
    assert scale >= 1 and sc.Columns == source.Columns * scale
    assert sc.Rows > source.Rows * scale  # the legend bar under the image
    image = pixels[: source.Rows * scale]
    for finding in result.findings:  # each contour drawn in its own grade colour
        assert np.all(image == finding.colour, axis=-1).sum() > 50
    assert sc_obj.sop_instance_uid in {d.sop_instance_uid for d in store.deliveries()}


def test_publishing_again_reuses_uids_and_never_duplicates(tmp_path: Path) -> None:
    """A retry of the same source instance (even in a new process) rebuilds the same UIDs,
    rewrites the same files and keeps one delivery per object."""
    source = generated_cr()
    first = publish(
        source=source,
        result=two_findings(source),
        config=_config(tmp_path),
        store=_store(tmp_path),
        calling_ae="MODALITY",
    )
    again = _store(tmp_path)  # a new connection, as after a restart
    second = publish(
        source=source,
        result=two_findings(source),
        config=_config(tmp_path),
        store=again,
        calling_ae="MODALITY",
    )
    assert [o.sop_instance_uid for o in first.objects] == [
        o.sop_instance_uid for o in second.objects
    ]
    assert len(again.deliveries()) == 3
    assert len(list((tmp_path / "results" / source.StudyInstanceUID).iterdir())) == 3


def test_without_a_destination_results_are_only_kept(tmp_path: Path) -> None:
    """A caller without send_results_to (or an unknown caller): files written, nothing queued."""
    source = generated_cr()
    store = _store(tmp_path)
    published = publish(
        source=source,
        result=result_of((source.Rows, source.Columns), (), 0.7),
        config=_config(tmp_path, send_to=None),
        store=store,
        calling_ae="MODALITY",
    )
    assert [o.kind for o in published.objects] == [ObjectKind.SR]
    assert published.destination is None and published.alert is None
    assert store.deliveries() == []
    assert published.objects[0].path.is_file()


def _one_delivery(store: DeliveryStore, tmp_path: Path) -> int:
    return store.enqueue(
        "pacs",
        [
            NewDelivery(
                study_instance_uid="1.2",
                sop_instance_uid="1.2.3",
                sop_class_uid="1.2.840",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                kind="SR",
                path=tmp_path / "x.dcm",
            )
        ],
    )[0]


def test_failed_deliveries_back_off_on_schedule_then_dead_letter(tmp_path: Path) -> None:
    """Each retryable failure waits the schedule's next interval; after the last, dead."""
    store = _store(tmp_path, schedule=(5.0, 50.0))
    delivery_id = _one_delivery(store, tmp_path)
    assert [d.id for d in store.claim_due("pacs")] == [delivery_id]
    assert store.claim_due("pacs") == []  # claimed rows are not handed out twice
    assert store.mark_failed(delivery_id, "refused", retryable=True) is DeliveryState.PENDING
    row = store.deliveries()[0]
    assert row.attempts == 1 and row.last_error == "refused"
    assert row.next_attempt_at == pytest.approx(row.updated_at + 5.0)
    assert store.claim_due("pacs") == []  # not due yet
    assert store.claim_due("pacs", now=row.next_attempt_at + 0.01)
    assert store.mark_failed(delivery_id, "refused", retryable=True) is DeliveryState.PENDING
    assert store.deliveries()[0].next_attempt_at == pytest.approx(
        store.deliveries()[0].updated_at + 50.0
    )
    store.claim_due("pacs", now=store.deliveries()[0].next_attempt_at + 0.01)
    assert store.mark_failed(delivery_id, "refused", retryable=True) is DeliveryState.DEAD
    dead = store.deliveries(state=DeliveryState.DEAD)
    assert [d.attempts for d in dead] == [3]
    assert store.retry() == [delivery_id]  # shadowspot retry: dead → pending, due now
    assert (
        store.deliveries()[0].state is DeliveryState.PENDING and store.deliveries()[0].attempts == 0
    )


def test_non_retryable_failure_is_dead_at_once_and_sending_rows_recover(tmp_path: Path) -> None:
    """A permanent refusal dead-letters immediately; rows left 'sending' by a dead process
    are pending again after recover()."""
    store = _store(tmp_path)
    delivery_id = _one_delivery(store, tmp_path)
    store.claim_due("pacs")
    assert (
        store.mark_failed(delivery_id, "cannot understand", retryable=False) is DeliveryState.DEAD
    )
    store.retry([delivery_id])
    store.claim_due("pacs")
    assert _store(tmp_path).recover() == 1
    assert store.deliveries()[0].state is DeliveryState.PENDING


class _Hook(BaseHTTPRequestHandler):
    answers: ClassVar[list[int]] = []
    bodies: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(type(self).answers.pop(0) if type(self).answers else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_alert_webhook_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    """S742: the alert is POSTed as JSON with UIDs, types and grades (no patient data);
    a 500 answer is retried."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.answers, _Hook.bodies = [500], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    notifier = AlertNotifier(
        AlertsConfig(webhook_url=f"http://127.0.0.1:{server.server_port}/hook", webhook_retries=3),
        first_backoff_seconds=0.05,
    )
    try:
        source = generated_cr()
        alert = Alert.from_result(
            two_findings(source),
            study_instance_uid=source.StudyInstanceUID,
            sop_instance_uid=source.SOPInstanceUID,
        )
        assert alert is not None
        notifier.notify(alert)
        assert wait_for(lambda: len(_Hook.bodies) == 2, timeout=10)
    finally:
        notifier.close()
        server.shutdown()
        server.server_close()
    body = _Hook.bodies[-1]
    assert body["event"] == "alert" and body["study_instance_uid"] == source.StudyInstanceUID
    assert body["findings"] == [
        {
            "finding_type": "nodule",
            "grade": 3,
            "probability": 0.91,
            "side": "right",
            "zone": "upper",
        }
    ]
    text = json.dumps(body)
    assert source.PatientID not in text and str(source.PatientName) not in text
