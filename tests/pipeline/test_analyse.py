"""The whole method through ``pipeline.analyse`` with a real (tiny) ONNX model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import PipelineConfig, SourceImage, analyse, load_model
from pipeline.model import LesionModel
from pipeline.result import FindingGroup, Photometric
from tests.pipeline.conftest import CXR_DIR, need
from tests.pipeline.tiny_model import build_tiny_model

STEPS = {
    "s100_grey",
    "s200_window",
    "s311_watershed",
    "s300_model",
    "s300_marks",
    "s331_attention",
    "s400_contours",
    "s500_enhancement",
    "s600_recognition",
    "s700_findings",
    "total",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LesionModel:
    return load_model(build_tiny_model(tmp_path_factory.mktemp("model"), size=128), threads=1)


def _chest_like(rows: int = 600, cols: int = 500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _yy, xx = np.mgrid[:rows, :cols]
    # Noise on a smooth, broad density gradient (no sharp structure the tiny model could mark).
    return (
        1200 + 300 * np.cos((xx - cols / 2) / cols * np.pi) + 80 * rng.standard_normal((rows, cols))
    )


def test_a_bright_disk_is_a_spot_where_it_is(tiny: LesionModel) -> None:
    """A bright 20 mm disk in the image-left lung becomes one spot finding on the patient's
    right, its box around the disk, its area close to the disk's, graded and coloured."""
    image = _chest_like()
    yy, xx = np.mgrid[:600, :500]
    disk = (yy - 300) ** 2 + (xx - 120) ** 2 <= 40**2
    image[disk] += 2500
    result = analyse(
        SourceImage(pixels=image.astype(np.uint16), spacing_mm=(0.25, 0.25)), tiny, PipelineConfig()
    )
    spots = [f for f in result.findings if f.group is FindingGroup.SPOT]
    assert len(spots) == 1
    spot = spots[0]
    x0, y0, x1, y1 = spot.box
    assert x0 <= 120 < x1 and y0 <= 300 < y1
    assert (x1 - x0) < 140 and (y1 - y0) < 140  # tight, not the whole lung
    assert spot.area_mm2 == pytest.approx(disk.sum() * 0.0625, rel=0.5)
    assert spot.side is not None and spot.side.value == "right"
    assert spot.mask.shape == image.shape and spot.mask[300, 120]
    assert spot.colour == PipelineConfig().grading.colour_of(spot.grade)
    assert set(result.timings_ms) >= STEPS
    assert result.enhanced_image.shape == image.shape


