"""S100: grey conversion and pixel-distribution analysis.

The stored pixel values of a ``SourceImage`` become one grey plane in which larger means
denser (brighter on a MONOCHROME2 display): the Modality LUT (rescale slope/intercept) is
applied, MONOCHROME1 is inverted, RGB is reduced to luma (ITU-R BT.601). The pixel
distribution is then analysed over the *exposed field*: uniform border bands (collimator
shutters, unexposed background) are found and left out, and robust statistics (sorted sample
for percentiles, mean, standard deviation, histogram) are taken over the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.config import GreyConfig
from pipeline.errors import InputImageError
from pipeline.result import Photometric, SourceImage

FloatArray = npt.NDArray[np.float32]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExposedField:
    """The part of the image inside the collimation: rows [top, bottom), columns [left, right)."""

    top: int
    bottom: int
    left: int
    right: int

    def __post_init__(self) -> None:
        if not (0 <= self.top < self.bottom and 0 <= self.left < self.right):
            raise ValueError(f"empty exposed field {self}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PixelDistribution:
    """S100's analysis of the grey values over the exposed field."""

    exposed: ExposedField
    minimum: float
    maximum: float
    mean: float
    std: float
    histogram: npt.NDArray[np.int64] = field(compare=False, repr=False)
    bin_edges: npt.NDArray[np.float64] = field(compare=False, repr=False)
    sorted_sample: FloatArray = field(compare=False, repr=False)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0–100) of the grey values in the exposed field."""
        s = self.sorted_sample
        pos = min(max(q, 0.0), 100.0) / 100.0 * (s.size - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, s.size - 1)
        frac = pos - lo
        return float(s[lo] * (1.0 - frac) + s[hi] * frac)


@dataclass(frozen=True, slots=True, kw_only=True)
class GreyImage:
    """The S100 output: one float32 grey plane (larger = denser) and its distribution."""

    pixels: FloatArray = field(compare=False, repr=False)
    distribution: PixelDistribution
    voi_range: tuple[float, float] | None
    """The DICOM VOI window as (low, high) in this plane's values, if the source had one."""
    spacing_mm: tuple[float, float] | None


def grey_plane(image: SourceImage) -> FloatArray:
    """S100 (conversion): Modality LUT, MONOCHROME1 inversion, RGB → luma, as float32."""
    p = image.pixels
    if image.photometric is Photometric.RGB:
        grey = np.tensordot(p.astype(np.float32, copy=False), _LUMA, axes=([2], [0]))
        grey = grey.astype(np.float32, copy=False)
    else:
        grey = p.astype(np.float32)  # always a fresh, writable copy
        if image.rescale_slope != 1.0:
            grey *= np.float32(image.rescale_slope)
        if image.rescale_intercept != 0.0:
            grey += np.float32(image.rescale_intercept)
        if image.photometric is Photometric.MONOCHROME1:
            np.negative(grey, out=grey)
    if not np.isfinite(grey).all():
        raise InputImageError("the image has non-finite pixel values")
    return grey


def _voi_range(image: SourceImage) -> tuple[float, float] | None:
    if image.voi_window is None or image.photometric is Photometric.RGB:
        return None
    centre, width = image.voi_window
    if width <= 0:
        return None
    low, high = centre - width / 2.0, centre + width / 2.0
    if image.photometric is Photometric.MONOCHROME1:
        low, high = -high, -low
    return (low, high)


def _subsample(grey: FloatArray, max_pixels: int) -> tuple[FloatArray, int]:
    stride = max(1, int(np.ceil(np.sqrt(grey.size / max_pixels))))
    return grey[::stride, ::stride], stride


def _trim(spread: FloatArray, tolerance: float, limit: int) -> tuple[int, int]:
    """How many leading and trailing entries of ``spread`` are below ``tolerance``."""
    flat = spread < tolerance
    n = flat.size
    lead = 0
    while lead < limit and flat[lead]:
        lead += 1
    trail = 0
    while trail < limit and flat[n - 1 - trail]:
        trail += 1
    return lead, trail


def find_exposed_field(grey: FloatArray, config: GreyConfig) -> ExposedField:
    """S100: the exposed field, leaving out uniform border bands (collimation, background).

    A border row or column is *uniform* when its spread (95th − 5th percentile) is below
    ``border_tolerance`` × the image's dynamic range; bands of uniform rows/columns are
    trimmed from each side, never more than ``max_border_fraction`` of the image.
    """
    sample, stride = _subsample(grey, config.sample_pixels)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    tolerance = config.border_tolerance * max(float(hi - lo), 1e-6)
    row_p = np.percentile(sample, [5, 95], axis=1)
    col_p = np.percentile(sample, [5, 95], axis=0)
    rows, cols = sample.shape
    top, bottom = _trim(row_p[1] - row_p[0], tolerance, int(rows * config.max_border_fraction))
    left, right = _trim(col_p[1] - col_p[0], tolerance, int(cols * config.max_border_fraction))
    height, width = grey.shape
    return ExposedField(
        top=min(top * stride, height - 1),
        bottom=max(min(height, (rows - bottom) * stride), min(top * stride, height - 1) + 1),
        left=min(left * stride, width - 1),
        right=max(min(width, (cols - right) * stride), min(left * stride, width - 1) + 1),
    )


def analyse_distribution(grey: FloatArray, config: GreyConfig) -> PixelDistribution:
    """S100 (analysis): histogram and robust statistics over the exposed field."""
    exposed = find_exposed_field(grey, config)
    inside = grey[exposed.top : exposed.bottom, exposed.left : exposed.right]
    sample, _ = _subsample(inside, config.sample_pixels)
    values = np.sort(sample, axis=None).astype(np.float32, copy=False)
    if values[0] == values[-1]:
        raise InputImageError("the image is constant: nothing to analyse")
    histogram, edges = np.histogram(values, bins=config.histogram_bins)
    return PixelDistribution(
        exposed=exposed,
        minimum=float(values[0]),
        maximum=float(values[-1]),
        mean=float(values.mean(dtype=np.float64)),
        std=float(values.std(dtype=np.float64)),
        histogram=histogram.astype(np.int64, copy=False),
        bin_edges=edges,
        sorted_sample=values,
    )


def to_grey(image: SourceImage, config: GreyConfig) -> GreyImage:
    """S100: the grey plane of ``image`` and the analysis of its pixel distribution."""
    grey = grey_plane(image)
    return GreyImage(
        pixels=grey,
        distribution=analyse_distribution(grey, config),
        voi_range=_voi_range(image),
        spacing_mm=image.spacing_mm,
    )
