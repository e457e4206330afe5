"""S331–S333: attention pass — windows centred on candidates, re-scored at higher resolution.

The method's "attention adjustment parameters" move the image's centre of composition to the
suspected lesion. Here, for the most probable initial marks, a window is cut from the
full-resolution preprocessed image, centred on the mark, with the whole image's aspect ratio
(so the model sees the same geometry as in training) and a side of ``context`` × the mark's
extent (at least ``min_window_fraction`` of the image); all windows are resampled to the
working size and scored in one batched model run. The window's probability over the mark's
footprint (its peak) is blended into the mark's probability with weight ``weight``. Marks more
probable than ``max_probability`` are not re-scored (each window costs a model run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.config import AttentionConfig
from pipeline.evidence import Mark
from pipeline.model import LesionModel
from pipeline.window import Preprocessed, resize

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionWindow:
    """A window of the input image: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


def window_for(mark: Mark, pre: Preprocessed, config: AttentionConfig) -> AttentionWindow:
    """S331–S332: the window centred on ``mark`` (input pixels, image aspect kept)."""
    sr, sc = pre.scale
    rows, cols = pre.input_shape
    r0, c0, r1, c1 = mark.box
    extent_r, extent_c = (r1 - r0) * sr * config.context, (c1 - c0) * sc * config.context
    zoom = min(rows / max(extent_r, 1.0), cols / max(extent_c, 1.0))
    zoom = float(np.clip(zoom, 1.0, 1.0 / config.min_window_fraction))
    height, width = max(16, round(rows / zoom)), max(16, round(cols / zoom))
    cr, cc = (r0 + r1) / 2.0 * sr, (c0 + c1) / 2.0 * sc
    top = int(np.clip(round(cr - height / 2.0), 0, rows - height))
    left = int(np.clip(round(cc - width / 2.0), 0, cols - width))
    return AttentionWindow(top=top, left=left, height=height, width=width)


def _footprint(mark: Mark, window: AttentionWindow, pre: Preprocessed) -> npt.NDArray[np.bool_]:
    """The mark's working mask seen in the window's working-size grid (nearest)."""
    out_r, out_c = pre.working_shape
    sr, sc = pre.scale
    ys = window.top + (np.arange(out_r) + 0.5) * (window.height / out_r)
    xs = window.left + (np.arange(out_c) + 0.5) * (window.width / out_c)
    ri = np.clip((ys / sr).astype(np.intp), 0, out_r - 1)
    ci = np.clip((xs / sc).astype(np.intp), 0, out_c - 1)
    return mark.mask[np.ix_(ri, ci)]


def attend(
    marks: tuple[Mark, ...], pre: Preprocessed, model: LesionModel, config: AttentionConfig
) -> tuple[Mark, ...]:
    """S333: re-score the ``max_windows`` most probable marks that are not already beyond
    doubt (``max_probability``) in windows centred on them."""
    uncertain = [i for i, m in enumerate(marks) if m.probability <= config.max_probability]
    chosen = uncertain[: config.max_windows] if config.enabled else []
    if not chosen:
        return marks
    windows = [window_for(marks[i], pre, config) for i in chosen]
    batch = np.stack(
        [
            resize(pre.full[w.top : w.top + w.height, w.left : w.left + w.width], pre.working_shape)
            for w in windows
        ]
    )
    probabilities = model.predict(batch)
    refined = list(marks)
    for j, (i, w) in enumerate(zip(chosen, windows, strict=True)):
        mark = marks[i]
        footprint = _footprint(mark, w, pre)
        if not footprint.any():
            continue
        score = float(probabilities[j, mark.channel.index][footprint].max())
        p = (1.0 - config.weight) * mark.probability + config.weight * score
        refined[i] = dataclasses.replace(mark, probability=float(np.clip(p, 0.0, 1.0)))
    return tuple(refined)
