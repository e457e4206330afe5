"""S700 with a learned box head: a finding's box from the boxes its pixels predict.

A model with a box head (``Manifest.box_output_name``) gives, at every working pixel, the
distances (left, top, right, bottom) to the edges of the box of the lesion the pixel belongs
to. A finding's box is read at its core, the pixels of its region whose probability is at
least ``CORE_FRACTION`` of the region's peak: each core pixel votes for one box, and each edge
of the finding's box is the probability-weighted median of those votes, so a region that
spreads over a second lesion keeps the box of the lesion most of its core lies on. The
finding's region is then its own shape moved and stretched into that box
(``geometry.fit_to_box``), so the SEG segment, SR contour, area and grade follow the box.

The head's output holds one set of four distances for every channel, or one set per finding
channel (``box_output.channels`` in the manifest: an ensemble whose members' boxes are
mixed with other weights for each group); a finding reads its own channel's set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

CORE_FRACTION = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxEvidence:
    """One image's box-head output and the probabilities its votes are weighted by."""

    distances: FloatArray  # (4·K, H, W): left, top, right, bottom, working pixels
    probabilities: FloatArray  # (C, H, W)
    channels: tuple[int, ...] = ()
    """The channel indices whose four distances follow one another in ``distances``, in
    order (``Manifest.box_channel_indices``); (): one set of four for every channel."""

    def distances_for(self, channel_index: int) -> FloatArray:
        """The four distance planes (4, H, W) a finding of ``channel_index`` reads."""
        if not self.channels:
            return self.distances[:4]
        k = self.channels.index(channel_index)
        return self.distances[4 * k : 4 * k + 4]


def _weighted_median(values: FloatArray, weights: FloatArray) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    k = int(np.searchsorted(cumulative, 0.5 * cumulative[-1]))
    return float(values[order][min(k, len(order) - 1)])


def predicted_box(
    mask: BoolArray, channel_index: int, evidence: BoxEvidence
) -> tuple[float, float, float, float] | None:
    """(row0, col0, row1, col1), fractional working pixels: the box the core of ``mask``
    predicts for a finding of channel ``channel_index``; None for an empty mask."""
    p = evidence.probabilities[channel_index]
    if not mask.any():
        return None
    peak = float(p[mask].max())
    rows, cols = np.nonzero(mask & (p >= CORE_FRACTION * peak))
    if rows.size == 0:  # a zero peak: every pixel votes alike
        rows, cols = np.nonzero(mask)
    weights = np.maximum(p[rows, cols], 1e-6)
    left, top, right, bottom = evidence.distances_for(channel_index)[:, rows, cols]
    yc, xc = rows + 0.5, cols + 0.5
    return (
        _weighted_median(yc - top, weights),
        _weighted_median(xc - left, weights),
        _weighted_median(yc + bottom, weights),
        _weighted_median(xc + right, weights),
    )
