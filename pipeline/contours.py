"""S400: binarisation of the independent copy, contour extraction, abnormal-contour matching.

Works on its own copy of the preprocessed working image (the "backup" of S300), so the two
branches cannot interfere. The smooth background (Gaussian, ``background_sigma_mm``) is
removed so that a boundary value separates local densities from the lung's overall gradient;
the boundary value is Otsu's threshold of that detail image inside the lung field (or a
configured value). Each white component is measured — area (mm²), equivalent diameter,
circularity 4πA/P² (P: crack length × π/4), solidity (area / convex-hull area) and contrast
(mean inside minus mean of a surrounding ring) — and matched against the abnormal shapes:
*spots* are round and compact within a diameter range, *shadows* large and fairly solid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.config import ContourConfig
from pipeline.geometry import Box, convex_hull_area, grow
from pipeline.itk import connected_components, dilate, gaussian, otsu_threshold
from pipeline.result import FindingGroup

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

_MAX_EXAMINED = 64  # largest components measured in full (bounded cost per image)


@dataclass(frozen=True, slots=True, kw_only=True)
class ContourMark:
    """An abnormal contour at working resolution with its shape measures."""

    group: FindingGroup
    mask: BoolArray = field(compare=False, repr=False)
    box: Box
    area_mm2: float
    diameter_mm: float
    circularity: float
    solidity: float
    contrast: float


def detail_image(image: FloatArray, sigma_px: float) -> FloatArray:
    """S400: the image minus its smooth background (local densities stand out)."""
    return np.asarray(image - gaussian(image, sigma_px), dtype=np.float32)


def binarise(detail: FloatArray, field_mask: BoolArray | None, config: ContourConfig) -> BoolArray:
    """S400: white where the detail image exceeds the boundary value, inside the field."""
    inside = detail[field_mask] if field_mask is not None and field_mask.any() else detail
    if config.method == "otsu":
        boundary = max(otsu_threshold(inside.astype(np.float32)), 0.0)
    else:
        boundary = config.fixed_threshold
    white = detail > boundary
    return white & field_mask if field_mask is not None else white


def _crack_lengths(labels: npt.NDArray[np.int32], count: int) -> npt.NDArray[np.float64]:
    padded = np.pad(labels, 1)
    length = np.zeros(count + 1)
    for a, b in (
        (padded[:, :-1], padded[:, 1:]),
        (padded[:-1, :], padded[1:, :]),
    ):
        edge = a != b
        length += np.bincount(a[edge], minlength=count + 1)
        length += np.bincount(b[edge], minlength=count + 1)
    return length


def _measure(
    local: BoolArray, image: FloatArray, box: Box, pixel_mm2: float, perimeter_px: float
) -> tuple[float, float, float, float, float]:
    area_px = float(local.sum())
    area_mm2 = area_px * pixel_mm2
    diameter = 2.0 * float(np.sqrt(area_mm2 / np.pi))
    circularity = min(1.0, 4.0 * np.pi * area_px / max(perimeter_px, 1.0) ** 2)
    solidity = area_px / max(convex_hull_area(local), 1.0)
    r0, c0, r1, c1 = grow(box, 3, image.shape)
    crop = image[r0:r1, c0:c1]
    inner = np.zeros(crop.shape, dtype=bool)
    inner[box[0] - r0 : box[2] - r0, box[1] - c0 : box[3] - c0] = local
    ring = dilate(inner, 3) & ~inner
    contrast = float(crop[inner].mean() - crop[ring].mean()) if ring.any() else 0.0
    return area_mm2, diameter, circularity, min(solidity, 1.0), contrast


def classify(
    area_mm2: float,
    diameter: float,
    circularity: float,
    solidity: float,
    contrast: float,
    config: ContourConfig,
) -> FindingGroup | None:
    """S400 matching: a spot, a shadow, or not an abnormal contour."""
    if contrast < config.min_contrast:
        return None
    low, high = config.spot_diameter_mm
    if (
        low <= diameter <= high
        and circularity >= config.spot_min_circularity
        and solidity >= config.spot_min_solidity
    ):
        return FindingGroup.SPOT
    if area_mm2 >= config.shadow_min_area_mm2 and solidity >= config.shadow_min_solidity:
        return FindingGroup.SHADOW
    return None


def contour_marks(
    image: FloatArray,
    field_mask: BoolArray | None,
    spacing_mm: tuple[float, float],
    config: ContourConfig,
) -> tuple[ContourMark, ...]:
    """S400: binarise a copy of the working image and keep the abnormal contours.

    ``spacing_mm`` is the working grid's (row, column) spacing (estimated if unknown).
    """
    backup = image.copy()
    sigma_px = config.background_sigma_mm / float(np.mean(spacing_mm))
    white = binarise(detail_image(backup, sigma_px), field_mask, config)
    labels, count = connected_components(white)
    if count == 0:
        return ()
    pixel_mm2 = spacing_mm[0] * spacing_mm[1]
    areas = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
    areas[0] = 0
    min_px = (np.pi / 4.0) * config.spot_diameter_mm[0] ** 2 / pixel_mm2
    order = [int(k) for k in np.argsort(areas)[::-1][:_MAX_EXAMINED] if areas[k] >= min_px]
    if not order:
        return ()
    cracks = _crack_lengths(labels, count) * (np.pi / 4.0)
    marks = []
    for k in order:
        rows, cols = np.nonzero(labels == k)
        box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        local = labels[box[0] : box[2], box[1] : box[3]] == k
        measures = _measure(local, backup, box, pixel_mm2, float(cracks[k]))
        group = classify(*measures, config)
        if group is None:
            continue
        mask = np.zeros(image.shape, dtype=bool)
        mask[box[0] : box[2], box[1] : box[3]] = local
        area_mm2, diameter, circularity, solidity, contrast = measures
        marks.append(
            ContourMark(
                group=group,
                mask=mask,
                box=box,
                area_mm2=area_mm2,
                diameter_mm=diameter,
                circularity=circularity,
                solidity=solidity,
                contrast=contrast,
            )
        )
    return tuple(marks)
