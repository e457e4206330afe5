"""Each step of the method on generated images with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import (
    CandidateConfig,
    ContourConfig,
    EnhancementConfig,
    GradingConfig,
    GreyConfig,
    RecognitionConfig,
    WatershedConfig,
)
from pipeline.contours import contour_marks
from pipeline.enhancement import (
    MarkSource,
    Region,
    border_ratios,
    enhance,
    gain_for,
    influence_coefficient,
)
from pipeline.evidence import channel_marks
from pipeline.geometry import (
    bounding_box,
    convex_hull_area,
    fit_to_box,
    scale_extent,
    trace_outer_contour,
)
from pipeline.grading import grade
from pipeline.grey import GreyImage, analyse_distribution
from pipeline.lung import lung_field, side_and_zone
from pipeline.manifest import Channel
from pipeline.result import FindingGroup, FindingType, Side, Zone
from pipeline.watershed import merge_regions, segment_regions
from pipeline.window import Preprocessed, Window, WindowSource, preprocess
from tests.pipeline.conftest import DICOM_DIR, need

SPOT = Channel(
    index=0,
    name="spot",
    kind="finding",
    group=FindingGroup.SPOT,
    finding_type=FindingType.NODULE,
    threshold=0.5,
)


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _pre(image: np.ndarray, spacing: tuple[float, float] | None = None, working: int | None = None):
    plane = image.astype(np.float32)
    grey = GreyImage(
        pixels=plane,
        distribution=analyse_distribution(plane, GreyConfig()),
        voi_range=None,
        spacing_mm=spacing,
    )
    shape = (working, working) if working else plane.shape
    return preprocess(grey, working_shape=shape, low_percentile=0, high_percentile=100)


# S321–S324 ---------------------------------------------------------------------------------


def test_s321_merge_joins_a_weak_boundary_and_keeps_a_strong_one() -> None:
    """Three regions: A|B separated by a weak ridge merge; B|C across a strong ridge do not."""
    values = np.zeros((20, 30), dtype=np.float32)
    labels = np.ones((20, 30), dtype=np.int32)
    labels[:, 10:20], labels[:, 20:] = 2, 3
    values[:, 9:11] = 0.01  # weak ridge between 1 and 2
    values[:, 19:21] = 0.5  # strong ridge between 2 and 3
    merged, count = merge_regions(
        values, labels, 3, WatershedConfig(merge_constraint=0.02, merge_threshold=0.02)
    )
    assert count == 2
    assert merged[5, 2] == merged[5, 15] != merged[5, 25]


def test_s321_merge_respects_the_minima_constraint() -> None:
    """Regions whose minima differ by more than the constraint never merge, however weak the
    boundary between them."""
    values = np.zeros((10, 20), dtype=np.float32)
    labels = np.ones((10, 20), dtype=np.int32)
    labels[:, 10:] = 2
    values[:, 10:] = 0.3  # region 2's minimum is 0.3 above region 1's
    _, count = merge_regions(
        values, labels, 2, WatershedConfig(merge_constraint=0.1, merge_threshold=1.0)
    )
    assert count == 2


# S300 --------------------------------------------------------------------------------------


def _two_touching_blobs() -> np.ndarray:
    yy, xx = np.mgrid[:60, :80]
    a = np.exp(-((yy - 30) ** 2 + (xx - 28) ** 2) / (2 * 6.0**2))
    b = np.exp(-((yy - 30) ** 2 + (xx - 52) ** 2) / (2 * 6.0**2))
    return (
        (0.95 * np.maximum(a, b) + 0.4 * np.exp(-((yy - 30) ** 2) / 50) * (abs(xx - 40) < 12))
        .clip(0, 1)
        .astype(np.float32)
    )


def test_s300_peak_relative_separates_touching_lesions() -> None:
    """Two peaks joined by a ridge above threshold: one component, but two peak-relative marks
    with boxes around each peak."""
    evidence = _two_touching_blobs()
    joined = channel_marks(evidence, SPOT, CandidateConfig(strategy="components"))
    split = channel_marks(
        evidence, SPOT, CandidateConfig(strategy="peak_relative", peak_fraction=0.7)
    )
    assert len(joined) == 1
    assert len(split) == 2
    left, right = sorted(split, key=lambda m: m.box[1])
    assert left.box[3] <= right.box[1]  # separate boxes, no overlap
    assert left.box[1] <= 28 < left.box[3] and right.box[1] <= 52 < right.box[3]


# S400 --------------------------------------------------------------------------------------


def test_s400_a_bright_disk_is_a_spot_contour() -> None:
    """A 12 mm bright disk on a noisy lung-like background matches the spot criteria."""
    rng = np.random.default_rng(3)
    image = (0.3 + 0.02 * rng.standard_normal((200, 200))).astype(np.float32)
    image[_disk(image.shape, (80, 120), 12)] = 0.7
    marks = contour_marks(image, None, (0.5, 0.5), ContourConfig())
    spots = [m for m in marks if m.group is FindingGroup.SPOT]
    assert len(spots) == 1
    assert spots[0].diameter_mm == pytest.approx(12.0, rel=0.15)
    assert spots[0].circularity > 0.8 and spots[0].solidity > 0.9 and spots[0].contrast > 0.3
    r0, c0, r1, c1 = spots[0].box
    assert r0 <= 80 <= r1 and c0 <= 120 <= c1


def test_s400_a_thin_line_is_not_a_spot() -> None:
    """A long thin bright line (a rib edge, a tube) is neither a spot nor a shadow."""
    image = np.full((200, 200), 0.3, dtype=np.float32)
    image[100:103, 20:180] = 0.8
    assert not [
        m
        for m in contour_marks(image, None, (0.5, 0.5), ContourConfig())
        if m.group is FindingGroup.SPOT
    ]


# S520–S530 ---------------------------------------------------------------------------------


def test_s520_coefficient_is_the_largest_border_pair_ratio() -> None:
    """A uniform disk of 0.8 on 0.2: every border pair has the ratio (0.8+ε)/(0.2+ε)."""
    image = np.full((40, 40), 0.2, dtype=np.float32)
    mask = _disk(image.shape, (20, 20), 8)
    image[mask] = 0.8
    eps = 0.01
    ratios = border_ratios(image, mask, eps)
    assert ratios.size > 0 and np.all(np.diff(ratios) >= 0)
    assert influence_coefficient(image, mask, eps) == pytest.approx(
        (0.8 + eps) / (0.2 + eps), rel=1e-5
    )


def test_s520_coefficient_takes_the_maximum_not_the_mean() -> None:
    """One bright pixel on the inner border raises the coefficient to its own pair's ratio."""
    image = np.full((40, 40), 0.2, dtype=np.float32)
    mask = _disk(image.shape, (20, 20), 8)
    image[mask] = 0.4
    image[12, 20] = 0.9  # top border pixel of the disk
    assert influence_coefficient(image, mask, 0.0) == pytest.approx(0.9 / 0.2, rel=1e-5)


