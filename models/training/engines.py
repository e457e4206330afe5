"""The engines that run a model folder on an image, for ``evaluate`` and ``compare``.

An engine takes a grey image (uint8, input pixels) and returns what the product would report:
findings (group, box in input pixels, probability, alert, mask) and the lung mask.

- ``pipeline_engine``: the real pipeline (``pipeline.analyse.analyse``) with the model;
- ``NetworkEngine``: the ONNX model alone with connected components (the reference the
  pipeline must not fall below);
- ``model_dir_with_thresholds``: a copy of a model folder with every finding threshold at the
  sweep value and, for the fits, one part of its operating point changed; ``sweep_findings``
  runs the pipeline with such a copy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.training import metrics as M
from models.training.dataset import Record, load_grey
from models.training.ensemble import reweight
from models.training.preprocess import prepare
from pipeline.itk import connected_components


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    group: str
    box: M.Box
    probability: float
    alert: bool | None
    mask: npt.NDArray[np.bool_] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Analysed:
    findings: tuple[Found, ...]
    lung: npt.NDArray[np.bool_] | None


Engine = Callable[[npt.NDArray[np.uint8]], Analysed]
EnsembleChoice = tuple[tuple[str, tuple[float, ...]], ...]
"""An ensemble's weights as (output name, one weight per member) pairs."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """What one ``evaluate`` command runs: the data and its split, the model folder, and the
    engine with its settings."""

    data_dir: Path
    split: str
    model_dir: Path
    engine: str  # "pipeline" or "network"
    config: Path | None  # the node configuration whose [pipeline] section is used
    sweep_threshold: float
    relative: float  # network engine: each component cut to this share of its peak


class ManifestChanges(TypedDict, total=False):
    """What ``model_dir_with_thresholds`` changes besides the thresholds."""

    extent_scale: bool
    box_weight: float | None
    support_power: float | None
    zoom_scales: Sequence[float] | None
    view_fusion: str | None
    ensemble_weights: EnsembleChoice | None


def as_box(values: Sequence[float]) -> M.Box:
    """Four numbers (x0, y0, x1, y1) as a box of floats."""
    x0, y0, x1, y1 = (float(v) for v in values)
    return (x0, y0, x1, y1)


def upsample(mask: npt.NDArray[np.bool_], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """A mask at another size, nearest neighbour at the pixel centres."""
    ri = np.minimum(
        ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int), mask.shape[0] - 1
    )
    ci = np.minimum(
        ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int), mask.shape[1] - 1
    )
    return mask[np.ix_(ri, ci)]


def _components(
    prob: npt.NDArray[np.float32], threshold: float, relative: float
) -> list[tuple[npt.NDArray[np.bool_], float]]:
    """Connected components of prob ≥ threshold, each cut to ≥ relative × its peak."""
    labels, _ = connected_components(prob >= threshold, full=True)
    out = []
    for k in range(1, int(labels.max()) + 1):
        region = labels == k
        peak = float(prob[region].max())
        if relative > 0:
            region &= prob >= relative * peak
        out.append((region, peak))
    return out


class NetworkEngine:
    """The ONNX model alone: S200 preprocessing, components per finding channel."""

    def __init__(self, model_dir: Path, thresholds: dict[str, float], relative: float) -> None:
        self.manifest: dict[str, Any] = json.loads((model_dir / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            str(model_dir / self.manifest["file"]), options, providers=["CPUExecutionProvider"]
        )
        self.thresholds = thresholds
        self.relative = relative
        self.size: tuple[int, int] = (
            self.manifest["input"]["height"],
            self.manifest["input"]["width"],
        )

    def probabilities(self, grey: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        x = prepare(grey, *self.size)[None, None]
        out: npt.NDArray[np.float32] = self.session.run(["probabilities"], {"image": x})[0][0]
        return out

    def __call__(self, grey: npt.NDArray[np.uint8]) -> Analysed:
        probs = self.probabilities(grey)
        h, w = grey.shape
        sy, sx = h / self.size[0], w / self.size[1]
        found = []
        lung = None
        for c, spec in enumerate(self.manifest["channels"]):
            if spec["kind"] == "lung":
                lung = upsample(probs[c] >= 0.5, (h, w))
                continue
            for region, peak in _components(probs[c], self.thresholds[spec["name"]], self.relative):
                ys, xs = np.nonzero(region)
                box = (xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy)
                found.append(
                    Found(group=spec["group"], box=box, probability=peak, alert=None, mask=region)
                )
        return Analysed(findings=tuple(found), lung=lung)


def pipeline_engine(model_dir: Path, config_path: Path | None = None) -> Engine:
    """The real pipeline (``pipeline.analyse.analyse``, S100–S742) with the model in
    ``model_dir`` and the ``[pipeline]`` section of the node configuration ``config_path``
    (validated by ``node.config.load_config``; None: the embedded defaults)."""
    import logging

    import structlog

    from node.config import load_config
    from pipeline.analyse import analyse
    from pipeline.config import PipelineConfig
    from pipeline.model import load_model
    from pipeline.result import SourceImage

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    base = PipelineConfig() if config_path is None else load_config(config_path).pipeline
    config = dataclasses.replace(base, model_dir=model_dir)
    model = load_model(model_dir, threads=2)

    def run(grey: npt.NDArray[np.uint8]) -> Analysed:
        result = analyse(SourceImage(pixels=grey), model, config)
        found = tuple(
            Found(
                group=str(f.finding_type.group),
                box=as_box(f.box),
                probability=float(f.probability),
                alert=bool(f.alert),
                mask=f.mask,
            )
            for f in result.findings
        )
        lung = None if result.lung_mask is None else np.asarray(result.lung_mask, dtype=bool)
        return Analysed(findings=found, lung=lung)

    return run


def model_dir_with_thresholds(
    model_dir: Path, value: float, tmp: Path, **changes: Unpack[ManifestChanges]
) -> Path:
    """A copy of the model folder whose manifest has every finding threshold set to value
    (with ``extent_scale=False``, no fitted extent: the regions as found; with
    ``box_weight``, that weight of the box head for every finding channel; with
    ``support_power``, that power of the support for every finding channel; with
    ``zoom_scales``, those S300 zoom scales; with ``view_fusion``, that S300 view fusion
    for every finding channel; with ``ensemble_weights``, an ensemble's graph with those
    weights, ``models.training.ensemble.reweight``)."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    op = manifest["operating_point"]
    for name in op["thresholds"]:
        op["thresholds"][name] = value
    if not changes.get("extent_scale", True):
        op.pop("extent_scale", None)
    for key in ("box_weight", "support_power"):
        if (per_channel := changes.get(key)) is not None:
            op[key] = dict.fromkeys(op["thresholds"], per_channel)
    if (zoom_scales := changes.get("zoom_scales")) is not None:
        op["zoom_scales"] = list(zoom_scales)
    if (view_fusion := changes.get("view_fusion")) is not None:
        op["view_fusion"] = dict.fromkeys(op["thresholds"], view_fusion)
    for file in (manifest["file"], manifest.get("box_output", {}).get("file")):
        if file is not None:
            shutil.copy(model_dir / file, tmp / file)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if (ensemble_weights := changes.get("ensemble_weights")) is not None:
        reweight(tmp, dict(ensemble_weights))
    return tmp


