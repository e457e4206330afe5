"""The job queue on its default SQLite file: grouping by quiet period, job states, recovery
after a crash (``tests/store/test_jobs.py``: on both backends)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from pydicom import uid
from sqlalchemy import update

from node.dimse import Status
from node.queue import Abandoned, InstanceHeader, InstanceState, JobState, Queue
from node.store.jobs import JobStore
from node.store.schema import jobs
from tests.node.conftest import NODE_AE, StartNode, make_config, make_image, scu

T0 = 1_800_000_000.0


def _header(study: str, n: int) -> InstanceHeader:
    return InstanceHeader(
        sop_instance_uid=f"1.2.3.{study}.{n}",
        sop_class_uid=uid.ComputedRadiographyImageStorage,
        study_instance_uid=f"1.2.3.{study}",
        series_instance_uid=f"1.2.3.{study}.0",
        transfer_syntax_uid=uid.ExplicitVRLittleEndian,
        modality="CR",
        body_part_examined="CHEST",
    )


def _add(queue: JobStore, study: str, n: int, at: float = T0) -> bool:
    return queue.add_instance(
        _header(study, n),
        path=Path(f"/spool/{study}/{n}.dcm"),
        calling_ae="M1",
        peer="::1",
        received_at=at,
    )


def test_database_is_wal(tmp_path: Path) -> None:
    """The queue database is SQLite in WAL mode at <storage>/shadowspot.db."""
    Queue(tmp_path, study_quiet_seconds=1.0).close()
    with sqlite3.connect(tmp_path / "shadowspot.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_study_becomes_a_job_only_after_its_quiet_period(tmp_path: Path) -> None:
    """Instances of a study wait until none arrived for study_quiet_seconds, then form one job;
    a late instance forms a second job of its own."""
    queue = Queue(tmp_path, study_quiet_seconds=2.0)
    assert _add(queue, "A", 1, T0) and _add(queue, "A", 2, T0 + 1.5) and _add(queue, "B", 1, T0)
    assert [j.study_instance_uid for j in queue.form_jobs(now=T0 + 2.5)] == ["1.2.3.B"]
    assert queue.form_jobs(now=T0 + 3.4) == []  # A's last instance came at +1.5
    (job_a,) = queue.form_jobs(now=T0 + 3.5)
    assert [i.sop_instance_uid for i in queue.instances_of(job_a.id)] == ["1.2.3.A.1", "1.2.3.A.2"]
    assert all(i.state is InstanceState.QUEUED for i in queue.instances_of(job_a.id))
    assert _add(queue, "A", 3, T0 + 10)
    (late,) = queue.form_jobs(now=T0 + 12)
    assert late.study_instance_uid == "1.2.3.A" and late.id != job_a.id
    assert [i.sop_instance_uid for i in queue.instances_of(late.id)] == ["1.2.3.A.3"]


def test_duplicate_instance_is_not_added_twice(tmp_path: Path) -> None:
    """A second add of the same SOP Instance UID is refused, before and after grouping."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0)
    assert _add(queue, "A", 1, T0)
    assert not _add(queue, "A", 1, T0 + 0.1)
    queue.form_jobs(now=T0 + 5)
    assert not _add(queue, "A", 1, T0 + 6)
    assert len(queue.instances()) == 1 and len(queue.jobs()) == 1


