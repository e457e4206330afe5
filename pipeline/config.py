"""Configuration of the analysis: the ``[pipeline]`` section of the node's TOML file.

Every threshold the method's steps use is a field here with a documented default; the node's
config loader (``node.config``) builds this object from TOML and validates it. The pipeline
never reads files or environment variables for its settings. The model's own numbers (window
percentiles, working size, per-channel thresholds) come from ``models/manifest.json``, not
from here.

Sub-tables follow the method's steps, e.g. ``[pipeline.watershed]``, ``[pipeline.grading]``
and ``[[pipeline.grading.rules]]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.result import FindingGroup, FindingType


def _fraction(value: float, name: str, *, open_low: bool = False) -> None:
    low_ok = value > 0.0 if open_low else value >= 0.0
    if not (low_ok and value <= 1.0):
        raise ValueError(f"{name} must be in {'(' if open_low else '['}0, 1], got {value}")


def _positive(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GreyConfig:
    """``[pipeline.grey]``: S100 grey conversion and pixel-distribution analysis."""

    border_tolerance: float = 0.02
    """A border row/column whose spread (p95 − p5) is below this fraction of the image's
    dynamic range is collimation or background and is left out of the statistics."""
    max_border_fraction: float = 0.25
    """At most this fraction of the height/width may be cut from each side as border."""
    histogram_bins: int = 256
    """Bins of the grey-level histogram kept with the statistics."""
    sample_pixels: int = 262_144
    """The statistics use a regular subsample of at most this many pixels (speed)."""

    def __post_init__(self) -> None:
        _fraction(self.border_tolerance, "border_tolerance")
        if not 0.0 <= self.max_border_fraction < 0.5:
            raise ValueError("max_border_fraction must be in [0, 0.5)")
        if self.histogram_bins < 2 or self.sample_pixels < 1024:
            raise ValueError("histogram_bins must be ≥ 2 and sample_pixels ≥ 1024")


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowConfig:
    """``[pipeline.window]``: S200 extremum optimisation (percentiles come from the manifest)."""

    use_voi_window: bool = False
    """Use the DICOM VOI window, when the image has one, instead of the manifest's
    percentiles. Off by default: the model was trained on percentile windows."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatershedConfig:
    """``[pipeline.watershed]``: S311–S324 watershed segmentation and region merge."""

    gradient_sigma_px: float = 1.0
    """Gaussian sigma (working pixels) of the gradient magnitude the watershed floods."""
    similarity_threshold: float = 0.01
    """S312: depth (in gradient units of the [0, 1] image) a minimum must have to seed a
    region (h-minima). Larger → fewer, bigger regions."""
    merge_constraint: float = 0.02
    """S321: adjacent regions whose minima differ by less than this are merge candidates."""
    merge_threshold: float = 0.02
    """S323–S324: merge two candidates when their shared boundary's mean value lies within
    this of both regions' minima."""

    def __post_init__(self) -> None:
        _positive(self.gradient_sigma_px, "gradient_sigma_px")
        for name in ("similarity_threshold", "merge_constraint", "merge_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateConfig:
    """``[pipeline.candidates]``: S300 model evidence → initial anomaly marks."""

    region_weight: float = 0.25
    """Weight of the watershed-region mean in the pooled evidence (the rest is the pixel's
    own probability). 0 = pixel probabilities only. 0.25 scored best on the validation split
    (model 1.0.0, 8 epochs: shadow AP50 0.353 vs 0.354 at 0.5 and 0.333 at 0; fewest false
    positives per normal study, 1.18 vs 1.23)."""
    strategy: Literal["components", "peak_relative", "basins"] = "peak_relative"
    """``components``: connected components above the channel threshold. ``peak_relative``:
    each component is re-cut at ``peak_fraction`` × its peak, splitting touching lesions and
    tightening boxes. ``basins``: the area above threshold is first split into one basin per
    evidence peak (watershed from peaks at least ``basin_depth`` prominent), then each basin
    is cut at ``peak_fraction`` × its own peak: weaker lesions next to a strong one survive
    (useful at low thresholds)."""
    peak_fraction: float = 0.35
    """Relative cut for ``peak_relative`` and ``basins``. 0.35 scored best on the validation
    split (model 1.1.0, pipeline: shadow AP50 0.393 vs 0.383 at 0.5, sensitivity
    at 1 FP/image 0.780 vs 0.750; 0.2 was no better than 0.35 with the earlier model)."""
    support: float | None = 0.05
    """``peak_relative`` and ``basins``: the evidence level down to which a finding's region
    may extend (and not below ``peak_fraction`` × its peak), whatever the channel's threshold;
    the threshold decides only which regions become findings (their peak must reach it). A
    finding's extent is thus the same at the operating point as in the evaluation's sweep.
    None: regions stop at the threshold (at a high threshold, only the saturated core)."""
    basin_depth: float = 0.1
    """``basins``: how far (in probability) a peak must rise above the saddle to its
    neighbour to get its own basin."""
    min_area_px: int = 12
    """Candidates smaller than this (working pixels) are dropped."""
    max_candidates: int = 24
    """At most this many candidates (highest peaks first) go on to the later steps."""

    def __post_init__(self) -> None:
        _fraction(self.region_weight, "region_weight")
        _fraction(self.peak_fraction, "peak_fraction")
        _fraction(self.basin_depth, "basin_depth", open_low=True)
        if self.support is not None:
            _fraction(self.support, "support", open_low=True)
        if self.min_area_px < 1 or self.max_candidates < 1:
            raise ValueError("min_area_px and max_candidates must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionConfig:
    """``[pipeline.attention]``: S331–S333 re-scoring of windows centred on candidates."""

    enabled: bool = True
    max_windows: int = 2
    """Only the most probable candidates get an attention window (one batched model run;
    each window costs one model inference)."""
    max_probability: float = 0.9
    """Candidates already more probable than this are not re-scored: the window could only
    confirm them, and each window costs a model run."""
    context: float = 3.0
    """Window side = this × the candidate's larger box side (at least ``min_window_fraction``
    of the image), taken from the full-resolution image and resampled to the model input."""
    min_window_fraction: float = 0.25
    """Smallest window side as a fraction of the image's shorter side."""
    weight: float = 0.5
    """Weight of the window's score in the candidate's refined probability."""

    def __post_init__(self) -> None:
        if self.max_windows < 0:
            raise ValueError("max_windows must be 0 or more")
        if self.context < 1.0:
            raise ValueError("context must be at least 1")
        _fraction(self.min_window_fraction, "min_window_fraction", open_low=True)
        _fraction(self.weight, "weight")
        _fraction(self.max_probability, "max_probability")


@dataclass(frozen=True, slots=True, kw_only=True)
class ContourConfig:
    """``[pipeline.contour]``: S400 binarisation and abnormal-contour matching."""

    method: Literal["otsu", "fixed"] = "otsu"
    """Boundary value of the binarisation: Otsu's threshold inside the lung field, or
    ``fixed_threshold``; applied to the detail image (image minus its smooth background)."""
    fixed_threshold: float = 0.04
    background_sigma_mm: float = 10.0
    """Sigma of the smooth background removed before binarising (mm; with unknown spacing
    the image is taken to be ``grading.fallback_field_width_mm`` wide)."""
    spot_diameter_mm: tuple[float, float] = (5.0, 60.0)
    """Equivalent-diameter range of a spot contour."""
    spot_min_circularity: float = 0.55
    """4πA/P² of a spot contour (1 = a disk)."""
    spot_min_solidity: float = 0.8
    """Area / convex-hull area of a spot contour."""
    shadow_min_area_mm2: float = 400.0
    shadow_min_solidity: float = 0.5
    min_contrast: float = 0.03
    """Mean inside minus mean of the surrounding ring, on the [0, 1] image."""

    def __post_init__(self) -> None:
        low, high = self.spot_diameter_mm
        if not 0 < low < high:
            raise ValueError("spot_diameter_mm must be (low, high) with 0 < low < high")
        _positive(self.background_sigma_mm, "background_sigma_mm")
        for name in ("spot_min_circularity", "spot_min_solidity", "shadow_min_solidity"):
            _fraction(getattr(self, name), name)
        if self.shadow_min_area_mm2 < 0 or self.min_contrast < 0:
            raise ValueError("shadow_min_area_mm2 and min_contrast must be 0 or more")


@dataclass(frozen=True, slots=True, kw_only=True)
class EnhancementConfig:
    """``[pipeline.enhancement]``: S500–S530 fusion, influence coefficient, enhancement."""

    agreement_bonus: float = 0.05
    """S510: added to a region's probability when both branches marked it."""
    ratio_epsilon: float = 0.01
    """S520: added to both pixels of a border pair before their ratio is taken."""
    target_ratio: float = 1.5
    """S530: the enhancement gain is target_ratio / coefficient (at least 1): a region that
    already stands out (coefficient ≥ target) is left as it is."""
    max_gain: float = 3.0
    feather_px: float = 2.0
    """Soft edge of the enhanced region (input pixels, Gaussian sigma)."""

    def __post_init__(self) -> None:
        _fraction(self.agreement_bonus, "agreement_bonus")
        _positive(self.ratio_epsilon, "ratio_epsilon")
        if self.target_ratio < 1.0 or self.max_gain < 1.0:
            raise ValueError("target_ratio and max_gain must be at least 1")
        if self.feather_px < 0:
            raise ValueError("feather_px must be 0 or more")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecognitionConfig:
    """``[pipeline.recognition]``: S600 final recognition and the lung field."""

    rescore_enhanced: bool = True
    """Run the model again on the enhanced image (S600) and average its region score with
    the S300/S333 score. Off: the refined score is final (saves one model run)."""
    lung_threshold: float = 0.5
    """The model's ``lung`` channel above this is lung field."""
    lung_min_overlap: float = 0.2
    """A finding is reported only if at least this fraction of it lies in the lung field
    (dilated by ``lung_margin_fraction``). Ignored when the model has no lung channel."""
    lung_margin_fraction: float = 0.03
    """Dilation of the lung mask, as a fraction of the working width."""

    def __post_init__(self) -> None:
        _fraction(self.lung_threshold, "lung_threshold", open_low=True)
        _fraction(self.lung_min_overlap, "lung_min_overlap")
        if not 0 <= self.lung_margin_fraction < 0.5:
            raise ValueError("lung_margin_fraction must be in [0, 0.5)")


@dataclass(frozen=True, slots=True, kw_only=True)
class GradeRule:
    """``[[pipeline.grading.rules]]``: one row of the S710 grading table.

    A finding gets the highest ``grade`` among the rules it matches (grade 1 if none):
    its group or type is listed (empty lists match all), its probability is at least
    ``min_probability`` and its size at least ``min_diameter_mm`` (equivalent diameter;
    a rule with a size bound never matches when the size is unknown).
    """

    grade: int
    groups: tuple[FindingGroup, ...] = ()
    finding_types: tuple[FindingType, ...] = ()
    min_probability: float = 0.0
    min_diameter_mm: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.grade <= 4:
            raise ValueError("grade must be between 1 and 4")
        _fraction(self.min_probability, "min_probability")
        if self.min_diameter_mm < 0:
            raise ValueError("min_diameter_mm must be 0 or more")


@dataclass(frozen=True, slots=True, kw_only=True)
class GradeColour:
    """``[[pipeline.grading.colours]]``: S730 grade → sRGB colour."""

    grade: int
    rgb: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.grade <= 4:
            raise ValueError("grade must be between 1 and 4")
        if len(self.rgb) != 3 or not all(0 <= c <= 255 for c in self.rgb):
            raise ValueError("rgb must be three integers 0–255")


DEFAULT_GRADE_RULES: tuple[GradeRule, ...] = (
    GradeRule(grade=2, min_probability=0.6),
    GradeRule(grade=3, min_probability=0.8),
    GradeRule(grade=3, groups=(FindingGroup.SPOT,), min_probability=0.5, min_diameter_mm=15.0),
    GradeRule(grade=3, groups=(FindingGroup.SHADOW,), min_probability=0.6, min_diameter_mm=40.0),
    GradeRule(grade=4, finding_types=(FindingType.MASS,), min_probability=0.6),
    GradeRule(grade=4, min_probability=0.9, min_diameter_mm=20.0),
)
"""Default S710 table: probability raises the grade, size raises it further; masses
(spots over 30 mm) are the most urgent."""

DEFAULT_GRADE_COLOURS: tuple[GradeColour, ...] = (
    GradeColour(grade=1, rgb=(0, 200, 255)),  # cyan: low suspicion
    GradeColour(grade=2, rgb=(255, 215, 0)),  # yellow
    GradeColour(grade=3, rgb=(255, 128, 0)),  # orange
    GradeColour(grade=4, rgb=(255, 0, 64)),  # red: most urgent
)


@dataclass(frozen=True, slots=True, kw_only=True)
class GradingConfig:
    """``[pipeline.grading]``: S710–S742 grading table, colours, spot size classes."""

    rules: tuple[GradeRule, ...] = DEFAULT_GRADE_RULES
    colours: tuple[GradeColour, ...] = DEFAULT_GRADE_COLOURS
    mass_diameter_mm: float = 30.0
    """A spot larger than this (equivalent diameter) is a mass, else a nodule."""
    fallback_field_width_mm: float = 350.0
    """When the spacing is unknown (PNG/JPEG), the image is taken to be this wide for the
    size *decisions* only (nodule/mass, grading, S400 sizes); ``area_mm2`` stays null."""

    def __post_init__(self) -> None:
        grades = sorted(c.grade for c in self.colours)
        if grades != [1, 2, 3, 4]:
            raise ValueError("colours must give exactly one colour for each grade 1–4")
        _positive(self.mass_diameter_mm, "mass_diameter_mm")
        _positive(self.fallback_field_width_mm, "fallback_field_width_mm")

    def colour_of(self, grade: int) -> tuple[int, int, int]:
        """S730: the sRGB colour of ``grade``."""
        for c in self.colours:
            if c.grade == grade:
                return (c.rgb[0], c.rgb[1], c.rgb[2])
        raise KeyError(grade)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    """Settings of S100–S742, one sub-table per step of the method."""

    model_dir: Path = field(default=Path(__file__).resolve().parents[1] / "models")
    """Folder holding ``manifest.json`` and the ONNX model it names (default: the project's
    ``models/``; a relative path in a config file is relative to that file's folder)."""

    alert_grade: int = 3
    """S741: a finding whose grade is at least this raises an alert."""

    threads: int = 2
    """onnxruntime intra-op threads (the model runs once per image, plus S333/S600)."""

    grey: GreyConfig = field(default_factory=GreyConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    watershed: WatershedConfig = field(default_factory=WatershedConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    contour: ContourConfig = field(default_factory=ContourConfig)
    enhancement: EnhancementConfig = field(default_factory=EnhancementConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    grading: GradingConfig = field(default_factory=GradingConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.alert_grade <= 4:
            raise ValueError("alert_grade must be between 1 and 4")
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