def test_s700_a_fitted_extent_scales_the_finding(tmp_path: Path) -> None:
    """With ``extent_scale`` 0.5 × 0.5 in the manifest the same disk gives a spot whose box
    is about half as wide and high, centred where it was, and whose mask and contour agree
    with that box."""
    image = _chest_like()
    yy, xx = np.mgrid[:600, :500]
    image[(yy - 300) ** 2 + (xx - 120) ** 2 <= 40**2] += 2500
    source = SourceImage(pixels=image.astype(np.uint16), spacing_mm=(0.25, 0.25))
    folder = build_tiny_model(tmp_path, size=128)
    boxes = []
    for scale in (None, [0.5, 0.5]):
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["operating_point"]["extent_scale"] = {"spot": scale or [1.0, 1.0]}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        result = analyse(source, load_model(folder, threads=1), PipelineConfig())
        (spot,) = [f for f in result.findings if f.group is FindingGroup.SPOT]
        ys, xs = np.nonzero(spot.mask)
        assert spot.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        boxes.append(spot.box)
    (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes
    assert (c1 - c0) == pytest.approx((a1 - a0) / 2, abs=8)
    assert (d1 - d0) == pytest.approx((b1 - b0) / 2, abs=8)
    assert (c0 + c1) / 2 == pytest.approx((a0 + a1) / 2, abs=4)
    assert (d0 + d1) / 2 == pytest.approx((b0 + b1) / 2, abs=4)


def test_s700_a_box_head_sets_the_finding_box(tmp_path: Path) -> None:
    """With a box head that says "5 px left and right, 8 px up, 2 px down" at every pixel,
    the disk's spot becomes a box of 10 × 10 working pixels (39 × 47 input pixels), shifted
    up from the disk's centre by 3 working pixels; mask, box and contour agree; the fitted
    extent of the manifest is not applied on top."""
    image = _chest_like()
    yy, xx = np.mgrid[:600, :500]
    image[(yy - 300) ** 2 + (xx - 120) ** 2 <= 40**2] += 2500
    source = SourceImage(pixels=image.astype(np.uint16), spacing_mm=(0.25, 0.25))
    folder = build_tiny_model(tmp_path, size=128, box_px=(5.0, 8.0, 5.0, 2.0))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["operating_point"]["extent_scale"] = {"spot": [2.0, 2.0]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = analyse(source, load_model(folder, threads=1), PipelineConfig())
    (spot,) = [f for f in result.findings if f.group is FindingGroup.SPOT]
    x0, y0, x1, y1 = spot.box
    sx, sy = 500 / 128, 600 / 128
    assert x1 - x0 == pytest.approx(10 * sx, abs=sx + 1)
    assert y1 - y0 == pytest.approx(10 * sy, abs=sy + 1)
    assert (x0 + x1) / 2 == pytest.approx(120, abs=2 * sx)
    assert (y0 + y1) / 2 == pytest.approx(300 - 3 * sy, abs=2 * sy)
    ys, xs = np.nonzero(spot.mask)
    assert spot.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    cx, cy = zip(*spot.contour, strict=True)
    assert x0 - 1 <= min(cx) and max(cx) <= x1 and y0 - 1 <= min(cy) and max(cy) <= y1

    # box_weight 0: the region's own box (extent 1); 0.5: halfway between it and the head's
    widths = {}
    for weight in (0.0, 0.5):
        manifest["operating_point"]["extent_scale"] = {"spot": [1.0, 1.0]}
        manifest["operating_point"]["box_weight"] = {"spot": weight}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        result = analyse(source, load_model(folder, threads=1), PipelineConfig())
        (spot,) = [f for f in result.findings if f.group is FindingGroup.SPOT]
        widths[weight] = spot.box[2] - spot.box[0]
    assert widths[0.0] > 60  # the disk is 81 px wide
    assert widths[0.5] == pytest.approx((widths[0.0] + 10 * sx) / 2, abs=sx + 1)


def test_s600_the_support_power_weighs_a_finding_by_its_support(tmp_path: Path) -> None:
    """At support power k the disk's spot has the probability it has at power 0 times its
    support (the mean S300 probability over its region, below 1 at a blurred edge) to the
    k: at power 2 the factor is the square of the one at power 1, and the region, box and
    contour do not change."""
    image = _chest_like()
    yy, xx = np.mgrid[:600, :500]
    image[(yy - 300) ** 2 + (xx - 120) ** 2 <= 40**2] += 2500
    source = SourceImage(pixels=image.astype(np.uint16), spacing_mm=(0.25, 0.25))
    folder = build_tiny_model(tmp_path, size=128)
    manifest = json.loads((folder / "manifest.json").read_text())
    spots = {}
    for power in (0.0, 1.0, 2.0):
        manifest["operating_point"]["support_power"] = {"spot": power}
        manifest["operating_point"]["thresholds"]["spot"] = 0.05
        (folder / "manifest.json").write_text(json.dumps(manifest))
        result = analyse(source, load_model(folder, threads=1), PipelineConfig())
        (spots[power],) = [f for f in result.findings if f.group is FindingGroup.SPOT]
    factor = spots[1.0].probability / spots[0.0].probability
    assert 0.05 < factor < 0.99
    assert spots[2.0].probability / spots[0.0].probability == pytest.approx(factor**2, rel=1e-4)
    assert spots[0.0].box == spots[1.0].box == spots[2.0].box
    assert spots[0.0].contour == spots[2.0].contour


def test_a_plain_image_has_no_spot(tiny: LesionModel) -> None:
    """Without a lesion the tiny model marks no spot."""
    result = analyse(SourceImage(pixels=_chest_like().astype(np.uint16)), tiny, PipelineConfig())
    assert not [f for f in result.findings if f.group is FindingGroup.SPOT]


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.integers(64, 400),
    cols=st.integers(64, 400),
    seed=st.integers(0, 1000),
    monochrome1=st.booleans(),
    spots=st.integers(0, 3),
)
def test_invariants_hold_on_any_image(
    tiny: LesionModel, rows: int, cols: int, seed: int, monochrome1: bool, spots: int
) -> None:
    """Masks have the input's shape, probabilities and the enhanced image stay in [0, 1],
    boxes lie inside the image and contain their mask, contours have ≥ 3 vertices."""
    rng = np.random.default_rng(seed)
    image = rng.normal(1000, 100, (rows, cols))
    for _ in range(spots):
        r, c, rad = rng.integers(0, rows), rng.integers(0, cols), rng.integers(3, 20)
        yy, xx = np.ogrid[:rows, :cols]
        image[(yy - r) ** 2 + (xx - c) ** 2 <= rad**2] += 800
    photometric = Photometric.MONOCHROME1 if monochrome1 else Photometric.MONOCHROME2
    result = analyse(
        SourceImage(pixels=image.clip(0, 4095).astype(np.uint16), photometric=photometric),
        tiny,
        PipelineConfig(),
    )
    assert result.shape == (rows, cols)
    assert result.enhanced_image.min() >= 0.0 and result.enhanced_image.max() <= 1.0
    for f in result.findings:
        assert f.mask.shape == (rows, cols) and 0.0 <= f.probability <= 1.0
        x0, y0, x1, y1 = f.box
        assert 0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows
        ys, xs = np.nonzero(f.mask)
        assert xs.min() == x0 and xs.max() == x1 - 1 and ys.min() == y0 and ys.max() == y1 - 1
        assert len(f.contour) >= 3 and 1 <= f.grade <= 4


def test_real_dataset_images_run_through(tiny: LesionModel) -> None:
    """Real PNGs from cxr-lesions (one per source) run end to end with the tiny model."""
    pil = pytest.importorskip("PIL.Image")
    folder = need(CXR_DIR / "images")
    for prefix in ("tbx", "cov", "nih"):
        paths = sorted(folder.glob(f"{prefix}*.png"))[:1]
        for path in paths:
            pixels = np.asarray(pil.open(path).convert("L"))
            result = analyse(SourceImage(pixels=pixels), tiny, PipelineConfig())
            assert result.shape == pixels.shape
            assert result.lung_mask is None or result.lung_mask.shape == pixels.shape


def test_shipped_model_on_real_dicom() -> None:
    """The shipped model on the real CR chest: runs and reports findings in the lungs only
    (skipped until the model is shipped)."""
    pydicom = pytest.importorskip("pydicom")
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "models" / "manifest.json").is_file():
        pytest.skip("models/manifest.json not shipped yet")
    from tests.pipeline.conftest import DICOM_DIR

    ds = pydicom.dcmread(need(DICOM_DIR / "RG1_UNCI.dcm"))
    model = load_model(repo / "models", threads=2)
    image = SourceImage(pixels=ds.pixel_array, photometric=Photometric.MONOCHROME1)
    result = analyse(image, model, PipelineConfig())
    assert result.lung_mask is not None and 0.1 < result.lung_mask.mean() < 0.8
    for f in result.findings:
        assert (f.mask & result.lung_mask).sum() > 0
