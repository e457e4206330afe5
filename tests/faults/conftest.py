"""Helpers of the fault suite: real ``shadowspot serve`` processes, DCMTK ``storescp`` peers,
pynetdicom senders that can put arbitrary bytes in a C-STORE, and read-only views of the
node's database and folders."""

from __future__ import annotations

import io
import re
import shutil
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread, uid
from pydicom.dataset import FileMetaDataset
from pynetdicom import AE, _config, evt

from bench.procs import NODE_AE, NodeProcess, StoreSCP
from node.dimse import VERIFICATION_SOP_CLASS

NETWORK_TIMEOUT = 10.0
_ONNXRUNTIME_SESSION = re.compile(r"\d+\n[0-9a-f-]{36}\n?")


def needs_dcmtk() -> None:
    for tool in ("storescp", "storescu"):
        if shutil.which(tool) is None:
            pytest.skip(f"DCMTK's {tool} is not installed (make system-deps installs it)")


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``shadowspot serve`` processes in ``tmp_path`` (each with its own TMPDIR);
    every one still running at the end is killed."""
    started: list[NodeProcess] = []

    def start(name: str = "node", **kwargs: Any) -> NodeProcess:
        workdir = tmp_path / name
        tmpdir = workdir / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        node = NodeProcess(workdir=workdir, env={"TMPDIR": str(tmpdir)}, **kwargs)
        started.append(node)
        node.start()
        return node

    yield start
    for node in started:
        node.kill()


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start DCMTK ``storescp`` receivers (unique file names: a duplicate stays visible)."""
    needs_dcmtk()
    started: list[StoreSCP] = []

    def start(name: str = "pacs", port: int | None = None, **kwargs: Any) -> StoreSCP:
        scp = StoreSCP(folder=tmp_path / name, extra=("--unique-filenames",), **kwargs)
        started.append(scp)
        scp.start(port)
        return scp

    yield start
    for scp in started:
        scp.stop()


def scu(calling_ae: str = "MODALITY1") -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = NETWORK_TIMEOUT
    return ae


def echo(port: int, calling_ae: str = "MODALITY1") -> int | None:
    """C-ECHO status from the node, or None when no association could be made."""
    ae = scu(calling_ae)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def chest_image(
    *,
    rows: int = 256,
    columns: int = 256,
    study_uid: str | None = None,
    sop_class: str = uid.ComputedRadiographyImageStorage,
    seed: int = 0,
) -> Dataset:
    """A small valid frontal chest CR (MONOCHROME2, 12 bit) with a dark lung-like field."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    lung = ((x - columns / 2) / (columns / 3)) ** 2 + ((y - rows / 2) / (rows / 2.5)) ** 2 < 1
    body = 2800 - 1500 * lung
    pixels = np.clip(body + rng.normal(0, 40, (rows, columns)), 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.PatientName, ds.PatientID = "Fault^Suite", "FAULT-0001"
    ds.PatientBirthDate, ds.PatientSex = "19600101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260301", "101010", "A1"
    ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", 1, 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientOrientation = ["P", "L"]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def meta_file(
    path: Path, dataset_bytes: bytes, *, sop_class: str, sop_instance: str, transfer_syntax: str
) -> Path:
    """A file whose meta header names ``sop_class``/``sop_instance``/``transfer_syntax`` and
    whose dataset part is exactly ``dataset_bytes`` (whatever they are)."""
    meta = Dataset()
    meta.file_meta = FileMetaDataset()
    meta.file_meta.MediaStorageSOPClassUID = sop_class
    meta.file_meta.MediaStorageSOPInstanceUID = sop_instance
    meta.file_meta.TransferSyntaxUID = transfer_syntax
    meta.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.77.1"
    buffer = io.BytesIO()
    meta.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue() + dataset_bytes)
    return path


@pytest.fixture
def raw_sending() -> Iterator[None]:
    """Let ``send_c_store(path)`` put the file's dataset bytes on the wire unparsed."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


def db_rows(node: NodeProcess, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the node's database ([] while a table does not exist)."""
    path = node.storage / "shadowspot.db"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def files_outside_storage(node: NodeProcess) -> list[Path]:
    """Files the node wrote in its working directory or its TMPDIR but outside ``storage``."""
    ours = {node.config_path, node.stderr_path}
    found = []
    for path in node.workdir.rglob("*"):
        if path.is_file() and path not in ours and node.storage not in path.parents:
            if path.name == ".ses" and _ONNXRUNTIME_SESSION.fullmatch(path.read_text()):
                continue  # onnxruntime's session marker in TMPDIR: a timestamp and a UUID
            found.append(path)
    return found


def events(node: NodeProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in node.events(all_runs=True) if e.get("event") == name]


def send_datasets(
    port: int, datasets: list[Dataset], *, calling_ae: str = "MODALITY1"
) -> dict[str, int | None]:
    """C-STORE ``datasets`` over one association; SOP Instance UID → status (None: no answer,
    or no association)."""
    ae = scu(calling_ae)
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, [uid.ExplicitVRLittleEndian])
    out: dict[str, int | None] = {str(ds.SOPInstanceUID): None for ds in datasets}
    with socket.socket() as probe:  # pynetdicom leaks the socket of a refused connection
        if probe.connect_ex(("127.0.0.1", port)) != 0:
            return out
    # pynetdicom 3.0.4 does not close a socket whose peer died (shutdown() raises first):
    # keep each one from the moment it connects and close it ourselves.
    opened: list[socket.socket] = []
    handlers = [(evt.EVT_CONN_OPEN, lambda event: opened.append(event.assoc.dul.socket.socket))]
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, evt_handlers=handlers)
    try:
        for ds in datasets:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            out[str(ds.SOPInstanceUID)] = int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()
        for sock in opened:
            sock.close()
    return out


def received_uids(folder: Path) -> Counter[str]:
    """How often each SOP Instance UID arrived in a storescp folder (unique file names)."""
    counts: Counter[str] = Counter()
    for path in folder.rglob("*"):
        if path.is_file():
            counts[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] += 1
    return counts