def test_s530_faint_region_is_enhanced_and_outside_is_unchanged() -> None:
    """A faint disk gets gain target/coefficient > 1: its contrast rises, far pixels keep
    their values; a region that already stands out is left alone."""
    image = np.full((120, 120), 0.4, dtype=np.float32)
    faint = _disk(image.shape, (40, 40), 10)
    strong = _disk(image.shape, (85, 85), 10)
    image[faint] = 0.45
    image[strong] = 0.95
    pre = Preprocessed(
        full=image,
        working=image,
        window=Window(low=0.0, high=1.0, source=WindowSource.PERCENTILE),
        input_shape=image.shape,
        spacing_mm=None,
    )
    config = EnhancementConfig(target_ratio=1.5, max_gain=3.0, feather_px=1.0)
    regions = tuple(
        Region(channel=SPOT, source=MarkSource.MODEL, probability=0.9, mask=m, box=bounding_box(m))
        for m in (faint, strong)
    )
    enhanced, done = enhance(regions, pre, config)
    c_faint = (0.45 + 0.01) / (0.4 + 0.01)
    assert done[0].coefficient == pytest.approx(c_faint, rel=1e-3)
    assert done[0].gain == pytest.approx(gain_for(c_faint, config)) and done[0].gain > 1
    assert done[1].gain == 1.0
    before = image[faint].mean() - 0.4
    after = enhanced[faint].mean() - enhanced[60:70, 100:110].mean()
    assert after > before * 1.2
    np.testing.assert_array_equal(enhanced[strong], pre.full[strong])
    np.testing.assert_array_equal(enhanced[60:70, 100:110], pre.full[60:70, 100:110])


# S710–S742 ---------------------------------------------------------------------------------


