"""Worker threads: take a study job from the queue and run the pipeline on each instance.

For each instance of a claimed job the worker decides from the stored header whether it is a
chest radiograph we analyse (else: ``skipped`` with the reason), then calls the two hooks it was
given (``PipelineHooks``): ``analyse_file(path)`` (``node.analysis``) and ``publish(...)``
(``node.results``). Without hooks the job ends ``waiting_for_pipeline``: nothing is faked, and
the next process that has a pipeline puts it back in the queue.

Each finished instance is committed at once, so a job interrupted by a crash or a shutdown only
re-runs what it had not finished. While it processes a job, the worker's ``Heartbeat`` thread
renews the job's lease every third of ``lease_seconds``; a worker whose heartbeat finds the
lease lost (it stalled past the lease, and the job went back to the queue) stops that job
without finishing it: whoever claimed it next runs it.

A job whose processing raises past the per-instance handling is never left ``running``: the
loop hands it to ``Queue.interrupted`` (queued again, or failed with its unfinished instances
after ``max_attempts``).

``publish`` must itself be idempotent per SOP instance (its result UIDs are generated once and
stored), because a crash between ``publish`` returning and the instance being marked
``analysed`` re-runs that one instance.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pydicom
import pydicom.errors
import structlog
from pydicom import Dataset, uid

from node import metrics
from node.errors import DatabaseError
from node.queue import Instance, InstanceHeader, InstanceState, Job, JobState, Queue
from node.scope import out_of_scope
from node.scrub import patient_values, protecting, scrub
from node.store.jobs import JobStore
from pipeline.errors import InputImageError, ModelError
from pipeline.result import AnalysisResult

log = structlog.stdlib.get_logger("node.worker")

ANALYSED_SOP_CLASSES = frozenset(
    {
        uid.ComputedRadiographyImageStorage,
        uid.DigitalXRayImageStorageForPresentation,
        uid.SecondaryCaptureImageStorage,
    }
)
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})


class AnalyseFile(Protocol):
    """``node.analysis.Analyser.analyse_file``: read one DICOM file and run the pipeline."""

    def __call__(self, path: Path, /) -> tuple[Dataset, AnalysisResult]: ...


class Publish(Protocol):
    """Encode and store the results of one instance and enqueue their deliveries.

    Must be idempotent for a given ``instance.sop_instance_uid`` (see the module docstring).
    """

    def __call__(
        self, *, dataset: Dataset, result: AnalysisResult, job: Job, instance: Instance
    ) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineHooks:
    """What the worker calls for each chest radiograph: analysis, then publication."""

    analyse_file: AnalyseFile
    publish: Publish
    description: str = "pipeline"


def not_analysed_because(header: InstanceHeader) -> str | None:
    """Why this instance is not a chest radiograph we analyse, or None if it is one."""
    if header.number_of_frames > 1:
        return f"multi-frame image ({header.number_of_frames} frames), not a radiograph"
    if header.sop_class_uid not in ANALYSED_SOP_CLASSES:
        return f"SOP class {uid.UID(header.sop_class_uid).name} is not analysed"
    modality = header.modality.upper()
    is_sc = header.sop_class_uid == uid.SecondaryCaptureImageStorage
    if modality not in ("", "CR", "DX") and not (is_sc and modality == "OT"):
        return f"modality {modality} is not a radiograph"
    body_part = header.body_part_examined.upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return f"body part {body_part} is not the chest"
    if is_sc and not body_part:
        return "secondary capture without BodyPartExamined CHEST"
    if header.view_position.upper() in LATERAL_VIEWS:
        return f"lateral view ({header.view_position}); frontal views only"
    return None


def not_frontal_by_content(header: InstanceHeader, result: AnalysisResult) -> str | None:
    """Without a View Position, the image itself must look frontal: a frontal chest shows two
    lung fields (``AnalysisResult.lung_fields``), a lateral one superimposed field. None when
    the header names the view, or the model has no lung channel to tell."""
    if header.view_position.strip() or result.lung_fields is None or result.lung_fields >= 2:
        return None
    return "no View Position, and the image does not show two lung fields: not a frontal chest"


class Heartbeat(threading.Thread):
    """Renews the lease on one claimed job every ``interval`` seconds until ``stop()``;
    ``lost`` is set once the queue says the lease is no longer this worker's."""

    def __init__(self, queue: JobStore, job_id: int, *, interval: float) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self._queue = queue
        self._job_id = job_id
        self._interval = interval
        self._stopping = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                held = self._queue.heartbeat(self._job_id)
            except DatabaseError as exc:  # unreachable for now: the lease may still hold
                log.warning("heartbeat_failed", job_id=self._job_id, error=str(exc))
                continue
            if not held:
                self.lost.set()
                return

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)


