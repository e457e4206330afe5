"""S300: feature traversal — the model's probabilities (and boxes) at one or more scales.

The model runs on the whole working image and, for each of the manifest's
``operating_point.zoom_scales``, on one more view of it:

- a scale above 1 zooms in: the centre window of the full-resolution image that covers
  1/scale of each side, resampled to the working size, so its content is seen ``scale``
  times larger. Its outputs come back into the window's place in the working grid and are
  averaged with the whole image's there, with a short ramp at the window's edge so that no
  step appears in the evidence;
- a scale below 1 zooms out: the whole image shrunk to ``scale`` of each side in the centre
  of a blank (zero) model input, as the training augmentation's smallest scales showed it.
  Its outputs over the image's place are resampled back to the whole working grid and
  averaged with the whole image's everywhere.

A channel whose ``view_fusion`` is ``max`` takes the strongest view instead of the average.

Box distances are resized with the view (divided by how much larger the view showed the
content). The training augmentation scaled images by 0.85–1.2, so views within that range
look like what the model was trained on. Each view is its own model run (batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.model import LesionModel
from pipeline.window import Preprocessed, resize

FloatArray = npt.NDArray[np.float32]

EDGE_RAMP_PX = 8
"""Working pixels over which a zoomed-in window's weight rises from 0 at its edge to 1."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ZoomWindow:
    """Where one view's content lies, in working pixels: rows [top, top + height), columns
    [left, left + width). Zoom in (``inward``): the window of the working grid the view
    shows, with the same window in the input grid. Zoom out: the place of the whole image
    in the view's own (working-size) input."""

    top: int
    left: int
    height: int
    width: int
    input_rows: tuple[int, int]
    input_cols: tuple[int, int]
    inward: bool


def zoom_window(pre: Preprocessed, scale: float) -> ZoomWindow:
    """The view at ``scale``: above 1 the centre window that, resampled to the working size,
    shows its content ``scale`` times larger; below 1 the centre box the whole image shrinks
    into."""
    rows, cols = pre.working_shape
    inward = scale > 1.0
    factor = 1.0 / scale if inward else scale
    height, width = round(rows * factor), round(cols * factor)
    top, left = (rows - height) // 2, (cols - width) // 2
    sr, sc = pre.scale
    input_rows, input_cols = (0, pre.input_shape[0]), (0, pre.input_shape[1])  # the whole image
    if inward:
        input_rows = (round(top * sr), round((top + height) * sr))
        input_cols = (round(left * sc), round((left + width) * sc))
    return ZoomWindow(
        top=top,
        left=left,
        height=height,
        width=width,
        input_rows=input_rows,
        input_cols=input_cols,
        inward=inward,
    )


def view_image(pre: Preprocessed, window: ZoomWindow) -> FloatArray:
    """The model's input for one view (working shape, [0, 1])."""
    content = pre.full[slice(*window.input_rows), slice(*window.input_cols)]
    if window.inward:
        return resize(content, pre.working_shape)
    canvas = np.zeros(pre.working_shape, dtype=np.float32)
    canvas[window.top : window.top + window.height, window.left : window.left + window.width] = (
        resize(content, (window.height, window.width))
    )
    return canvas


def _ramp(height: int, width: int) -> FloatArray:
    """A window's weight: 1 inside, falling linearly to 1/(ramp+1) at its edge pixels."""
    r = np.arange(height, dtype=np.float32)
    c = np.arange(width, dtype=np.float32)
    dr = np.minimum(r, height - 1 - r)[:, None]
    dc = np.minimum(c, width - 1 - c)[None, :]
    return np.asarray(np.minimum(1.0, (np.minimum(dr, dc) + 1.0) / (EDGE_RAMP_PX + 1)), np.float32)


def _resized(planes: FloatArray, shape: tuple[int, int], factors: FloatArray | None) -> FloatArray:
    out = np.stack([resize(plane, shape) for plane in planes])
    if factors is not None:
        out *= factors[:, None, None]
    return out


def back_to_working(
    probabilities: FloatArray, distances: FloatArray | None, window: ZoomWindow
) -> tuple[FloatArray, FloatArray | None]:
    """One view's outputs (C, H, W) and (4·K, H, W) in the working grid: zoom in, the
    window's place (C, height, width); zoom out, the whole grid (C, H, W) from the image's
    place in the view. Distances (left, top, right, bottom) are rescaled with the view."""
    rows, cols = probabilities.shape[1:]
    if window.inward:
        shape = (window.height, window.width)
        fy, fx = window.height / rows, window.width / cols
    else:
        shape = (rows, cols)
        place = (
            slice(window.top, window.top + window.height),
            slice(window.left, window.left + window.width),
        )
        probabilities = probabilities[:, place[0], place[1]]
        distances = None if distances is None else distances[:, place[0], place[1]]
        fy, fx = rows / window.height, cols / window.width
    p = _resized(probabilities, shape, None)
    if distances is None:
        return p, None
    factors = np.tile(np.array([fx, fy, fx, fy], dtype=np.float32), len(distances) // 4)
    return p, _resized(distances, shape, factors)


def _placement(window: ZoomWindow) -> tuple[slice, slice, FloatArray | float]:
    """Where a view's outputs (``back_to_working``) go in the working grid, and their
    weight there: a zoomed-in window its own place with the edge ramp, a zoomed-out view
    the whole grid at weight 1."""
    if not window.inward:
        return slice(None), slice(None), 1.0
    rows = slice(window.top, window.top + window.height)
    cols = slice(window.left, window.left + window.width)
    return rows, cols, _ramp(window.height, window.width)


def traverse(pre: Preprocessed, model: LesionModel) -> tuple[FloatArray, FloatArray | None]:
    """S300: the probabilities (C, H, W) and box distances (4·K, H, W; None without a box
    head) of the working image over the manifest's zoom scales: box distances and the
    channels fused by ``mean`` averaged where the views cover the image, the channels fused
    by ``max`` the strongest view there (each view first blended into the whole image's
    over its edge ramp, so that no step appears)."""
    windows = [zoom_window(pre, s) for s in model.manifest.zoom_scales]
    probabilities, distances = model.predict_with_boxes(pre.working[None])
    if not windows:
        return probabilities[0], None if distances is None else distances[0]
    strongest = [c.index for c in model.manifest.channels if c.view_fusion == "max"]
    whole = probabilities[0][strongest]
    p_max = whole.copy()
    p_sum = probabilities[0].astype(np.float32, copy=True)
    d_sum = None if distances is None else distances[0].astype(np.float32, copy=True)
    weight = np.ones(pre.working_shape, dtype=np.float32)
    for w in windows:
        # one view per run: a batch of several was slower here (79 ms for 3 against 24 ms
        # each) and grows onnxruntime's memory arena to the batch's activations
        view_p, view_d = model.predict_with_boxes(view_image(pre, w)[None])
        p, d = back_to_working(view_p[0], None if view_d is None else view_d[0], w)
        rows, cols, ramp = _placement(w)
        p_sum[:, rows, cols] += p * ramp
        if strongest:
            blended = p[strongest] * ramp + whole[:, rows, cols] * (1.0 - ramp)
            np.maximum(p_max[:, rows, cols], blended, out=p_max[:, rows, cols])
        if d_sum is not None and d is not None:
            d_sum[:, rows, cols] += d * ramp
        weight[rows, cols] += ramp
    fused = p_sum / weight
    fused[strongest] = p_max
    return (
        np.asarray(fused, dtype=np.float32),
        None if d_sum is None else np.asarray(d_sum / weight, dtype=np.float32),
    )
