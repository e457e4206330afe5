"""The lesion model (S300's "trained fully convolutional encoder–decoder") and its manifest.

``load_model`` reads ``<model_dir>/manifest.json`` (contract in docs/architecture.md), checks
the ONNX file's sha256 and the graph's input/output names and shapes against it, opens one
onnxruntime session with the configured intra-op threads and runs it once on a blank image
to prove the output shape. Anything missing or mismatched is a ``ModelError`` at start-up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pipeline.errors import ModelError
from pipeline.result import FindingGroup, FindingType

FloatArray = npt.NDArray[np.float32]

MANIFEST = "manifest.json"
MAX_SUPPORT_POWER = 4.0
MAX_ZOOM_SCALES = 4
MIN_ZOOM, MAX_ZOOM = 0.5, 2.0
VIEW_FUSIONS = ("mean", "max")


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


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ModelError(f"manifest: missing {where}{key}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelError(f"manifest: {where}{key} has the wrong type ({type(value).__name__})")
    return value


def _probability(value: object, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise ModelError(f"manifest: operating_point.{key} must be in (0, 1)")
    return float(value)


def _extent_scale(raw: object, name: str) -> tuple[float, float]:
    where = f"manifest: operating_point.extent_scale.{name}"
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise ModelError(f"{where} must be [width factor, height factor]")
    try:
        width, height = float(raw[0]), float(raw[1])
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where} must hold two numbers") from exc
    if not (0.5 <= width <= 2.0 and 0.5 <= height <= 2.0):
        raise ModelError(f"{where} factors must lie in [0.5, 2], got {raw}")
    return (width, height)


def _channel(
    i: int,
    raw: object,
    thresholds: dict[str, Any],
    alert_thresholds: dict[str, Any],
    extent_scales: dict[str, Any],
    box_weights: dict[str, Any],
    support_powers: dict[str, Any],
    view_fusions: dict[str, Any],
) -> Channel:
    if not isinstance(raw, dict):
        raise ModelError(f"manifest: channels[{i}] must be an object")
    name = _get(raw, "name", str, f"channels[{i}].")
    kind = _get(raw, "kind", str, f"channels[{i}].")
    if kind != "finding":
        return Channel(index=i, name=name, kind=kind)
    try:
        group = FindingGroup(_get(raw, "group", str, f"channels[{i}]."))
        finding_type = FindingType(_get(raw, "finding_type", str, f"channels[{i}]."))
    except ValueError as exc:
        raise ModelError(f"manifest: channels[{i}]: {exc}") from exc
    threshold = _probability(thresholds.get(name, 0.5), f"thresholds.{name}")
    alert_threshold = None
    if name in alert_thresholds:
        alert_threshold = _probability(alert_thresholds[name], f"alert_thresholds.{name}")
    extent_scale = (1.0, 1.0)
    if name in extent_scales:
        extent_scale = _extent_scale(extent_scales[name], name)
    box_weight = box_weights.get(name, 1.0)
    if not isinstance(box_weight, int | float) or isinstance(box_weight, bool):
        raise ModelError(f"manifest: operating_point.box_weight.{name} must be a number")
    if not 0.0 <= box_weight <= 1.0:
        raise ModelError(f"manifest: operating_point.box_weight.{name} must lie in [0, 1]")
    support_power = support_powers.get(name, 0.0)
    if not isinstance(support_power, int | float) or isinstance(support_power, bool):
        raise ModelError(f"manifest: operating_point.support_power.{name} must be a number")
    if not 0.0 <= support_power <= MAX_SUPPORT_POWER:
        raise ModelError(
            f"manifest: operating_point.support_power.{name} must lie in [0, {MAX_SUPPORT_POWER}]"
        )
    view_fusion = view_fusions.get(name, "mean")
    if view_fusion not in VIEW_FUSIONS:
        raise ModelError(
            f"manifest: operating_point.view_fusion.{name} must be one of {VIEW_FUSIONS}"
        )
    return Channel(
        index=i,
        name=name,
        kind=kind,
        group=group,
        finding_type=finding_type,
        threshold=threshold,
        alert_threshold=alert_threshold,
        extent_scale=extent_scale,
        box_weight=float(box_weight),
        support_power=float(support_power),
        view_fusion=view_fusion,
    )


def _op_section(op: object, key: str) -> dict[str, Any]:
    """``operating_point.<key>``, an object of values per channel name ({} when absent)."""
    section = op.get(key, {}) if isinstance(op, dict) else {}
    if not isinstance(section, dict):
        raise ModelError(f"manifest: operating_point.{key} must be an object")
    return section


def _zoom_scales(op: object) -> tuple[float, ...]:
    raw = op.get("zoom_scales", []) if isinstance(op, dict) else []
    where = "manifest: operating_point.zoom_scales"
    if not isinstance(raw, list) or len(raw) > MAX_ZOOM_SCALES:
        raise ModelError(f"{where} must be a list of at most {MAX_ZOOM_SCALES} numbers")
    for value in raw:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ModelError(f"{where} must hold numbers, got {value!r}")
        if not MIN_ZOOM <= value <= MAX_ZOOM or value == 1.0:
            raise ModelError(
                f"{where}: each scale must lie in [{MIN_ZOOM}, {MAX_ZOOM}] and not be 1, "
                f"got {value}"
            )
    return tuple(float(v) for v in raw)


def parse_manifest(raw: dict[str, Any]) -> Manifest:
    """Validate the manifest's structure (not yet the ONNX file) and build a ``Manifest``."""
    inp = _get(raw, "input", dict, "")
    out = _get(raw, "output", dict, "")
    window = _get(inp, "window", dict, "input.")
    op = raw.get("operating_point", {})
    per_channel = [
        _op_section(op, key)
        for key in (
            "thresholds",
            "alert_thresholds",
            "extent_scale",
            "box_weight",
            "support_power",
            "view_fusion",
        )
    ]
    channels = tuple(
        _channel(i, c, *per_channel) for i, c in enumerate(_get(raw, "channels", list, ""))
    )
    if not any(c.kind == "finding" for c in channels):
        raise ModelError("manifest: no channel of kind 'finding'")
    low = float(_get(window, "low_percentile", (int, float), "input.window."))
    high = float(_get(window, "high_percentile", (int, float), "input.window."))
    if not 0.0 <= low < high <= 100.0:
        raise ModelError("manifest: input.window percentiles must satisfy 0 ≤ low < high ≤ 100")
    height = _get(inp, "height", int, "input.")
    width = _get(inp, "width", int, "input.")
    if height < 16 or width < 16:
        raise ModelError("manifest: input height and width must be at least 16")
    alert = op.get("alert_grade") if isinstance(op, dict) else None
    box_output = raw.get("box_output")
    if box_output is not None and not isinstance(box_output, dict):
        raise ModelError("manifest: box_output must be an object")
    box_output_name = box_file = box_sha256 = None
    box_channels: tuple[str, ...] = ()
    if box_output is not None:
        box_output_name = _get(box_output, "name", str, "box_output.")
        if "file" in box_output:
            box_file = _get(box_output, "file", str, "box_output.")
            box_sha256 = _get(box_output, "sha256", str, "box_output.").lower()
        if "channels" in box_output:
            box_channels = tuple(_get(box_output, "channels", list, "box_output."))
            findings = tuple(c.name for c in channels if c.kind == "finding")
            if box_channels != findings:
                raise ModelError(
                    f"manifest: box_output.channels {list(box_channels)} must name the finding "
                    f"channels in order, {list(findings)}"
                )
    return Manifest(
        name=_get(raw, "name", str, ""),
        version=_get(raw, "version", str, ""),
        file=_get(raw, "file", str, ""),
        sha256=_get(raw, "sha256", str, "").lower(),
        input_name=_get(inp, "name", str, "input."),
        height=height,
        width=width,
        low_percentile=low,
        high_percentile=high,
        output_name=_get(out, "name", str, "output."),
        channels=channels,
        alert_grade=alert if isinstance(alert, int) else None,
        box_output_name=box_output_name,
        box_file=box_file,
        box_sha256=box_sha256,
        box_channels=box_channels,
        zoom_scales=_zoom_scales(op),
        raw=raw,
    )


