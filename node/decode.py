"""Decode: a pydicom ``Dataset`` → ``pipeline.result.SourceImage`` (the pipeline's input).

The stored pixel values go to the pipeline unchanged, with the header facts S100 needs: the
photometric interpretation, the Modality LUT's rescale slope/intercept, the first VOI window
and the pixel spacing (``PixelSpacing``, else ``ImagerPixelSpacing``; zero or malformed →
unknown). Multi-frame images (e.g. a secondary capture) contribute their first frame. YBR
colour data is converted to RGB by pydicom. Any failure is a ``DecodeError`` (an
``InputImageError``), which the worker records against the instance.

Two guards against images that would take the worker's memory. Before any decoder runs, the
declared size (header, and each compressed frame's own header) is held to ``[node]
max_decoded_megapixels``. Then compressed pixel data is decoded by a ``DecoderPool``
(``node.decode_pool``) in a child process limited to ``[node] decode_memory_mb``, so a frame
the size parser misreads still cannot take more; uncompressed data, whose size the header
states exactly, is read here.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue

from node.config import Config
from node.decode_child import first_frame
from node.decode_pool import DecoderPool
from node.errors import DecodeError, DecodeMemoryError
from pipeline.result import Photometric, SourceImage

__all__ = ["MAX_PIXELS", "DecodeError", "DecodeMemoryError", "DecoderPool", "decode"]

_PHOTOMETRIC = {
    "MONOCHROME1": Photometric.MONOCHROME1,
    "MONOCHROME2": Photometric.MONOCHROME2,
    "RGB": Photometric.RGB,
    "YBR_FULL": Photometric.RGB,
    "YBR_FULL_422": Photometric.RGB,
    "YBR_ICT": Photometric.RGB,
    "YBR_RCT": Photometric.RGB,
    "PALETTE COLOR": Photometric.RGB,
}


def _first(value: Any) -> Any:
    if isinstance(value, MultiValue | list | tuple):
        return value[0] if len(value) else None
    return value


def _float(value: Any) -> float | None:
    try:
        result = float(_first(value))
    except (TypeError, ValueError, IndexError):
        return None
    return result if np.isfinite(result) else None


def spacing_of(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing or ImagerPixelSpacing; None if unknown."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
            return (row, col)
    return None


def voi_window_of(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first (centre, width) VOI window, if present and valid."""
    centre = _float(ds.get("WindowCenter"))
    width = _float(ds.get("WindowWidth"))
    if centre is None or width is None or width <= 0:
        return None
    return (centre, width)


_JPEG_2000 = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_JPEG = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    }
)
_SOC_SIZ = b"\xff\x4f\xff\x51"
_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
"""JPEG start-of-frame markers (and JPEG-LS SOF55); not DHT, JPG or DAC."""


MAX_PIXELS = 100_000_000
"""Pixel budget of one image (rows × columns × frames × samples): ``[node]
max_decoded_megapixels``. A larger declared size, in the header or in any compressed frame,
is refused before a decoder runs."""


def max_pixels(config: Config) -> int:
    """The pixel budget ``[node] max_decoded_megapixels`` sets."""
    return int(config.node.max_decoded_megapixels * 1_000_000)


_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
"""JPEG markers without a length: TEM, RST0–7, SOI."""
_SOS, _EOI = 0xDA, 0xD9


def _jpeg_frame_header(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) of a JPEG or JPEG-LS frame header (SOFn, SOF55), walking the markers
    from SOI: any number of 0xFF fill bytes may precede a marker code (ITU T.81 B.1.1.2),
    standalone markers have no length; the frame header must come before the first scan."""
    if frame[:2] != b"\xff\xd8":
        return None
    at = 2
    while at < len(frame):
        if frame[at] != 0xFF:
            return None
        while at < len(frame) and frame[at] == 0xFF:  # fill bytes
            at += 1
        if at >= len(frame):
            return None
        code = frame[at]
        at += 1
        if code in _STANDALONE:
            continue
        if code in (_SOS, _EOI) or at + 2 > len(frame):
            return None
        (length,) = struct.unpack(">H", frame[at : at + 2])
        if code in _SOF:
            if length < 8 or at + 7 > len(frame):
                return None
            rows, columns = struct.unpack(">HH", frame[at + 3 : at + 7])
            return rows, columns
        if length < 2:
            return None
        at += length
    return None


def _declared_size(frame: bytes, transfer_syntax: str) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG 2000 SIZ (raw codestream or inside a JP2 box) or a
    JPEG/JPEG-LS frame header declares; None when the frame has none that can be read."""
    if transfer_syntax in _JPEG_2000:
        at = frame.find(_SOC_SIZ)
        if at < 0 or len(frame) < at + 24:
            return None
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[at + 8 : at + 24])
        if x0 > xsiz or y0 > ysiz:
            return None
        return ysiz - y0, xsiz - x0
    return _jpeg_frame_header(frame)


