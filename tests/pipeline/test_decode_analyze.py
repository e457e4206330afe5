"""node.decode (DICOM → SourceImage), node.analysis.Analyser and ``shadowspot analyze``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from node.cli import main
from node.decode import DecodeError, decode
from pipeline.result import Photometric
from tests.pipeline.conftest import DICOM_DIR, need
from tests.pipeline.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


def test_decode_real_cr_monochrome1_uncompressed_and_jpeg2000() -> None:
    """The 15-bit MONOCHROME1 CR decodes identically from both transfer syntaxes; its
    PixelSpacing of 0 means unknown spacing."""
    plain = decode(pydicom.dcmread(need(DICOM_DIR / "RG1_UNCI.dcm")))
    j2k = decode(pydicom.dcmread(need(DICOM_DIR / "RG1_J2KI.dcm")))
    assert plain.photometric is Photometric.MONOCHROME1
    assert plain.shape == (1955, 1841) and plain.spacing_mm is None
    assert plain.voi_window == (15000.0, 30000.0)
    np.testing.assert_array_equal(plain.pixels, j2k.pixels)


def test_decode_real_dx_spacing_from_pixel_spacing() -> None:
    """The DX image carries its spacing and VOI window."""
    image = decode(pydicom.dcmread(need(DICOM_DIR / "dx_image.dcm")))
    assert image.spacing_mm == pytest.approx((1.2, 1.2012))
    assert image.voi_window == (128.0, 256.0) and image.shape == (169, 211)


def _sc(frames: int) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 32, 40, 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.NumberOfFrames = frames
    pixels = np.zeros((frames, 32, 40, 3), dtype=np.uint8)
    for f in range(frames):
        pixels[f] = 10 * (f + 1)
    ds.PixelData = pixels.tobytes()
    return ds


def test_decode_multiframe_rgb_takes_the_first_frame() -> None:
    """A multi-frame RGB secondary capture decodes to its first frame as RGB."""
    image = decode(_sc(3))
    assert image.photometric is Photometric.RGB and image.pixels.shape == (32, 40, 3)
    assert int(image.pixels[0, 0, 0]) == 10


def test_decode_without_pixel_data_is_a_decode_error() -> None:
    """A dataset without pixel data is refused with DecodeError."""
    ds = _sc(1)
    del ds.PixelData
    with pytest.raises(DecodeError):
        decode(ds)


def _check_contract(doc: dict, source: Path, shape: tuple[int, int]) -> None:
    assert doc["source"] == str(source)
    assert isinstance(doc["alert"], bool)
    assert isinstance(doc["timings_ms"], dict) and "total" in doc["timings_ms"]
    assert doc["alert"] == any(f["alert"] for f in doc["findings"])
    for f in doc["findings"]:
        assert isinstance(f["label"], str)
        assert 0.0 <= f["probability"] <= 1.0 and 1 <= f["grade"] <= 4
        assert isinstance(f["alert"], bool)
        x0, y0, x1, y1 = f["box"]
        assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]
        assert f["area_mm2"] is None or f["area_mm2"] > 0
        assert f["side"] in ("left", "right", None)
        assert f["zone"] in ("upper", "middle", "lower", None)


def test_analyze_png_with_tiny_model_and_spacing(tmp_path: Path) -> None:
    """``shadowspot analyze`` on a generated PNG (tiny model via a config file): JSON with the
    contract, area in mm² thanks to --spacing, and an annotated PNG of the input's size."""
    from PIL import Image

    model_dir = build_tiny_model(tmp_path / "model", size=128)
    config = tmp_path / "shadowspot.toml"
    config.write_text(f'[pipeline]\nmodel_dir = "{model_dir}"\nthreads = 1\n')
    rng = np.random.default_rng(0)
    pixels = (90 + 10 * rng.standard_normal((400, 360))).clip(0, 255)
    yy, xx = np.mgrid[:400, :360]
    pixels[(yy - 200) ** 2 + (xx - 100) ** 2 <= 25**2] = 230
    source = tmp_path / "disk.png"
    Image.fromarray(pixels.astype(np.uint8)).save(source)
    out = tmp_path / "out"
    code = main(
        ["analyze", str(source), "--out", str(out), "--spacing", "0.3", "--config", str(config)]
    )
    assert code == 0
    doc = json.loads((out / "disk.json").read_text())
    _check_contract(doc, source, (400, 360))
    spots = [f for f in doc["findings"] if f["label"] in ("nodule", "mass")]
    assert len(spots) == 1 and spots[0]["area_mm2"] is not None
    x0, y0, x1, y1 = spots[0]["box"]
    assert x0 <= 100 < x1 and y0 <= 200 < y1
    with Image.open(out / "disk.png") as rendered:
        scale = rendered.width // 360  # small inputs are enlarged by an integer factor
        assert scale >= 1 and rendered.width == 360 * scale and rendered.mode == "RGB"
        assert rendered.height > 400 * scale  # the legend bar sits below the image
        assert getattr(rendered, "n_frames", 1) == (2 if doc["alert"] else 1)  # S742 blink


