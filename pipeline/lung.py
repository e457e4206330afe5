"""The lung field: where findings may be reported, and which side and zone they are in.

The mask comes from the model's ``lung`` channel (a learned lung-field segmentation output
beside the lesion channels): threshold, keep the two largest sizeable components, fill holes.
Side: the patient's right lung is on the image's left on a PA (and on a conventionally
displayed AP) chest image; the midline is the middle of the gap between the two lungs (the
image centre when they cannot be told apart). Zone: upper/middle/lower third of that lung's
height.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.config import RecognitionConfig
from pipeline.geometry import bounding_box
from pipeline.itk import LabelArray, connected_components, dilate, fill_holes
from pipeline.result import Side, Zone

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

_MIN_LUNG_FRACTION = 0.01  # a lung component smaller than 1 % of the image is noise


@dataclass(frozen=True, slots=True, kw_only=True)
class LungField:
    """The lung field at working resolution and the geometry derived from it."""

    mask: BoolArray = field(compare=False, repr=False)
    allowed: BoolArray = field(compare=False, repr=False)
    """The mask dilated by the configured margin: where findings may lie."""
    midline: float
    """Column (working pixels) separating the image's left lung from its right."""
    rows_image_left: tuple[int, int] | None
    rows_image_right: tuple[int, int] | None
    fields: int = 0
    """How many lung fields the image shows: 2 when the two kept components lie on opposite
    sides of the image's vertical centre line (a frontal chest), 1 for one field or two on
    the same side (a lateral shows its lungs superimposed), 0 for none."""

    @property
    def found(self) -> bool:
        return bool(self.mask.any())


def lung_field(
    probability: FloatArray | None, config: RecognitionConfig, shape: tuple[int, int]
) -> LungField:
    """The lung field from the model's lung channel (None: no channel → empty field)."""
    mask = np.zeros(shape, dtype=bool)
    if probability is not None:
        labels, count = connected_components(probability >= config.lung_threshold)
        if count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            sizes[0] = 0
            keep = [
                int(k)
                for k in np.argsort(sizes)[::-1][:2]
                if sizes[k] >= _MIN_LUNG_FRACTION * mask.size
            ]
            if keep:
                mask = fill_holes(np.isin(labels, keep))
                return _geometry(mask, config, fields=_fields(labels, keep))
    return _geometry(mask, config)


def _fields(labels: LabelArray, keep: list[int]) -> int:
    """1 or 2: two only when the components' centroids lie either side of the centre line."""
    centre = labels.shape[1] / 2.0
    sides = {bool(np.nonzero(labels == k)[1].mean() < centre) for k in keep}
    return len(sides)


def _geometry(mask: BoolArray, config: RecognitionConfig, *, fields: int = 0) -> LungField:
    width = mask.shape[1]
    cols: npt.NDArray[np.bool_] = np.asarray(mask.any(axis=0), dtype=bool)
    midline = width / 2.0
    if cols.any():
        centre = slice(width // 4, 3 * width // 4)
        gap = np.flatnonzero(~cols[centre])
        if gap.size:
            midline = centre.start + float(gap.mean())
    half = round(midline)
    rows_left = bounding_box(mask[:, :half])
    rows_right = bounding_box(mask[:, half:])
    margin = round(config.lung_margin_fraction * width)
    return LungField(
        mask=mask,
        allowed=dilate(mask, margin) if mask.any() else mask,
        midline=midline,
        rows_image_left=(rows_left[0], rows_left[2]) if rows_left else None,
        rows_image_right=(rows_right[0], rows_right[2]) if rows_right else None,
        fields=fields,
    )


def in_lung_fraction(region: BoolArray, lungs: LungField) -> float:
    """Fraction of ``region`` inside the (dilated) lung field."""
    area = int(region.sum())
    return float((region & lungs.allowed).sum()) / area if area else 0.0


def side_and_zone(region: BoolArray, lungs: LungField) -> tuple[Side | None, Zone | None]:
    """The patient's side and the lung zone of a region (working resolution)."""
    rows, cols = np.nonzero(region)
    if rows.size == 0:
        return None, None
    cy, cx = float(rows.mean()), float(cols.mean())
    image_left = cx < lungs.midline
    side = Side.RIGHT if image_left else Side.LEFT  # patient's right = image's left (PA)
    extent = lungs.rows_image_left if image_left else lungs.rows_image_right
    top, bottom = extent if extent else (0, region.shape[0])
    third = (bottom - top) / 3.0
    if cy < top + third:
        zone = Zone.UPPER
    elif cy < top + 2 * third:
        zone = Zone.MIDDLE
    else:
        zone = Zone.LOWER
    return side, zone
