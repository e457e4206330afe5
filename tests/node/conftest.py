"""Shared helpers of the node tests: configs on a temporary storage folder, running nodes on
127.0.0.1 with a free port, synthetic radiographs made with pydicom, the shared real files."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, uid
from pydicom.dataset import FileMetaDataset
from pynetdicom import AE

from models.training.shared_data import DICOM
from node.config import CallerConfig, Config, HttpConfig, LoggingConfig, NodeSection
from node.logs import configure_logging
from node.serve import Node
from node.worker import AnalyseFile

SHARED_DICOM = DICOM
NODE_AE = "SHADOWSPOT"
PATIENT_NAME = "Secretname^Jane"
PATIENT_ID = "PID-SECRET-4711"


def shared_file(name: str) -> Path:
    """A real radiograph from ../shared/data/dicom, or skip when that folder is absent."""
    path = SHARED_DICOM / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder is not checked out here)")
    return path


def needs_dcmtk(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.skip(f"DCMTK's {tool} is not installed (make system-deps installs it)")
    return found


def make_config(storage: Path, *, callers: tuple[CallerConfig, ...] = (), **node: Any) -> Config:
    """A config for tests: 127.0.0.1, port 0, storage in ``storage``, no HTTP endpoint."""
    section = NodeSection(
        host="127.0.0.1",
        port=0,
        storage=storage,
        study_quiet_seconds=node.pop("study_quiet_seconds", 0.3),
        min_free_mb=node.pop("min_free_mb", 1.0),
        network_timeout_seconds=node.pop("network_timeout_seconds", 10.0),
        **node,
    )
    return Config(
        node=section,
        callers=callers,
        http=HttpConfig(enabled=False),
        logging=LoggingConfig(file=False),
    )


def make_image(
    *,
    sop_class: str = uid.ComputedRadiographyImageStorage,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    study_uid: str | None = None,
    sop_instance_uid: str | None = None,
    rows: int = 64,
    columns: int = 48,
    frames: int = 1,
    bits: int = 16,
    view_position: str | None = "PA",
    noise: bool = True,
) -> Dataset:
    """A small, valid grey image with patient data we can look for in logs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid or uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid or uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC-SECRET-1"
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view_position is not None:
        ds.ViewPosition = view_position
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(7)
    dtype = np.uint16 if bits == 16 else np.uint8
    shape = (frames, rows, columns) if frames > 1 else (rows, columns)
    if noise:
        pixels = rng.integers(0, 2**ds.BitsStored, size=shape, dtype=dtype)
    else:  # a smooth ramp, which lossy coders keep nearly exact
        ramp = np.add.outer(np.arange(rows), np.arange(columns)) * (2**ds.BitsStored - 1)
        pixels = np.broadcast_to(ramp // (rows + columns), shape).astype(dtype)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    return ds


def scu(*contexts: tuple[str, list[str]] | str, ae_title: str = "MODALITY1") -> AE:
    """A pynetdicom SCU proposing ``contexts`` (a SOP class, or a SOP class with syntaxes)."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts:
        if isinstance(context, str):
            ae.add_requested_context(context, [uid.ExplicitVRLittleEndian])
        else:
            ae.add_requested_context(context[0], context[1])
    return ae


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    configure_logging(fmt="json", level="info")


StartNode = Callable[..., Node]


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[StartNode]:
    """Start a real node on 127.0.0.1:0 (stopped at the end of the test)."""
    started: list[Node] = []

    def start(
        config: Config | None = None, *, analyse_file: AnalyseFile | None = None, **node: Any
    ) -> Node:
        config = config or make_config(tmp_path / f"var{len(started)}", **node)
        running = Node(config, analyse_file=analyse_file)
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(grace_seconds=2.0)


def with_node(config: Config, **changes: Any) -> Config:
    return replace(config, node=replace(config.node, **changes))