def test_analyze_reports_a_bad_input_and_carries_on(tmp_path: Path) -> None:
    """A file that is neither DICOM nor an image fails alone; the exit code says so."""
    model_dir = build_tiny_model(tmp_path / "model", size=64)
    config = tmp_path / "c.toml"
    config.write_text(f'[pipeline]\nmodel_dir = "{model_dir}"\n')
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    assert main(["analyze", str(bad), "--out", str(tmp_path / "o"), "--config", str(config)]) == 1


def test_analyze_refuses_a_pathologically_nested_file_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sequence nested 5,000 deep (beyond Python's recursion limit) is one clear failure
    line, as the node refuses it, not a RecursionError."""
    from pydicom.filewriter import write_file_meta_info

    from tests.faults.test_bad_input import _nested, _patched, chest_image

    model_dir = build_tiny_model(tmp_path / "model", size=64)
    config = tmp_path / "c.toml"
    config.write_text(f'[pipeline]\nmodel_dir = "{model_dir}"\n')
    ds = chest_image(rows=128, columns=128)
    nested = tmp_path / "nested.dcm"
    with nested.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta)
        f.write(_patched(ds, 0x00082222, _nested(5000)))
    assert (
        main(["analyze", str(nested), "--out", str(tmp_path / "o"), "--config", str(config)]) == 1
    )
    err = capsys.readouterr().err
    assert "nested too deep" in err and "Traceback" not in err


@pytest.mark.slow
def test_analyze_real_dicom_with_the_shipped_model(tmp_path: Path) -> None:
    """End to end: ``shadowspot analyze`` on every real DICOM in ../shared/data/dicom with the
    shipped model writes a JSON per input that honours the contract, and a PNG."""
    if not (REPO / "models" / "manifest.json").is_file():
        pytest.skip(
            "models/manifest.json not shipped yet: the end-to-end test needs the real model"
        )
    files = sorted(need(DICOM_DIR).glob("*.dcm"))
    if not files:
        pytest.skip("no DICOM files in ../shared/data/dicom")
    config = tmp_path / "c.toml"
    config.write_text(f'[pipeline]\nmodel_dir = "{REPO / "models"}"\n')
    out = tmp_path / "out"
    assert main(["analyze", *map(str, files), "--out", str(out), "--config", str(config)]) == 0
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        doc = json.loads((out / f"{f.stem}.json").read_text())
        _check_contract(doc, f, (int(ds.Rows), int(ds.Columns)))
        assert doc["model"]["name"] and (out / f"{f.stem}.png").is_file()


def _jpeg_extended_without_tables(path: Path) -> None:
    """A CR in JPEG Extended (12-bit, SOF1) whose one frame has no Huffman table (no DHT):
    every decoder plugin fails on it."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGExtended12Bit

    ds = _sc(1)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    del ds.PlanarConfiguration
    rows, cols = int(ds.Rows), int(ds.Columns)
    sof1 = b"\xff\xc1\x00\x0b\x0c" + rows.to_bytes(2, "big") + cols.to_bytes(2, "big")
    sof1 += b"\x01\x01\x11\x00"
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    ds.PixelData = encapsulate([b"\xff\xd8" + sof1 + sos + b"\x12\x34" * 32 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    ds.save_as(path, enforce_file_format=True)


def test_analyze_an_undecodable_12_bit_jpeg_says_one_clear_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A 12-bit JPEG no plugin can decode fails with one line naming the plugins' failures:
    the decoders' own error records (one per plugin), made in the decoder process, bring no
    traceback to the terminal (fd 2, which that process shares)."""
    model_dir = build_tiny_model(tmp_path / "model", size=64)
    config = tmp_path / "c.toml"
    config.write_text(f'[pipeline]\nmodel_dir = "{model_dir}"\n')
    bad = tmp_path / "jpeg12.dcm"
    _jpeg_extended_without_tables(bad)
    assert main(["analyze", str(bad), "--out", str(tmp_path / "o"), "--config", str(config)]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    (line,) = err.splitlines()
    assert line.startswith(f"shadowspot analyze: {bad}: cannot decode the pixel data")
    assert "pylibjpeg:" in line and "DHT marker missing" in line
