"""Decompression bombs: a few hundred bytes whose codestream declares 65000² pixels are refused
before any decoder allocates, however the markers are dressed (fill bytes, JPEG-LS SOF55,
JPEG 2000 SIZ); an image over the pixel budget is refused by its header; a real compressed
radiograph still decodes."""

from __future__ import annotations

import io
import resource
import struct
import time

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from node.decode import DecodeError, decode
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
