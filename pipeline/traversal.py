"""S300: feature traversal — the model's probabilities (and boxes) at one or more scales.

The model runs on the whole working image and, for each of the manifest's
``operating_point.zoom_scales``, on a centre window of the full-resolution image that
covers 1/scale of each side, resampled to the working size: the window's content is seen
``scale`` times larger, as the training augmentation's scale range (up to 1.2) let the model
see it. Each window's outputs are brought back to the working grid (probabilities resampled
into the window's place, box distances shrunk by the same factor) and averaged with the
whole image's where the window covers it, with a short ramp at the window's edge so that
no step appears in the evidence. All runs go through the model in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.model import LesionModel
from pipeline.window import Preprocessed, resize

FloatArray = npt.NDArray[np.float32]

EDGE_RAMP_PX = 8
"""Working pixels over which a window's weight rises from 0 at its edge to 1 inside."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ZoomWindow:
    """A centre window: rows [top, top + height), columns [left, left + width) of the
    working grid, and the same window in the input grid."""

    top: int
    left: int
    height: int
    width: int
    input_rows: tuple[int, int]
    input_cols: tuple[int, int]


def zoom_window(pre: Preprocessed, scale: float) -> ZoomWindow:
    """The centre window that, resampled to the working size, shows its content ``scale``
    times larger."""
    rows, cols = pre.working_shape
    height, width = round(rows / scale), round(cols / scale)
    top, left = (rows - height) // 2, (cols - width) // 2
    sr, sc = pre.scale
    return ZoomWindow(
        top=top,
        left=left,
        height=height,
        width=width,
        input_rows=(round(top * sr), round((top + height) * sr)),
        input_cols=(round(left * sc), round((left + width) * sc)),
    )


def _ramp(height: int, width: int) -> FloatArray:
    """A window's weight: 1 inside, falling linearly to 1/(ramp+1) at its edge pixels."""
    r = np.arange(height, dtype=np.float32)
    c = np.arange(width, dtype=np.float32)
    dr = np.minimum(r, height - 1 - r)[:, None]
    dc = np.minimum(c, width - 1 - c)[None, :]
    return np.asarray(np.minimum(1.0, (np.minimum(dr, dc) + 1.0) / (EDGE_RAMP_PX + 1)), np.float32)


def back_to_working(
    probabilities: FloatArray, distances: FloatArray | None, window: ZoomWindow
) -> tuple[FloatArray, FloatArray | None]:
    """A window's outputs (C, H, W) and (4, H, W) in the working grid's window
    (C, height, width): probabilities resampled, distances resampled and scaled."""
    shape = (window.height, window.width)
    p = np.stack([resize(channel, shape) for channel in probabilities])
    if distances is None:
        return p, None
    rows, cols = probabilities.shape[1:]
    fy, fx = window.height / rows, window.width / cols
    factors = np.array([fx, fy, fx, fy], dtype=np.float32)  # left, top, right, bottom
    d = np.stack([resize(c, shape) * f for c, f in zip(distances, factors, strict=True)])
    return p, d


def traverse(pre: Preprocessed, model: LesionModel) -> tuple[FloatArray, FloatArray | None]:
    """S300: the probabilities (C, H, W) and box distances (4, H, W; None without a box
    head) of the working image, averaged over the manifest's zoom scales."""
    windows = [zoom_window(pre, s) for s in model.manifest.zoom_scales]
    crops = [
        resize(pre.full[slice(*w.input_rows), slice(*w.input_cols)], pre.working_shape)
        for w in windows
    ]
    probabilities, distances = model.predict_with_boxes(np.stack([pre.working, *crops]))
    if not windows:
        return probabilities[0], None if distances is None else distances[0]
    p_sum = probabilities[0].astype(np.float32, copy=True)
    d_sum = None if distances is None else distances[0].astype(np.float32, copy=True)
    weight = np.ones(pre.working_shape, dtype=np.float32)
    for k, w in enumerate(windows, start=1):
        p, d = back_to_working(probabilities[k], None if distances is None else distances[k], w)
        ramp = _ramp(w.height, w.width)
        rows, cols = slice(w.top, w.top + w.height), slice(w.left, w.left + w.width)
        p_sum[:, rows, cols] += p * ramp
        if d_sum is not None and d is not None:
            d_sum[:, rows, cols] += d * ramp
        weight[rows, cols] += ramp
    return (
        np.asarray(p_sum / weight, dtype=np.float32),
        None if d_sum is None else np.asarray(d_sum / weight, dtype=np.float32),
    )