def _check_budget(rows: int, columns: int, frames: int, samples: int, max_pixels: int) -> None:
    total = rows * columns * frames * samples
    if total > max_pixels:
        raise DecodeError(
            f"the image declares {rows}×{columns} pixels × {frames} frame(s) × {samples} "
            f"sample(s), over the {max_pixels / 1e6:g} Mpixel budget"
        )


def _check_codestreams(ds: pydicom.Dataset, max_pixels: int) -> None:
    """Refuse an image over the pixel budget, and compressed frames whose codestream declares
    another size than Rows × Columns or no readable size at all.

    The decoders allocate what the codestream declares (JPEG 2000 SIZ, JPEG SOF marker) before
    pydicom can compare it with the header: a few hundred bytes claiming 65000² pixels would
    take gigabytes. Each frame is parsed before any decoder sees it.
    """
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError("the image has no usable Rows, Columns or Number of Frames") from exc
    _check_budget(rows, columns, frames, samples, max_pixels)
    syntax = _transfer_syntax(ds)
    if syntax not in _JPEG_2000 and syntax not in _JPEG:
        return
    for number, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames), 1):
        declared = _declared_size(frame, syntax)
        if declared is None:
            raise DecodeError(f"compressed frame {number} has no readable frame header")
        _check_budget(*declared, 1, samples, max_pixels)
        if declared != (rows, columns):
            raise DecodeError(
                f"compressed frame {number} declares {declared[0]}×{declared[1]} pixels, "
                f"the header {rows}×{columns}"
            )


_NATIVE = frozenset(
    {
        "",  # no file meta: a dataset built in memory, uncompressed
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.ExplicitVRBigEndian,
    }
)


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return "" if meta is None else str(meta.get("TransferSyntaxUID", ""))


def _pixels(
    ds: pydicom.Dataset, photometric: str, max_pixels: int, pool: DecoderPool | None
) -> np.ndarray[Any, Any]:
    """The first frame's pixels (palette colours applied); compressed ones decoded by the
    pool's memory-limited processes, when there is a pool."""
    _check_codestreams(ds, max_pixels)
    stored = None
    if pool is not None and _transfer_syntax(ds) not in _NATIVE:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        stored = pool.first_frame(ds, most_values=int(ds.Rows) * int(ds.Columns) * samples)
    try:
        pixels = first_frame(ds) if stored is None else stored  # pydicom: YBR → RGB
        if photometric == "PALETTE COLOR":
            from pydicom.pixels.processing import apply_color_lut

            pixels = apply_color_lut(pixels, ds)
    except Exception as exc:  # the decoders raise many unrelated types
        raise DecodeError(f"cannot decode the pixel data: {exc}") from exc
    return np.asarray(pixels)


def decode(
    ds: pydicom.Dataset, *, max_pixels: int = MAX_PIXELS, pool: DecoderPool | None = None
) -> SourceImage:
    """Build the pipeline's ``SourceImage`` from a DICOM dataset with pixel data, refusing
    (``DecodeError``) an image over ``max_pixels`` before any decoder runs. With ``pool``,
    compressed pixel data is decoded in its memory-limited processes (``DecodeMemoryError``
    over the limit); without, here (tests and tools that decode trusted files)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DecodeError("the dataset has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    kind = _PHOTOMETRIC.get(photometric)
    if kind is None:
        raise DecodeError(f"unsupported photometric interpretation {photometric!r}")
    pixels = _pixels(ds, photometric, max_pixels, pool)
    slope = _float(ds.get("RescaleSlope"))
    intercept = _float(ds.get("RescaleIntercept"))
    bits = ds.get("BitsStored")
    return SourceImage(
        pixels=pixels,
        photometric=kind,
        rescale_slope=slope if slope else 1.0,
        rescale_intercept=intercept or 0.0,
        voi_window=voi_window_of(ds),
        spacing_mm=spacing_of(ds),
        bits_stored=int(bits) if bits is not None else None,
    )
