"""Real inputs for the results tests: findings drawn as masks on real image geometry, a
generated CR, dciodvfy, and a real Orthanc started on free ports with a temporary config."""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.training.shared_data import DICOM
from pipeline.result import AnalysisResult, Finding, FindingType, Side, Zone
from tests.ports import free_port

RG1 = DICOM / "RG1_UNCI.dcm"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def rg1() -> Dataset:
    if not RG1.is_file():
        pytest.skip(f"shared test data absent: {RG1}")
    return pydicom.dcmread(RG1)


def generated_cr(rows: int = 480, cols: int = 400, spacing: float = 0.7) -> Dataset:
    """A small CR chest image with the header a real CR carries (written and read back)."""
    rng = np.random.default_rng(3)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    today = dt.date.today().strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101010"
    ds.AccessionNumber = "A1"
    ds.Modality = "CR"
    ds.Manufacturer = "Test"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P1"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelData = rng.integers(0, 4095, (rows, cols), dtype=np.uint16).tobytes()
    return ds


def disk_finding(
    shape: tuple[int, int],
    *,
    centre: tuple[float, float],
    radii: tuple[float, float],
    finding_type: FindingType,
    probability: float,
    grade: int,
    colour: tuple[int, int, int],
    alert: bool,
    side: Side,
    zone: Zone,
    spacing: float | None,
) -> Finding:
    """A real ``Finding`` from an ellipse drawn on the image grid; contour = vertices on it."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx, cy = centre
    rx, ry = radii
    mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0
    ys, xs = np.nonzero(mask)
    angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    contour = tuple((float(cx + rx * math.cos(a)), float(cy + ry * math.sin(a))) for a in angles)
    area = None if spacing is None else float(mask.sum()) * spacing * spacing
    return Finding(
        finding_type=finding_type,
        probability=probability,
        grade=grade,
        colour=colour,
        alert=alert,
        box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        contour=contour,
        area_mm2=area,
        side=side,
        zone=zone,
        mask=mask,
    )


def two_findings(source: Dataset) -> AnalysisResult:
    """A nodule (grade 3, alert) in the patient's right upper zone and a consolidation
    (grade 2) in the left lower zone, at proportional positions on ``source``."""
    shape = (int(source.Rows), int(source.Columns))
    spacing = float(source.PixelSpacing[0]) if "PixelSpacing" in source else 0.0
    mm = spacing if spacing > 0 else None
    rows, cols = shape
    nodule = disk_finding(
        shape,
        centre=(0.3 * cols, 0.35 * rows),
        radii=(0.03 * cols, 0.03 * cols),
        finding_type=FindingType.NODULE,
        probability=0.91,
        grade=3,
        colour=(230, 30, 30),
        alert=True,
        side=Side.RIGHT,
        zone=Zone.UPPER,
        spacing=mm,
    )
    consolidation = disk_finding(
        shape,
        centre=(0.68 * cols, 0.65 * rows),
        radii=(0.08 * cols, 0.06 * rows),
        finding_type=FindingType.CONSOLIDATION,
        probability=0.64,
        grade=2,
        colour=(250, 200, 0),
        alert=False,
        side=Side.LEFT,
        zone=Zone.LOWER,
        spacing=mm,
    )
    return result_of(shape, (nodule, consolidation), mm)


def result_of(
    shape: tuple[int, int], findings: tuple[Finding, ...], spacing: float | None
) -> AnalysisResult:
    return AnalysisResult(
        findings=findings,
        shape=shape,
        spacing_mm=None if spacing is None else (spacing, spacing),
        model_name="shadowspot-lesion-unet",
        model_version="1.0.0",
        timings_ms={},
        enhanced_image=np.zeros(shape, np.float32),
    )


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports for a file."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (run.stdout + run.stderr).splitlines()
    return (
        [line for line in lines if line.startswith("Error")],
        [line for line in lines if line.startswith("Warning")],
    )


class Orthanc:
    """A real Orthanc with its own temporary configuration and storage."""

    def __init__(self, folder: Path, *, dicom_port: int | None = None) -> None:
        self.folder = folder
        self.http_port = free_port()
        self.dicom_port = dicom_port or free_port()
        self.ae_title = "ORTHANC"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        if shutil.which("Orthanc") is None:
            pytest.skip("Orthanc (Debian orthanc) is not installed")
        config = {
            "Name": "shadowspot-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "HttpTimeout": 10,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        with (self.folder / "orthanc.log").open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.folder / 'orthanc.log'}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not come up")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: bytes) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def lookup(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        found = self.post("/tools/lookup", sop_instance_uid.encode())
        return next((f["ID"] for f in found if f["Type"] == "Instance"), None)

    def instance(self, orthanc_id: str) -> Dataset:
        data = self.get(f"/instances/{orthanc_id}/file")
        from io import BytesIO

        return pydicom.dcmread(BytesIO(data))


@contextmanager
def orthanc(folder: Path, *, dicom_port: int | None = None) -> Iterator[Orthanc]:
    server = Orthanc(folder, dicom_port=dicom_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
