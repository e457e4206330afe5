"""The node's logging set-up: JSON lines with bound context, stdlib records alike, tracebacks
without local variables, patient-data keys dropped."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from node.logs import configure_logging, get_logger


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = configure_logging(fmt="console", level="info", log_dir=tmp_path / "logs")
    assert path is not None
    yield path
    structlog.contextvars.clear_contextvars()
    configure_logging(fmt="json", level="info")


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_context_reaches_structlog_and_stdlib_lines(log_file: Path) -> None:
    """Bound context appears on our events and on a plain stdlib (pynetdicom) record."""
    structlog.contextvars.bind_contextvars(calling_ae="MODALITY1", peer="10.0.0.5:4000")
    get_logger("node.test").info("instance_spooled", study_instance_uid="1.2.3")
    logging.getLogger("pynetdicom.assoc").warning("Association Aborted")
    ours, theirs = _lines(log_file)
    assert ours["event"] == "instance_spooled" and ours["calling_ae"] == "MODALITY1"
    assert theirs["event"] == "Association Aborted" and theirs["peer"] == "10.0.0.5:4000"
    assert theirs["logger"] == "pynetdicom.assoc" and theirs["level"] == "warning"


def test_tracebacks_show_no_locals_and_patient_keys_are_dropped(log_file: Path) -> None:
    """An exception logged from a frame holding patient data does not leak it."""

    def fail(patient_name: str) -> None:
        raise ValueError("cannot decode")

    try:
        fail("Secretname^Jane")
    except ValueError:
        get_logger("node.test").exception("instance_failed", patient_id="PID-SECRET")
    text = log_file.read_text()
    (line,) = _lines(log_file)
    assert "ValueError" in json.dumps(line["exception"])
    assert "Secretname" not in text and "PID-SECRET" not in text
