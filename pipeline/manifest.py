"""The model's manifest (``models/manifest.json``): what the pipeline needs to know of a model.

The manifest is read with the same typed validator as the node's configuration
(``pipeline.schema``): the ``*Spec`` dataclasses below are its schema (keys, types, defaults,
ranges in ``__post_init__``), and every problem is listed in one ``ModelError``. Keys the
pipeline does not read (the lab's records: training, metrics, fits' notes) are allowed.
``parse_manifest`` then joins each finding channel with its operating point into a
``Channel``. The ONNX file itself is checked by ``pipeline.model.load_model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.errors import ModelError
from pipeline.result import FindingGroup, FindingType
from pipeline.schema import EntryError, Problem, Schema

MANIFEST = "manifest.json"
MAX_SUPPORT_POWER = 4.0
MAX_ZOOM_SCALES = 4
MIN_ZOOM, MAX_ZOOM = 0.5, 2.0
VIEW_FUSIONS = ("mean", "max")
_SCHEMA = Schema(table="an object", ignore_unknown=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Channel:
    """One output channel of the model: a finding channel or the lung field."""

    index: int
    name: str
    kind: str  # "finding" | "lung" | anything else (ignored)
    group: FindingGroup | None = None
    finding_type: FindingType | None = None
    threshold: float = 0.5
    alert_threshold: float | None = None
    """S741 for this model: below this probability a finding's grade stays under the alert
    grade (``operating_point.alert_thresholds``; None: the grading table alone decides)."""
    extent_scale: tuple[float, float] = (1.0, 1.0)
    """S700 for this model: (width, height) factors by which a finding's region is scaled
    about its centre (``operating_point.extent_scale``, fitted on training data by
    ``evaluate --fit-extent-scale``): the network's evidence spreads wider than the lesions
    radiologists outline. (1, 1): the region as found."""
    box_weight: float = 1.0
    """S700 for a model with a box head: the head's share in a finding's box; the rest is the
    box of the region scaled by ``extent_scale`` (``operating_point.box_weight``, fitted on
    training data by ``evaluate --fit-box-weight``). Without a box head it plays no part."""
    support_power: float = 0.0
    """S600 for this model: a region's probability is multiplied by its support, the mean of
    this channel's S300 probability over the region, to this power
    (``operating_point.support_power``, fitted on training data by ``evaluate
    --fit-support-power``): of two regions with the same peak, the one the model marks as a
    whole ranks above the one it marks at a point. 0: the peak alone."""
    view_fusion: str = "mean"
    """S300 for this model with zoom scales: how this channel's probabilities from the
    views are combined where they overlap (``operating_point.view_fusion``, fitted on
    training data by ``evaluate --fit-view-fusion``): ``mean``, their weighted average;
    ``max``, the strongest view, so that evidence one scale shows is not diluted by views
    at which the lesion is too small or too large to be seen."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """``models/manifest.json``: everything the pipeline needs to know about the model."""

    name: str
    version: str
    file: str
    sha256: str
    input_name: str
    height: int
    width: int
    low_percentile: float
    high_percentile: float
    output_name: str
    channels: tuple[Channel, ...]
    alert_grade: int | None = None
    box_output_name: str | None = None
    """The learned box head's output (``box_output.name``): per working pixel, distances
    (left, top, right, bottom) in working pixels to the edges of its lesion's box. None: the
    model has no box head and a finding's box is its region's."""
    box_file: str | None = None
    """The ONNX file that computes both outputs (``box_output.file``), so that ``file`` can
    be the network without the head for the runs that need only probabilities; None: ``file``
    has both outputs."""
    box_sha256: str | None = None
    box_channels: tuple[str, ...] = ()
    """``box_output.channels``: the finding channels that have a set of four distances of
    their own, in the output's order ((N, 4·K, H, W)); (): one set of four serves every
    channel. When given, it names every finding channel, in the manifest's order."""
    zoom_scales: tuple[float, ...] = ()
    """S300 for this model (``operating_point.zoom_scales``): the model also runs on views
    of the image zoomed by these factors (above 1: a centre window enlarged; below 1: the
    whole image shrunk into a blank input), their outputs averaged with the whole image's
    where they cover it (``pipeline.traversal``). (): the whole image alone. The thresholds
    are chosen with them, so they belong to the operating point."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def working_shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def finding_channels(self) -> tuple[Channel, ...]:
        return tuple(c for c in self.channels if c.kind == "finding")

    @property
    def lung_channel(self) -> Channel | None:
        return next((c for c in self.channels if c.kind == "lung"), None)

    @property
    def box_planes(self) -> int:
        """How many planes the box output has: four per set of distances."""
        return 4 * max(1, len(self.box_channels))

    @property
    def box_channel_indices(self) -> tuple[int, ...]:
        """``box_channels`` as channel indices (``pipeline.boxes.BoxEvidence.channels``)."""
        index = {c.name: c.index for c in self.channels}
        return tuple(index[name] for name in self.box_channels)


# The schema ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowSpec:
    low_percentile: float
    high_percentile: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ValueError("percentiles must satisfy 0 ≤ low < high ≤ 100")


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    name: str
    height: int
    width: int
    window: WindowSpec

    def __post_init__(self) -> None:
        if self.height < 16 or self.width < 16:
            raise ValueError("input height and width must be at least 16")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSpec:
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxOutputSpec:
    name: str
    file: str | None = None
    sha256: str | None = None
    channels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.file is not None and self.sha256 is None:
            raise ValueError("a box_output.file needs its sha256")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelSpec:
    name: str
    kind: str  # "finding" | "lung" | anything else (ignored)
    group: FindingGroup | None = None
    finding_type: FindingType | None = None

    def __post_init__(self) -> None:
        if self.kind == "finding" and (self.group is None or self.finding_type is None):
            raise ValueError("a finding channel needs its group and finding_type")


def _in_open_unit(values: dict[str, float]) -> None:
    for name, value in values.items():
        if not 0.0 < value < 1.0:
            raise EntryError(name, f"must be in (0, 1), got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatingPointSpec:
    thresholds: dict[str, float] = field(default_factory=dict)
    alert_thresholds: dict[str, float] = field(default_factory=dict)
    alert_grade: int | None = None
    extent_scale: dict[str, tuple[float, ...]] = field(default_factory=dict)
    box_weight: dict[str, float] = field(default_factory=dict)
    support_power: dict[str, float] = field(default_factory=dict)
    view_fusion: dict[str, Literal["mean", "max"]] = field(default_factory=dict)
    zoom_scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _in_open_unit(self.thresholds)
        _in_open_unit(self.alert_thresholds)
        for name, scale in self.extent_scale.items():
            if len(scale) != 2 or not all(0.5 <= s <= 2.0 for s in scale):
                reason = f"must be [width, height] factors in [0.5, 2], got {list(scale)}"
                raise EntryError(name, reason)
        for name, weight in self.box_weight.items():
            if not 0.0 <= weight <= 1.0:
                raise EntryError(name, f"must lie in [0, 1], got {weight}")
        for name, power in self.support_power.items():
            if not 0.0 <= power <= MAX_SUPPORT_POWER:
                raise EntryError(name, f"must lie in [0, {MAX_SUPPORT_POWER}], got {power}")
        if len(self.zoom_scales) > MAX_ZOOM_SCALES:
            raise ValueError(f"at most {MAX_ZOOM_SCALES} zoom scales")
        for zoom in self.zoom_scales:
            if not MIN_ZOOM <= zoom <= MAX_ZOOM or zoom == 1.0:
                raise ValueError(f"each scale must lie in [{MIN_ZOOM}, {MAX_ZOOM}] and not be 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestSpec:
    name: str
    version: str
    file: str
    sha256: str
    input: InputSpec
    output: OutputSpec
    channels: tuple[ChannelSpec, ...]
    operating_point: OperatingPointSpec = field(default_factory=OperatingPointSpec)
    box_output: BoxOutputSpec | None = None

    def __post_init__(self) -> None:
        findings = tuple(c.name for c in self.channels if c.kind == "finding")
        if not findings:
            raise ValueError("no channel of kind 'finding'")
        box = self.box_output
        if box is not None and box.channels and box.channels != findings:
            raise ValueError(
                f"box_output.channels {list(box.channels)} must name the finding channels "
                f"in order, {list(findings)}"
            )


def parse_manifest(raw: dict[str, Any]) -> Manifest:
    """Validate the manifest (every problem at once, in one ``ModelError``) and build it."""
    problems: list[Problem] = []
    spec = _SCHEMA.build(ManifestSpec, raw, where="manifest", problems=problems)
    if problems or spec is None:
        lines = "; ".join(f"{p.key}: {p.reason}" for p in problems) or "cannot be read"
        raise ModelError(f"manifest: {lines}")
    op = spec.operating_point
    box = spec.box_output
    return Manifest(
        name=spec.name,
        version=spec.version,
        file=spec.file,
        sha256=spec.sha256.lower(),
        input_name=spec.input.name,
        height=spec.input.height,
        width=spec.input.width,
        low_percentile=spec.input.window.low_percentile,
        high_percentile=spec.input.window.high_percentile,
        output_name=spec.output.name,
        channels=tuple(_channel(i, c, op) for i, c in enumerate(spec.channels)),
        alert_grade=op.alert_grade,
        box_output_name=box.name if box else None,
        box_file=box.file if box else None,
        box_sha256=box.sha256.lower() if box and box.sha256 else None,
        box_channels=box.channels if box else (),
        zoom_scales=op.zoom_scales,
        raw=raw,
    )


def _channel(index: int, spec: ChannelSpec, op: OperatingPointSpec) -> Channel:
    if spec.kind != "finding":
        return Channel(index=index, name=spec.name, kind=spec.kind)
    name = spec.name
    scale = op.extent_scale.get(name, (1.0, 1.0))
    return Channel(
        index=index,
        name=name,
        kind=spec.kind,
        group=spec.group,
        finding_type=spec.finding_type,
        threshold=op.thresholds.get(name, 0.5),
        alert_threshold=op.alert_thresholds.get(name),
        extent_scale=(scale[0], scale[1]),
        box_weight=op.box_weight.get(name, 1.0),
        support_power=op.support_power.get(name, 0.0),
        view_fusion=op.view_fusion.get(name, "mean"),
    )
