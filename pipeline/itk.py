# SimpleITK ships no type stubs: this wrapper module is where its untyped calls are allowed.
# mypy: disable-error-code="no-untyped-call"
"""Typed wrappers around the few SimpleITK filters the pipeline uses.

SimpleITK ships no type information for its procedural API; this module is the one place
where its untyped calls are made, so every other module stays strictly typed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int32]


def _image(array: npt.NDArray[Any]) -> Any:
    return sitk.GetImageFromArray(np.ascontiguousarray(array))


def bin_shrink(image: FloatArray, factors: tuple[int, int]) -> FloatArray:
    """Average non-overlapping blocks of (columns, rows) = ``factors`` pixels."""
    shrunk = sitk.BinShrink(_image(image), list(factors))
    return np.asarray(sitk.GetArrayFromImage(shrunk), dtype=np.float32)


def gaussian(image: FloatArray, sigma_px: float) -> FloatArray:
    """Recursive Gaussian smoothing with sigma in pixels."""
    out = sitk.SmoothingRecursiveGaussian(_image(image), float(sigma_px))
    return np.asarray(sitk.GetArrayFromImage(out), dtype=np.float32)


def gradient_magnitude(image: FloatArray, sigma_px: float) -> FloatArray:
    """Gradient magnitude of the Gaussian-smoothed image (sigma in pixels)."""
    f = sitk.GradientMagnitudeRecursiveGaussianImageFilter()
    f.SetSigma(float(sigma_px))
    return np.asarray(sitk.GetArrayFromImage(f.Execute(_image(image))), dtype=np.float32)


def quantise(image: FloatArray, top: float) -> tuple[npt.NDArray[np.uint16], float]:
    """``image`` on a 16-bit scale (0..top → 0..65535) and the units per input unit.

    ITK's morphological filters are an order of magnitude faster on integers than on floats.
    """
    scale = 65535.0 / max(top, 1e-12)
    q = np.clip(image * scale, 0.0, 65535.0) + 0.5
    return q.astype(np.uint16), scale


def h_minima_markers(image: npt.NDArray[np.uint16], height: int) -> Any:
    """Labelled regional minima deeper than ``height`` (markers for the watershed)."""
    minima = sitk.HMinima(_image(image), float(height))
    regional = sitk.RegionalMinima(minima, 0, 1, False, True)
    return sitk.ConnectedComponent(regional, True)


def watershed_from_markers(image: npt.NDArray[np.uint16], markers: Any) -> LabelArray:
    """Marker-controlled morphological watershed; every pixel gets a region label."""
    out = sitk.MorphologicalWatershedFromMarkers(_image(image), markers, False, False)
    return np.asarray(sitk.GetArrayFromImage(out), dtype=np.int32)


def connected_components(
    mask: npt.NDArray[np.bool_], *, full: bool = True
) -> tuple[LabelArray, int]:
    """Label 8-connected (``full``) or 4-connected components of a mask: labels, count."""
    f = sitk.ConnectedComponentImageFilter()
    f.SetFullyConnected(full)
    labels = f.Execute(_image(mask.astype(np.uint8)))
    return np.asarray(sitk.GetArrayFromImage(labels), dtype=np.int32), int(f.GetObjectCount())


def fill_holes(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Fill the holes of a binary mask."""
    out = sitk.BinaryFillhole(_image(mask.astype(np.uint8)), True, 1)
    return np.asarray(sitk.GetArrayFromImage(out), dtype=bool)


def dilate(mask: npt.NDArray[np.bool_], radius_px: int) -> npt.NDArray[np.bool_]:
    """Binary dilation with a ball of ``radius_px``."""
    if radius_px < 1:
        return mask.copy()
    out = sitk.BinaryDilate(_image(mask.astype(np.uint8)), [radius_px, radius_px])
    return np.asarray(sitk.GetArrayFromImage(out), dtype=bool)


def otsu_threshold(values: FloatArray, bins: int = 128) -> float:
    """Otsu's threshold of a set of values (computed on their histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight = np.cumsum(hist).astype(np.float64)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    w0, w1 = weight[:-1], total - weight[:-1]
    valid = (w0 > 0) & (w1 > 0)
    m0 = np.where(valid, mean[:-1] / np.maximum(w0, 1), 0.0)
    m1 = np.where(valid, (mean[-1] - mean[:-1]) / np.maximum(w1, 1), 0.0)
    between = np.where(valid, w0 * w1 * (m0 - m1) ** 2, -1.0)
    return float(edges[int(np.argmax(between)) + 1])