def sweep_findings(
    model_dir: Path,
    records: Sequence[Record],
    data_dir: Path,
    threshold: float,
    config: Path | None = None,
    **changes: Unpack[ManifestChanges],
) -> list[Analysed]:
    """The pipeline's findings on ``records`` with every finding threshold at ``threshold``
    and the manifest changed as ``model_dir_with_thresholds`` does with ``changes``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_dir_with_thresholds(model_dir, threshold, Path(tmp), **changes)
        engine = pipeline_engine(folder, config)
        return [engine(image_of(data_dir, r)) for r in records]


def run_sweep(
    ev: Evaluation, records: Sequence[Record], **changes: Unpack[ManifestChanges]
) -> list[Analysed]:
    """``sweep_findings`` with the command's model, data, sweep threshold and config."""
    return sweep_findings(
        ev.model_dir, records, ev.data_dir, ev.sweep_threshold, ev.config, **changes
    )


def engine_for(ev: Evaluation, sweep_dir: Path | None) -> Engine:
    """The chosen engine at the manifest's operating point or, with ``sweep_dir`` (an empty
    folder for the pipeline's copy of the model), with every finding threshold at the sweep
    value."""
    if ev.engine == "network":
        manifest = json.loads((ev.model_dir / "manifest.json").read_text())
        thresholds = manifest["operating_point"]["thresholds"]
        if sweep_dir is not None:
            thresholds = dict.fromkeys(thresholds, ev.sweep_threshold)
        return NetworkEngine(ev.model_dir, thresholds, ev.relative)
    if sweep_dir is None:
        return pipeline_engine(ev.model_dir, ev.config)
    folder = model_dir_with_thresholds(ev.model_dir, ev.sweep_threshold, sweep_dir)
    return pipeline_engine(folder, ev.config)


def image_of(data_dir: Path, record: Record) -> npt.NDArray[np.uint8]:
    """A record's grey image in a ``cxr-lesions`` folder."""
    return load_grey(data_dir / "images" / f"{record.id}.png")