def test_s710_grading_table_probability_and_size() -> None:
    """Default table: grade rises with probability and size; masses are grade 4; unknown size
    never satisfies a size rule; alert at the configured grade."""
    cfg = GradingConfig()
    assert grade(FindingType.NODULE, 0.55, 8.0, cfg, 3).grade == 1
    assert grade(FindingType.NODULE, 0.65, 8.0, cfg, 3).grade == 2
    assert grade(FindingType.NODULE, 0.55, 20.0, cfg, 3).grade == 3
    assert grade(FindingType.NODULE, 0.55, None, cfg, 3).grade == 1
    g = grade(FindingType.MASS, 0.7, 40.0, cfg, 3)
    assert g.grade == 4 and g.alert and g.colour == cfg.colour_of(4)
    assert not grade(FindingType.OPACITY, 0.65, 10.0, cfg, 3).alert


def test_s741_model_alert_threshold_holds_the_grade_under_the_alert_grade() -> None:
    """Below the model's alert threshold a finding that the table would grade 3 or 4 stays
    at grade 2 (no alert); at or above it the table decides; without one, nothing changes."""
    cfg = GradingConfig()
    assert grade(FindingType.OPACITY, 0.85, 10.0, cfg, 3).grade == 3
    held = grade(FindingType.OPACITY, 0.85, 10.0, cfg, 3, alert_threshold=0.97)
    assert held.grade == 2 and not held.alert and held.colour == cfg.colour_of(2)
    held_mass = grade(FindingType.MASS, 0.9, 40.0, cfg, 3, alert_threshold=0.97)
    assert held_mass.grade == 2 and not held_mass.alert
    kept = grade(FindingType.MASS, 0.98, 40.0, cfg, 3, alert_threshold=0.97)
    assert kept.grade == 4 and kept.alert
    low = grade(FindingType.NODULE, 0.55, 8.0, cfg, 3, alert_threshold=0.97)
    assert low.grade == 1 and not low.alert


# Lung field --------------------------------------------------------------------------------


def test_lung_side_and_zone_follow_the_pa_convention() -> None:
    """The image's left lung is the patient's right; zones are thirds of that lung's height."""
    prob = np.zeros((100, 100), dtype=np.float32)
    prob[20:80, 10:40] = 0.9  # image-left lung
    prob[20:80, 60:90] = 0.9  # image-right lung
    lungs = lung_field(prob, RecognitionConfig(), prob.shape)
    assert 40 <= lungs.midline <= 60
    spot = _disk(prob.shape, (25, 25), 3)
    assert side_and_zone(spot, lungs) == (Side.RIGHT, Zone.UPPER)
    spot = _disk(prob.shape, (75, 75), 3)
    assert side_and_zone(spot, lungs) == (Side.LEFT, Zone.LOWER)


def test_a_frontal_chest_shows_two_lung_fields_a_lateral_one() -> None:
    """Two lungs either side of the centre line count 2; one superimposed field (a lateral)
    or two components on one side count 1; no lung channel above threshold counts 0."""
    frontal = np.zeros((100, 100), dtype=np.float32)
    frontal[20:80, 10:40] = frontal[20:80, 60:90] = 0.9
    lateral = np.zeros((100, 100), dtype=np.float32)
    lateral[15:85, 25:75] = 0.9
    one_side = np.zeros((100, 100), dtype=np.float32)
    one_side[10:40, 5:45] = one_side[60:90, 5:45] = 0.9
    config = RecognitionConfig()
    assert lung_field(frontal, config, frontal.shape).fields == 2
    assert lung_field(lateral, config, lateral.shape).fields == 1
    assert lung_field(one_side, config, one_side.shape).fields == 1
    assert lung_field(np.zeros_like(frontal), config, frontal.shape).fields == 0


# Geometry ----------------------------------------------------------------------------------