class Worker(threading.Thread):
    """One worker thread: forms jobs of quiet studies, claims one at a time, processes it."""

    def __init__(
        self,
        queue: Queue,
        hooks: PipelineHooks | None,
        *,
        stop: threading.Event,
        name: str = "worker-1",
        poll_seconds: float = 0.2,
        min_age_years: float = 18.0,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._min_age = min_age_years
        self._queue = queue
        self._hooks = hooks
        self._stop_event = stop
        self._poll = poll_seconds

    def run(self) -> None:
        while not self._stop_event.is_set():
            job: Job | None = None
            try:
                for formed in self._queue.form_jobs():
                    log.info(
                        "job_formed", job_id=formed.id, study_instance_uid=formed.study_instance_uid
                    )
                job = self._queue.claim()
                if job is None:
                    self._stop_event.wait(self._poll)
                    continue
                self.process(job)
            except Exception as exc:  # the worker loop's one catch-all: log, back off, go on
                log.exception("worker_failed", job_id=None if job is None else job.id)
                if job is not None:
                    self._interrupted(job, exc)
                self._stop_event.wait(1.0)

    def _interrupted(self, job: Job, exc: Exception) -> None:
        """A job whose processing raised is not left running: queued again, or failed with
        its instances once its attempts are used up (``Queue.interrupted``)."""
        try:
            state = self._queue.interrupted(job.id, f"processing raised {type(exc).__name__}")
        except DatabaseError as db_exc:  # the database itself fails: its lease runs out
            log.error("job_not_recorded", job_id=job.id, error=type(db_exc).__name__)
            return
        log.warning("job_interrupted", job_id=job.id, attempt=job.attempts, state=state)

    def process(self, job: Job) -> JobState:
        """Run one claimed job to an end state (or release it at shutdown)."""
        context = {
            "job_id": job.id,
            "study_instance_uid": job.study_instance_uid,
            "calling_ae": job.calling_ae,
            "attempt": job.attempts,
        }
        heartbeat = Heartbeat(self._queue, job.id, interval=self._queue.lease_seconds / 3)
        heartbeat.start()
        try:
            with structlog.contextvars.bound_contextvars(**context):
                return self._process(job, heartbeat.lost)
        finally:
            heartbeat.stop()

    def _process(self, job: Job, lost: threading.Event) -> JobState:
        started = time.monotonic()
        outcomes: Counter[str] = Counter()
        waiting_reason: str | None = None
        for instance in self._queue.instances_of(job.id):
            if instance.state.finished:
                outcomes["already_" + instance.state.value] += 1
                continue
            if lost.is_set():  # another worker holds it now: leave it to that one
                log.warning("job_lease_lost", **outcomes)
                return JobState.QUEUED
            if self._stop_event.is_set():
                self._queue.release(job.id)
                log.info("job_released", **outcomes)
                return JobState.QUEUED
            with structlog.contextvars.bound_contextvars(
                sop_instance_uid=instance.sop_instance_uid
            ):
                outcome = self._instance(job, instance)
            if isinstance(outcome, InstanceState):
                outcomes[outcome.value] += 1
            else:
                waiting_reason = outcome
                outcomes["waiting"] += 1
        ms = round((time.monotonic() - started) * 1000, 1)
        if waiting_reason is not None:
            self._queue.finish_job(job.id, JobState.WAITING_FOR_PIPELINE, waiting_reason)
            log.warning("study_waiting_for_pipeline", reason=waiting_reason, ms=ms, **outcomes)
            return JobState.WAITING_FOR_PIPELINE
        summary = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
        failed = outcomes[InstanceState.FAILED.value] + outcomes["already_failed"]
        if failed:  # done only when every result the job owes was written
            self._queue.finish_job(job.id, JobState.FAILED, summary)
            log.warning("study_failed", ms=ms, **outcomes)
            return JobState.FAILED
        self._queue.finish_job(job.id, JobState.DONE, summary)
        log.info("study_processed", ms=ms, **outcomes)
        return JobState.DONE

    def _stored_header(self, instance: Instance) -> Dataset | None:
        """The stored file's header (without its pixels); None when it cannot be read (the
        analysis then reports the file as it is)."""
        try:
            return pydicom.dcmread(instance.path, stop_before_pixels=True)
        except (OSError, ValueError, EOFError, pydicom.errors.InvalidDicomError):
            return None

    def _instance(self, job: Job, instance: Instance) -> InstanceState | str:
        """Process one instance; returns its final state, or why it must wait for a pipeline.

        The instance's patient values are protected meanwhile: no log line emitted while it
        is processed, by us or by pydicom/highdicom, and no reason stored for it carries them.
        """
        header = self._stored_header(instance)
        values = frozenset() if header is None else patient_values(header)
        with protecting(values):
            return self._process_instance(job, instance, header)

    def _process_instance(
        self, job: Job, instance: Instance, header: Dataset | None
    ) -> InstanceState | str:
        reason = not_analysed_because(instance.header)
        if reason is None and header is not None:  # ``node.scope``'s checks on the header
            reason = out_of_scope(header, min_age_years=self._min_age)
        if reason is not None:
            self._queue.finish_instance(instance.sop_instance_uid, InstanceState.SKIPPED, reason)
            log.info("instance_skipped", reason=reason)
            return InstanceState.SKIPPED
        if self._hooks is None:
            return "no pipeline in this process (node.analysis / node.results not available)"
        try:
            with metrics.PIPELINE_SECONDS.time():
                dataset, result = self._hooks.analyse_file(instance.path)
            if (reason := not_frontal_by_content(instance.header, result)) is not None:
                self._queue.finish_instance(
                    instance.sop_instance_uid, InstanceState.SKIPPED, reason
                )
                log.info("instance_skipped", reason=reason)
                return InstanceState.SKIPPED
            self._hooks.publish(dataset=dataset, result=result, job=job, instance=instance)
        except ModelError as exc:
            log.error("pipeline_unavailable", error=type(exc).__name__)
            metrics.record_error("pipeline_unavailable")
            return scrub(f"model unavailable: {exc}")
        except Exception as exc:  # part of the worker loop: record the failure, go on
            # Stored as the reason (and shown by ``shadowspot status``): without the
            # instance's patient values (protected) or any other quoted value.
            failure = scrub(f"{type(exc).__name__}: {exc}")
            metrics.record_error("instance_failed")
            self._queue.finish_instance(instance.sop_instance_uid, InstanceState.FAILED, failure)
            if isinstance(exc, InputImageError):
                log.warning("instance_failed", error=type(exc).__name__)
            else:
                log.exception("instance_failed", error=type(exc).__name__)
            return InstanceState.FAILED
        self._queue.finish_instance(instance.sop_instance_uid, InstanceState.ANALYSED, None)
        if result.spacing_mm is None:
            log.warning(
                "source_without_pixel_spacing",
                detail="no positive PixelSpacing or ImagerPixelSpacing: sizes are in pixels, "
                "the SR has no mm measurements, and some viewers (OHIF) cannot display the "
                "source; ask the modality's vendor to fill them in",
            )
        log.info(
            "instance_analysed",
            findings=len(result.findings),
            alert=result.alert,
            highest_grade=result.highest_grade,
        )
        return InstanceState.ANALYSED
