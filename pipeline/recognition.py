"""S600: final recognition on the enhanced image → findings in the input's pixel grid.

Each fused region is re-scored on the locally enhanced image (one more model run on the
enhanced image at working size; the region's score is the peak of its channel inside it) and
that score is averaged with the region's S300/S333 probability; with a fitted support power
(manifest) the result is weighed by the region's support, the mean S300 probability over
it, so that a region the model marks whole outranks one it marks at a point. A region
becomes a finding when the result reaches its channel's operating threshold (manifest) and
enough of it lies in the lung field. Overlapping findings (IoU > 0.5) keep only the most
probable one. Each finding's mask is brought to full resolution; its outer contour, box,
area, side, zone, type (spots: nodule/mass by size) and grade (S710–S742) are attached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.boxes import BoxEvidence, predicted_box
from pipeline.config import PipelineConfig
from pipeline.enhancement import MarkSource, Region
from pipeline.geometry import (
    Box,
    bounding_box,
    fit_to_box,
    grow,
    scale_extent,
    simplify_chain,
    trace_outer_contour,
)
from pipeline.grading import grade
from pipeline.lung import LungField, in_lung_fraction, side_and_zone
from pipeline.result import Finding, FindingGroup, FindingType
from pipeline.window import Preprocessed, resize

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
Fractional = tuple[float, float, float, float]

_NMS_IOU = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class Recognised:
    """A region that survived S600, with its final probability."""

    region: Region
    probability: float
    mask: BoolArray = field(compare=False, repr=False)


def support(region: Region, probabilities: FloatArray) -> float:
    """S600: how much of a region the model stands behind, the mean of its channel's S300
    probability over it (1: every pixel certain; near 0: one confident point)."""
    return float(probabilities[region.channel.index][region.mask].mean())


def rescore(
    regions: tuple[Region, ...],
    enhanced_probabilities: FloatArray | None,
    probabilities: FloatArray | None = None,
) -> list[float]:
    """S600: each region's probability after recognition on the enhanced image, times its
    ``support`` in ``probabilities`` (the S300 maps) to its channel's ``support_power``."""
    scores = []
    for r in regions:
        p = r.probability
        if enhanced_probabilities is not None:
            p = (p + float(enhanced_probabilities[r.channel.index][r.mask].max())) / 2.0
            if r.source is MarkSource.BOTH:
                p = max(p, r.probability)  # confirmation by both branches is not undone
        if probabilities is not None and r.channel.support_power > 0.0:
            p *= support(r, probabilities) ** r.channel.support_power
        scores.append(float(np.clip(p, 0.0, 1.0)))
    return scores


