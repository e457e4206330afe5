"""Decompression bombs: a few hundred bytes whose codestream declares 65000² pixels are refused
before any decoder allocates, however the markers are dressed (fill bytes, JPEG-LS SOF55,
JPEG 2000 SIZ); an image over the pixel budget is refused by its header; a real compressed
radiograph still decodes.

Behind the size parser, the memory limit: compressed data is decoded in a decoder process
limited to ``[node] decode_memory_mb``. A JP2 file whose decoy SIZ the parser reads while the
decoder reads a 12000² codestream, an image needing more than a small limit, a decoder killed
mid-decode: each is a ``DecodeError`` naming the limit, the worker's memory untouched, and the
next image decodes. Through a real node the bomb's instance fails for good, also after a
restart, and the next study is analysed."""

from __future__ import annotations

import io
import os
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pynetdicom import evt

from bench.procs import NODE_AE, NodeProcess
from node.decode import DecodeError, DecodeMemoryError, DecoderPool, decode
from tests.faults.conftest import chest_image, db_rows, events, scu, wait_for
from tests.node.conftest import shared_file

BOMB = 65000


def _jpeg_baseline(rows: int = 64, columns: int = 64) -> bytes:
    grey = (np.arange(rows * columns) % 251).astype(np.uint8).reshape(rows, columns)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _dataset(frame: bytes, syntax: str, rows: int = 64, columns: int = 64) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = uid.ComputedRadiographyImageStorage
    ds.SOPInstanceUID = uid.generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


def _patch_sof(jpeg: bytes, code: int, rows: int, columns: int) -> bytes:
    """The frame header's height and width set to ``rows`` × ``columns``."""
    at = jpeg.index(bytes((0xFF, code)))
    return jpeg[: at + 5] + struct.pack(">HH", rows, columns) + jpeg[at + 9 :]