def test_claim_and_finish_walk_the_job_states(tmp_path: Path) -> None:
    """queued → running (attempt 1) → done; a finished job cannot be finished again."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0)
    _add(queue, "A", 1, T0)
    (formed,) = queue.form_jobs(now=T0 + 5)
    assert formed.state is JobState.QUEUED
    job = queue.claim()
    assert job is not None and job.state is JobState.RUNNING and job.attempts == 1
    assert queue.claim() is None
    queue.finish_job(job.id, JobState.DONE, "1 analysed")
    with pytest.raises(ValueError, match="not running"):
        queue.finish_job(job.id, JobState.DONE)
    assert queue.job_counts()[JobState.DONE] == 1


def test_recover_requeues_what_a_dead_process_left_running(tmp_path: Path) -> None:
    """A job left running by a killed process is queued again on reopening; one interrupted
    max_attempts times is failed instead of looping for ever."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0, max_attempts=2)
    _add(queue, "A", 1, T0)
    queue.form_jobs(now=T0 + 5)
    assert queue.claim() is not None  # ...and the process dies here: no close, no release
    reopened = Queue(tmp_path, study_quiet_seconds=1.0, max_attempts=2)
    assert reopened.recover() == (1, 0)
    (job,) = reopened.jobs()
    assert job.state is JobState.QUEUED
    assert reopened.claim() is not None  # second attempt, interrupted again
    again = Queue(tmp_path, study_quiet_seconds=1.0, max_attempts=2)
    assert again.recover() == (0, 1)
    (job,) = again.jobs()
    assert job.state is JobState.FAILED and job.reason == "interrupted 2 times"
    # ...and its instances with it, with the reason: none is left queued for ever.
    (instance,) = again.instances_of(job.id)
    assert instance.state is InstanceState.FAILED and instance.reason == "job interrupted 2 times"


def test_waiting_jobs_are_requeued_when_a_pipeline_exists(tmp_path: Path) -> None:
    """waiting_for_pipeline jobs go back to queued by requeue_waiting, and only those."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0)
    _add(queue, "A", 1, T0)
    _add(queue, "B", 1, T0)
    queue.form_jobs(now=T0 + 5)
    first, second = queue.claim(), queue.claim()
    assert first is not None and second is not None
    queue.finish_job(first.id, JobState.WAITING_FOR_PIPELINE, "no pipeline")
    queue.finish_job(second.id, JobState.DONE)
    assert queue.requeue_waiting() == 1
    states = {j.id: j.state for j in queue.jobs()}
    assert states == {first.id: JobState.QUEUED, second.id: JobState.DONE}


@pytest.mark.network
def test_node_groups_a_study_after_its_quiet_period(start_node: StartNode) -> None:
    """Through the running node: two instances of one study and one of another become two
    jobs, only after study_quiet_seconds without a new instance."""
    node = start_node(study_quiet_seconds=1.0)
    study_a, study_b = uid.generate_uid(), uid.generate_uid()
    datasets = [make_image(study_uid=s) for s in (study_a, study_a, study_b)]
    assoc = scu(uid.ComputedRadiographyImageStorage).associate(
        "127.0.0.1", node.port, ae_title=NODE_AE
    )
    assert assoc.is_established
    sent_at = time.monotonic()
    assert [assoc.send_c_store(d).Status for d in datasets] == [Status.SUCCESS] * 3
    assoc.release()
    assert node.queue.jobs() == [] or time.monotonic() - sent_at >= 1.0
    deadline = time.monotonic() + 10
    while len(node.queue.jobs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.monotonic() - sent_at >= 1.0
    jobs = {j.study_instance_uid: j for j in node.queue.jobs()}
    assert set(jobs) == {study_a, study_b}
    assert len(node.queue.instances_of(jobs[study_a].id)) == 2
    assert len(node.queue.instances_of(jobs[study_b].id)) == 1


def test_spooled_file_without_a_row_is_adopted_at_start(
    tmp_path: Path, start_node: StartNode
) -> None:
    """A file a crash left in the spool after its rename but before its database row is
    recorded at the next start, once, and grouped like any other instance."""
    storage = tmp_path / "var"
    ds = make_image()
    orphan = storage / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    orphan.parent.mkdir(parents=True)
    ds.save_as(orphan, enforce_file_format=True)
    node = start_node(make_config(storage, study_quiet_seconds=0.1))
    (row,) = node.queue.instances()
    assert row.sop_instance_uid == ds.SOPInstanceUID and row.path == orphan
    assert node.adopt_orphans() == 0  # known now: never adopted twice


def test_a_failed_job_fails_its_unfinished_instances_with_the_reason(tmp_path: Path) -> None:
    """A job that ends failed leaves none of its instances queued: each unfinished one is
    failed with the job's reason; finished ones keep their own state and reason."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0)
    _add(queue, "A", 1, T0)
    _add(queue, "A", 2, T0)
    queue.form_jobs(now=T0 + 5)
    job = queue.claim()
    assert job is not None
    queue.finish_instance("1.2.3.A.1", InstanceState.ANALYSED, None)
    queue.finish_job(job.id, JobState.FAILED, "model crashed")
    states = {i.sop_instance_uid: (i.state, i.reason) for i in queue.instances()}
    assert states == {
        "1.2.3.A.1": (InstanceState.ANALYSED, None),
        "1.2.3.A.2": (InstanceState.FAILED, "job failed: model crashed"),
    }


