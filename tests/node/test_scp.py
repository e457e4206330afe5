"""The Storage SCP over real associations on 127.0.0.1: what it accepts, refuses and keeps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import structlog.testing
from pydicom import uid
from pydicom.filereader import read_file_meta_info
from pynetdicom import _config

from node.config import CallerConfig
from node.dimse import VERIFICATION_SOP_CLASS, RejectReason, Status
from node.logs import configure_logging
from node.queue import InstanceState
from node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from tests.node.conftest import (
    NODE_AE,
    PATIENT_ID,
    PATIENT_NAME,
    StartNode,
    make_config,
    make_image,
    needs_dcmtk,
    scu,
    shared_file,
)

pytestmark = pytest.mark.network
CR = uid.ComputedRadiographyImageStorage


def _store(port: int, *datasets: pydicom.Dataset | Path, ae_title: str = "MODALITY1") -> list[int]:
    contexts = {str(d.SOPClassUID) for d in datasets if isinstance(d, pydicom.Dataset)}
    contexts |= {
        str(read_file_meta_info(d).MediaStorageSOPClassUID) for d in datasets if isinstance(d, Path)
    }
    ae = scu(*[(c, [ts]) for c in sorted(contexts) for ts in TRANSFER_SYNTAXES], ae_title=ae_title)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(d).Status) for d in datasets]
    finally:
        assoc.release()


def test_echo_answers_success(start_node: StartNode) -> None:
    """C-ECHO from pynetdicom and from DCMTK's echoscu both get Success."""
    node = start_node()
    assoc = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == Status.SUCCESS
    assoc.release()
    echoscu = needs_dcmtk("echoscu")
    done = subprocess.run(
        [echoscu, "-aec", NODE_AE, "127.0.0.1", str(node.port)], capture_output=True, timeout=20
    )
    assert done.returncode == 0, done.stderr


def test_store_is_durable_before_success(start_node: StartNode) -> None:
    """A C-STORE answered Success has its exact bytes in the spool and a row in the queue."""
    node = start_node()
    ds = make_image()
    assert _store(node.port, ds) == [Status.SUCCESS]
    path = node.spool.path_for_uids(ds.StudyInstanceUID, ds.SOPInstanceUID)
    stored = pydicom.dcmread(path)
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    (row,) = node.queue.instances()
    assert row.path == path and row.state is InstanceState.RECEIVED
    assert row.calling_ae == "MODALITY1" and row.peer == "127.0.0.1"
    assert list((node.config.node.storage / "spool" / ".tmp").iterdir()) == []


