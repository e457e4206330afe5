"""S300 feature traversal at several scales (``pipeline.traversal``): the zoomed windows'
geometry, their outputs brought back to the working grid, and the blend with the whole
image's outputs, through the real loader and a real ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ModelError
from pipeline.model import load_model
from pipeline.traversal import (
    EDGE_RAMP_PX,
    back_to_working,
    traverse,
    view_image,
    zoom_window,
)
from pipeline.window import Preprocessed, Window, WindowSource, resize
from tests.pipeline.tiny_model import build_tiny_model


def _pre(full: np.ndarray, size: int) -> Preprocessed:
    return Preprocessed(
        full=full.astype(np.float32),
        working=resize(full.astype(np.float32), (size, size)),
        window=Window(low=0.0, high=1.0, source=WindowSource.PERCENTILE),
        input_shape=(int(full.shape[0]), int(full.shape[1])),
        spacing_mm=None,
    )


def _with_zoom(folder: Path, scales: object) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["operating_point"]["zoom_scales"] = scales
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_s300_zoom_window_is_the_centre_of_the_image_in_both_grids() -> None:
    """At scale 1.2 on a 384² working grid the window is the centre 320² (32 px from each
    edge); in a 1000 × 800 input grid the same window, scaled per axis."""
    pre = _pre(np.zeros((1000, 800)), 384)
    w = zoom_window(pre, 1.2)
    assert (w.top, w.left, w.height, w.width) == (32, 32, 320, 320)
    assert w.input_rows == (round(32 * 1000 / 384), round(352 * 1000 / 384))
    assert w.input_cols == (round(32 * 800 / 384), round(352 * 800 / 384))


def test_s300_a_windows_outputs_come_back_at_their_place_and_size() -> None:
    """A blob at the centre of a window's output lands at the window's centre; a box the
    window sees as 24 px to each edge is 20 px in the working grid at scale 1.2."""
    pre = _pre(np.zeros((384, 384)), 384)
    w = zoom_window(pre, 1.2)
    p = np.zeros((1, 384, 384), dtype=np.float32)
    p[0, 182:202, 182:202] = 1.0
    d = np.full((4, 384, 384), 24.0, dtype=np.float32)
    p_back, d_back = back_to_working(p, d, w)
    assert p_back.shape == (1, 320, 320) and d_back is not None
    rows, cols = np.nonzero(p_back[0] > 0.5)
    assert abs((rows.mean() + w.top) - 192) < 1.0 and abs((cols.mean() + w.left) - 192) < 1.0
    assert np.allclose(d_back, 20.0, atol=1e-4)
    # boxes per finding channel (an ensemble's): every set of four rescaled alike
    d8 = np.concatenate([d, np.full((4, 384, 384), 12.0, dtype=np.float32)])
    _, d8_back = back_to_working(p, d8, w)
    assert d8_back is not None and d8_back.shape == (8, 320, 320)
    assert np.allclose(d8_back[:4], 20.0, atol=1e-4) and np.allclose(d8_back[4:], 10.0, atol=1e-4)


def test_s300_without_zoom_scales_the_traversal_is_one_model_run(tmp_path: Path) -> None:
    """No ``zoom_scales`` in the manifest: exactly the model's outputs on the working image."""
    model = load_model(build_tiny_model(tmp_path, size=64, box_px=(3.0, 4.0, 5.0, 6.0)))
    rng = np.random.default_rng(0)
    pre = _pre(rng.random((200, 160)), 64)
    probabilities, distances = traverse(pre, model)
    expected_p, expected_d = model.predict_with_boxes(pre.working[None])
    assert expected_d is not None and distances is not None
    assert np.array_equal(probabilities, expected_p[0])
    assert np.array_equal(distances, expected_d[0])


