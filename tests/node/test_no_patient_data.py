"""No patient value reaches a log line, a stored reason or an HTTP response.

pydicom's, highdicom's and Python's messages quote the values they refuse, and an exception
may carry them unquoted; ``node.scrub`` removes the values of the instance being processed
from every log line and stored reason, and any other quoted value from exception texts and
third-party messages. Distinctive values (name, IDs, accession number, valid and invalid
birth dates, an invalid sex) are sent through the real worker with the shipped model and
``node.results.publish``; stderr, the log file, the database files, the HTTP endpoint's
answers and ``shadowspot status`` are then searched for them. Only the DICOM results may
carry the (valid) name and ID, and they are not searched."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom import Dataset

from node.analysis import Analyser
from node.config import HttpConfig
from node.db import DB_NAME
from node.errors import EncodeError
from node.health import HealthServer
from node.logs import configure_logging
from node.queue import InstanceState, JobState, Queue
from node.scrub import REDACTED, patient_values, protecting, scrub, scrub_values
from node.spool import Spool, inspect
from node.status_cmd import format_status, read_status
from node.worker import PipelineHooks, Worker
from pipeline.result import AnalysisResult
from tests.node.conftest import make_image
from tests.results.helpers import rg1
from tests.results.test_imperfect_headers import (
    analyser,  # noqa: F401  (the module fixture: the shipped model, loaded once)
    new_instance,
    node_config,
    run_worker,
    with_values,
    written,
)

NAME = "Zzsecret^Patientname"
SECRETS_ANY_CASE = ("zzsecret",)
"""Found in the name's family component, the IDs, the invalid birth date and sex."""
SECRETS_EXACT = ("Patientname", "19450101", "1945-01-01")
"""The name's given component (exact case: the keyword PatientName may be logged) and the
valid birth date in the forms a message prints it."""


def secrets_in(text: str) -> list[str]:
    found = [s for s in SECRETS_ANY_CASE if s in text.lower()]
    return found + [s for s in SECRETS_EXACT if s in text]


def _no_secret(text: str, where: str) -> None:
    assert secrets_in(text) == [], f"patient values in {where}"