def test_outer_contour_is_the_boundary_of_the_mask() -> None:
    """Moore tracing visits exactly the mask's boundary pixels."""
    mask = _disk((30, 30), (15, 14), 7)
    contour = trace_outer_contour(mask)
    inner = mask.copy()
    inner[1:-1, 1:-1] = (
        mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:] & mask[1:-1, 1:-1]
    )
    assert set(contour) == set(zip(*np.nonzero(mask & ~inner), strict=True))
    assert convex_hull_area(mask) >= mask.sum()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    blocks=st.integers(2, 6),
    constraint=st.floats(0.0, 0.5),
    threshold=st.floats(0.0, 0.5),
)
def test_s321_merge_only_coarsens(
    seed: int, blocks: int, constraint: float, threshold: float
) -> None:
    """Merging only joins whole regions: every original region lands in exactly one merged
    region, the count never grows, and with zero thresholds nothing merges."""
    rng = np.random.default_rng(seed)
    values = rng.random((48, 48)).astype(np.float32)
    step = 48 // blocks
    rows, cols = np.mgrid[:48, :48]
    labels = (
        np.minimum(rows // step, blocks - 1) * blocks + np.minimum(cols // step, blocks - 1) + 1
    ).astype(np.int32)
    count = blocks * blocks
    merged, merged_count = merge_regions(
        values,
        labels,
        count,
        WatershedConfig(merge_constraint=constraint, merge_threshold=threshold),
    )
    assert 1 <= merged_count <= count and merged.min() >= 1 and merged.max() == merged_count
    for k in range(1, count + 1):
        assert np.unique(merged[labels == k]).size == 1
    _, none = merge_regions(
        values, labels, count, WatershedConfig(merge_constraint=0.0, merge_threshold=0.0)
    )
    assert none == count


def test_s311_watershed_on_the_real_radiograph() -> None:
    """On the real CR chest at working size every pixel gets a region, and the merge reduces
    the watershed's over-segmentation."""
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(need(DICOM_DIR / "RG1_UNCI.dcm"))
    plane = -ds.pixel_array.astype(np.float32)
    grey = GreyImage(
        pixels=plane,
        distribution=analyse_distribution(plane, GreyConfig()),
        voi_range=None,
        spacing_mm=None,
    )
    pre = preprocess(grey, working_shape=(384, 384), low_percentile=0.5, high_percentile=99.5)
    regions = segment_regions(pre.working, WatershedConfig(similarity_threshold=0.005))
    assert regions.labels.shape == (384, 384) and regions.labels.min() >= 1
    assert 20 <= regions.count < regions.initial_count


def test_s300_basins_keep_a_weak_lesion_next_to_a_strong_one() -> None:
    """At a low threshold a strong and a weak lesion (0.4 of the strong one's peak) share one
    component: the peak-relative cut at half the peak loses the weak one, the basin strategy
    keeps both with separate boxes."""
    yy, xx = np.mgrid[:60, :100]
    strong = np.exp(-((yy - 30) ** 2 + (xx - 30) ** 2) / (2 * 6.0**2))
    weak = 0.25 * np.exp(-((yy - 30) ** 2 + (xx - 70) ** 2) / (2 * 6.0**2))
    evidence = (np.maximum(strong, weak) + 0.15 * (abs(yy - 30) < 4)).clip(0, 1).astype(np.float32)
    low = Channel(
        index=0,
        name="spot",
        kind="finding",
        group=FindingGroup.SPOT,
        finding_type=FindingType.NODULE,
        threshold=0.1,
    )
    half = CandidateConfig(strategy="peak_relative", peak_fraction=0.5)
    peak = channel_marks(evidence, low, half)
    basins = channel_marks(
        evidence, low, CandidateConfig(strategy="basins", basin_depth=0.1, peak_fraction=0.5)
    )
    assert len(peak) == 1
    assert len(basins) == 2
    right = max(basins, key=lambda m: m.box[1])
    assert right.box[1] <= 70 < right.box[3] and right.probability == pytest.approx(0.4, abs=0.05)
    assert min(basins, key=lambda m: m.box[1]).box[3] <= right.box[1]


def test_s700_fit_to_box_moves_and_stretches_a_region_into_a_box() -> None:
    """An L-shaped region fitted into a box fills that box's extent, keeps its shape (the
    notch stays in the same corner), is clipped at the border; a box of no size or beyond
    the array leaves the region as it was."""
    m = np.zeros((40, 40), dtype=bool)
    m[10:20, 10:20] = True
    m[10:15, 15:20] = False  # notch: top right
    fitted = fit_to_box(m, (4.0, 20.0, 24.0, 30.0))  # rows 4..24, cols 20..30
    assert bounding_box(fitted) == (4, 20, 24, 30)
    assert not fitted[4:14, 25:30].any() and fitted[14:24, 25:30].all()
    assert fitted[4:24, 20:25].all()
    assert bounding_box(fit_to_box(m, (30.0, 30.0, 50.0, 50.0))) == (30, 30, 40, 40)
    assert fit_to_box(m, (5.0, 5.0, 5.0, 9.0)) is m
    assert fit_to_box(m, (60.0, 60.0, 70.0, 70.0)) is m


def test_s700_predicted_box_is_the_weighted_median_of_the_core_votes() -> None:
    """Core pixels (≥ half the peak) vote for boxes; each edge is their weighted median,
    so the box of the lesion most of the core lies on wins; weak pixels do not vote."""
    from pipeline.boxes import BoxEvidence, predicted_box

    p = np.zeros((1, 40, 40), dtype=np.float32)
    d = np.zeros((4, 40, 40), dtype=np.float32)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 5:35] = True
    p[0, 10:20, 5:25] = 0.9  # core on lesion A: boxes rows 8..22, cols 3..27
    p[0, 10:20, 25:30] = 0.8  # a smaller part on lesion B: rows 0..30, cols 20..40
    p[0, 10:20, 30:35] = 0.2  # weak: no vote (it would say a huge box)
    rows, cols = np.mgrid[0:40, 0:40] + 0.5
    a = (8.0, 3.0, 22.0, 27.0)
    b = (0.0, 20.0, 30.0, 40.0)
    for (r0, c0, r1, c1), sel in (
        (a, (slice(10, 20), slice(5, 25))),
        (b, (slice(10, 20), slice(25, 30))),
    ):
        d[0][sel], d[1][sel] = cols[sel] - c0, rows[sel] - r0
        d[2][sel], d[3][sel] = c1 - cols[sel], r1 - rows[sel]
    d[:, 10:20, 30:35] = 100.0
    box = predicted_box(mask, 0, BoxEvidence(distances=d, probabilities=p))
    assert box == pytest.approx(a)
    assert predicted_box(np.zeros_like(mask), 0, BoxEvidence(distances=d, probabilities=p)) is None
    # boxes per finding channel: channel 0 reads the first four planes, channel 1 the next
    two = np.stack([p[0], p[0]])
    per_channel = BoxEvidence(
        distances=np.concatenate([d, d + 2.0]), probabilities=two, channels=(0, 1)
    )
    assert predicted_box(mask, 0, per_channel) == pytest.approx(a)
    wider = (a[0] - 2.0, a[1] - 2.0, a[2] + 2.0, a[3] + 2.0)
    assert predicted_box(mask, 1, per_channel) == pytest.approx(wider)