def test_s300_zoomed_outputs_are_averaged_inside_their_window_only(tmp_path: Path) -> None:
    """With scale 1.25 the outputs outside the centre window are the whole image's; well
    inside it they are the mean of the whole image's and the window's; the box distances
    there are the mean of 3 px and 3 px shrunk by the window's size (51 of 64 px: the
    window is whole pixels); the ramp makes no step at the window's edge."""
    folder = _with_zoom(build_tiny_model(tmp_path, size=64, box_px=(3.0, 3.0, 3.0, 3.0)), [1.25])
    model = load_model(folder)
    assert model.manifest.zoom_scales == (1.25,)
    rng = np.random.default_rng(1)
    full = np.clip(0.5 + 0.2 * rng.standard_normal((256, 256)), 0, 1)
    full[100:140, 110:150] = 0.95  # a bright patch near the centre
    pre = _pre(full, 64)
    probabilities, distances = traverse(pre, model)
    assert distances is not None
    w = zoom_window(pre, 1.25)
    base_p, _ = model.predict_with_boxes(pre.working[None])
    crop = resize(
        pre.full[slice(*w.input_rows), slice(*w.input_cols)].astype(np.float32),
        pre.working_shape,
    )
    zoom_p, _ = model.predict_with_boxes(crop[None])
    back, _ = back_to_working(zoom_p[0], None, w)
    outside = np.ones((64, 64), dtype=bool)
    outside[w.top : w.top + w.height, w.left : w.left + w.width] = False
    assert np.allclose(probabilities[:, outside], base_p[0][:, outside], atol=1e-6)
    r = EDGE_RAMP_PX
    inner = (slice(w.top + r, w.top + w.height - r), slice(w.left + r, w.left + w.width - r))
    mean = (base_p[0][:, inner[0], inner[1]] + back[:, r:-r, r:-r]) / 2.0
    assert np.allclose(probabilities[:, inner[0], inner[1]], mean, atol=1e-5)
    assert w.height == 51
    assert np.allclose(distances[:, inner[0], inner[1]], (3.0 + 3.0 * 51 / 64) / 2.0, atol=1e-3)
    edge_step = np.abs(np.diff(distances[0], axis=1)).max()
    assert edge_step < 0.6 / EDGE_RAMP_PX + 1e-3  # 0.6 px spread over the ramp, not a step


@pytest.mark.parametrize("bad", [[1.0], [0.4], [2.5], ["1.2"], [True], [1.1] * 5, 1.2])
def test_zoom_scales_are_checked_at_load(tmp_path: Path, bad: object) -> None:
    """``operating_point.zoom_scales`` must be a short list of numbers in [0.5, 2], not 1."""
    folder = _with_zoom(build_tiny_model(tmp_path, size=64), bad)
    with pytest.raises(ModelError, match="zoom_scales"):
        load_model(folder)


def test_s300_zoom_out_shrinks_the_whole_image_into_a_blank_input() -> None:
    """At scale 0.75 on a 64² working grid the whole image fills the centre 48² of the
    view (8 px of zeros around it), resampled from the full-resolution image."""
    rng = np.random.default_rng(2)
    pre = _pre(0.2 + 0.8 * rng.random((300, 200)), 64)
    w = zoom_window(pre, 0.75)
    assert (w.top, w.left, w.height, w.width, w.inward) == (8, 8, 48, 48, False)
    assert (w.input_rows, w.input_cols) == ((0, 300), (0, 200))
    view = view_image(pre, w)
    assert view.shape == (64, 64)
    assert not view[:8].any() and not view[-8:].any() and not view[:, :8].any()
    assert np.allclose(view[8:56, 8:56], resize(pre.full, (48, 48)))


def test_s300_a_zoomed_out_views_outputs_cover_the_whole_grid(tmp_path: Path) -> None:
    """A blob at the centre of a zoomed-out view stays at the centre of the working grid
    and grows back by 1/scale; a 6-px distance there is 8 px in the working grid at 0.75;
    with scale 0.75 in the manifest every working pixel is the mean of the two views."""
    pre = _pre(np.zeros((64, 64)), 64)
    w = zoom_window(pre, 0.75)
    p = np.zeros((1, 64, 64), dtype=np.float32)
    p[0, 29:35, 29:35] = 1.0
    d = np.full((4, 64, 64), 6.0, dtype=np.float32)
    p_back, d_back = back_to_working(p, d, w)
    assert p_back.shape == (1, 64, 64) and d_back is not None
    rows, cols = np.nonzero(p_back[0] > 0.5)
    assert abs(rows.mean() - 31.5) < 1.0 and abs(cols.mean() - 31.5) < 1.0
    assert 7 <= rows.max() - rows.min() + 1 <= 9  # 6 px at 0.75 → 8 px
    assert np.allclose(d_back, 8.0, atol=1e-4)

    folder = _with_zoom(build_tiny_model(tmp_path, size=64, box_px=(3.0, 3.0, 3.0, 3.0)), [0.75])
    model = load_model(folder)
    rng = np.random.default_rng(3)
    full = np.clip(0.5 + 0.2 * rng.standard_normal((256, 256)), 0, 1)
    pre = _pre(full, 64)
    probabilities, distances = traverse(pre, model)
    base_p, _ = model.predict_with_boxes(pre.working[None])
    view_p, _ = model.predict_with_boxes(view_image(pre, zoom_window(pre, 0.75))[None])
    back, _ = back_to_working(view_p[0], None, zoom_window(pre, 0.75))
    assert np.allclose(probabilities, (base_p[0] + back) / 2.0, atol=1e-5)
    assert distances is not None and np.allclose(distances, (3.0 + 4.0) / 2.0, atol=1e-3)


