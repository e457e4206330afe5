"""The whole method, S100 → S742, as one call: ``analyse(image, model, config)``.

Each step is a pure function in its own module; this module only strings them together in
the method's order and times each step (``AnalysisResult.timings_ms``, milliseconds, keys
named after the steps, plus ``total``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import structlog

from pipeline.attention import attend
from pipeline.boxes import BoxEvidence
from pipeline.config import PipelineConfig
from pipeline.contours import contour_marks
from pipeline.enhancement import enhance, fuse
from pipeline.evidence import initial_marks, pool_evidence
from pipeline.grey import to_grey
from pipeline.lung import lung_field
from pipeline.model import LesionModel
from pipeline.recognition import make_finding, rescore, select, suppress_coinciding
from pipeline.result import AnalysisResult, Finding, SourceImage
from pipeline.traversal import traverse
from pipeline.watershed import segment_regions
from pipeline.window import Preprocessed, preprocess, resize, resize_nearest

log = structlog.get_logger(__name__)


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round((time.perf_counter() - start) * 1000.0, 2)


def working_spacing(pre: Preprocessed, config: PipelineConfig) -> tuple[float, float]:
    """The working grid's spacing in mm, estimated from the nominal field width if unknown."""
    known = pre.working_spacing_mm
    if known is not None:
        return known
    mm = config.grading.fallback_field_width_mm / pre.input_shape[1]
    sr, sc = pre.scale
    return (mm * sr, mm * sc)


def analyse(image: SourceImage, model: LesionModel, config: PipelineConfig) -> AnalysisResult:
    """Run S100–S742 on one image and return its graded findings (input pixel grid)."""
    t = _Timer()
    start = time.perf_counter()
    m = model.manifest
    finding_channels = m.finding_channels
    with t.step("s100_grey"):
        grey = to_grey(image, config.grey)
    with t.step("s200_window"):
        pre = preprocess(
            grey,
            working_shape=m.working_shape,
            low_percentile=m.low_percentile,
            high_percentile=m.high_percentile,
            use_voi=config.window.use_voi_window,
        )
        del grey
    with t.step("s311_watershed"):
        regions = segment_regions(pre.working, config.watershed)
    with t.step("s300_model"):
        probabilities, distances = traverse(pre, model)
        boxes = (
            None
            if distances is None
            else BoxEvidence(
                distances=distances,
                probabilities=probabilities,
                channels=m.box_channel_indices,
            )
        )
    with t.step("s300_marks"):
        evidence = pool_evidence(probabilities, regions, config.candidates.region_weight)
        marks = initial_marks(evidence, finding_channels, config.candidates)
        lung = m.lung_channel
        lungs = lung_field(
            probabilities[lung.index] if lung else None, config.recognition, pre.working_shape
        )
    with t.step("s331_attention"):
        marks = attend(marks, pre, model, config.attention)
    with t.step("s400_contours"):
        contours = contour_marks(
            pre.working,
            lungs.allowed if lungs.found else None,
            working_spacing(pre, config),
            config.contour,
        )
    with t.step("s500_enhancement"):
        fused = fuse(marks, contours, evidence, finding_channels, config.enhancement)
        enhanced, fused = enhance(fused, pre, config.enhancement)
    with t.step("s600_recognition"):
        again = None
        if config.recognition.rescore_enhanced and fused:
            again = model.predict(resize(enhanced, pre.working_shape)[None])[0]
        recognised = select(fused, rescore(fused, again, probabilities), lungs, config)
    with t.step("s700_findings"):
        findings: list[Finding] = [
            f for r in recognised if (f := make_finding(r, pre, lungs, config, boxes)) is not None
        ]
        findings = suppress_coinciding(findings)
        lung_mask = (
            np.asarray(resize_nearest(lungs.mask, pre.input_shape), dtype=bool)
            if lungs.found
            else None
        )
    t.ms["total"] = round((time.perf_counter() - start) * 1000.0, 2)
    log.debug(
        "image_analysed",
        findings=len(findings),
        marks=len(marks),
        contours=len(contours),
        regions=regions.count,
        timings_ms=t.ms,
    )
    return AnalysisResult(
        findings=tuple(findings),
        shape=pre.input_shape,
        spacing_mm=image.spacing_mm,
        model_name=m.name,
        model_version=m.version,
        timings_ms=t.ms,
        enhanced_image=enhanced,
        lung_mask=lung_mask,
        lung_fields=lungs.fields if lung else None,
    )
