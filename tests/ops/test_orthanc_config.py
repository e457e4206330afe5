"""docker/orthanc/orthanc.json, run by Debian's Orthanc with only ports and folders adapted.

Checks what the compose demo depends on: the node's AE may echo and the PACS refuses unknown
AEs, the DICOMweb plugin answers on the root OHIF reads, and forward.lua sends a received
chest radiograph on to the node's real Storage SCP.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from node.config import CallerConfig, Config, NodeSection
from node.queue import Queue
from node.scp import StorageSCP
from node.spool import Spool
from tests.ports import free_port

pytestmark = [pytest.mark.network, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass(frozen=True, slots=True)
class Running:
    http: int
    dicom: int
    queue: Queue


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The node's Storage SCP, and Orthanc on the compose config pointed at it."""
    tmp_path = tmp_path_factory.mktemp("orthanc")
    if ORTHANC is None:
        pytest.skip("Debian's orthanc package is not installed (make system-deps)")
    config = Config(
        node=NodeSection(host="127.0.0.1", port=0, storage=tmp_path / "var", min_free_mb=0.0),
        callers=(CallerConfig(ae_title="ORTHANC"),),
    )
    queue = Queue(config.node.storage, study_quiet_seconds=60.0)
    scp = StorageSCP(config, spool=Spool(config.node.storage, min_free_bytes=0), queue=queue)
    _, node_port = scp.start()

    orthanc = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    http, dicom = free_port(), free_port()
    orthanc.update(
        StorageDirectory=str(tmp_path / "orthanc"),
        IndexDirectory=str(tmp_path / "orthanc"),
        HttpPort=http,
        DicomPort=dicom,
        RemoteAccessAllowed=False,
        LuaScripts=[str(DOCKER / "orthanc" / "forward.lua")],
        Plugins=[str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
    )
    orthanc["DicomModalities"]["shadowspot"].update(Host="127.0.0.1", Port=node_port)
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(orthanc), encoding="utf-8")
    log = (tmp_path / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_http(http, process)
        yield Running(http=http, dicom=dicom, queue=queue)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
        scp.stop(grace_seconds=1.0)
        queue.close()


def _wait_for_http(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with {process.returncode} on the compose config")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    pytest.fail("Orthanc did not answer on HTTP within 30 s")


def _associate(port: int, calling_ae: str, contexts: list[str]) -> Any:
    ae = AE(ae_title=calling_ae)
    for context in contexts:
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="ORTHANC")


def _echo(port: int, calling_ae: str) -> int | None:
    assoc = _associate(port, calling_ae, [Verification])
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if status else None


def _chest_radiograph() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientID = "TEST"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * 2
    return ds


def test_node_ae_may_echo_and_unknown_ae_is_refused(stack: Running) -> None:
    """The PACS accepts a C-ECHO from the node's AE title and refuses an unregistered AE."""
    assert _echo(stack.dicom, "SHADOWSPOT") == 0x0000
    assert _echo(stack.dicom, "ROGUE") is None


@pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="orthanc-dicomweb is not installed")
def test_dicomweb_answers_on_the_root_ohif_reads(stack: Running) -> None:
    """QIDO-RS on /dicom-web/studies (OHIF's qidoRoot) answers 200 with JSON."""
    url = f"http://127.0.0.1:{stack.http}/dicom-web/studies"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read() or b"[]") == []


def test_received_chest_radiograph_is_forwarded_to_the_node(stack: Running) -> None:
    """An image a modality stores in Orthanc reaches the node's spool and queue (forward.lua)."""
    image = _chest_radiograph()
    assoc = _associate(stack.dicom, "MODALITY1", [ComputedRadiographyImageStorage])
    assert assoc.is_established
    status = assoc.send_c_store(image)
    assoc.release()
    assert status.Status == 0x0000
    deadline = time.monotonic() + 20
    while not stack.queue.has_instance(image.SOPInstanceUID):
        assert time.monotonic() < deadline, "Orthanc did not forward the image to the node"
        time.sleep(0.2)
