"""Mutated datasets through the C-STORE path and malformed PDUs over a raw socket.

One ``shadowspot serve`` takes every bad input below. A C-STORE must be answered with a status
the node defines: a failure (quarantined with its reason) for what cannot be a usable image,
or success only for what is well-formed, which the worker then ends analysed, skipped or
failed with a reason. Garbage on the socket must end that connection only. Afterwards the node
is up, answers C-ECHO, and its peak memory stayed under the per-worker target.
"""

from __future__ import annotations

import copy
import io
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, uid
from pydicom.encaps import encapsulate
from pynetdicom import build_context

from bench.memory import TARGET_BYTES_PER_WORKER
from bench.procs import NODE_AE, NodeProcess
from node.dimse import VERIFICATION_SOP_CLASS, Status
from tests.faults.conftest import (
    chest_image,
    db_rows,
    echo,
    files_outside_storage,
    meta_file,
    scu,
    wait_for,
)

pytestmark = pytest.mark.network

CR = uid.ComputedRadiographyImageStorage
EXPLICIT = uid.ExplicitVRLittleEndian
J2K = uid.JPEG2000Lossless
JPEG = uid.JPEGBaseline8Bit


def _dataset_bytes(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The dataset part only (no preamble, no file meta), as it travels in a C-STORE."""
    body = Dataset(ds)  # the elements without the file meta
    buffer = io.BytesIO()
    body.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element, whatever its VR and value."""
    tag = struct.pack("<HH", group, elem)
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _patched(ds: Dataset, tag: int, raw: bytes) -> bytes:
    """``ds`` encoded with the element ``tag`` replaced by ``raw`` bytes (kept in tag order)."""
    ds = copy.deepcopy(ds)
    if tag in ds:
        del ds[tag]
    head = Dataset()
    tail = Dataset()
    for element in ds:
        (head if element.tag < tag else tail).add(element)
    return _dataset_bytes(head) + raw + _dataset_bytes(tail)


def _nested(depth: int) -> bytes:
    """A sequence nested ``depth`` levels deep, in undefined-length items."""
    inner = _element(0x0008, 0x0100, b"SH", b"T-D3000 ")
    for _ in range(depth):
        item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        inner = (
            b"\x08\x00\x22\x22SQ\0\0\xff\xff\xff\xff" + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        )
    return inner


def mutations() -> list[tuple[str, bytes, str, str]]:
    """(name, dataset bytes, transfer syntax, SOP instance UID of the request)."""
    out: list[tuple[str, bytes, str, str]] = []

    def add(name: str, data: bytes, ts: str = EXPLICIT, ds: Dataset | None = None) -> None:
        out.append((name, data, ts, str(ds.SOPInstanceUID) if ds else uid.generate_uid()))

    good = chest_image(rows=128, columns=128)
    whole = _dataset_bytes(good)
    add("empty dataset (0 bytes)", b"")
    add("random garbage", bytes(range(256)) * 40)
    add("truncated after 100 bytes", whole[:100], ds=good)
    add("truncated in the middle", whole[: len(whole) // 2], ds=good)
    add("truncated by one byte", whole[:-1], ds=good)
    add(
        "element length beyond the end",
        whole[:-64] + _element(0x0009, 0x0010, b"LO", b"x") + b"\xff" * 4,
        ds=good,
    )

    ds = chest_image(rows=128, columns=128)
    add(
        "Rows as DS text",
        _patched(ds, 0x00280010, _element(0x0028, 0x0010, b"DS", b"12.5e9")),
        ds=ds,
    )
    ds = chest_image(rows=128, columns=128)
    add(
        "Rows with an unknown VR",
        _patched(ds, 0x00280010, _element(0x0028, 0x0010, b"ZZ", b"\x80\x00")),
        ds=ds,
    )
    ds = chest_image(rows=128, columns=128)
    add(
        "SOP Instance UID as binary US",
        _patched(ds, 0x00080018, _element(0x0008, 0x0018, b"US", b"\x01\x00")),
        ds=ds,
    )
    ds = chest_image(rows=128, columns=128)
    add(
        "BitsAllocated = 7",
        _patched(ds, 0x00280100, _element(0x0028, 0x0100, b"US", b"\x07\x00")),
        ds=ds,
    )
    ds = chest_image(rows=128, columns=128)
    add("implicit VR bytes in an explicit context", _dataset_bytes(ds, implicit=True), ds=ds)
    ds = chest_image(rows=128, columns=128)
    add("sequence nested 2000 levels deep", _patched(ds, 0x00082222, _nested(2000)), ds=ds)

    ds = chest_image(rows=128, columns=128)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 10000
    add("huge dimensions, native pixel data of 32 KB", _dataset_bytes(ds), ds=ds)
    ds = chest_image(rows=128, columns=128)
    ds.Rows, ds.Columns = 512, 512
    add("pixel data shorter than Rows×Columns", _dataset_bytes(ds), ds=ds)
    ds = chest_image(rows=128, columns=128)
    odd = _element(0x7FE0, 0x0010, b"OW", ds.PixelData[:-1])
    add("pixel data one byte short (odd length)", _patched(ds, 0x7FE00010, odd), ds=ds)
    ds = chest_image(rows=128, columns=128)
    del ds.PixelData
    add("no pixel data", _dataset_bytes(ds), ds=ds)

    small = chest_image(rows=64, columns=64)
    small.compress(J2K, encoding_plugin="pylibjpeg")
    small.Rows = small.Columns = 60000
    add("huge dimensions, tiny JPEG 2000 frame", _dataset_bytes(small), J2K, ds=small)
    bomb = chest_image(rows=64, columns=64)
    bomb.compress(J2K, encoding_plugin="pylibjpeg")
    bomb.Rows = bomb.Columns = 30000
    add(
        "JPEG 2000 bomb (codestream claims 30000²)",
        _dataset_bytes(_siz_bomb(bomb, 30000)),
        J2K,
        ds=bomb,
    )
    hidden = chest_image(rows=64, columns=64)
    hidden.compress(J2K, encoding_plugin="pylibjpeg")
    hidden = _siz_bomb(hidden, 30000)  # the header still says 64 × 64
    add("JPEG 2000 codestream of 30000² under a 64² header", _dataset_bytes(hidden), J2K, ds=hidden)
    jpeg = _jpeg_bomb(30000)
    add("JPEG codestream of 30000² under a 64² header", _dataset_bytes(jpeg), JPEG, ds=jpeg)
    ds = chest_image(rows=128, columns=128)
    add("native pixel data in a JPEG 2000 context", _dataset_bytes(ds), J2K, ds=ds)
    ds = chest_image(rows=128, columns=128)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    ds["PixelData"].VR = "OB"
    add("corrupt JPEG 2000 codestream", _dataset_bytes(ds), J2K, ds=ds)
    return out


def _jpeg_bomb(size: int) -> Dataset:
    """An 8-bit 64² chest whose baseline JPEG frame (by Pillow) has its SOF0 patched to
    claim ``size``² pixels."""
    ds = chest_image(rows=64, columns=64)
    grey = (np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(64, 64) >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG")
    frame = bytearray(buffer.getvalue())
    sof = frame.index(b"\xff\xc0")
    frame[sof + 5 : sof + 9] = struct.pack(">HH", size, size)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    return ds


def _siz_bomb(ds: Dataset, size: int) -> Dataset:
    """Patch the JPEG 2000 SIZ marker so that the codestream claims ``size``² pixels."""
    from pydicom.encaps import generate_fragmented_frames

    frame = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    siz = frame.index(b"\xff\x51")
    patched = bytearray(frame)
    # Xsiz, Ysiz at +6, +10; XTsiz, YTsiz (tile size) at +22, +26 (after Lsiz and Rsiz).
    for offset in (6, 10, 22, 26):
        patched[siz + offset : siz + offset + 4] = struct.pack(">I", size)
    ds.PixelData = encapsulate([bytes(patched)])
    return ds


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("bad-input")
    (workdir / "tmp").mkdir()
    process = NodeProcess(
        workdir=workdir,
        node={
            "study_quiet_seconds": 0.3,
            "network_timeout_seconds": 3.0,
            "idle_timeout_seconds": 3.0,
        },
        env={"TMPDIR": str(workdir / "tmp")},
        address_space_limit=8_000_000_000,  # a bomb that gets through must not take the host
    )
    process.start()
    yield process
    process.kill()


_DECODED_LATER = (
    "native pixel data in",
    "corrupt JPEG",
    "JPEG 2000 codestream of",
    "JPEG codestream",
)
"""Compressed pixel data is only decoded by the worker: these may be accepted, must then fail
there with a reason."""
_LENIENT = ("implicit VR bytes in an explicit context",)
"""pydicom reads implicit VR data sent in an explicit VR context (with a warning): accepting
and analysing it is allowed."""


def _assert_up(node: NodeProcess) -> None:
    assert node.alive(), node.tail()
    assert echo(node.port) == Status.SUCCESS, node.tail()


def test_mutated_datasets_get_clear_statuses(
    node: NodeProcess, tmp_path: Path, raw_sending: None
) -> None:
    """Every mutated dataset is answered with a defined status; failures are quarantined with
    a reason, accepted ones end with a reason; the node stays up with bounded memory."""
    cases = mutations()
    ae = scu()
    ae.requested_contexts = [build_context(CR, [ts]) for ts in (EXPLICIT, J2K, JPEG)]
    outcomes: dict[str, int] = {}
    for i, (name, data, ts, sop_instance) in enumerate(cases):
        path = meta_file(
            tmp_path / f"{i:02d}.dcm",
            data,
            sop_class=CR,
            sop_instance=sop_instance,
            transfer_syntax=ts,
        )
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established, name
        status = assoc.send_c_store(path)
        assert "Status" in status, f"{name}: no C-STORE response ({node.tail(3)})"
        outcomes[name] = int(status.Status)
        assoc.release()
        _assert_up(node)

    undefined = {n: hex(s) for n, s in outcomes.items() if s not in Status._value2member_map_}
    assert not undefined
    # What must be refused at the door (it cannot be a usable image).
    must_fail = [n for n, *_ in cases if not n.startswith(_DECODED_LATER + _LENIENT)]
    wrongly_accepted = [n for n in must_fail if outcomes[n] == Status.SUCCESS]
    assert not wrongly_accepted, f"accepted although unusable: {wrongly_accepted}"
    failures = [n for n, s in outcomes.items() if s != Status.SUCCESS]
    reasons = list((node.storage / "quarantine").glob("*.reason.json"))
    assert len(reasons) == len(failures)

    def finished() -> bool:
        states = db_rows(node, "SELECT state FROM instances")
        return all(s in ("analysed", "skipped", "failed") for (s,) in states)

    wait_for(finished, 60.0, "accepted instances to be processed")
    lenient = {sop for name, _, _, sop in cases if name in _LENIENT}
    for sop, state, reason in db_rows(
        node, "SELECT sop_instance_uid, state, reason FROM instances"
    ):
        if sop not in lenient:
            assert state != "analysed", "a mutated dataset was analysed as if it were fine"
            assert reason
    _assert_up(node)
    peak = node.peak_rss()
    assert peak is not None and peak < TARGET_BYTES_PER_WORKER, f"peak RSS {peak / 1e6:.0f} MB"
    assert files_outside_storage(node) == []
    print(f"mutated datasets: {len(cases)}; statuses: { {n: hex(s) for n, s in outcomes.items()} }")


def test_bogus_transfer_syntax_is_refused_at_negotiation(node: NodeProcess) -> None:
    """A presentation context with a transfer syntax nobody defined is rejected; a good one in
    the same association still works."""
    ae = scu()
    ae.requested_contexts = [
        build_context(CR, ["1.2.3.4.5.6.7"]),
        build_context(VERIFICATION_SOP_CLASS),
    ]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
    assert accepted == {VERIFICATION_SOP_CLASS}
    assert assoc.send_c_echo().Status == Status.SUCCESS
    assoc.release()


def _a_associate_rq() -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU for Verification, built by pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAWSOCKET"
    primitive.called_ae_title = NODE_AE
    context = build_context(VERIFICATION_SOP_CLASS)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


RAW_PDUS: list[tuple[str, Callable[[], list[bytes]]]] = [
    ("connect and close (0 bytes)", lambda: []),
    ("0-length A-ASSOCIATE-RQ", lambda: [b"\x01\x00\x00\x00\x00\x00"]),
    ("unknown PDU type 0xFF", lambda: [b"\xff\x00\x00\x00\x00\x04abcd"]),
    ("PDU claiming 4 GiB then close", lambda: [b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64]),
    ("random garbage", lambda: [bytes((i * 37) % 256 for i in range(4096))]),
    (
        "association, then 0-length P-DATA-TF",
        lambda: [_a_associate_rq(), b"\x04\x00\x00\x00\x00\x00"],
    ),
    (
        "association, then P-DATA for an unknown context",
        lambda: [
            _a_associate_rq(),
            b"\x04\x00\x00\x00\x00\x0a\x00\x00\x00\x06\x63\x03\x00\x00\x00\x00",
        ],
    ),
    ("association, then garbage", lambda: [_a_associate_rq(), b"\x99" * 100]),
]


@pytest.mark.parametrize(("name", "pdus"), RAW_PDUS, ids=[n for n, _ in RAW_PDUS])
def test_malformed_pdus_end_only_their_connection(
    node: NodeProcess, name: str, pdus: Callable[[], list[bytes]]
) -> None:
    """Malformed PDUs: the node closes that connection within its idle timeout (before the
    A-ASSOCIATE-RQ) or its network timeout (after) and keeps serving everyone else."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5.0) as sock:
        for pdu in pdus():
            sock.sendall(pdu)
            time.sleep(0.1)
        if name.startswith("association"):
            assert sock.recv(1)  # the A-ASSOCIATE-AC (or anything) came back first
        assert echo(node.port) == Status.SUCCESS  # others are served meanwhile
        sock.settimeout(8.0)
        try:
            while sock.recv(65536):
                pass  # drain until the node closes (or resets) the connection
        except ConnectionResetError:
            pass
    _assert_up(node)
