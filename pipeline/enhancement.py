"""S500–S530: fusion of both mark sets, enhancement influence coefficient, local enhancement.

S510 fusion: every initial (model) mark is a region; a contour mark overlapping it confirms
it (``agreement_bonus`` is added to its probability); a contour mark no model mark overlaps
becomes a region of its own for the model channel of its group, with the model's pooled
evidence inside it as its prior (S600 decides whether it is reported).

S520 coefficient, exactly as the method states: for every pair of 4-adjacent pixels that
straddles the region's border (one inside, one outside) the ratio inside / outside is taken
(``ratio_epsilon`` added to both, on the [0, 1] working image); the ratios are sorted and the
largest is the enhancement influence coefficient.

S530 local enhancement, driven by the coefficient: gain = clip(target_ratio / coefficient,
1, max_gain); inside the region (feathered edge) each pixel's difference from the mean of
the surrounding ring is multiplied by the gain, at full resolution. A region that already
stands out (coefficient ≥ target) is left unchanged; pixels farther than a few feather
widths from every region never change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from pipeline.config import EnhancementConfig
from pipeline.contours import ContourMark
from pipeline.evidence import Mark
from pipeline.geometry import Box, bounding_box, grow
from pipeline.itk import gaussian
from pipeline.manifest import Channel
from pipeline.window import Preprocessed, resize

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


class MarkSource(StrEnum):
    MODEL = "model"
    CONTOUR = "contour"
    BOTH = "both"


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    """A fused local-enhancement region (working resolution) and its S520/S530 figures."""

    channel: Channel
    source: MarkSource
    probability: float
    mask: BoolArray = field(compare=False, repr=False)
    box: Box
    coefficient: float = 1.0
    gain: float = 1.0


def fuse(
    marks: tuple[Mark, ...],
    contours: tuple[ContourMark, ...],
    evidence: FloatArray,
    channels: tuple[Channel, ...],
    config: EnhancementConfig,
) -> tuple[Region, ...]:
    """S510: combine the initial marks and the contour marks into enhancement regions."""
    regions = []
    used = [False] * len(contours)
    for m in marks:
        agree = False
        for i, c in enumerate(contours):
            if (m.mask & c.mask).any():
                used[i] = agree = True
        p = min(1.0, m.probability + (config.agreement_bonus if agree else 0.0))
        source = MarkSource.BOTH if agree else MarkSource.MODEL
        regions.append(
            Region(channel=m.channel, source=source, probability=p, mask=m.mask, box=m.box)
        )
    by_group = {ch.group: ch for ch in channels}
    for c, was_used in zip(contours, used, strict=True):
        channel = by_group.get(c.group)
        if was_used or channel is None:
            continue
        prior = float(evidence[channel.index][c.mask].max())
        regions.append(
            Region(
                channel=channel,
                source=MarkSource.CONTOUR,
                probability=prior,
                mask=c.mask,
                box=c.box,
            )
        )
    return tuple(regions)


def border_ratios(image: FloatArray, mask: BoolArray, epsilon: float) -> npt.NDArray[np.float64]:
    """S520: inside/outside ratios of every 4-adjacent pixel pair straddling the border."""
    box = bounding_box(mask)
    if box is None:
        return np.empty(0)
    r0, c0, r1, c1 = grow(box, 1, mask.shape)
    m, v = mask[r0:r1, c0:c1], image[r0:r1, c0:c1].astype(np.float64) + epsilon
    ratios = []
    for ma, mb, va, vb in (
        (m[:, :-1], m[:, 1:], v[:, :-1], v[:, 1:]),
        (m[:-1, :], m[1:, :], v[:-1, :], v[1:, :]),
    ):
        a_in = ma & ~mb
        b_in = mb & ~ma
        ratios.append(va[a_in] / vb[a_in])
        ratios.append(vb[b_in] / va[b_in])
    return np.sort(np.concatenate(ratios))


def influence_coefficient(image: FloatArray, mask: BoolArray, epsilon: float) -> float:
    """S520: the largest of the sorted border-pair ratios (1.0 when there is no border)."""
    ratios = border_ratios(image, mask, epsilon)
    return float(ratios[-1]) if ratios.size else 1.0


def gain_for(coefficient: float, config: EnhancementConfig) -> float:
    """S530: enhancement gain driven by the coefficient."""
    return float(np.clip(config.target_ratio / max(coefficient, 1e-6), 1.0, config.max_gain))


def _soft_weight(
    region: Region, pre: Preprocessed, feather_px: float
) -> tuple[Box, FloatArray, float]:
    """The region's feathered weight in input pixels (crop box, weight in [0, 1]) and the
    mean of the working image in a ring around it (the S530 reference level).

    Feathering and the ring are computed at working resolution, then the weight is resampled
    to the input grid: the cost stays proportional to the working size.
    """
    sr, sc = pre.scale
    feather_w = feather_px / max(min(sr, sc), 1e-6)
    margin = int(np.ceil(3 * feather_w)) + 3
    wr0, wc0, wr1, wc1 = grow(region.box, margin, pre.working_shape)
    hard = region.mask[wr0:wr1, wc0:wc1].astype(np.float32)
    soft = gaussian(hard, feather_w) if feather_w > 0.3 else hard
    soft = np.maximum(soft, hard * 0.5)  # the region itself keeps at least half the gain
    near = gaussian(hard, 2.0) > 0.01
    ring = near & (hard == 0)
    crop = pre.working[wr0:wr1, wc0:wc1]
    reference = float(crop[ring].mean()) if ring.any() else float(crop.mean())
    r0, c0 = round(wr0 * sr), round(wc0 * sc)
    r1, c1 = min(pre.input_shape[0], round(wr1 * sr)), min(pre.input_shape[1], round(wc1 * sc))
    weight = np.clip(resize(soft, (r1 - r0, c1 - c0)), 0.0, 1.0)
    return (r0, c0, r1, c1), weight, reference


def enhance(
    regions: tuple[Region, ...], pre: Preprocessed, config: EnhancementConfig
) -> tuple[FloatArray, tuple[Region, ...]]:
    """S520–S530: coefficient and local enhancement of each region, at full resolution.

    Returns the enhanced image (input grid, [0, 1]) and the regions with their figures.
    """
    enhanced = pre.full.copy()
    done = []
    for region in regions:
        coefficient = influence_coefficient(pre.working, region.mask, config.ratio_epsilon)
        gain = gain_for(coefficient, config)
        done.append(dataclasses.replace(region, coefficient=coefficient, gain=gain))
        if gain <= 1.0:
            continue
        (r0, c0, r1, c1), weight, reference = _soft_weight(region, pre, config.feather_px)
        crop = enhanced[r0:r1, c0:c1]
        crop += weight * np.float32(gain - 1.0) * (crop - np.float32(reference))
        np.clip(crop, 0.0, 1.0, out=crop)
    return enhanced, tuple(done)
