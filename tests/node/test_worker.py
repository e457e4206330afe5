"""The worker: which instances are analysed, what a job ends as, and that nothing runs twice.

The pipeline and publication hooks here are small recording doubles that satisfy the worker's
``AnalyseFile``/``Publish`` protocols (the real ones are exercised by their own modules' tests);
the queue, spool and DICOM files are real.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import structlog
import structlog.testing
from pydicom import Dataset, uid

from node.queue import Instance, InstanceHeader, InstanceState, Job, JobState, Queue
from node.spool import Spool, inspect
from node.worker import PipelineHooks, Worker, not_analysed_because
from pipeline.errors import InputImageError
from pipeline.result import AnalysisResult
from tests.node.conftest import make_image


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing in the worker catches it."""


@dataclass
class Recorder:
    """Records every call; fails or 'crashes' on the instances it is told to."""

    analysed: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    crash_on: set[str] = field(default_factory=set)
    bad_input: set[str] = field(default_factory=set)
    spacing_mm: tuple[float, float] | None = None
    lung_fields: dict[str, int] = field(default_factory=dict)

    def analyse_file(self, path: Path, /) -> tuple[Dataset, AnalysisResult]:
        ds = pydicom.dcmread(path)
        uid_ = str(ds.SOPInstanceUID)
        self.analysed.append(uid_)
        if uid_ in self.crash_on:
            self.crash_on.discard(uid_)
            raise Crash(uid_)
        if uid_ in self.bad_input:
            raise InputImageError("constant image")
        shape = (int(ds.Rows), int(ds.Columns))
        return ds, AnalysisResult(
            findings=(),
            shape=shape,
            spacing_mm=self.spacing_mm,
            model_name="recorder",
            model_version="0",
            timings_ms={},
            enhanced_image=np.zeros(shape, np.float32),
            lung_fields=self.lung_fields.get(uid_, 2),
        )

    def publish(
        self, *, dataset: Dataset, result: AnalysisResult, job: Job, instance: Instance
    ) -> None:
        assert dataset.SOPInstanceUID == instance.sop_instance_uid
        self.published.append(instance.sop_instance_uid)

    def hooks(self) -> PipelineHooks:
        return PipelineHooks(analyse_file=self.analyse_file, publish=self.publish)


def _received(storage: Path, *datasets: Dataset) -> Queue:
    """Spool and enqueue ``datasets`` as the C-STORE handler does, and form their jobs."""
    queue = Queue(storage, study_quiet_seconds=0.1)
    spool = Spool(storage, min_free_bytes=0)
    for ds in datasets:
        path = storage / "in.dcm"
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        header = inspect(data, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
        queue.add_instance(header, path=spool.write(data, header), calling_ae="M1", peer="h")
    queue.form_jobs(now=1e12)
    return queue


def _run_one(queue: Queue, hooks: PipelineHooks | None) -> JobState:
    job = queue.claim()
    assert job is not None
    return Worker(queue, hooks, stop=threading.Event()).process(job)


def _header(**kw: object) -> InstanceHeader:
    base: dict[str, object] = {
        "sop_instance_uid": "1.2",
        "sop_class_uid": uid.ComputedRadiographyImageStorage,
        "study_instance_uid": "1.3",
        "series_instance_uid": "1.4",
        "transfer_syntax_uid": uid.ExplicitVRLittleEndian,
        "modality": "CR",
        "body_part_examined": "CHEST",
        "view_position": "PA",
    }
    return InstanceHeader(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"body_part_examined": ""}, None),
        ({"body_part_examined": "THORAX", "modality": "DX"}, None),
        ({"sop_class_uid": uid.DigitalXRayImageStorageForPresentation, "modality": "DX"}, None),
        ({"sop_class_uid": uid.SecondaryCaptureImageStorage, "modality": "OT"}, None),
        ({"body_part_examined": "KNEE"}, "body part KNEE"),
        ({"modality": "MG"}, "modality MG"),
        ({"view_position": "LL"}, "lateral view"),
        ({"number_of_frames": 4}, "multi-frame"),
        ({"sop_class_uid": uid.DigitalXRayImageStorageForProcessing}, "For Processing"),
        (
            {"sop_class_uid": uid.SecondaryCaptureImageStorage, "body_part_examined": ""},
            "secondary",
        ),
    ],
)
def test_which_instances_are_chest_radiographs(
    changes: dict[str, object], reason: str | None
) -> None:
    """Body part, modality, SOP class, frames and view decide; the reason names the cause."""
    found = not_analysed_because(_header(**changes))
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found