def test_an_interrupted_job_is_queued_again_then_failed_with_its_instances(
    tmp_path: Path,
) -> None:
    """A job whose processing raised goes back to the queue while attempts are left; at the
    last attempt it fails, and so do its unfinished instances, with the reason."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0, max_attempts=2)
    _add(queue, "A", 1, T0)
    queue.form_jobs(now=T0 + 5)
    job = queue.claim()
    assert job is not None
    assert queue.interrupted(job.id, "processing raised RuntimeError") is JobState.QUEUED
    again = queue.claim()
    assert again is not None and again.attempts == 2
    assert queue.interrupted(job.id, "processing raised RuntimeError") is JobState.FAILED
    assert queue.interrupted(job.id, "late") is None  # not running any more: unchanged
    (failed,) = queue.jobs()
    assert failed.state is JobState.FAILED
    assert failed.reason == "processing raised RuntimeError; gave up after 2 attempts"
    (instance,) = queue.instances()
    assert instance.state is InstanceState.FAILED
    assert instance.reason == "job failed: processing raised RuntimeError; gave up after 2 attempts"


def _over(queue: Queue, study: str, states: dict[int, InstanceState], job: JobState) -> int:
    """A job of ``study`` that ran and ended ``job``, its instances left in ``states``."""
    for n in states:
        _add(queue, study, n, T0)
    (formed,) = queue.form_jobs(now=T0 + 5)
    claimed = queue.claim()
    assert claimed is not None and claimed.id == formed.id
    for n, state in states.items():
        if state.finished:
            queue.finish_instance(f"1.2.3.{study}.{n}", state, f"{state} on purpose")
    with queue.database.write() as db:  # an older node's end: instances left unfinished
        db.execute(update(jobs).where(jobs.c.id == formed.id).values(state=job))
    return formed.id


def test_requeue_takes_failed_and_stuck_instances_into_a_new_job(tmp_path: Path) -> None:
    """Failed instances, and unfinished ones in a job that is over, are abandoned; requeue
    takes them out of their job, which ends done (what it still holds finished) or is
    deleted (it holds nothing); the new job has its full attempts."""
    queue = Queue(tmp_path, study_quiet_seconds=1.0, max_attempts=3)
    a = _over(queue, "A", {1: InstanceState.ANALYSED, 2: InstanceState.FAILED}, JobState.FAILED)
    b = _over(queue, "B", {1: InstanceState.QUEUED}, JobState.FAILED)
    _over(queue, "C", {1: InstanceState.ANALYSED}, JobState.DONE)
    found = {x.instance.sop_instance_uid: x.kind for x in queue.abandoned()}
    assert found == {"1.2.3.A.2": Abandoned.FAILED, "1.2.3.B.1": Abandoned.STUCK}
    assert [x.instance.sop_instance_uid for x in queue.abandoned(kinds=[Abandoned.STUCK])] == [
        "1.2.3.B.1"
    ]
    assert queue.abandoned(study_instance_uids=["1.2.3.C"]) == []

    requeued = queue.requeue(["1.2.3.A.2", "1.2.3.B.1", "1.2.3.C.1"])
    assert sorted(x.instance.sop_instance_uid for x in requeued) == ["1.2.3.A.2", "1.2.3.B.1"]
    jobs = {j.id: j for j in queue.jobs()}
    assert jobs[a].state is JobState.DONE and b not in jobs
    assert queue.requeue(["1.2.3.A.2"]) == []  # received now: no longer abandoned
    formed = queue.form_jobs(now=T0 + 6)  # received times are kept: quiet at once
    assert sorted(j.study_instance_uid for j in formed) == ["1.2.3.A", "1.2.3.B"]
    assert all(j.attempts == 0 and j.state is JobState.QUEUED for j in formed)
    for j in formed:
        (instance,) = queue.instances_of(j.id)
        assert instance.state is InstanceState.QUEUED and instance.reason is None