def test_s700_extent_scale_shrinks_and_grows_a_region_about_its_centre() -> None:
    """A 20×20 square scaled by 0.9 × 0.5 keeps its centre and becomes 18 wide, 10 high; by
    1.2 it grows to 24; (1, 1) returns the mask itself; a region that would vanish is kept;
    a region at the border is clipped, not wrapped."""
    m = np.zeros((40, 40), dtype=bool)
    m[10:30, 5:25] = True
    assert bounding_box(scale_extent(m, 0.9, 0.5)) == (15, 6, 25, 24)
    assert bounding_box(scale_extent(m, 1.2, 1.0)) == (10, 3, 30, 27)
    assert scale_extent(m, 1.0, 1.0) is m
    dot = np.zeros((10, 10), dtype=bool)
    dot[4, 4] = True
    assert np.array_equal(scale_extent(dot, 0.5, 0.5), dot)
    edge = np.zeros((20, 20), dtype=bool)
    edge[0:10, 0:10] = True
    grown = scale_extent(edge, 1.5, 1.5)
    assert bounding_box(grown) == (0, 0, 12, 12) and grown.sum() == 12 * 12  # ends at 12.5


def test_s700_one_finding_per_lesion_whatever_its_group() -> None:
    """Two regions of one lesion (nearly the same box), or an opacity and a nodule over the
    same region: of findings overlapping at IoU > 0.5 the most probable stays, whatever its
    group; a finding that overlaps less stays."""
    from pipeline.recognition import suppress_coinciding
    from pipeline.result import Finding, FindingType

    def finding(kind: FindingType, p: float, box: tuple[int, int, int, int]) -> Finding:
        mask = np.zeros((100, 100), dtype=bool)
        mask[box[1] : box[3], box[0] : box[2]] = True
        x0, y0, x1, y1 = box
        return Finding(
            finding_type=kind,
            probability=p,
            grade=1,
            colour=(255, 255, 0),
            alert=False,
            box=box,
            contour=((x0, y0), (x1, y0), (x1, y1), (x0, y1)),
            area_mm2=None,
            side=None,
            zone=None,
            mask=mask,
        )

    low = finding(FindingType.OPACITY, 0.6, (10, 10, 50, 50))
    high = finding(FindingType.OPACITY, 0.9, (12, 12, 52, 52))
    spot = finding(FindingType.NODULE, 0.5, (10, 10, 50, 50))
    apart = finding(FindingType.OPACITY, 0.7, (35, 35, 75, 75))
    kept = suppress_coinciding([low, high, spot, apart])
    assert kept == [high, apart]
    strong_spot = finding(FindingType.NODULE, 0.95, (11, 11, 51, 51))
    assert suppress_coinciding([low, high, strong_spot, apart]) == [strong_spot, apart]
