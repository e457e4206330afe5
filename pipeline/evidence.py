"""S300: feature traversal — model evidence pooled over the watershed regions → initial marks.

The model's per-pixel probabilities are pooled over the S311–S324 regions (each pixel's
evidence = ``region_weight`` × its region's mean + the rest × its own probability), so marks
follow anatomical boundaries rather than pixel noise. Initial anomaly marks are then cut from
each finding channel: the connected regions whose peak reaches the channel's operating
threshold (manifest), each re-cut at a fraction of its own peak (``peak_relative``), which
separates touching lesions and keeps boxes tight, and reaching down to a support level below
the threshold, so that a finding's extent does not depend on the threshold that detects it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.config import CandidateConfig
from pipeline.geometry import Box
from pipeline.itk import (
    connected_components,
    h_minima_markers,
    quantise,
    watershed_from_markers,
)
from pipeline.manifest import Channel
from pipeline.watershed import Regions

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
LabelArray = npt.NDArray[np.int32]


@dataclass(frozen=True, slots=True, kw_only=True)
class Mark:
    """A marked region at working resolution, for one finding channel of the model."""

    channel: Channel
    probability: float
    mask: BoolArray = field(compare=False, repr=False)  # working shape
    box: Box  # working pixels (row0, col0, row1, col1)

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())


def pool_evidence(probabilities: FloatArray, regions: Regions, weight: float) -> FloatArray:
    """S300: blend each pixel's probability with its watershed region's mean (C, H, W)."""
    if weight == 0.0:
        return probabilities
    labels = regions.labels.ravel()
    counts = np.maximum(np.bincount(labels, minlength=regions.count + 1), 1)
    pooled = np.empty_like(probabilities)
    for c in range(probabilities.shape[0]):
        p = probabilities[c]
        means = np.bincount(labels, weights=p.ravel(), minlength=regions.count + 1) / counts
        region_mean = means.astype(np.float32)[regions.labels]
        pooled[c] = weight * region_mean + (1.0 - weight) * p
    return pooled


def _components(labels: LabelArray, count: int, values: FloatArray) -> list[tuple[int, Box, float]]:
    """(label, box, peak) of each labelled component, in one pass over the pixels."""
    if count == 0:
        return []
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    n = count + 1
    rmin = np.full(n, labels.shape[0], dtype=np.int64)
    cmin = np.full(n, labels.shape[1], dtype=np.int64)
    rmax = np.full(n, -1, dtype=np.int64)
    cmax = np.full(n, -1, dtype=np.int64)
    peak = np.full(n, -np.inf)
    np.minimum.at(rmin, lab, rows)
    np.minimum.at(cmin, lab, cols)
    np.maximum.at(rmax, lab, rows)
    np.maximum.at(cmax, lab, cols)
    np.maximum.at(peak, lab, values[rows, cols].astype(np.float64))
    return [
        (k, (int(rmin[k]), int(cmin[k]), int(rmax[k]) + 1, int(cmax[k]) + 1), float(peak[k]))
        for k in range(1, n)
        if rmax[k] >= 0
    ]


def _basins(evidence: FloatArray, above: BoolArray, depth: float) -> tuple[LabelArray, int]:
    """The above-threshold area split into one basin per evidence peak at least ``depth``
    prominent (watershed of the inverted evidence from its h-maxima)."""
    levels, scale = quantise(np.where(above, 1.0 - evidence, 1.0).astype(np.float32), 1.0)
    markers = h_minima_markers(levels, max(1, round(depth * scale)))
    labels = watershed_from_markers(levels, markers)
    labels[~above] = 0
    return labels, int(labels.max())


def _cut_at_peak_fraction(
    evidence: FloatArray,
    above: BoolArray,
    labels: LabelArray,
    count: int,
    threshold: float,
    fraction: float,
) -> BoolArray:
    """Keep, in each labelled area, the pixels at least ``fraction`` × its own peak."""
    cut = np.full(count + 1, np.inf, dtype=np.float32)
    for k, _, peak in _components(labels, count, evidence):
        cut[k] = max(threshold, fraction * peak)
    return above & (evidence >= cut[labels])


def channel_marks(evidence: FloatArray, channel: Channel, config: CandidateConfig) -> list[Mark]:
    """S300: initial anomaly marks of one finding channel from its pooled evidence map: the
    regions whose peak reaches the channel's threshold, each extending down to
    ``peak_fraction`` × its peak but not below ``support`` (``support`` None or strategy
    ``components``: down to the threshold)."""
    floor = channel.threshold
    if config.strategy != "components" and config.support is not None:
        floor = min(floor, config.support)
    above = evidence >= floor
    labels, count = connected_components(above)
    if config.strategy != "components" and count:
        if config.strategy == "basins":
            labels, count = _basins(evidence, above, config.basin_depth)
        kept = _cut_at_peak_fraction(evidence, above, labels, count, floor, config.peak_fraction)
        if config.strategy == "basins":  # neighbouring basins stay apart after the cut
            kept[:, 1:] &= (labels[:, 1:] == labels[:, :-1]) | (labels[:, :-1] == 0)
            kept[1:, :] &= (labels[1:, :] == labels[:-1, :]) | (labels[:-1, :] == 0)
        labels, count = connected_components(kept, full=config.strategy != "basins")
    marks = []
    for k, (r0, c0, r1, c1), peak in _components(labels, count, evidence):
        if peak < channel.threshold:  # below the operating point: not a finding
            continue
        local = labels[r0:r1, c0:c1] == k
        if int(local.sum()) < config.min_area_px:
            continue
        mask = np.zeros(evidence.shape, dtype=bool)
        mask[r0:r1, c0:c1] = local
        marks.append(
            Mark(channel=channel, probability=min(peak, 1.0), mask=mask, box=(r0, c0, r1, c1))
        )
    return marks


def initial_marks(
    evidence: FloatArray, channels: tuple[Channel, ...], config: CandidateConfig
) -> tuple[Mark, ...]:
    """S300: the initial anomaly marks of every finding channel, most probable first."""
    marks = [m for ch in channels for m in channel_marks(evidence[ch.index], ch, config)]
    marks.sort(key=lambda m: m.probability, reverse=True)
    return tuple(marks[: config.max_candidates])
