"""The data that crosses the pipeline boundary: the image going in, the findings coming out.

``SourceImage`` is what a decoder (``node.decode`` for DICOM, PNG/JPEG readers for research)
hands to the pipeline: stored pixel values plus the few header facts step S100 needs.
``AnalysisResult`` is what comes back: ``Finding`` objects in the pixel grid of the input as
given, the enhanced image (S530) and the per-step timings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from pipeline.errors import InputImageError


class Photometric(StrEnum):
    """Photometric interpretations the pipeline understands (DICOM spelling)."""

    MONOCHROME1 = "MONOCHROME1"
    MONOCHROME2 = "MONOCHROME2"
    RGB = "RGB"


class FindingGroup(StrEnum):
    """The method's two kinds of lesion, plus everything else the model reports."""

    SPOT = "spot"
    SHADOW = "shadow"
    OTHER = "other"


class FindingType(StrEnum):
    """Finding types; values are the labels written to JSON and DICOM text."""

    NODULE = "nodule"
    MASS = "mass"
    TUBERCULOSIS = "tuberculosis"
    CONSOLIDATION = "consolidation"
    GROUND_GLASS_OPACITY = "ground_glass_opacity"
    INFILTRATION = "infiltration"
    OPACITY = "opacity"
    PLEURAL_EFFUSION = "pleural_effusion"

    @property
    def group(self) -> FindingGroup:
        return _GROUP_OF[self]


_GROUP_OF = {
    FindingType.NODULE: FindingGroup.SPOT,
    FindingType.MASS: FindingGroup.SPOT,
    FindingType.TUBERCULOSIS: FindingGroup.SHADOW,
    FindingType.CONSOLIDATION: FindingGroup.SHADOW,
    FindingType.GROUND_GLASS_OPACITY: FindingGroup.SHADOW,
    FindingType.INFILTRATION: FindingGroup.SHADOW,
    FindingType.OPACITY: FindingGroup.SHADOW,
    FindingType.PLEURAL_EFFUSION: FindingGroup.OTHER,
}


class Side(StrEnum):
    """The patient's side (not the viewer's): on a PA chest image the patient's right is
    on the image's left."""

    LEFT = "left"
    RIGHT = "right"


class Zone(StrEnum):
    """Lung zone by thirds of the lung field's height."""

    UPPER = "upper"
    MIDDLE = "middle"
    LOWER = "lower"


def _read_only(array: npt.NDArray[np.generic]) -> None:
    array.flags.writeable = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceImage:
    """One decoded radiograph as stored, with the header facts S100 needs.

    ``pixels`` is 2-D (rows, columns) for grey images or 3-D (rows, columns, 3) for RGB.
    ``spacing_mm`` is (row spacing, column spacing) in mm at the image plane, or None
    when unknown (PNG/JPEG without ``--spacing``).
    """

    pixels: npt.NDArray[np.generic] = field(compare=False, repr=False)
    photometric: Photometric = Photometric.MONOCHROME2
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    voi_window: tuple[float, float] | None = None  # (centre, width) after the modality LUT
    spacing_mm: tuple[float, float] | None = None
    bits_stored: int | None = None

    def __post_init__(self) -> None:
        p = self.pixels
        grey = self.photometric is not Photometric.RGB
        if grey and p.ndim != 2:
            raise InputImageError(f"a grey image must be 2-D, got shape {p.shape}")
        if not grey and (p.ndim != 3 or p.shape[2] != 3):
            raise InputImageError(f"an RGB image must be rows×columns×3, got shape {p.shape}")
        if min(p.shape[:2]) < 16:
            raise InputImageError(f"image too small to analyse: {p.shape[:2]}")
        if self.spacing_mm is not None and min(self.spacing_mm) <= 0:
            raise InputImageError(f"pixel spacing must be positive, got {self.spacing_mm}")
        _read_only(p)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One final anomaly mark (S600), graded and coloured (S710–S742).

    All geometry is in pixels of the input image as given: ``mask`` has the input's
    (rows, columns); ``box`` is (x0, y0, x1, y1) with x1/y1 exclusive; ``contour`` is the
    outer contour as (x, y) vertices, not repeating the first point.
    """

    finding_type: FindingType
    probability: float
    grade: int
    colour: tuple[int, int, int]  # sRGB 0–255, the grade's colour (S730)
    alert: bool
    box: tuple[int, int, int, int]
    contour: tuple[tuple[float, float], ...]
    area_mm2: float | None
    side: Side | None
    zone: Zone | None
    mask: npt.NDArray[np.bool_] = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if self.grade < 1:
            raise ValueError(f"grade must be 1 or more, got {self.grade}")
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"box must be (x0, y0, x1, y1) with x0 < x1, y0 < y1: {self.box}")
        if self.mask.ndim != 2 or self.mask.dtype != np.bool_:
            raise ValueError("mask must be a 2-D boolean array")
        if len(self.contour) < 3:
            raise ValueError("contour needs at least 3 vertices")
        _read_only(self.mask)

    @property
    def group(self) -> FindingGroup:
        return self.finding_type.group


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalysisResult:
    """Everything the pipeline says about one image."""

    findings: tuple[Finding, ...]
    shape: tuple[int, int]  # (rows, columns) of the input
    spacing_mm: tuple[float, float] | None
    model_name: str
    model_version: str
    timings_ms: dict[str, float] = field(compare=False)
    enhanced_image: npt.NDArray[np.float32] = field(compare=False, repr=False)  # [0, 1], input grid
    lung_mask: npt.NDArray[np.bool_] | None = field(default=None, compare=False, repr=False)
    lung_fields: int | None = None
    """How many lung fields the model's lung channel shows (``pipeline.lung.LungField.fields``):
    2 on a frontal chest, fewer on a lateral or an image that is not a chest; None when the
    model has no lung channel or the result was not made by ``analyse``."""

    def __post_init__(self) -> None:
        if self.enhanced_image.shape != self.shape:
            raise ValueError("enhanced_image must have the input's shape")
        _read_only(self.enhanced_image)

    @property
    def alert(self) -> bool:
        """S742: the study-level alert is raised when any finding reaches the alert grade."""
        return any(f.alert for f in self.findings)

    @property
    def highest_grade(self) -> int | None:
        return max((f.grade for f in self.findings), default=None)