class LesionModel:
    """A loaded, verified model: ``predict`` maps (N, H, W) [0, 1] images to (N, C, H, W)."""

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        box_session: ort.InferenceSession | None = None,
    ) -> None:
        self.manifest = manifest
        self._session = session
        self._box_session = box_session
        batch = session.get_inputs()[0].shape[0]
        self._max_batch = batch if isinstance(batch, int) else None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def predict(self, images: FloatArray) -> FloatArray:
        """Run the model on a batch of working-size images (N, H, W) in [0, 1]: the
        probabilities (N, C, H, W)."""
        return self.predict_with_boxes(images, boxes=False)[0]

    def predict_with_boxes(
        self, images: FloatArray, *, boxes: bool = True
    ) -> tuple[FloatArray, FloatArray | None]:
        """The probabilities (N, C, H, W) and, when the model has a box head and ``boxes`` is
        set, its box distances (N, 4·K, H, W: ``Manifest.box_planes``); else None."""
        if images.ndim != 3 or images.shape[1:] != self.manifest.working_shape:
            raise ModelError(
                f"model input must be (N, {self.manifest.height}, {self.manifest.width}), "
                f"got {images.shape}"
            )
        names = [self.manifest.output_name]
        session = self._session
        if boxes and self.manifest.box_output_name is not None:
            names.append(self.manifest.box_output_name)
            session = self._box_session or self._session
        step = self._max_batch or images.shape[0]
        parts = [
            self._run(session, images[i : i + step], names) for i in range(0, images.shape[0], step)
        ]
        outs = [np.concatenate([p[k] for p in parts], axis=0) for k in range(len(names))]
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def _run(
        self, session: ort.InferenceSession, batch: FloatArray, names: list[str]
    ) -> list[FloatArray]:
        feed = {self.manifest.input_name: np.ascontiguousarray(batch[:, None], dtype=np.float32)}
        return [np.asarray(o, dtype=np.float32) for o in session.run(names, feed)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_dims(what: str, dims: list[Any], expected: list[int | None]) -> None:
    if len(dims) != len(expected):
        raise ModelError(f"model {what} has rank {len(dims)}, expected {len(expected)}")
    for got, want in zip(dims, expected, strict=True):
        if want is not None and isinstance(got, int) and got != want:
            raise ModelError(f"model {what} shape {dims} does not match the manifest {expected}")


def _open_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped exception classes
        raise ModelError(f"cannot load {path}: {exc}") from exc


def _verified_session(
    model_dir: Path, file: str, sha256: str, threads: int
) -> ort.InferenceSession:
    path = model_dir / file
    if not path.is_file():
        raise ModelError(f"the model file {path} named by the manifest does not exist")
    if _sha256(path) != sha256:
        raise ModelError(f"{path} does not match the manifest's sha256")
    return _open_session(path, threads)


def _check_io(session: ort.InferenceSession, manifest: Manifest, outputs: list[str]) -> None:
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [manifest.input_name]:
        raise ModelError(f"model inputs {[i.name for i in inputs]} ≠ [{manifest.input_name!r}]")
    for name in outputs:
        if name not in [o.name for o in session.get_outputs()]:
            raise ModelError(f"model has no output named {name!r}")
    _check_dims("input", list(inputs[0].shape), [None, 1, manifest.height, manifest.width])


def load_model(model_dir: Path, *, threads: int = 2) -> LesionModel:
    """Load and verify the model described by ``<model_dir>/manifest.json``."""
    manifest_path = model_dir / MANIFEST
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"no model manifest at {manifest_path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{manifest_path} must hold a JSON object")
    manifest = parse_manifest(raw)
    session = _verified_session(model_dir, manifest.file, manifest.sha256, threads)
    wanted = [manifest.output_name]
    box_session = None
    if manifest.box_output_name is not None:
        if manifest.box_file is None:
            wanted.append(manifest.box_output_name)
        else:
            assert manifest.box_sha256 is not None
            box_session = _verified_session(
                model_dir, manifest.box_file, manifest.box_sha256, threads
            )
            _check_io(box_session, manifest, [manifest.output_name, manifest.box_output_name])
    _check_io(session, manifest, wanted)
    model = LesionModel(manifest, session, box_session)
    blank = np.zeros((1, *manifest.working_shape), dtype=np.float32)
    expected = (1, len(manifest.channels), manifest.height, manifest.width)
    probes = [model.predict(blank)]
    with_boxes, box_probe = model.predict_with_boxes(blank)
    probes.append(with_boxes)
    for probe in probes:
        if probe.shape != expected:
            raise ModelError(f"model output shape {probe.shape} ≠ {expected} from the manifest")
    box_expected = (1, manifest.box_planes, manifest.height, manifest.width)
    if box_probe is not None and box_probe.shape != box_expected:
        raise ModelError(f"model box output shape {box_probe.shape} ≠ {box_expected}")
    return model