def _refused_quickly(ds: Dataset, match: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(DecodeError, match=match):
        decode(ds)
    assert time.monotonic() - started < 2.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"decoding the bomb took {grown_mb:.0f} MB"


def test_jpeg_bomb_with_a_fill_byte_after_soi_is_refused() -> None:
    """The attack of the issue: SOF0 declares 65000×65000 and one legal 0xFF fill byte
    follows SOI (the old marker walk stopped at FF FF and let the decoder allocate 16 GB)."""
    jpeg = _patch_sof(_jpeg_baseline(), 0xC0, BOMB, BOMB)
    bomb = jpeg[:2] + b"\xff" + jpeg[2:]
    assert len(bomb) < 4096
    _refused_quickly(_dataset(bomb, uid.JPEGBaseline8Bit), "65000×65000.*budget")


def test_jpeg_bomb_behind_many_fill_bytes_and_a_restart_marker_is_refused() -> None:
    jpeg = _patch_sof(_jpeg_baseline(), 0xC0, BOMB, BOMB)
    bomb = jpeg[:2] + b"\xff" * 7 + b"\xff\xd0" + jpeg[2:]
    _refused_quickly(_dataset(bomb, uid.JPEGBaseline8Bit), "budget")


def test_jpeg_ls_sof55_bomb_is_refused() -> None:
    """A JPEG-LS frame header (SOF55, FF F7) declaring 65000² after a fill byte."""
    sof55 = b"\xff\xf7" + struct.pack(">HBHHB", 11, 8, BOMB, BOMB, 1) + b"\x01\x11\x00"
    bomb = b"\xff\xd8\xff" + sof55 + b"\xff\xda" + b"\x00" * 32 + b"\xff\xd9"
    _refused_quickly(_dataset(bomb, uid.JPEGLSLossless), "65000×65000.*budget")


def test_jpeg_2000_siz_bomb_inside_a_jp2_box_is_refused() -> None:
    siz = (
        struct.pack(">HHIIIIIIIIH", 41, 0, BOMB, BOMB, 0, 0, BOMB, BOMB, 0, 0, 1) + b"\x07\x01\x01"
    )
    codestream = b"\xff\x4f\xff\x51" + siz + b"\xff\xd9"
    jp2 = struct.pack(">I4s", 8 + len(codestream), b"jp2c") + codestream
    _refused_quickly(_dataset(jp2, uid.JPEG2000Lossless), "65000×65000.*budget")


def test_a_frame_without_a_readable_header_is_refused_before_decoding() -> None:
    _refused_quickly(_dataset(b"\xff\xd8\x00garbage", uid.JPEGBaseline8Bit), "no readable frame")


def test_a_frame_that_disagrees_with_rows_and_columns_is_refused() -> None:
    jpeg = _patch_sof(_jpeg_baseline(), 0xC0, 128, 64)
    _refused_quickly(_dataset(jpeg, uid.JPEGBaseline8Bit), "declares 128×64.*header 64×64")


def test_an_uncompressed_header_over_the_budget_is_refused() -> None:
    ds = _dataset(_jpeg_baseline(), uid.ExplicitVRLittleEndian, rows=20000, columns=20000)
    ds.PixelData = b"\x00" * 16  # lies: far less than the header says
    ds.NumberOfFrames = 1
    with pytest.raises(DecodeError, match="budget"):
        decode(ds, max_pixels=100_000_000)


def test_the_small_real_jpeg_and_the_shared_jpeg_2000_radiograph_still_decode() -> None:
    image = decode(_dataset(_jpeg_baseline(), uid.JPEGBaseline8Bit))
    assert image.pixels.shape == (64, 64)
    ds = pydicom.dcmread(shared_file("RG1_J2KI.dcm"))
    assert decode(ds).pixels.shape == (int(ds.Rows), int(ds.Columns))


# The memory limit behind the size parser ---------------------------------------------------


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _j2k(ds: Dataset) -> Dataset:
    ds.compress(uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def _misread_jp2(ds: Dataset, size: int = 12000) -> Dataset:
    """``ds`` (JPEG 2000) with its frame wrapped as a JP2 file: an XML box holding the real
    64² codestream comes first (the size parser reads its SIZ), the codestream box after it
    claims ``size``² (what the decoder reads and allocates: 0.9 GB for 12000²)."""
    decoy = next(generate_frames(ds.PixelData, number_of_frames=1))
    real = bytearray(decoy)
    siz = real.index(b"\xff\x51")
    for offset in (6, 10, 22, 26):  # Xsiz, Ysiz, XTsiz, YTsiz
        real[siz + offset : siz + offset + 4] = struct.pack(">I", size)
    header = _box(b"ihdr", struct.pack(">IIHBBBB", size, size, 1, 11, 7, 0, 0))
    jp2 = b"".join(
        (
            _box(b"jP  ", b"\r\n\x87\n"),
            _box(b"ftyp", b"jp2 \0\0\0\0jp2 "),
            _box(b"jp2h", header + _box(b"colr", b"\x01\x00\x00\x00\x00\x00\x11")),
            _box(b"xml ", decoy),
            _box(b"jp2c", bytes(real)),
        )
    )
    ds.PixelData = encapsulate([jp2])
    return ds


@pytest.fixture
def pool() -> Iterator[DecoderPool]:
    """Decoder processes with a 64 MB limit (a 64² image needs a few)."""
    with DecoderPool(64) as decoders:
        yield decoders


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_frame_the_size_parser_misreads_is_stopped_by_the_memory_limit(
    pool: DecoderPool,
) -> None:
    """The parser reads the decoy's 64² (the header agrees), the decoder the 12000² behind it:
    the decoder process runs out under its limit, the worker's memory stays where it was, and
    the next image decodes in a new process."""
    bomb = _misread_jp2(_j2k(chest_image(rows=64, columns=64)))
    assert len(bomb.PixelData) < 16_384
    before = _maxrss_mb()
    with pytest.raises(DecodeMemoryError, match=r"64 MB decode memory limit.*decode_memory_mb"):
        decode(bomb, pool=pool)
    assert _maxrss_mb() - before < 50
    ordinary = chest_image(rows=64, columns=64)
    expected = ordinary.pixel_array.copy()
    assert np.array_equal(decode(_j2k(ordinary), pool=pool).pixels, expected)


def _blank_j2k(size: int) -> Dataset:
    """A legitimately declared ``size``² 12-bit image, all zero: a few hundred bytes of JPEG
    2000 whose decoding takes about 8 bytes a pixel."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(size * size * 2)
    return _j2k(ds)


def test_an_image_needing_more_than_the_limit_is_refused_and_the_next_decodes() -> None:
    """A 3000² image (9 Mpixel, well within the pixel budget) needs about 70 MB to decode:
    over a 16 MB limit it is refused and the next image decodes; under 256 MB it decodes."""
    blank = _blank_j2k(3000)
    assert len(blank.PixelData) < 1024
    with DecoderPool(16) as pool:
        with pytest.raises(DecodeMemoryError, match="16 MB decode memory limit"):
            decode(blank, pool=pool)
        ordinary = _j2k(chest_image(rows=64, columns=64))
        assert decode(ordinary, pool=pool).pixels.shape == (64, 64)
    with DecoderPool(256) as pool:
        assert decode(blank, pool=pool).pixels.shape == (3000, 3000)


def test_a_decoder_killed_mid_decode_is_a_decode_error_and_is_replaced(
    pool: DecoderPool,
) -> None:
    """A decoder process killed while it decodes (as the kernel's OOM killer would) fails
    that image with the limit named; one killed while idle is replaced without blame."""
    ordinary = _j2k(chest_image(rows=64, columns=64))
    decode(ordinary, pool=pool)
    (idle,) = pool.pids
    os.kill(idle, signal.SIGKILL)
    time.sleep(0.2)
    assert decode(ordinary, pool=pool).pixels.shape == (64, 64)
    (child,) = pool.pids
    assert child != idle
    slow = _j2k(chest_image(rows=4000, columns=4000))
    with DecoderPool(2048) as big:
        decode(ordinary, pool=big)
        (pid,) = big.pids
        killer = threading.Thread(target=_kill_when_growing, args=(pid, 40), daemon=True)
        killer.start()
        with pytest.raises(DecodeError, match=r"killed by SIGKILL.*2048 MB decode memory limit"):
            decode(slow, pool=big)
        killer.join(10)
        assert decode(ordinary, pool=big).pixels.shape == (64, 64)


def _kill_when_growing(pid: int, mb: int) -> None:
    """SIGKILL ``pid`` once its address space grew by ``mb`` (it is decoding)."""
    start = _vm_size_mb(pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _vm_size_mb(pid) - start < mb:
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)


def _vm_size_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_the_shared_jpeg_2000_radiograph_decodes_identically_in_the_decoder_process() -> None:
    """RG1_J2KI (1955×1841, 15 bit, MONOCHROME1) through the decoder process: the same array,
    type and header facts as decoded in this process."""
    with DecoderPool(256) as pool:
        there = decode(pydicom.dcmread(shared_file("RG1_J2KI.dcm")), pool=pool)
    here = decode(pydicom.dcmread(shared_file("RG1_J2KI.dcm")))
    assert there.pixels.dtype == here.pixels.dtype
    assert np.array_equal(there.pixels, here.pixels)
    assert there == here  # the non-array fields


# Through a real node ------------------------------------------------------------------------


def _send_j2k(port: int, datasets: list[Dataset]) -> list[int | None]:
    """C-STORE JPEG 2000 datasets over one association; their statuses."""
    ae = scu()
    ae.add_requested_context(uid.ComputedRadiographyImageStorage, [uid.JPEG2000Lossless])
    opened: list[socket.socket] = []  # pynetdicom may leave a socket open: close it here
    handlers = [(evt.EVT_CONN_OPEN, lambda event: opened.append(event.assoc.dul.socket.socket))]
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, evt_handlers=handlers)
    statuses: list[int | None] = []
    try:
        for ds in datasets:
            answer = assoc.send_c_store(ds) if assoc.is_established else None
            statuses.append(int(answer.Status) if answer and "Status" in answer else None)
    finally:
        if assoc.is_established:
            assoc.release()
        for sock in opened:
            sock.close()
    return statuses


def _states(node: NodeProcess) -> dict[str, tuple[str, str | None]]:
    rows = db_rows(node, "SELECT sop_instance_uid, state, reason FROM instances")
    return {str(sop): (str(state), reason) for sop, state, reason in rows}


def _finished(node: NodeProcess, *sops: str) -> bool:
    states = _states(node)
    return all(states.get(s, ("",))[0] in ("analysed", "failed", "skipped") for s in sops)


@pytest.mark.network
@pytest.mark.slow
def test_the_node_fails_a_bomb_for_good_and_analyses_the_next_study(
    start_node: Callable[..., NodeProcess],
) -> None:
    """``shadowspot serve`` with ``decode_memory_mb = 64`` takes the misread JP2 bomb and an
    ordinary JPEG 2000 chest: the bomb's instance fails with the limit as its reason, the
    chest is analysed, the node stays up; after a restart the bomb is not run again while a
    new study is analysed."""
    node = start_node(
        node={"study_quiet_seconds": 0.2, "decode_memory_mb": 64},
        address_space_limit=8_000_000_000,  # if the limit failed, the bomb must not take the host
    )
    bomb = _misread_jp2(_j2k(chest_image(rows=64, columns=64)))
    chest = _j2k(chest_image(seed=1))
    assert _send_j2k(node.port, [bomb, chest]) == [0, 0]
    bomb_uid, chest_uid = str(bomb.SOPInstanceUID), str(chest.SOPInstanceUID)
    wait_for(lambda: _finished(node, bomb_uid, chest_uid), 120, "both instances to finish")
    state, reason = _states(node)[bomb_uid]
    assert state == "failed"
    assert reason is not None and "DecodeMemoryError" in reason and "64 MB" in reason, reason
    assert _states(node)[chest_uid][0] == "analysed"
    assert node.alive(), node.tail()

    assert node.stop() == 0
    node.start()
    after = _j2k(chest_image(seed=2))
    assert _send_j2k(node.port, [after]) == [0]
    after_uid = str(after.SOPInstanceUID)
    wait_for(lambda: _finished(node, after_uid), 120, "the new study to finish")
    assert _states(node)[after_uid][0] == "analysed"
    assert _states(node)[bomb_uid][0] == "failed"
    failed_now = [e for e in node.events() if e.get("event") == "instance_failed"]
    assert failed_now == [], "an instance was run again after the restart"
    assert [e for e in events(node, "instance_failed")], "the first run logged the bomb"
