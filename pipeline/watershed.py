"""S311–S324: watershed region segmentation and the adjacent-minima region merge.

S311–S314: the gradient magnitude of the preprocessed (working-size) image is flooded from
markers; markers are the regional minima deeper than the *pixel-similarity threshold*
(h-minima), so pixels are aggregated around the set of minimum pixels.

S321–S324: over-segmentation is undone by merging adjacent regions A, B when their minima
differ by less than the *adjacent-region minima constraint difference* and the values on their
shared boundary (mean of max(g(a), g(b)) over the 4-neighbour pixel pairs that straddle it)
lie within the *merge threshold* of both regions' minima. Pairs are visited from the weakest
boundary up; a merged region keeps the lower minimum.

Runs at working resolution (the full-resolution watershed takes tens of seconds here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.config import WatershedConfig
from pipeline.itk import gradient_magnitude, h_minima_markers, quantise, watershed_from_markers

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int32]


@dataclass(frozen=True, slots=True, kw_only=True)
class Regions:
    """A labelling of the working image: labels 1..count, every pixel labelled."""

    labels: LabelArray = field(compare=False, repr=False)
    count: int
    initial_count: int
    """Regions before the S321–S324 merge."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Adjacency:
    """Adjacent region pairs (a < b) and the mean boundary value between them."""

    a: npt.NDArray[np.int64]
    b: npt.NDArray[np.int64]
    boundary: npt.NDArray[np.float64]


def region_minima(values: FloatArray, labels: LabelArray, count: int) -> npt.NDArray[np.float64]:
    """The minimum of ``values`` in each region (index = label; index 0 unused)."""
    minima = np.full(count + 1, np.inf)
    np.minimum.at(minima, labels.ravel(), values.ravel().astype(np.float64))
    return minima


def adjacency(values: FloatArray, labels: LabelArray, count: int) -> Adjacency:
    """S322: every pair of 4-adjacent regions and the mean of their boundary values."""
    pairs_a, pairs_b, vals = [], [], []
    for la, lb, va, vb in (
        (labels[:, :-1], labels[:, 1:], values[:, :-1], values[:, 1:]),
        (labels[:-1, :], labels[1:, :], values[:-1, :], values[1:, :]),
    ):
        cross = la != lb
        a, b = la[cross].astype(np.int64), lb[cross].astype(np.int64)
        pairs_a.append(np.minimum(a, b))
        pairs_b.append(np.maximum(a, b))
        vals.append(np.maximum(va[cross], vb[cross]).astype(np.float64))
    a = np.concatenate(pairs_a)
    b = np.concatenate(pairs_b)
    v = np.concatenate(vals)
    keys, inverse = np.unique(a * (count + 1) + b, return_inverse=True)
    sums = np.bincount(inverse, weights=v, minlength=keys.size)
    counts = np.bincount(inverse, minlength=keys.size)
    return Adjacency(a=keys // (count + 1), b=keys % (count + 1), boundary=sums / counts)


def _find(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def merge_regions(
    values: FloatArray, labels: LabelArray, count: int, config: WatershedConfig
) -> tuple[LabelArray, int]:
    """S321–S324: merge adjacent regions that violate the minima constraint difference and
    whose boundary is within the merge threshold of both minima. Returns (labels, count)."""
    if count < 2:
        return labels, count
    minima = region_minima(values, labels, count).tolist()
    adj = adjacency(values, labels, count)
    parent = list(range(count + 1))
    for i in np.argsort(adj.boundary, kind="stable").tolist():
        ra, rb = _find(parent, int(adj.a[i])), _find(parent, int(adj.b[i]))
        if ra == rb:
            continue
        ma, mb, bv = minima[ra], minima[rb], float(adj.boundary[i])
        if (
            abs(ma - mb) < config.merge_constraint
            and bv - ma <= config.merge_threshold
            and bv - mb <= config.merge_threshold
        ):
            keep, drop = (ra, rb) if ma <= mb else (rb, ra)
            parent[drop] = keep
    roots = np.array([_find(parent, x) for x in range(count + 1)], dtype=np.int64)
    unique_roots, new_ids = np.unique(roots[1:], return_inverse=True)
    lut = np.zeros(count + 1, dtype=np.int32)
    lut[1:] = new_ids.astype(np.int32) + 1
    return lut[labels], int(unique_roots.size)


def segment_regions(image: FloatArray, config: WatershedConfig) -> Regions:
    """S311–S324: marker-controlled watershed on the gradient, then the region merge."""
    gradient = gradient_magnitude(image, config.gradient_sigma_px)
    levels, scale = quantise(gradient, float(gradient.max()))
    markers = h_minima_markers(levels, round(config.similarity_threshold * scale))
    labels = watershed_from_markers(levels, markers)
    initial = int(labels.max())
    merged, count = merge_regions(gradient, labels, initial, config)
    return Regions(labels=merged, count=count, initial_count=initial)
