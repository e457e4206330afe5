"""No patient value reaches a log line or a stored reason: pydicom's and highdicom's messages
quote the values they refuse; the log renderer and the worker's stored failure reason scrub
them. Distinctive values (valid and invalid) are sent through a real worker and a real log
file, which are then searched for them."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom import Dataset

from node.logs import configure_logging, scrub
from node.queue import Queue
from node.spool import Spool, inspect
from node.worker import PipelineHooks, Worker
from pipeline.result import AnalysisResult
from tests.node.conftest import make_image

SECRETS = ("ZZSECRETDOB", "ZZSECRET-SEX", "ZZSECRETID", "ZZSECRET^PATIENTNAME")


def _no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text.upper(), f"{secret} in {where}"


def test_scrub_redacts_quoted_values_and_keeps_uids() -> None:
    text = "SR could not be built: Unable to convert 'ZZSECRETDOB' to 'DA' object"
    assert scrub(text) == "SR could not be built: Unable to convert '<redacted>' to 'DA' object"
    assert scrub("instance '1.2.840.10008.1.2' refused") == "instance '1.2.840.10008.1.2' refused"


def test_log_lines_carry_no_patient_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception quoting a birth date, and pydicom's own warning quoting a sex, go through
    the node's handlers (stderr and the log file) without the values."""
    log_file = configure_logging(fmt="json", level="info", log_dir=tmp_path / "logs")
    assert log_file is not None
    try:
        try:
            raise ValueError("Unable to convert 'ZZSECRETDOB' to 'DA' object")
        except ValueError:
            structlog.stdlib.get_logger("node.worker").exception("instance_failed")
        logging.getLogger("pydicom").warning("Invalid value for VR CS: 'zzsecret-sex'.")
        structlog.stdlib.get_logger("node.worker").warning(
            "x", error="Unable to convert 'ZZSECRETID'"
        )
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
        stderr = capsys.readouterr().err
        configure_logging(fmt="json", level="info")
    written = log_file.read_text(encoding="utf-8")
    assert "instance_failed" in written and "<redacted>" in written
    _no_secret(written, "the log file")
    _no_secret(stderr, "stderr")


class _Refusing:
    def analyse_file(self, path: Path, /) -> tuple[Dataset, AnalysisResult]:
        ds = pydicom.dcmread(path)
        raise ValueError(f"Unable to convert '{ds.PatientID}' to 'DA' object")

    def publish(self, **_: object) -> None:
        raise AssertionError("nothing to publish")


def test_the_stored_failure_reason_carries_no_patient_values(tmp_path: Path) -> None:
    ds = make_image()
    ds.PatientID = "ZZSECRETID"
    ds.PatientName = "Zzsecret^Patientname"
    queue = Queue(tmp_path, study_quiet_seconds=0.1)
    spool = Spool(tmp_path, min_free_bytes=0)
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    header = inspect(data, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
    queue.add_instance(header, path=spool.write(data, header), calling_ae="M1", peer="h")
    queue.form_jobs(now=1e12)
    job = queue.claim()
    assert job is not None
    refusing = _Refusing()
    hooks = PipelineHooks(analyse_file=refusing.analyse_file, publish=refusing.publish)  # type: ignore[arg-type]
    Worker(queue, hooks, stop=threading.Event()).process(job)
    (instance,) = queue.instances()
    assert instance.reason is not None and "<redacted>" in instance.reason
    queue.close()
    for db_file in tmp_path.glob("shadowspot.db*"):
        _no_secret(db_file.read_bytes().decode("latin-1"), db_file.name)