def test_without_a_pipeline_the_job_waits_and_nothing_is_faked(tmp_path: Path) -> None:
    """No hooks: chest images stay queued in a waiting_for_pipeline job; non-chest are skipped."""
    study = uid.generate_uid()
    chest, knee = make_image(study_uid=study), make_image(study_uid=study, body_part="KNEE")
    queue = _received(tmp_path, chest, knee)
    assert _run_one(queue, None) is JobState.WAITING_FOR_PIPELINE
    states = {i.sop_instance_uid: (i.state, i.reason) for i in queue.instances()}
    assert states[chest.SOPInstanceUID] == (InstanceState.QUEUED, None)
    assert states[knee.SOPInstanceUID] == (InstanceState.SKIPPED, "body part KNEE is not the chest")
    (job,) = queue.jobs()
    assert job.reason is not None and "no pipeline" in job.reason


def test_with_hooks_each_chest_image_is_analysed_and_published_once(tmp_path: Path) -> None:
    """Chest images are analysed and published, others skipped, bad input failed; the job is
    failed (not done: it owes a result it could not write), with the counts as its reason."""
    study = uid.generate_uid()
    good, lateral, bad = (make_image(study_uid=study) for _ in range(3))
    lateral.ViewPosition = "LL"
    recorder = Recorder(bad_input={bad.SOPInstanceUID})
    queue = _received(tmp_path, good, lateral, bad)
    assert _run_one(queue, recorder.hooks()) is JobState.FAILED
    (job,) = queue.jobs()
    assert job.reason == "1 analysed, 1 failed, 1 skipped"
    states = {i.sop_instance_uid: i.state for i in queue.instances()}
    assert states == {
        good.SOPInstanceUID: InstanceState.ANALYSED,
        lateral.SOPInstanceUID: InstanceState.SKIPPED,
        bad.SOPInstanceUID: InstanceState.FAILED,
    }
    assert recorder.published == [good.SOPInstanceUID]


@pytest.mark.parametrize(("spacing", "warned"), [(None, True), ((0.15, 0.15), False)])
def test_a_source_without_pixel_spacing_is_analysed_with_a_warning(
    tmp_path: Path, spacing: tuple[float, float] | None, warned: bool
) -> None:
    """IT staff learn from the log that a modality sends no usable pixel spacing."""
    recorder = Recorder(spacing_mm=spacing)
    queue = _received(tmp_path, make_image())
    with structlog.testing.capture_logs() as logs:
        assert _run_one(queue, recorder.hooks()) is JobState.DONE
    events = [e["event"] for e in logs]
    assert "instance_analysed" in events
    assert ("source_without_pixel_spacing" in events) is warned


def test_a_job_interrupted_mid_way_resumes_without_repeating(tmp_path: Path) -> None:
    """A crash during the second instance leaves the job running; after recovery only the
    unfinished instances run: the first is never analysed or published twice."""
    study = uid.generate_uid()
    datasets = [make_image(study_uid=study) for _ in range(3)]
    first, second, third = (str(d.SOPInstanceUID) for d in datasets)
    recorder = Recorder(crash_on={second})
    queue = _received(tmp_path, *datasets)
    with pytest.raises(Crash):
        _run_one(queue, recorder.hooks())
    (job,) = queue.jobs()
    assert job.state is JobState.RUNNING  # what kill -9 would leave behind
    restarted = Queue(tmp_path, study_quiet_seconds=0.1)
    assert restarted.recover() == (1, 0)
    assert _run_one(restarted, recorder.hooks()) is JobState.DONE
    assert recorder.published == [first, second, third]
    assert recorder.analysed == [first, second, second, third]
    (job,) = restarted.jobs()
    assert job.attempts == 2 and job.state is JobState.DONE


