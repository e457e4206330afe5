"""Durable intake: the spool folder and the quarantine.

``<storage>/spool/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` holds each received instance
exactly as encoded on the wire (``event.encoded_dataset()``: preamble, file meta, dataset in
its transfer syntax; nothing is recompressed). A file appears there only complete: it is
written to ``spool/.tmp/``, fsynced, renamed into place and the folder fsynced, before the
C-STORE handler answers success.

``<storage>/quarantine/<time>_<id>.dcm`` keeps what we refused because it cannot be parsed or
is not an image, beside ``<same name>.reason.json`` saying why. Spooled files that start-up
finds recorded nowhere and cannot adopt (unreadable, or a second copy of a recorded SOP
Instance UID) are moved there too (``quarantine_file``), so no start parses them again.

Free space is checked first: below the floor nothing is written (Out of Resources).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from node.dimse import Status
from node.errors import IngestError
from node.queue import InstanceHeader

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(target: Path, data: bytes, tmp_dir: Path) -> None:
    """Temp file, fsync, atomic rename, fsync the folder(s)."""
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    new_dir = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if new_dir:
        fsync_dir(target.parent.parent)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _check_uid(value: str, keyword: str) -> str:
    if not value or len(value) > 64 or not _UID.match(value):
        raise IngestError(
            f"{keyword} is missing or not a valid UID",
            status=Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        )
    return value


_PARSE_ERRORS = (
    InvalidDicomError,
    EOFError,
    OSError,  # pydicom: "No tag to read at file position ..."
    struct.error,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    TypeError,
    NotImplementedError,
    OverflowError,
    RecursionError,  # sequences nested deeper than the interpreter's recursion limit
)
"""What pydicom raises on malformed input (translated to Cannot Understand at this boundary)."""


def _truncated_element(ds: pydicom.Dataset) -> str | None:
    """The tag of a top-level element whose value is shorter than its declared length.

    pydicom reads a cut-off stream without complaint, leaving the last value short; a dataset
    truncated in transit (or garbage after the file meta) shows up here.
    """
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts its raw elements)
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.value is not None:
            declared = raw.length
            if declared != _UNDEFINED_LENGTH and len(raw.value) < declared:
                return str(tag)
    return None


MAX_IMAGE_SIDE = 10_000
MAX_FRAME_PIXELS = 40_000_000
"""The largest frame we accept: twice a 43 × 43 cm detector at 0.1 mm (4300² ≈ 18.5 Mpx).
A compressed frame decodes to Rows × Columns whatever its size on the wire, so a bigger claim
would let a few bytes exhaust a worker's memory."""