def _iou(a: BoolArray, b: BoolArray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def select(
    regions: tuple[Region, ...], scores: list[float], lungs: LungField, config: PipelineConfig
) -> list[Recognised]:
    """S600: keep regions over their threshold and in the lung field; suppress overlaps."""
    keep: list[Recognised] = []
    restrict = lungs.found
    for i in np.argsort(scores, kind="stable")[::-1].tolist():
        r, p = regions[i], scores[i]
        if p < r.channel.threshold:
            continue
        if restrict and in_lung_fraction(r.mask, lungs) < config.recognition.lung_min_overlap:
            continue
        if any(_iou(r.mask, k.mask) > _NMS_IOU for k in keep):
            continue
        keep.append(Recognised(region=r, probability=p, mask=r.mask))
    return keep


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def suppress_coinciding(findings: list[Finding]) -> list[Finding]:
    """S700: one finding per lesion. Two regions of one lesion can get (nearly) the same box
    (a box head predicts the lesion's box from each), and one lesion can be read by both
    finding channels (an opacity and a mass over the same region); of findings whose boxes
    overlap with IoU > 0.5, whatever their group, only the most probable one stays (as S600
    does for regions)."""
    keep: list[Finding] = []
    for f in sorted(findings, key=lambda f: f.probability, reverse=True):
        if not any(_box_iou(k.box, f.box) > _NMS_IOU for k in keep):
            keep.append(f)
    return keep


def full_resolution_mask(mask: BoolArray, pre: Preprocessed) -> tuple[BoolArray, Box] | None:
    """The working-resolution mask in the input grid (linear upsampling, cut at 0.5)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    wr0, wc0, wr1, wc1 = grow(
        (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1), 1, mask.shape
    )
    sr, sc = pre.scale
    r0, c0 = round(wr0 * sr), round(wc0 * sc)
    r1, c1 = min(pre.input_shape[0], round(wr1 * sr)), min(pre.input_shape[1], round(wc1 * sc))
    up = resize(mask[wr0:wr1, wc0:wc1].astype(np.float32), (r1 - r0, c1 - c0)) >= 0.5
    if not up.any():  # a sliver thinner than the upsampling: keep its nearest pixels
        up = resize(mask[wr0:wr1, wc0:wc1].astype(np.float32), (r1 - r0, c1 - c0)) > 0.0
    full = np.zeros(pre.input_shape, dtype=bool)
    full[r0:r1, c0:c1] = up
    ys = np.flatnonzero(up.any(axis=1))
    xs = np.flatnonzero(up.any(axis=0))
    box = (c0 + int(xs[0]), r0 + int(ys[0]), c0 + int(xs[-1]) + 1, r0 + int(ys[-1]) + 1)
    return full, box


def outer_contour(full: BoolArray, box: Box) -> tuple[tuple[float, float], ...]:
    """(x, y) pixel-centre vertices of the mask's outer contour (at least 3 vertices)."""
    x0, y0, x1, y1 = box
    chain = simplify_chain(trace_outer_contour(full[y0:y1, x0:x1]))
    if len(chain) < 3:  # a pixel or a line: the outline of its box
        return (
            (x0 - 0.5, y0 - 0.5),
            (x1 - 0.5, y0 - 0.5),
            (x1 - 0.5, y1 - 0.5),
            (x0 - 0.5, y1 - 0.5),
        )
    return tuple((float(x0 + c), float(y0 + r)) for r, c in chain)


def finding_type_of(channel_type: FindingType, diameter_mm: float, mass_mm: float) -> FindingType:
    """Spots are nodules up to ``mass_mm`` and masses above; other types are the channel's."""
    if channel_type.group is FindingGroup.SPOT:
        return FindingType.MASS if diameter_mm > mass_mm else FindingType.NODULE
    return channel_type


def finding_box(rec: Recognised, boxes: BoxEvidence | None) -> Fractional | None:
    """S700 with a box head (``pipeline.boxes``): the box a finding reports (row0, col0,
    row1, col1; fractional working pixels), the blend of the box the head predicts for it
    and its own region's box scaled by the fitted extent (``Channel.extent_scale``), the head
    weighing ``Channel.box_weight``. None without a box head."""
    if boxes is None:
        return None
    channel = rec.region.channel
    head = predicted_box(rec.mask, channel.index, boxes)
    own = bounding_box(scale_extent(rec.mask, *channel.extent_scale))
    if head is None or own is None:
        return None
    w = channel.box_weight
    return (
        w * head[0] + (1 - w) * own[0],
        w * head[1] + (1 - w) * own[1],
        w * head[2] + (1 - w) * own[2],
        w * head[3] + (1 - w) * own[3],
    )


def finding_region(
    rec: Recognised, pre: Preprocessed, boxes: BoxEvidence | None
) -> tuple[BoolArray, BoolArray, Box] | None:
    """S700: the region a finding reports, at working size and in the input grid, with its
    box (x0, y0, x1, y1) there. With a box head the region is fitted into ``finding_box``
    in the input grid itself, so that the box's edges are not rounded to working pixels;
    without one it is the region scaled by the fitted extent. None for an empty region."""
    target = finding_box(rec, boxes)
    if target is None:
        mask = scale_extent(rec.mask, *rec.region.channel.extent_scale)
        up = full_resolution_mask(mask, pre)
        return None if up is None else (mask, *up)
    up = full_resolution_mask(rec.mask, pre)
    if up is None:
        return None
    sr, sc = pre.scale
    full = fit_to_box(up[0], (target[0] * sr, target[1] * sc, target[2] * sr, target[3] * sc))
    r0, c0, r1, c1 = bounding_box(full) or (0, 0, 0, 0)
    return fit_to_box(rec.mask, target), full, (c0, r0, c1, r1)


def make_finding(
    rec: Recognised,
    pre: Preprocessed,
    lungs: LungField,
    config: PipelineConfig,
    boxes: BoxEvidence | None = None,
) -> Finding | None:
    """S600 + S710–S742: one graded, coloured finding in the input grid, its region fitted
    to the model's box for it first (``finding_region``)."""
    region = finding_region(rec, pre, boxes)
    if region is None:
        return None
    mask, full, box = region
    area_px = int(full.sum())
    spacing = pre.spacing_mm
    if spacing is not None:
        size_mm2 = area_px * spacing[0] * spacing[1]
        area_mm2: float | None = size_mm2
    else:
        mm = config.grading.fallback_field_width_mm / pre.input_shape[1]
        area_mm2, size_mm2 = None, area_px * mm * mm
    diameter = 2.0 * float(np.sqrt(size_mm2 / np.pi))
    channel_type = rec.region.channel.finding_type or FindingType.OPACITY
    finding_type = finding_type_of(channel_type, diameter, config.grading.mass_diameter_mm)
    graded = grade(
        finding_type,
        rec.probability,
        diameter,
        config.grading,
        config.alert_grade,
        rec.region.channel.alert_threshold,
    )
    side, zone = side_and_zone(mask, lungs)
    return Finding(
        finding_type=finding_type,
        probability=rec.probability,
        grade=graded.grade,
        colour=graded.colour,
        alert=graded.alert,
        box=box,
        contour=outer_contour(full, box),
        area_mm2=area_mm2,
        side=side,
        zone=zone,
        mask=full,
    )
