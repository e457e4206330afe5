"""The real pipeline's findings on RG1_UNCI.dcm encoded into SEG, SR and GSPS that dciodvfy
accepts and that say what the pipeline said."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.analysis import Analyser
from node.config import default_config
from node.encode import ObjectKind, ResultUIDs, encode_results
from node.results import producer_for
from tests.results.helpers import RG1, dciodvfy

MODELS = Path(__file__).resolve().parents[2] / "models" / "manifest.json"


def test_real_pipeline_output_encodes_into_valid_objects(tmp_path: Path) -> None:
    """analyse_file → encode_results: zero dciodvfy errors, one segment and one SR group
    per finding, SEG masks equal to the findings' masks."""
    if not RG1.is_file():
        pytest.skip(f"shared test data absent: {RG1}")
    if not MODELS.is_file():
        pytest.skip("no trained model in models/")
    config = default_config()
    source, result = Analyser(config.pipeline).analyse_file(RG1)
    objects = encode_results(
        source=source, result=result, uids=ResultUIDs.new(), producer=producer_for(config, result)
    )
    kinds = [o.kind for o in objects]
    assert kinds == (
        [ObjectKind.SEG, ObjectKind.SR, ObjectKind.PR] if result.findings else [ObjectKind.SR]
    )
    for obj in objects:
        path = tmp_path / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(path)
        assert errors == [], obj.kind
    by_kind = {o.kind: o.dataset for o in objects}
    measurements = next(
        item
        for item in by_kind[ObjectKind.SR].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    groups = measurements.ContentSequence
    assert len(groups) == max(1, len(result.findings))
    if result.findings:
        seg = by_kind[ObjectKind.SEG]
        assert len(seg.SegmentSequence) == len(result.findings)
        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        for frame, finding in zip(frames, result.findings, strict=True):
            assert np.array_equal(frame.astype(bool), finding.mask)