def _with_fusion(folder: Path, fusion: object) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    names = [c["name"] for c in manifest["channels"] if c["kind"] == "finding"]
    manifest["operating_point"]["view_fusion"] = dict.fromkeys(names, fusion)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_s300_a_channel_fused_by_max_takes_the_strongest_view(tmp_path: Path) -> None:
    """With ``view_fusion`` ``max`` for the finding channels and scales 0.75 and 1.25, each
    working pixel of those channels is the highest of the three views (the zoomed-in one
    blended into the whole image's over its edge ramp, so outside its window it plays no
    part); the other channels and the box distances are still averaged."""
    model_dir = build_tiny_model(tmp_path, size=64, box_px=(3.0, 3.0, 3.0, 3.0))
    model = load_model(_with_fusion(_with_zoom(model_dir, [0.75, 1.25]), "max"))
    fused = [c.index for c in model.manifest.channels if c.view_fusion == "max"]
    averaged = [c.index for c in model.manifest.channels if c.view_fusion == "mean"]
    assert fused and averaged  # the finding channels by max, the lung channel by mean
    rng = np.random.default_rng(4)
    full = np.clip(0.5 + 0.2 * rng.standard_normal((256, 256)), 0, 1)
    full[100:140, 110:150] = 0.95
    pre = _pre(full, 64)
    probabilities, distances = traverse(pre, model)

    base, _ = model.predict_with_boxes(pre.working[None])
    views = []
    for scale in (0.75, 1.25):
        w = zoom_window(pre, scale)
        p, _ = model.predict_with_boxes(view_image(pre, w)[None])
        back, _ = back_to_working(p[0], None, w)
        if w.inward:  # only well inside the window, past the ramp, is the view itself
            r = EDGE_RAMP_PX
            placed = base[0].copy()
            rows = slice(w.top + r, w.top + w.height - r)
            cols = slice(w.left + r, w.left + w.width - r)
            placed[:, rows, cols] = back[:, r:-r, r:-r]
            inner = np.zeros((64, 64), dtype=bool)
            inner[rows, cols] = True
            outside = np.ones((64, 64), dtype=bool)
            outside[w.top : w.top + w.height, w.left : w.left + w.width] = False
            back = placed
        views.append(back)
    strongest = np.maximum(base[0], np.maximum(views[0], views[1]))
    assert np.allclose(probabilities[fused][:, inner], strongest[fused][:, inner], atol=1e-6)
    out_max = np.maximum(base[0], views[0])
    assert np.allclose(probabilities[fused][:, outside], out_max[fused][:, outside], atol=1e-6)
    assert (probabilities[fused] >= base[0][fused] - 1e-6).all()
    assert not np.allclose(probabilities[fused], (base[0][fused] + views[0][fused]) / 2.0)
    mean_model = load_model(_with_fusion(model_dir, "mean"))
    mean_p, mean_d = traverse(pre, mean_model)
    assert np.allclose(probabilities[averaged], mean_p[averaged], atol=1e-6)
    assert distances is not None and mean_d is not None and np.array_equal(distances, mean_d)


@pytest.mark.parametrize("bad", ["median", 1, None])
def test_view_fusion_is_checked_at_load(tmp_path: Path, bad: object) -> None:
    """``operating_point.view_fusion`` per channel must be ``mean`` or ``max``."""
    folder = _with_fusion(build_tiny_model(tmp_path, size=64), bad)
    with pytest.raises(ModelError, match="view_fusion"):
        load_model(folder)
