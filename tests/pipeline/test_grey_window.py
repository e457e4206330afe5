"""S100 grey conversion / distribution and S200 extremum optimisation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import GreyConfig
from pipeline.errors import InputImageError
from pipeline.grey import find_exposed_field, grey_plane, to_grey
from pipeline.result import Photometric, SourceImage
from pipeline.window import model_input, preprocess, resize, resize_nearest
from tests.pipeline.conftest import CXR_DIR, DICOM_DIR, need


def _ramp(rows: int = 64, cols: int = 48) -> np.ndarray:
    return np.add.outer(np.arange(rows), np.arange(cols)).astype(np.uint16)


def test_s100_monochrome1_is_inverted_after_the_modality_lut() -> None:
    """MONOCHROME1 stored values become larger-is-denser after slope/intercept."""
    stored = _ramp()
    m1 = SourceImage(
        pixels=stored, photometric=Photometric.MONOCHROME1, rescale_slope=2.0, rescale_intercept=5
    )
    m2 = SourceImage(
        pixels=stored, photometric=Photometric.MONOCHROME2, rescale_slope=2.0, rescale_intercept=5
    )
    np.testing.assert_allclose(grey_plane(m2), stored * 2.0 + 5)
    np.testing.assert_allclose(grey_plane(m1), -(stored * 2.0 + 5))


def test_s100_rgb_becomes_bt601_luma() -> None:
    """An RGB secondary capture is reduced to BT.601 luma."""
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    grey = grey_plane(SourceImage(pixels=rgb, photometric=Photometric.RGB))
    np.testing.assert_allclose(grey, 0.299 * 100 + 0.587 * 200 + 0.114 * 50, rtol=1e-5)


def test_s100_collimation_borders_are_left_out_of_the_statistics() -> None:
    """Uniform bright shutter bands are trimmed; the statistics see only the exposed field."""
    rng = np.random.default_rng(1)
    image = np.full((400, 300), 4000.0, dtype=np.float32)  # collimator: uniform, very bright
    image[40:360, 30:270] = rng.normal(1000, 200, (320, 240))
    field = find_exposed_field(image, GreyConfig())
    assert abs(field.top - 40) <= 3 and abs(field.bottom - 360) <= 3
    assert abs(field.left - 30) <= 3 and abs(field.right - 270) <= 3
    grey = to_grey(SourceImage(pixels=image), GreyConfig())
    assert grey.distribution.percentile(99.5) < 2000  # the shutter does not stretch the window


def test_s100_constant_image_is_an_input_error() -> None:
    """A constant image cannot be analysed."""
    with pytest.raises(InputImageError):
        to_grey(SourceImage(pixels=np.full((64, 64), 7, dtype=np.uint8)), GreyConfig())


def test_s200_window_clips_and_stretches_to_unit_range() -> None:
    """Percentile window maps the low percentile to 0 and the high one to 1."""
    image = _ramp(200, 200)
    grey = to_grey(SourceImage(pixels=image), GreyConfig())
    pre = preprocess(grey, working_shape=(50, 40), low_percentile=10, high_percentile=90)
    assert pre.full.shape == (200, 200) and pre.working.shape == (50, 40)
    assert pre.full.min() == 0.0 and pre.full.max() == 1.0
    assert np.isclose(pre.window.low, np.percentile(image, 10), atol=2)
    assert pre.scale == (4.0, 5.0)


def test_s200_working_spacing_keeps_the_physical_size() -> None:
    """Resampling changes the spacing so that rows × spacing stays the same."""
    grey = to_grey(SourceImage(pixels=_ramp(300, 200), spacing_mm=(0.2, 0.15)), GreyConfig())
    pre = preprocess(grey, working_shape=(100, 100), low_percentile=1, high_percentile=99)
    assert pre.working_spacing_mm == pytest.approx((0.6, 0.3))


def test_s200_voi_window_is_used_when_configured() -> None:
    """With use_voi, the DICOM window (after MONOCHROME1 inversion) is the interval."""
    image = SourceImage(
        pixels=_ramp(), photometric=Photometric.MONOCHROME1, voi_window=(50.0, 40.0)
    )
    grey = to_grey(image, GreyConfig())
    pre = preprocess(
        grey, working_shape=(32, 32), low_percentile=1, high_percentile=99, use_voi=True
    )
    assert (pre.window.low, pre.window.high) == (-70.0, -30.0)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(16, 300),
    cols=st.integers(16, 300),
    out_rows=st.integers(8, 128),
    out_cols=st.integers(8, 128),
    seed=st.integers(0, 2**16),
)
def test_resize_keeps_shape_and_range(
    rows: int, cols: int, out_rows: int, out_cols: int, seed: int
) -> None:
    """Resampling yields the requested shape and never leaves the input's value range."""
    image = np.random.default_rng(seed).random((rows, cols), dtype=np.float32)
    out = resize(image, (out_rows, out_cols))
    assert out.shape == (out_rows, out_cols) and out.dtype == np.float32
    assert out.min() >= image.min() - 1e-6 and out.max() <= image.max() + 1e-6
    assert resize_nearest(image > 0.5, (out_rows, out_cols)).shape == (out_rows, out_cols)


def test_resize_preserves_a_linear_ramp_centre() -> None:
    """Centre-aligned resampling keeps the mean of a ramp (no half-pixel shift)."""
    image = np.tile(np.arange(400, dtype=np.float32), (40, 1))
    out = resize(image, (10, 100))
    assert out.mean() == pytest.approx(image.mean(), rel=1e-3)


def test_s100_s200_on_the_real_cr_radiograph() -> None:
    """The 15-bit MONOCHROME1 CR chest: lungs (air) come out dark, the mediastinum bright."""
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(need(DICOM_DIR / "RG1_UNCI.dcm"))
    image = SourceImage(pixels=ds.pixel_array, photometric=Photometric.MONOCHROME1)
    pre = preprocess(
        to_grey(image, GreyConfig()),
        working_shape=(256, 256),
        low_percentile=0.5,
        high_percentile=99.5,
    )
    w = pre.working
    centre = w[96:160, 120:136].mean()  # mediastinum
    lungs = (w[80:140, 50:90].mean() + w[80:140, 166:206].mean()) / 2
    assert centre > lungs + 0.15


def test_model_input_on_a_real_png() -> None:
    """model_input turns an 8-bit dataset PNG into a [0, 1] float32 working image."""
    pil = pytest.importorskip("PIL.Image")
    images = sorted(need(CXR_DIR / "images").glob("*.png"))[:1]
    if not images:
        pytest.skip("no PNG in cxr-lesions/images")
    pixels = np.asarray(pil.open(images[0]).convert("L"))
    out = model_input(pixels, working_shape=(128, 128), low_percentile=0.5, high_percentile=99.5)
    assert out.shape == (128, 128) and out.dtype == np.float32
    assert 0.0 <= out.min() < 0.05 and 0.95 < out.max() <= 1.0


def test_s200_window_falls_back_to_the_full_range_when_percentiles_coincide() -> None:
    """A small object on a blank field (percentiles equal) still gets a usable window."""
    image = np.zeros((200, 200), dtype=np.uint16)
    image[100:104, 100:104] = 1000
    image[0, :] = 7  # not a uniform border band everywhere
    grey = to_grey(SourceImage(pixels=image), GreyConfig(border_tolerance=0.0))
    pre = preprocess(grey, working_shape=(50, 50), low_percentile=0.5, high_percentile=99.5)
    assert pre.window.high > pre.window.low
    assert pre.full[101, 101] == 1.0
