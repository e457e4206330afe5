"""Intake over real associations on 127.0.0.1: a resent failed instance is analysed again, a
known one is not; one SOP Instance UID sent under two studies at once leaves one recorded
file; start-up moves spool files it cannot record to the quarantine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import structlog.testing
from pydicom import Dataset, uid

from node.dimse import Status
from node.queue import InstanceState, JobState, Queue
from node.serve import Node
from node.spool import Spool, inspect
from pipeline.errors import InputImageError
from pipeline.result import AnalysisResult
from tests.node.conftest import NODE_AE, StartNode, make_config, make_image, scu

pytestmark = pytest.mark.network
CR = uid.ComputedRadiographyImageStorage


@dataclass
class Flaky:
    """An ``analyse_file`` that fails with bad input while ``failing`` is set, else finds
    nothing; records what it was asked to analyse."""

    failing: bool = True
    analysed: list[str] = field(default_factory=list)

    def __call__(self, path: Path, /) -> tuple[Dataset, AnalysisResult]:
        ds = pydicom.dcmread(path)
        self.analysed.append(str(ds.SOPInstanceUID))
        if self.failing:
            raise InputImageError("the image is blank")
        shape = (int(ds.Rows), int(ds.Columns))
        return ds, AnalysisResult(
            findings=(),
            shape=shape,
            spacing_mm=(0.5, 0.5),
            model_name="flaky",
            model_version="0",
            timings_ms={},
            enhanced_image=np.zeros(shape, np.float32),
        )


def send(port: int, ds: Dataset, *, before: Callable[[], object] | None = None) -> int:
    """C-STORE one dataset over its own association; ``before`` runs just before the store."""
    assoc = scu(CR).associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        if before is not None:
            before()
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_resent_failed_instance_is_analysed_again(start_node: StartNode) -> None:
    """A resend of an instance whose analysis failed is Success, received again and analysed
    in a new job with its full attempts; its old job, which held nothing else, is gone."""
    flaky = Flaky()
    node = start_node(analyse_file=flaky, study_quiet_seconds=0.1)
    ds = make_image()
    assert send(node.port, ds) == Status.SUCCESS
    wait_until(lambda: [j.state for j in node.queue.jobs()] == [JobState.FAILED], "the failure")
    (old_job,) = node.queue.jobs()
    flaky.failing = False
    assert send(node.port, ds) == Status.SUCCESS
    wait_until(lambda: node.queue.instances()[0].state is InstanceState.ANALYSED, "the analysis")
    (job,) = node.queue.jobs()
    assert job.id != old_job.id and job.state is JobState.DONE and job.attempts == 1
    assert flaky.analysed == [ds.SOPInstanceUID] * 2
    assert len(list(node.spool.files())) == 1


def test_a_resent_analysed_instance_is_a_duplicate(start_node: StartNode) -> None:
    """A resend of an instance that was analysed is acknowledged and not analysed twice."""
    flaky = Flaky(failing=False)
    node = start_node(analyse_file=flaky, study_quiet_seconds=0.1)
    ds = make_image()
    assert send(node.port, ds) == Status.SUCCESS
    wait_until(lambda: [j.state for j in node.queue.jobs()] == [JobState.DONE], "the analysis")
    assert send(node.port, ds) == Status.SUCCESS
    time.sleep(0.5)  # more than the quiet period: a second job would have formed by now
    assert len(node.queue.jobs()) == 1 and flaky.analysed == [ds.SOPInstanceUID]


def _at_once(port: int, datasets: list[Dataset]) -> dict[str, int]:
    """Store each dataset over its own association, all C-STOREs released at one moment;
    Study Instance UID → status."""
    barrier = threading.Barrier(len(datasets))
    statuses: dict[str, int] = {}

    def sender(ds: Dataset) -> None:
        statuses[ds.StudyInstanceUID] = send(port, ds, before=lambda: barrier.wait(10))

    threads = [threading.Thread(target=sender, args=(ds,)) for ds in datasets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return statuses


def test_one_uid_in_two_studies_at_once_leaves_one_recorded_file(start_node: StartNode) -> None:
    """Two associations storing the same SOP Instance UID under two studies at the same
    moment: one is Success and recorded, the other refused with Duplicate SOP Instance; the
    spool holds exactly the recorded file (no orphan), in every one of several rounds."""
    node = start_node()
    for _ in range(6):
        sop = uid.generate_uid()
        copies = [make_image(study_uid=uid.generate_uid(), sop_instance_uid=sop) for _ in "ab"]
        statuses = _at_once(node.port, copies)
        (row,) = [i for i in node.queue.instances() if i.sop_instance_uid == sop]
        on_disk = sorted(p for p in node.spool.files() if p.stem == sop)
        assert on_disk == [row.path], "a second, unrecorded spool file"
        assert statuses[row.header.study_instance_uid] == Status.SUCCESS
        assert sorted(statuses.values()) == [Status.SUCCESS, Status.DUPLICATE_SOP_INSTANCE]


def test_start_quarantines_spool_files_it_cannot_record(tmp_path: Path) -> None:
    """At start-up, an unrecorded spooled copy of a UID recorded in another study and an
    unreadable file are moved to the quarantine with their reason (logged), not parsed again
    at every start."""
    storage = tmp_path / "var"
    ds = make_image()
    spool, queue = Spool(storage, min_free_bytes=0), Queue(storage, study_quiet_seconds=0.1)
    path = storage / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    header = inspect(data, sop_class_uid=CR, sop_instance_uid=ds.SOPInstanceUID)
    recorded = spool.write(data, header)
    assert queue.add_instance(header, path=recorded, calling_ae="M1", peer="h")
    queue.close()
    twin = make_image(study_uid=uid.generate_uid(), sop_instance_uid=ds.SOPInstanceUID)
    second = spool.path_for_uids(twin.StudyInstanceUID, ds.SOPInstanceUID)
    second.parent.mkdir(parents=True)
    twin.save_as(second, enforce_file_format=True)  # what the same-UID race used to leave
    garbage = spool.path_for_uids(uid.generate_uid(), uid.generate_uid())
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"not DICOM at all")

    for start in range(2):
        node = Node(make_config(storage), analyse_file=None)
        try:
            with structlog.testing.capture_logs() as logs:
                assert node.adopt_orphans() == 0
            assert list(node.spool.files()) == [recorded], f"start {start}"
        finally:
            node.stop(grace_seconds=0)
        moved = [e["reason"] for e in logs if e["event"] == "orphan_quarantined"]
        assert sorted(moved) == ([] if start else ["uid_in_another_study", "unreadable"])
    reasons = sorted(
        json.loads(p.read_text())["reason"] for p in (storage / "quarantine").glob("*.json")
    )
    assert reasons == [
        "unrecorded spool file: cannot be read: InvalidDicomError",
        "unrecorded spool file: its SOP Instance UID is recorded in another study",
    ]
    assert len(list((storage / "quarantine").glob("*.dcm"))) == 2