def test_worker_thread_releases_its_job_when_stopped(tmp_path: Path) -> None:
    """A stop request between instances hands the job back to the queue (not left running)."""
    study = uid.generate_uid()
    queue = _received(tmp_path, make_image(study_uid=study), make_image(study_uid=study))
    stop = threading.Event()
    recorder = Recorder()
    hooks = recorder.hooks()

    def analyse_then_stop(path: Path, /) -> tuple[Dataset, AnalysisResult]:
        stop.set()
        return recorder.analyse_file(path)

    worker = Worker(
        queue, PipelineHooks(analyse_file=analyse_then_stop, publish=hooks.publish), stop=stop
    )
    job = queue.claim()
    assert job is not None
    assert worker.process(job) is JobState.QUEUED
    (job,) = queue.jobs()
    assert job.state is JobState.QUEUED
    assert [i.state for i in queue.instances()].count(InstanceState.ANALYSED) == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"PatientAge": "010Y"}, "younger than 18"),
        ({"PatientAge": "", "PatientBirthDate": "20200101", "StudyDate": "20261201"}, "younger"),
        ({"Manufacturer": "ShadowSpot"}, "own result objects"),
        ({"SeriesNumber": 9104}, "own result series (9104)"),
    ],
)
def test_children_and_our_own_objects_are_stored_not_analysed(
    tmp_path: Path, change: dict[str, object], reason: str
) -> None:
    """Scope: the model is for adults' chests; a PACS that forwards our results back does not
    get them analysed again. The reason names the rule, never the patient's value."""
    study = uid.generate_uid()
    adult, other = make_image(study_uid=study), make_image(study_uid=study)
    adult.PatientAge = "045Y"
    for keyword, value in change.items():
        setattr(other, keyword, value)
    recorder = Recorder()
    queue = _received(tmp_path, adult, other)
    _run_one(queue, recorder.hooks())
    states = {i.sop_instance_uid: i for i in queue.instances()}
    assert states[adult.SOPInstanceUID].state is InstanceState.ANALYSED
    skipped = states[other.SOPInstanceUID]
    assert skipped.state is InstanceState.SKIPPED and reason in (skipped.reason or "")
    assert "010" not in (skipped.reason or "") and "2020" not in (skipped.reason or "")
    assert recorder.analysed == [adult.SOPInstanceUID]


def test_a_job_whose_processing_raises_is_not_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error past the per-instance handling (here in the scope check) neither kills the
    worker nor leaves the job running for ever: it is retried up to max_attempts, then the
    job fails and each of its instances is failed with the reason."""
    study = uid.generate_uid()
    queue = _received(tmp_path, make_image(study_uid=study), make_image(study_uid=study))
    calls: list[str] = []

    def broken_scope(ds: Dataset, *, min_age_years: float) -> str | None:
        calls.append(str(ds.SOPInstanceUID))
        raise RuntimeError("a bug in a check")

    monkeypatch.setattr("node.worker.out_of_scope", broken_scope)
    stop = threading.Event()
    worker = Worker(queue, Recorder().hooks(), stop=stop, poll_seconds=0.05)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while queue.jobs()[0].state is not JobState.FAILED and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(10)
    (job,) = queue.jobs()
    assert job.state is JobState.FAILED and job.attempts == queue.max_attempts
    assert len(calls) == queue.max_attempts
    reason = (
        f"job failed: processing raised RuntimeError; gave up after {queue.max_attempts} attempts"
    )
    assert {(i.state, i.reason) for i in queue.instances()} == {(InstanceState.FAILED, reason)}


def test_without_a_view_position_an_image_must_show_two_lung_fields(tmp_path: Path) -> None:
    """Scope by content: with no View Position, an image whose lung channel shows one field
    (a lateral) is skipped, not published; a header that names a frontal view is trusted."""
    study = uid.generate_uid()
    frontal, lateral, named = (make_image(study_uid=study) for _ in range(3))
    for ds in (frontal, lateral):
        del ds.ViewPosition
    named.ViewPosition = "PA"
    recorder = Recorder(lung_fields={lateral.SOPInstanceUID: 1, named.SOPInstanceUID: 1})
    queue = _received(tmp_path, frontal, lateral, named)
    assert _run_one(queue, recorder.hooks()) is JobState.DONE
    states = {i.sop_instance_uid: i for i in queue.instances()}
    assert states[lateral.SOPInstanceUID].state is InstanceState.SKIPPED
    assert "two lung fields" in (states[lateral.SOPInstanceUID].reason or "")
    assert sorted(recorder.published) == sorted([frontal.SOPInstanceUID, named.SOPInstanceUID])
