"""Geometry helpers shared by the steps: boxes, convex hull, outer-contour tracing."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
Box = tuple[int, int, int, int]  # (row0, col0, row1, col1), exclusive ends

# Moore neighbourhood, clockwise in image coordinates (row down), starting west.
_DIRS = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))


def bounding_box(mask: BoolArray) -> Box | None:
    """(row0, col0, row1, col1) of the true pixels, exclusive ends; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def grow(box: Box, margin: int, shape: tuple[int, int]) -> Box:
    """``box`` enlarged by ``margin`` on every side, clipped to ``shape``."""
    r0, c0, r1, c1 = box
    return (
        max(0, r0 - margin),
        max(0, c0 - margin),
        min(shape[0], r1 + margin),
        min(shape[1], c1 + margin),
    )


def scale_extent(mask: BoolArray, width: float, height: float) -> BoolArray:
    """``mask`` scaled about its bounding box's centre by ``width`` × ``height`` (nearest
    neighbour, pixel centres), clipped to the array; ``mask`` itself when the factors are 1 or
    the scaled mask would be empty."""
    box = bounding_box(mask)
    if box is None or (width == 1.0 and height == 1.0):
        return mask
    r0, c0, r1, c1 = box
    cy, cx = (r0 + r1) / 2.0, (c0 + c1) / 2.0
    target = (
        cy - (cy - r0) * height,
        cx - (cx - c0) * width,
        cy + (r1 - cy) * height,
        cx + (c1 - cx) * width,
    )
    return fit_to_box(mask, target)


def fit_to_box(mask: BoolArray, target: tuple[float, float, float, float]) -> BoolArray:
    """``mask`` with its bounding box mapped onto ``target`` (row0, col0, row1, col1; pixel
    edges, fractional), nearest neighbour at pixel centres, clipped to the array: the same
    shape, moved and stretched into the box. ``mask`` itself when it is empty or the result
    would be."""
    box = bounding_box(mask)
    if box is None:
        return mask
    r0, c0, r1, c1 = box
    tr0, tc0, tr1, tc1 = target
    if not (tr1 > tr0 and tc1 > tc0):
        return mask
    out_r0, out_r1 = max(0, int(np.floor(tr0))), min(mask.shape[0], int(np.ceil(tr1)))
    out_c0, out_c1 = max(0, int(np.floor(tc0))), min(mask.shape[1], int(np.ceil(tc1)))
    if out_r1 <= out_r0 or out_c1 <= out_c0:
        return mask
    sy, sx = (r1 - r0) / (tr1 - tr0), (c1 - c0) / (tc1 - tc0)
    src_r = np.floor(r0 + (np.arange(out_r0, out_r1) + 0.5 - tr0) * sy).astype(np.intp)
    src_c = np.floor(c0 + (np.arange(out_c0, out_c1) + 0.5 - tc0) * sx).astype(np.intp)
    ok_r, ok_c = (src_r >= r0) & (src_r < r1), (src_c >= c0) & (src_c < c1)
    patch = mask[np.ix_(np.clip(src_r, r0, r1 - 1), np.clip(src_c, c0, c1 - 1))]
    patch &= ok_r[:, None] & ok_c[None, :]
    if not patch.any():
        return mask
    out = np.zeros_like(mask)
    out[out_r0:out_r1, out_c0:out_c1] = patch
    return out


def convex_hull_area(mask: BoolArray) -> float:
    """Area of the convex hull of the pixel squares of ``mask`` (monotone chain)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0.0
    # Only each row's leftmost and rightmost pixels can be hull vertices: 4 corners per row.
    sub = mask[rows]
    first = np.argmax(sub, axis=1)
    last = sub.shape[1] - 1 - np.argmax(sub[:, ::-1], axis=1)
    corners = np.concatenate(
        [
            np.stack([first, rows], axis=1),
            np.stack([first, rows + 1], axis=1),
            np.stack([last + 1, rows], axis=1),
            np.stack([last + 1, rows + 1], axis=1),
        ]
    )
    pts = np.unique(corners, axis=0).astype(np.float64)
    if len(pts) < 3:
        return 0.0

    def half(points: npt.NDArray[np.float64]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for x, y in points.tolist():
            while len(chain) >= 2:
                (x1, y1), (x2, y2) = chain[-2], chain[-1]
                if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) > 0:
                    break
                chain.pop()
            chain.append((x, y))
        return chain

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def trace_outer_contour(mask: BoolArray) -> list[tuple[int, int]]:
    """Outer boundary pixels of the component holding the first true pixel (raster order),
    as (row, col), clockwise, by Moore-neighbour tracing with Jacob's stopping rule."""
    padded = np.pad(mask, 1)
    flat = np.flatnonzero(padded)
    if flat.size == 0:
        return []
    start = divmod(int(flat[0]), padded.shape[1])
    contour = [start]
    current, back = start, 0  # we entered start from the west (its west neighbour is 0)
    first_move: tuple[tuple[int, int], int] | None = None
    for _ in range(4 * padded.size):
        for k in range(8):
            d = (back + 1 + k) % 8
            nr, nc = current[0] + _DIRS[d][0], current[1] + _DIRS[d][1]
            if padded[nr, nc]:
                break
        else:
            break  # an isolated pixel
        move = ((nr, nc), d)
        if first_move is None:
            first_move = move
        elif current == start and move == first_move:
            contour.pop()
            break
        # The new backtrack is the last empty neighbour scanned, seen from the new pixel.
        pr, pc = current[0] + _DIRS[(d - 1) % 8][0], current[1] + _DIRS[(d - 1) % 8][1]
        back = _DIRS.index((pr - nr, pc - nc))
        current = (nr, nc)
        contour.append(current)
    return [(r - 1, c - 1) for r, c in contour]


def simplify_chain(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop vertices that lie on a straight run between their neighbours."""
    if len(points) < 4:
        return points
    arr = np.array(points)
    prev = np.roll(arr, 1, axis=0)
    nxt = np.roll(arr, -1, axis=0)
    cross = (arr[:, 0] - prev[:, 0]) * (nxt[:, 1] - arr[:, 1]) - (arr[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - arr[:, 0]
    )
    keep = cross != 0
    if keep.sum() < 3:
        return points
    return [(int(r), int(c)) for r, c in arr[keep].tolist()]
