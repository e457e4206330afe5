"""S200: extremum optimisation — robust window, contrast stretch, working resolution.

The "extremum optimisation interval" of the method is a robust window [low, high] taken from
the S100 distribution (percentiles of the exposed field, or the DICOM VOI window when so
configured); grey values are clipped to it and stretched to [0, 1]. The stretched image is
kept at full resolution (the base of the enhanced image, S530) and resampled to the model's
working size (area-averaging shrink, then linear interpolation), with the physical spacing of
the working grid recorded.

``model_input`` is the one function that turns a raw grey array into exactly what the model
sees; training code must use it so that training and inference cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from pipeline.config import GreyConfig
from pipeline.errors import InputImageError
from pipeline.grey import GreyImage, analyse_distribution
from pipeline.itk import bin_shrink

FloatArray = npt.NDArray[np.float32]


class WindowSource(StrEnum):
    PERCENTILE = "percentile"
    VOI = "voi"


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """The extremum optimisation interval, in grey-plane values."""

    low: float
    high: float
    source: WindowSource

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise InputImageError(f"empty window [{self.low}, {self.high}]: image has no contrast")


@dataclass(frozen=True, slots=True, kw_only=True)
class Preprocessed:
    """The S200 output: the windowed image at full and at working resolution."""

    full: FloatArray = field(compare=False, repr=False)
    """[0, 1], the input's grid."""
    working: FloatArray = field(compare=False, repr=False)
    """[0, 1], the model's (height, width)."""
    window: Window
    input_shape: tuple[int, int]
    spacing_mm: tuple[float, float] | None
    """Input spacing (row, column) in mm, if known."""

    @property
    def working_shape(self) -> tuple[int, int]:
        return (int(self.working.shape[0]), int(self.working.shape[1]))

    @property
    def scale(self) -> tuple[float, float]:
        """Input pixels per working pixel, (rows, columns)."""
        return (
            self.input_shape[0] / self.working.shape[0],
            self.input_shape[1] / self.working.shape[1],
        )

    @property
    def working_spacing_mm(self) -> tuple[float, float] | None:
        """Spacing of the working grid in mm (row, column): the physical size is kept."""
        if self.spacing_mm is None:
            return None
        sr, sc = self.scale
        return (self.spacing_mm[0] * sr, self.spacing_mm[1] * sc)


def choose_window(
    grey: GreyImage, *, low_percentile: float, high_percentile: float, use_voi: bool = False
) -> Window:
    """S200: the extremum optimisation interval from the S100 distribution."""
    if use_voi and grey.voi_range is not None:
        return Window(low=grey.voi_range[0], high=grey.voi_range[1], source=WindowSource.VOI)
    d = grey.distribution
    low, high = d.percentile(low_percentile), d.percentile(high_percentile)
    if high <= low:  # almost all pixels equal (a tiny object on a blank field): full range
        low, high = d.minimum, d.maximum
    return Window(low=low, high=high, source=WindowSource.PERCENTILE)


def apply_window(pixels: FloatArray, window: Window) -> FloatArray:
    """S200: clip to the window and stretch to [0, 1] (a new float32 array)."""
    out = pixels.astype(np.float32, copy=True)
    out -= np.float32(window.low)
    out *= np.float32(1.0 / (window.high - window.low))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _axis_weights(
    n_in: int, n_out: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], FloatArray]:
    """Linear-interpolation indices and weights along one axis, pixel centres aligned."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1.0)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def resize(image: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """Resample a 2-D float image to ``shape`` (rows, columns), pixel centres aligned.

    Shrinking first averages integer blocks with SimpleITK's ``BinShrink`` (no aliasing),
    then interpolates linearly (edges clamped) to the exact size; enlarging is linear.
    """
    rows, cols = shape
    src = np.ascontiguousarray(image, dtype=np.float32)
    if src.shape == (rows, cols):
        return src.copy()
    shrink = (max(1, src.shape[1] // cols), max(1, src.shape[0] // rows))
    if shrink != (1, 1):
        src = bin_shrink(src, shrink)
        # BinShrink drops the incomplete last block; that trims < one block at the edge.
    r0, r1, rw = _axis_weights(src.shape[0], rows)
    c0, c1, cw = _axis_weights(src.shape[1], cols)
    tmp = src[r0] * (1.0 - rw)[:, None] + src[r1] * rw[:, None]
    out = tmp[:, c0] * (1.0 - cw)[None, :] + tmp[:, c1] * cw[None, :]
    return np.asarray(out, dtype=np.float32)


def resize_nearest(
    image: npt.NDArray[np.generic], shape: tuple[int, int]
) -> npt.NDArray[np.generic]:
    """Nearest-neighbour resample (masks, labels) to ``shape``, pixel centres aligned."""
    rows, cols = shape
    ri = np.minimum(
        ((np.arange(rows) + 0.5) * (image.shape[0] / rows)).astype(np.intp), image.shape[0] - 1
    )
    ci = np.minimum(
        ((np.arange(cols) + 0.5) * (image.shape[1] / cols)).astype(np.intp), image.shape[1] - 1
    )
    return image[np.ix_(ri, ci)]


def preprocess(
    grey: GreyImage,
    *,
    working_shape: tuple[int, int],
    low_percentile: float,
    high_percentile: float,
    use_voi: bool = False,
) -> Preprocessed:
    """S200: window the S100 grey plane, stretch to [0, 1] and resample to the working size."""
    window = choose_window(
        grey, low_percentile=low_percentile, high_percentile=high_percentile, use_voi=use_voi
    )
    full = apply_window(grey.pixels, window)
    return Preprocessed(
        full=full,
        working=resize(full, working_shape),
        window=window,
        input_shape=(int(full.shape[0]), int(full.shape[1])),
        spacing_mm=grey.spacing_mm,
    )


def model_input(
    pixels: npt.NDArray[np.generic],
    *,
    working_shape: tuple[int, int],
    low_percentile: float,
    high_percentile: float,
    grey_config: GreyConfig | None = None,
) -> FloatArray:
    """S100 + S200 for a 2-D grey array whose larger values are denser (PNG/JPEG data):
    exactly the (rows, columns) float32 [0, 1] image the model is fed.

    Training code packs its data with this function (with the manifest's percentiles and
    working size) so that training and inference see the same preprocessing.
    """
    if pixels.ndim != 2:
        raise InputImageError(f"model_input needs a 2-D grey array, got shape {pixels.shape}")
    plane = pixels.astype(np.float32)
    distribution = analyse_distribution(plane, grey_config or GreyConfig())
    grey = GreyImage(pixels=plane, distribution=distribution, voi_range=None, spacing_mm=None)
    return preprocess(
        grey,
        working_shape=working_shape,
        low_percentile=low_percentile,
        high_percentile=high_percentile,
    ).working