@pytest.mark.slow
def test_storescu_sends_the_shared_radiographs(start_node: StartNode) -> None:
    """DCMTK storescu sends the real CR (uncompressed and JPEG 2000) and DX files; each is kept
    in the transfer syntax it was sent in and still decodes."""
    storescu = needs_dcmtk("storescu")
    files = {
        "RG1_UNCI.dcm": [],
        "dx_image.dcm": [],
        "RG1_J2KI.dcm": ["-xw"],  # propose JPEG 2000 (lossy) for the J2K file
    }
    for name, options in files.items():
        source = shared_file(name)
        node = start_node()  # RG1_UNCI and RG1_J2KI share their SOP Instance UID
        command = [storescu, *options, "-aet", "MODALITY1", "-aec", NODE_AE, "127.0.0.1"]
        done = subprocess.run(
            [*command, str(node.port), str(source)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        original = pydicom.dcmread(source)
        (row,) = node.queue.instances()
        stored = pydicom.dcmread(row.path)
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert row.header.modality == original.Modality
        assert stored.pixel_array.shape == (original.Rows, original.Columns)
        assert np.array_equal(stored.pixel_array, original.pixel_array)


def _converted(tmp_path: Path, base: Path, ts: uid.UID) -> Path:
    """``base`` re-encoded in transfer syntax ``ts`` by DCMTK or pydicom."""
    out = tmp_path / f"{ts}.dcm"
    dcmtk = {
        uid.ExplicitVRLittleEndian: ["dcmconv", "+te"],
        uid.ImplicitVRLittleEndian: ["dcmconv", "+ti"],
        uid.ExplicitVRBigEndian: ["dcmconv", "+tb"],
        uid.DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
        uid.RLELossless: ["dcmcrle"],
        uid.JPEGBaseline8Bit: ["dcmcjpeg", "+eb"],
        uid.JPEGExtended12Bit: ["dcmcjpeg", "+ee"],
        uid.JPEGLossless: ["dcmcjpeg", "+el"],
        uid.JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
        uid.JPEGLSLossless: ["dcmcjpls", "+el"],
        uid.JPEGLSNearLossless: ["dcmcjpls", "+en"],
    }
    if ts in dcmtk:
        tool, *args = dcmtk[ts]
        subprocess.run([needs_dcmtk(tool), *args, str(base), str(out)], check=True, timeout=30)
    else:
        ds = pydicom.dcmread(base)
        kwargs = {"j2k_cr": [5]} if ts == uid.JPEG2000 else {}
        ds.compress(ts, **kwargs)
        ds.save_as(out, enforce_file_format=True)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == ts
    return out


def test_every_transfer_syntax_is_accepted_as_sent(
    start_node: StartNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of the 13 transfer syntaxes is negotiated, stored byte-for-byte as sent, and decodes
    to the same pixels (lossless) or nearly (lossy)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file as it is
    base = tmp_path / "base.dcm"
    original = make_image(bits=8, rows=32, columns=40, noise=False)
    original.save_as(base, enforce_file_format=True)
    node = start_node()
    ae = scu()
    for ts in TRANSFER_SYNTAXES:
        ae.add_requested_context(CR, [ts])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    assert accepted == {str(ts) for ts in TRANSFER_SYNTAXES}
    lossy = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLSNearLossless, uid.JPEG2000}
    try:
        for ts in TRANSFER_SYNTAXES:
            path = _converted(tmp_path, base, ts)
            sent = pydicom.dcmread(path)
            sent.SOPInstanceUID = uid.generate_uid()  # one instance per syntax
            sent.save_as(path, enforce_file_format=True)
            assert assoc.send_c_store(path).Status == Status.SUCCESS, ts.name
            stored = pydicom.dcmread(
                node.spool.path_for_uids(sent.StudyInstanceUID, sent.SOPInstanceUID)
            )
            assert stored.file_meta.TransferSyntaxUID == ts
            difference = np.abs(stored.pixel_array.astype(int) - original.pixel_array.astype(int))
            if ts in lossy:
                assert difference.mean() < 2 and difference.max() <= 16, ts.name
            else:
                assert difference.max() == 0, ts.name
    finally:
        assoc.release()
    assert len(node.queue.instances()) == len(TRANSFER_SYNTAXES)


def test_every_storage_sop_class_is_accepted(start_node: StartNode) -> None:
    """CR, DX (presentation, processing), SC and grey multi-frame SC are stored."""
    node = start_node()
    datasets = [
        make_image(
            sop_class=sop_class,
            frames=3 if "7.2" in sop_class or "7.3" in sop_class else 1,
            bits=8 if sop_class.endswith("7.2") else 16,
        )
        for sop_class in STORAGE_SOP_CLASSES
    ]
    assert _store(node.port, *datasets) == [Status.SUCCESS] * len(datasets)
    assert len(node.queue.instances()) == len(datasets)


def test_unsupported_sop_class_is_refused_at_negotiation(start_node: StartNode) -> None:
    """A CT context is rejected (abstract syntax not supported) while CR is accepted."""
    node = start_node()
    ae = scu(uid.CTImageStorage, CR)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    results = {str(c.abstract_syntax): c.result for c in assoc.rejected_contexts}
    assert results == {str(uid.CTImageStorage): 0x03}
    with pytest.raises(ValueError, match="No presentation context"):
        assoc.send_c_store(make_image(sop_class=uid.CTImageStorage, modality="CT"))
    assert assoc.send_c_store(make_image()).Status == Status.SUCCESS
    assoc.release()


def test_unknown_caller_is_rejected_with_its_reason(start_node: StartNode, tmp_path: Path) -> None:
    """With [[callers]] listed, an unknown calling AE gets A-ASSOCIATE-RJ permanent, service
    user, "calling AE title not recognized"; a listed one (with its host) gets in."""
    callers = (CallerConfig(ae_title="MODALITY1", host="127.0.0.1"),)
    node = start_node(make_config(tmp_path / "var", callers=callers))
    rejected = scu(VERIFICATION_SOP_CLASS, ae_title="INTRUDER").associate(
        "127.0.0.1", node.port, ae_title=NODE_AE
    )
    assert rejected.is_rejected
    rj = rejected.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (
        0x01,
        0x01,
        RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED,
    )
    allowed = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert allowed.is_established
    allowed.release()


def test_listed_caller_from_another_host_is_rejected(start_node: StartNode, tmp_path: Path) -> None:
    """A caller pinned to another address is rejected even with the right AE title, and the
    log says so with its own reason (not that of an unknown AE title), no address in it."""
    callers = (CallerConfig(ae_title="MODALITY1", host="192.0.2.10"),)
    node = start_node(make_config(tmp_path / "var", callers=callers))
    with structlog.testing.capture_logs() as logs:
        assoc = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
        unknown = scu(VERIFICATION_SOP_CLASS, ae_title="INTRUDER").associate(
            "127.0.0.1", node.port, ae_title=NODE_AE
        )
    assert assoc.is_rejected and unknown.is_rejected
    assert assoc.acceptor.primitive.diagnostic == RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
    reasons = [e["reason"] for e in logs if e["event"] == "association_rejected"]
    assert reasons == ["calling_address_not_allowed", "calling_ae_title_not_recognized"]


def test_wrong_called_ae_is_rejected(start_node: StartNode) -> None:
    """An association to another called AE title is rejected "called AE title not recognized"
    (seen by pynetdicom and by DCMTK storescu)."""
    node = start_node()
    assoc = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title="NOTUS")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED
    echoscu = needs_dcmtk("echoscu")
    done = subprocess.run(
        [echoscu, "-aec", "NOTUS", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode != 0
    assert "Called AE Title Not Recognized" in done.stderr + done.stdout


def test_too_many_associations_are_refused_transiently(start_node: StartNode) -> None:
    """Past max_associations the node answers rejected-transient, local limit exceeded."""
    node = start_node(max_associations=1)
    first = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert first.is_established
    second = scu(VERIFICATION_SOP_CLASS).associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert second.is_rejected
    rj = second.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    first.release()


def _quarantined(node_storage: Path) -> list[dict[str, str]]:
    folder = node_storage / "quarantine"
    reasons = sorted(folder.glob("*.reason.json"))
    for reason in reasons:
        assert reason.with_name(reason.name.replace(".reason.json", ".dcm")).is_file()
    return [json.loads(r.read_text()) for r in reasons]


def test_corrupt_dataset_is_refused_and_quarantined(
    start_node: StartNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset cut off in its pixel data, and one with a broken sequence, get Cannot
    Understand; each lands in quarantine with a reason file, nothing in spool or queue."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send bytes as they are
    good = tmp_path / "good.dcm"
    make_image().save_as(good, enforce_file_format=True)
    raw = good.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # preamble, DICM, meta
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: int(len(raw) * 0.7)])
    broken_sequence = tmp_path / "sequence.dcm"
    item = b"\xfe\xff\x00\xe0\x10\x00\x00\x00" + b"\x01" * 8  # item longer than what follows
    broken_sequence.write_bytes(raw[:meta_end] + b"\x08\x00\x15\x11SQ\x00\x00" + b"\xff" * 4 + item)
    node = start_node()
    assert _store(node.port, truncated, broken_sequence) == [Status.CANNOT_UNDERSTAND] * 2
    reasons = _quarantined(node.config.node.storage)
    assert [r["status"] for r in reasons] == ["0xC000", "0xC000"]
    assert {r["calling_ae"] for r in reasons} == {"MODALITY1"}
    assert any("truncated" in r["reason"] for r in reasons)
    assert node.queue.instances() == []
    assert list(node.spool.files()) == []


def test_dataset_without_pixel_data_is_refused_and_quarantined(start_node: StartNode) -> None:
    """An image SOP instance with no Pixel Data gets Data Set Does Not Match SOP Class."""
    node = start_node()
    ds = make_image()
    del ds.PixelData
    assert _store(node.port, ds) == [Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS]
    (reason,) = _quarantined(node.config.node.storage)
    assert reason["status"] == "0xA900" and "Pixel Data" in reason["reason"]
    assert node.queue.instances() == []


def test_duplicate_instance_is_acknowledged_once(start_node: StartNode) -> None:
    """Sending the same SOP instance twice answers Success twice and keeps one file, one row."""
    node = start_node()
    ds = make_image()
    assert _store(node.port, ds, ds) == [Status.SUCCESS, Status.SUCCESS]
    assert _store(node.port, ds) == [Status.SUCCESS]
    assert len(node.queue.instances()) == 1
    assert len(list(node.spool.files())) == 1


def test_real_duplicate_in_another_transfer_syntax(start_node: StartNode) -> None:
    """RG1_UNCI and RG1_J2KI share a SOP Instance UID: the second is acknowledged, not kept."""
    unci, j2ki = shared_file("RG1_UNCI.dcm"), shared_file("RG1_J2KI.dcm")
    node = start_node()
    assert _store(node.port, unci, j2ki) == [Status.SUCCESS, Status.SUCCESS]
    (row,) = node.queue.instances()
    assert row.header.transfer_syntax_uid == uid.ExplicitVRLittleEndian


def test_low_disk_space_answers_out_of_resources(start_node: StartNode) -> None:
    """Below the free-space floor nothing is written and the answer is Out of Resources."""
    node = start_node(min_free_mb=1e12)  # a petabyte floor: always below it
    assert _store(node.port, make_image()) == [Status.OUT_OF_RESOURCES]
    assert node.queue.instances() == []
    assert list(node.spool.files()) == []
    assert _quarantined(node.config.node.storage) == []


def test_logs_carry_context_but_no_patient_data(start_node: StartNode, tmp_path: Path) -> None:
    """The instance_spooled line has calling AE, peer, study and instance UID, and no line
    anywhere has the patient's name, ID, birth date or accession number."""
    log_file = configure_logging(fmt="json", level="info", log_dir=tmp_path / "logs")
    assert log_file is not None
    try:
        node = start_node()
        ds = make_image()
        bad = make_image()
        del bad.PixelData
        _store(node.port, ds, bad)
        node.stop(grace_seconds=2.0)
    finally:
        configure_logging(fmt="json", level="info")
    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    (spooled,) = [e for e in lines if e["event"] == "instance_spooled"]
    assert spooled["calling_ae"] == "MODALITY1"
    assert spooled["peer"].startswith("127.0.0.1:")
    assert spooled["study_instance_uid"] == ds.StudyInstanceUID
    assert spooled["sop_instance_uid"] == ds.SOPInstanceUID
    assert any(e["event"] == "instance_quarantined" for e in lines)
    for secret in (PATIENT_NAME, PATIENT_ID, "19700101", "ACC-SECRET-1", "Secretname"):
        assert secret not in text