def _pixel_problem(ds: pydicom.Dataset, transfer_syntax: str) -> str | None:
    """Why the image geometry, or the length of native Pixel Data, cannot be right (or None)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError, OverflowError):
        return "Rows, Columns, Samples per Pixel, Bits Allocated or Number of Frames is no number"
    if min(rows, columns, samples, frames) < 1 or bits not in (1, 8, 16, 32, 64):
        return (
            f"impossible image geometry: {rows}×{columns}, {samples} samples, "
            f"{bits} bits allocated, {frames} frames"
        )
    if rows > MAX_IMAGE_SIDE or columns > MAX_IMAGE_SIDE or rows * columns > MAX_FRAME_PIXELS:
        return f"an image of {rows}×{columns} pixels is larger than the node accepts"
    if pydicom.uid.UID(transfer_syntax).is_encapsulated:
        return None  # compressed: the decoder checks each frame against Rows × Columns
    expected = (rows * columns * samples * frames * bits + 7) // 8
    actual = len(ds[_PIXEL_DATA].value)
    if actual not in (expected, expected + 1):  # + 1: the pad byte of an odd length
        return (
            f"Pixel Data has {actual} bytes where Rows × Columns × Samples × Frames × Bits "
            f"Allocated needs {expected}"
        )
    return None


def inspect(data: bytes, *, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    """Parse an encoded instance fully and check it is an image we can keep.

    ``sop_class_uid``/``sop_instance_uid`` are those of the C-STORE request; the dataset must
    agree with them. Raises ``IngestError`` with Cannot Understand (unparseable) or Data Set
    Does Not Match SOP Class (no pixel data, missing or inconsistent identifiers).
    """
    try:
        ds = pydicom.dcmread(BytesIO(data), force=False)
        truncated = _truncated_element(ds)
        for element in ds.iterall():  # convert every value now: a bad one fails here, not later
            _ = element.value
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except _PARSE_ERRORS as exc:
        raise IngestError(
            f"cannot parse the dataset ({type(exc).__name__}: {exc})",
            status=Status.CANNOT_UNDERSTAND,
        ) from exc
    if truncated is not None:
        raise IngestError(
            f"the dataset is truncated in element {truncated}", status=Status.CANNOT_UNDERSTAND
        )
    if _PIXEL_DATA not in ds or not ds[_PIXEL_DATA].value:
        raise IngestError(
            "the dataset has no Pixel Data", status=Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise IngestError(
            "the image has no Rows/Columns", status=Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        )
    problem = _pixel_problem(ds, transfer_syntax)
    if problem is not None:
        raise IngestError(problem, status=Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    if _text(ds, "SOPClassUID") != sop_class_uid:
        raise IngestError(
            "SOP Class UID in the dataset differs from the request",
            status=Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        )
    if _text(ds, "SOPInstanceUID") != sop_instance_uid:
        raise IngestError(
            "SOP Instance UID in the dataset differs from the request",
            status=Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        )
    frames = ds.get("NumberOfFrames", 1)
    return InstanceHeader(
        sop_instance_uid=_check_uid(sop_instance_uid, "SOPInstanceUID"),
        sop_class_uid=sop_class_uid,
        study_instance_uid=_check_uid(_text(ds, "StudyInstanceUID"), "StudyInstanceUID"),
        series_instance_uid=_check_uid(_text(ds, "SeriesInstanceUID"), "SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax,
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        number_of_frames=int(frames) if frames not in (None, "") else 1,
    )


class Spool:
    """The spool and quarantine folders under ``storage``, with a free-space floor."""

    def __init__(self, storage: Path, *, min_free_bytes: int) -> None:
        self.root = storage / "spool"
        self.quarantine_dir = storage / "quarantine"
        self._tmp = self.root / ".tmp"
        self.min_free_bytes = min_free_bytes
        for folder in (self.root, self._tmp, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.glob("*.part"):  # a write a crash interrupted: never acked
            leftover.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int) -> None:
        """Raise Out of Resources if writing ``incoming`` bytes would cross the floor."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise IngestError(
                f"free space {free // 2**20} MiB is below the floor "
                f"{self.min_free_bytes // 2**20} MiB",
                status=Status.OUT_OF_RESOURCES,
            )

    def path_for(self, header: InstanceHeader) -> Path:
        return self.path_for_uids(header.study_instance_uid, header.sop_instance_uid)

    def path_for_uids(self, study_instance_uid: str, sop_instance_uid: str) -> Path:
        return self.root / study_instance_uid / f"{sop_instance_uid}.dcm"

    def write(self, data: bytes, header: InstanceHeader) -> Path:
        """Store ``data`` durably at its spool path and return the path."""
        target = self.path_for(header)
        _write_durably(target, data, self._tmp)
        return target

    def quarantine(
        self, data: bytes, *, status: Status, reason: str, context: dict[str, Any]
    ) -> Path:
        """Keep a refused object with a ``.reason.json`` beside it; returns the object's path."""
        status_fields = {"status": f"0x{status.value:04X}", "status_name": status.name}
        target = self._quarantine_target(status_fields, reason, context)
        _write_durably(target, data, self._tmp)
        return target

    def quarantine_file(self, path: Path, *, reason: str, context: dict[str, Any]) -> Path:
        """Move a spooled file to the quarantine with a ``.reason.json``; returns its new path."""
        target = self._quarantine_target({}, reason, {"spool_path": str(path), **context})
        os.replace(path, target)
        fsync_dir(target.parent)
        fsync_dir(path.parent)
        return target

    def _quarantine_target(
        self, status_fields: dict[str, str], reason: str, context: dict[str, Any]
    ) -> Path:
        """A new quarantine path, its ``.reason.json`` already written durably."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.quarantine_dir / f"{stamp}_{uuid.uuid4().hex[:12]}.dcm"
        record = {
            **status_fields,
            "reason": reason,
            "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **context,
        }
        reason_path = target.with_name(target.stem + ".reason.json")
        _write_durably(reason_path, json.dumps(record, indent=2).encode(), self._tmp)
        return target

    def files(self) -> Iterator[Path]:
        """Every complete spooled instance file."""
        for study in self.root.iterdir():
            if study.is_dir() and study.name != ".tmp":
                yield from study.glob("*.dcm")
