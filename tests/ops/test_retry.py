"""``shadowspot retry``: ``--instances`` re-queues failed or stuck instances, with a node
running (its worker picks them up) and without one (the next start does); deliveries sent
again never make two associations to one destination at once."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, uid
from pynetdicom import AE, evt
from sqlalchemy import update

from bench.procs import SHADOWSPOT, NodeProcess
from node.cli import main
from node.config import load_config
from node.deliveries import DeliveryState, DeliveryStore, NewDelivery
from node.dimse import Status
from node.export import Exporter
from node.queue import InstanceState, JobState, Queue
from node.serve import Node
from node.store.schema import instances
from tests.node.conftest import NODE_AE, make_config, make_image, scu
from tests.node.test_intake import Flaky

pytestmark = pytest.mark.network
CR = uid.ComputedRadiographyImageStorage


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _config_file(tmp_path: Path, storage: Path, extra: str = "") -> Path:
    path = tmp_path / "shadowspot.toml"
    path.write_text(f'[node]\nstorage = "{storage}"\n{extra}', encoding="utf-8")
    return path


def _send(port: int, *datasets: Dataset) -> list[int]:
    assoc = scu(CR).associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.stop(grace_seconds=2.0)


def _start(storage: Path, flaky: Flaky, nodes: list[Node]) -> Node:
    node = Node(make_config(storage, study_quiet_seconds=0.1), analyse_file=flaky)
    node.start()
    nodes.append(node)
    return node


def _states(node: Node) -> dict[str, InstanceState]:
    return {i.sop_instance_uid: i.state for i in node.queue.instances()}


def test_retry_instances_while_the_node_runs(
    tmp_path: Path, nodes: list[Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """With the node running, retry --instances --all re-queues the failed instances through
    its database; its worker analyses them again in a new job with full attempts, and the
    command names each one with what it was."""
    storage, flaky = tmp_path / "var", Flaky()
    node = _start(storage, flaky, nodes)
    study = uid.generate_uid()
    images = [make_image(study_uid=study) for _ in range(2)]
    assert _send(node.port, *images) == [Status.SUCCESS] * 2
    _wait(lambda: [j.state for j in node.queue.jobs()] == [JobState.FAILED], "the failed job")
    (old,) = node.queue.jobs()
    flaky.failing = False

    config = _config_file(tmp_path, storage)
    capsys.readouterr()  # only what the command prints, not the node's log lines
    assert main(["retry", "--instances", "--all", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    for ds in images:
        assert f"re-queued {ds.SOPInstanceUID} (study {study}): was failed: " in out
    assert "InputImageError: the image is blank" in out
    assert "2 instance(s) of 1 study(ies) re-queued" in out
    _wait(lambda: set(_states(node).values()) == {InstanceState.ANALYSED}, "the analysis")
    (job,) = node.queue.jobs()
    assert job.id != old.id and job.state is JobState.DONE and job.attempts == 1
    assert sorted(flaky.analysed) == sorted([str(ds.SOPInstanceUID) for ds in images] * 2)

    assert main(["retry", "--instances", "--all", "--config", str(config)]) == 0
    assert "0 instance(s) of 0 study(ies) re-queued" in capsys.readouterr().out


def test_retry_instances_without_a_running_node(
    tmp_path: Path, nodes: list[Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """With the node stopped, retry --instances --study re-queues the study's failed and
    stuck instances (only that study's); the next start analyses them."""
    storage, flaky = tmp_path / "var", Flaky()
    node = _start(storage, flaky, nodes)
    wanted, other = uid.generate_uid(), uid.generate_uid()
    first, second, elsewhere = (make_image(study_uid=s) for s in (wanted, wanted, other))
    assert _send(node.port, first, second, elsewhere) == [Status.SUCCESS] * 3
    _wait(lambda: [j.state for j in node.queue.jobs()] == [JobState.FAILED] * 2, "the failures")
    node.stop(grace_seconds=2.0)
    nodes.clear()
    queue = Queue(storage, study_quiet_seconds=0.1)
    with queue.database.write() as db:  # a node of an older version left it queued in the job
        db.execute(
            update(instances)
            .where(instances.c.sop_instance_uid == second.SOPInstanceUID)
            .values(state="queued", reason=None)
        )
    queue.close()

    config = _config_file(tmp_path, storage)
    capsys.readouterr()  # only what the command prints, not the node's log lines
    assert main(["retry", "--instances", "--study", wanted, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"re-queued {first.SOPInstanceUID}" in out and "was failed" in out
    assert f"re-queued {second.SOPInstanceUID}" in out and "was stuck: queued in job" in out
    assert str(elsewhere.SOPInstanceUID) not in out

    flaky.failing = False
    node = _start(storage, flaky, nodes)
    done = {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
    _wait(
        lambda: {u for u, s in _states(node).items() if s is InstanceState.ANALYSED} == done,
        "the re-queued study to be analysed",
    )
    assert _states(node)[elsewhere.SOPInstanceUID] is InstanceState.FAILED


def test_retry_instances_names_what_it_did_not_requeue(
    tmp_path: Path, nodes: list[Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """Named instances that are not abandoned (analysed, unknown, or of the other --state)
    are listed with the reason and exit 1; no selection at all is a usage error."""
    storage, flaky = tmp_path / "var", Flaky(failing=False)
    node = _start(storage, flaky, nodes)
    ds = make_image()
    assert _send(node.port, ds) == [Status.SUCCESS]
    _wait(lambda: [j.state for j in node.queue.jobs()] == [JobState.DONE], "the analysis")
    config = str(_config_file(tmp_path, storage))
    capsys.readouterr()  # only what the command prints, not the node's log lines
    assert main(["retry", "--instances", ds.SOPInstanceUID, "1.2.3.4", "--config", config]) == 1
    out = capsys.readouterr().out
    assert f"not re-queued {ds.SOPInstanceUID}: it is analysed already" in out
    assert "not re-queued 1.2.3.4: no instance with this SOP Instance UID was received" in out
    assert main(["retry", "--instances", "--config", config]) == 2
    assert "--study UID or --all" in capsys.readouterr().err
    assert main(["retry", "--state", "failed", "--config", config]) == 2
    assert main(["retry", "--all", "12", "--config", config]) == 2


def _rows(node: NodeProcess, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{node.storage / 'shadowspot.db'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.mark.slow
def test_retry_instances_from_another_process_reaches_a_running_serve(tmp_path: Path) -> None:
    """`shadowspot retry --instances UID` run beside a `shadowspot serve` process: the serve's
    worker analyses the instance again at once, in a new job with its full attempts (here it
    fails again: the image is over [node] max_decoded_megapixels, checked before the model)."""
    node = NodeProcess(
        workdir=tmp_path / "node",
        node={"study_quiet_seconds": 0.2, "max_decoded_megapixels": 0.001},
    )
    node.start()
    try:
        ds = make_image()  # 64 × 48 pixels: over the budget of 1000
        assert _send(node.port, ds) == [Status.SUCCESS]
        _wait(lambda: _rows(node, "SELECT state FROM jobs") == [("failed",)], "the failure")
        [(old_job,)] = _rows(node, "SELECT id FROM jobs")
        done = subprocess.run(
            [
                str(SHADOWSPOT),
                "retry",
                "--instances",
                ds.SOPInstanceUID,
                "--config",
                str(node.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"re-queued {ds.SOPInstanceUID} (study {ds.StudyInstanceUID}): was failed" in (
            done.stdout
        )

        def failed_again() -> bool:
            return len([e for e in node.events() if e.get("event") == "instance_failed"]) == 2

        _wait(failed_again, "the second analysis", timeout=60)
        _wait(lambda: _rows(node, "SELECT state FROM jobs") == [("failed",)], "the new job")
        [(job, attempts)] = _rows(node, "SELECT id, attempts FROM jobs")
        assert job != old_job and attempts == 1
    finally:
        node.stop()


class SlowPacs:
    """A pynetdicom Storage SCP that takes ``delay`` per C-STORE and counts the associations
    open at once (the most ever) and the SOP Instance UIDs it stored."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.open_now = 0
        self.most_at_once = 0
        self.stored: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(CR)
        handlers: list[Any] = [
            (evt.EVT_ESTABLISHED, self._opened),
            (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._closed),
            (evt.EVT_C_STORE, self._store),
        ]
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self.server.server_address[1])

    def _opened(self, event: evt.Event) -> None:
        with self._lock:
            self.open_now += 1
            self.most_at_once = max(self.most_at_once, self.open_now)

    def _closed(self, event: evt.Event) -> None:
        with self._lock:
            self.open_now -= 1

    def _store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        with self._lock:
            self.stored[str(event.request.AffectedSOPInstanceUID)] += 1
        return int(Status.SUCCESS)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def slow_pacs() -> Iterator[SlowPacs]:
    pacs = SlowPacs(delay=0.3)
    yield pacs
    pacs.close()


def _queue_results(store: DeliveryStore, storage: Path, study: str, n: int) -> list[str]:
    """``n`` result files of ``study`` queued for PACS; returns their SOP Instance UIDs."""
    items = []
    for _ in range(n):
        ds = make_image(study_uid=study)
        path = storage / "results" / study / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        items.append(
            NewDelivery(
                study_instance_uid=study,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=CR,
                transfer_syntax_uid=uid.ExplicitVRLittleEndian,
                kind="seg",
                path=path,
            )
        )
    store.enqueue("PACS", items)
    return [i.sop_instance_uid for i in items]


def test_retry_of_deliveries_never_opens_a_second_association(
    tmp_path: Path, slow_pacs: SlowPacs, capsys: pytest.CaptureFixture[str]
) -> None:
    """While the running node's exporter is sending a study to the PACS, `shadowspot retry`
    of dead deliveries (attempts reset) opens no second association to it: the node sends
    them right after; every object arrives once."""
    storage = tmp_path / "var"
    config_path = _config_file(
        tmp_path,
        storage,
        f'[[destinations]]\nname = "PACS"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {slow_pacs.port}\ntimeout_seconds = 10\n[export]\nretry_schedule_seconds = []\n",
    )
    config = load_config(config_path)
    store = DeliveryStore(storage, retry_schedule_seconds=())
    dead = _queue_results(store, storage, uid.generate_uid(), 2)
    for delivery in store.claim_due("PACS"):
        store.mark_failed(delivery.id, "association rejected", retryable=False)
    pending = _queue_results(store, storage, uid.generate_uid(), 4)
    node_exporter = Exporter(config, DeliveryStore(storage, retry_schedule_seconds=()))
    node_exporter.poll_seconds = 0.2
    node_exporter.start()
    try:
        _wait(lambda: slow_pacs.open_now == 1, "the node's association to the PACS")
        assert main(["retry", "--config", str(config_path)]) == 0
        assert "2 deliveries queued for sending now" in capsys.readouterr().out
        _wait(lambda: store.counts() == {DeliveryState.DELIVERED: 6}, "every delivery", timeout=30)
    finally:
        node_exporter.stop()
        node_exporter.store.close()
        store.close()
    assert slow_pacs.most_at_once == 1
    assert slow_pacs.stored == Counter({u: 1 for u in dead + pending})


def test_retry_of_deliveries_by_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`retry --study UID --queue-only` re-arms only that study's dead deliveries."""
    storage = tmp_path / "var"
    store = DeliveryStore(storage, retry_schedule_seconds=())
    wanted, other = uid.generate_uid(), uid.generate_uid()
    _queue_results(store, storage, wanted, 2)
    _queue_results(store, storage, other, 1)
    for delivery in store.claim_due("PACS"):
        store.mark_failed(delivery.id, "association rejected", retryable=False)
    config = str(_config_file(tmp_path, storage))
    assert main(["retry", "--study", wanted, "--queue-only", "--config", config]) == 0
    assert "2 deliveries queued for sending now" in capsys.readouterr().out
    states = {(d.study_instance_uid, d.state) for d in store.deliveries()}
    assert states == {(wanted, DeliveryState.PENDING), (other, DeliveryState.DEAD)}
    store.close()