@pytest.fixture
def restore_logging(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Tests that configure logging inside ``capsys`` hand the session its stream back
    (a handler left on capsys' stream would write to a closed file afterwards)."""
    yield
    with capsys.disabled():
        structlog.contextvars.clear_contextvars()
        configure_logging(fmt="json", level="info")


# The scrubber --------------------------------------------------------------------------------


def test_scrub_redacts_quoted_values_and_keeps_uids() -> None:
    text = "SR could not be built: Unable to convert 'ZZSECRETDOB' to 'DA' object"
    assert scrub(text) == "SR could not be built: Unable to convert '<redacted>' to 'DA' object"
    assert scrub("instance '1.2.840.10008.1.2' refused") == "instance '1.2.840.10008.1.2' refused"
    # A quoted value made of digits is a birth date or a patient ID, not a UID.
    assert scrub("Unable to convert '19451301' to 'DA' object") == (
        "Unable to convert '<redacted>' to 'DA' object"
    )
    assert scrub("'zzsecret-sex' is not a valid PatientSexValues") == (
        "'<redacted>' is not a valid PatientSexValues"
    )
    # Keywords and Python type names are not patient data: the message stays useful.
    assert scrub("'Dataset' object has no attribute 'PatientBirthDate'") == (
        "'Dataset' object has no attribute 'PatientBirthDate'"
    )


def test_scrub_removes_the_values_of_the_instance_quoted_or_not() -> None:
    """The instance's name (whole, by component, as "Given Family"), IDs and birth date in
    the forms a message prints it are removed wherever they stand; UIDs that contain the
    digits of an ID are left alone; short values (sex "M") are not searched for."""
    ds = make_image()
    ds.PatientName = NAME
    ds.PatientID = "4711"
    ds.OtherPatientIDs = ["ZZSECRETOTHER", "ZZSECRETTHIRD"]
    ds.PatientBirthDate = "19450101"
    ds.PatientSex = "M"
    ds.AccessionNumber = "ZZSECRETACC"
    text = (
        f"cannot file {NAME} (Patientname Zzsecret), ID 4711 / ZZSECRETOTHER, "
        "born 1945-01-01, accession zzsecretacc, study 1.2.826.4711.3, Male"
    )
    scrubbed = scrub(text, ds)
    assert secrets_in(scrubbed) == [] and "4711 " not in scrubbed
    assert "1.2.826.4711.3" in scrubbed and "Male" in scrubbed
    assert scrubbed.count(REDACTED) == 6  # "(Patientname Zzsecret)" is one of the forms
    assert scrub_values("ZZSECRETTHIRD", patient_values(ds)) == REDACTED


def test_protected_values_are_scrubbed_from_every_log_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """Inside ``protecting``, any field of any line loses the values, unquoted too."""
    log_file = configure_logging(fmt="json", level="info", log_dir=tmp_path / "logs")
    assert log_file is not None
    ds = make_image()
    ds.PatientName, ds.PatientID = NAME, "ZZSECRETID"
    with protecting(patient_values(ds)):
        structlog.stdlib.get_logger("node.test").info("x", note=f"for {ds.PatientName}")
        logging.getLogger("highdicom").warning("patient %s", ds.PatientID)
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = log_file.read_text(encoding="utf-8")
    assert text.count(REDACTED) == 2
    _no_secret(text, "the log file")
    _no_secret(capsys.readouterr().err, "stderr")


def test_log_lines_carry_no_patient_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """An exception quoting a birth date and pydicom's own warning quoting a sex go through
    the node's handlers (stderr in the console format, the log file) without the values."""
    log_file = configure_logging(fmt="console", level="info", log_dir=tmp_path / "logs")
    assert log_file is not None
    try:
        raise ValueError("Unable to convert 'ZZSECRETDOB' to 'DA' object")
    except ValueError:
        structlog.stdlib.get_logger("node.worker").exception("instance_failed")
    logging.getLogger("pydicom").warning("Invalid value for VR CS: 'zzsecret-sex'.")
    structlog.stdlib.get_logger("node.worker").warning("x", error="Unable to convert 'ZZSECRETID'")
    for handler in logging.getLogger().handlers:
        handler.flush()
    stderr = capsys.readouterr().err
    written_ = log_file.read_text(encoding="utf-8")
    assert "instance_failed" in written_ and REDACTED in written_
    assert "Traceback" in stderr  # the console renders the traceback, scrubbed
    _no_secret(written_, "the log file")
    _no_secret(stderr, "stderr")


_WARNING_SCRIPT = """
import sys
from pathlib import Path
from pydicom import Dataset
from node.logs import configure_logging
configure_logging(fmt="json", level="info", log_dir=Path(sys.argv[1]))
ds = Dataset()
ds.PatientSex = "zzsecret-sex"  # pydicom logs and warns: "Invalid value for VR CS: '...'"
"""


def test_python_warnings_go_through_the_handlers_scrubbed(tmp_path: Path) -> None:
    """In the node's process (not under pytest, which records warnings itself), pydicom's
    warnings about an invalid value are log records like the rest, never raw on stderr."""
    done = subprocess.run(
        [sys.executable, "-c", _WARNING_SCRIPT, str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    written_ = (tmp_path / "logs" / "shadowspot.log").read_text(encoding="utf-8")
    assert '"logger": "py.warnings"' in written_ and REDACTED in written_
    _no_secret(written_, "the log file")
    _no_secret(done.stderr, "stderr")


class _Refusing:
    def analyse_file(self, path: Path, /) -> tuple[Dataset, AnalysisResult]:
        ds = pydicom.dcmread(path)
        raise ValueError(f"Unable to convert '{ds.PatientID}' for {ds.PatientName}")

    def publish(self, **_: object) -> None:
        raise AssertionError("nothing to publish")


def test_the_stored_failure_reason_carries_no_patient_values(tmp_path: Path) -> None:
    """Quoted or not: the reason the worker stores has neither the ID nor the name."""
    ds = make_image()
    ds.PatientID = "ZZSECRETID"
    ds.PatientName = NAME
    queue = Queue(tmp_path, study_quiet_seconds=0.1)
    spool = Spool(tmp_path, min_free_bytes=0)
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.unlink()
    header = inspect(data, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
    queue.add_instance(header, path=spool.write(data, header), calling_ae="M1", peer="h")
    queue.form_jobs(now=1e12)
    job = queue.claim()
    assert job is not None
    refusing = _Refusing()
    hooks = PipelineHooks(analyse_file=refusing.analyse_file, publish=refusing.publish)
    assert Worker(queue, hooks, stop=threading.Event()).process(job) is JobState.FAILED
    (instance,) = queue.instances()
    assert instance.reason == "ValueError: Unable to convert '<redacted>' for <redacted>"
    queue.close()
    for db_file in tmp_path.glob("shadowspot.db*"):
        _no_secret(db_file.read_bytes().decode("latin-1"), db_file.name)


# The worker path with the real model ---------------------------------------------------------


def _patient(source: Dataset, birth_date: str) -> Dataset:
    return with_values(
        new_instance(source),
        PatientName=NAME,
        PatientID="ZZSECRETID",
        OtherPatientIDs="ZZSECRETOTHER",
        AccessionNumber="ZZSECRETACC",
        PatientBirthDate=birth_date,
        PatientSex="zzsecret-sex",
    )


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:  # 503 (unhealthy) and 404 have bodies too
        return bytes(exc.read())


def test_no_patient_value_in_any_log_the_database_or_an_http_response(
    analyser: Analyser,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    """Three chest images of a patient with distinctive values: a valid birth date, an
    invalid one (both with an invalid sex), and one whose publication fails with the values
    in the exception's message, unquoted. Two are done with their results written, one is
    failed; nothing the node logs, stores, serves or reports carries a value."""
    storage = tmp_path / "var"
    log_file = configure_logging(fmt="console", level="info", log_dir=storage / "logs")
    assert log_file is not None
    source = rg1()
    valid, invalid, failing = (
        _patient(source, "19450101"),
        _patient(source, "ZZSECRETDOB"),
        _patient(source, "19450101"),
    )

    def refuse(ds: Dataset) -> None:
        if ds.SOPInstanceUID == failing.SOPInstanceUID:
            raise EncodeError(
                f"cannot file the results of {ds.PatientName} ({ds.PatientID}, born "
                f"{ds.PatientBirthDate}, sex {ds.PatientSex}, accession {ds.AccessionNumber})"
            )

    queue = run_worker(storage, analyser, valid, invalid, failing, before_publish=refuse)
    states = {i.sop_instance_uid: (i.state, i.reason) for i in queue.instances()}
    assert states[valid.SOPInstanceUID] == (InstanceState.ANALYSED, None)
    assert states[invalid.SOPInstanceUID] == (InstanceState.ANALYSED, None)
    state, reason = states[failing.SOPInstanceUID]
    assert state is InstanceState.FAILED
    assert reason is not None and reason.startswith("EncodeError: cannot file the results of")
    assert sorted(j.state for j in queue.jobs()) == [JobState.DONE, JobState.DONE, JobState.FAILED]
    assert {k: len(v) for k, v in written(storage).items()} == {"seg": 2, "sr": 2, "pr": 2}

    config = replace(node_config(storage), http=HttpConfig(enabled=True, port=0))
    server = HealthServer(config).start()
    try:
        host, port = server.address
        answers = {p: _get(f"http://{host}:{port}{p}") for p in ("/health", "/metrics", "/x")}
    finally:
        server.shutdown()
    assert b"shadowspot" in answers["/metrics"]
    queue.close()
    status = read_status(storage / DB_NAME)
    reports = {"status": format_status(status), "status --json": json.dumps(asdict(status))}
    for handler in logging.getLogger().handlers:
        handler.flush()
    stderr = capsys.readouterr().err

    logs = {p.name: p.read_text(encoding="utf-8") for p in (storage / "logs").iterdir()}
    assert "instance_analysed" in logs[log_file.name]
    assert "source_attributes_emptied" in logs[log_file.name]
    assert "instance_failed" in logs[log_file.name] and REDACTED in logs[log_file.name]
    assert "instance_failed" in stderr
    databases = {p.name: p.read_bytes() for p in storage.glob(f"{DB_NAME}*")}
    assert DB_NAME in databases
    for where, text in {
        "stderr": stderr,
        **logs,
        **{name: data.decode("latin-1") for name, data in databases.items()},
        **{f"GET {p}": body.decode("utf-8", "replace") for p, body in answers.items()},
        **reports,
    }.items():
        _no_secret(text, where)
