"""The shipped model meets its manifest's contract, whatever network is inside the ONNX file.

The product reads ``models/manifest.json`` with ``pipeline.model``; these tests hold the
shipped file to that contract (digest, inputs, outputs, channels, operating point) and run
one real radiograph through the product's own ``pipeline.analyse``. Nothing here knows the
network's architecture, so any ONNX model that meets the manifest can ship; the lab's own
reading of the shipped U-Net is tested in ``test_lab_reads_shipped.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk

from models.training.shared_data import CXR_LESIONS
from pipeline.analyse import analyse
from pipeline.config import PipelineConfig
from pipeline.manifest import parse_manifest
from pipeline.model import load_model
from pipeline.result import FindingGroup, FindingType, SourceImage

MODELS = Path(__file__).resolve().parents[2] / "models"
# A TBX11K image of the validation split (tests/model/test_dataset.py checks that it is):
# of that split's TBX11K images, the one with the largest lesion box. Chosen by that rule,
# not by what any model finds on it.
LESION_IMAGE = "tbx-tb0200"


def _raw_manifest() -> dict[str, object]:
    return json.loads((MODELS / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_the_manifest_is_valid_and_names_the_file_by_its_digest() -> None:
    raw = _raw_manifest()
    manifest = parse_manifest(raw)  # the product's own validation
    path = MODELS / manifest.file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.sha256
    assert path.stat().st_size < 20 * 1024 * 1024
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert manifest.lung_channel is not None
    for channel in manifest.finding_channels:
        assert FindingType(channel.finding_type).group is FindingGroup(channel.group)
    thresholds = raw["operating_point"]["thresholds"]  # type: ignore[index]
    assert {c.name for c in manifest.finding_channels} == set(thresholds)
    assert all(0.0 < float(t) < 1.0 for t in thresholds.values())


def test_the_model_answers_in_the_declared_shapes() -> None:
    """``load_model`` checks the graph's inputs and outputs against the manifest; the
    probabilities come back (N, channels, H, W) in [0, 1], the boxes in their declared planes."""
    model = load_model(MODELS)
    manifest = model.manifest
    batch = np.random.default_rng(0).random((2, *manifest.working_shape)).astype(np.float32)
    probs, boxes = model.predict_with_boxes(batch)
    assert probs.shape == (2, len(manifest.channels), *manifest.working_shape)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    if manifest.box_output_name is None:
        assert boxes is None
    else:
        assert boxes is not None and boxes.shape == (
            2,
            manifest.box_planes,
            *manifest.working_shape,
        )


def test_it_finds_the_lesion_in_a_real_validation_image() -> None:
    """Through the product's pipeline at the shipped operating point, a shadow finding
    overlaps the annotated tuberculosis box (IoU ≥ 0.3)."""
    annotations = CXR_LESIONS / "annotations.jsonl"
    if not annotations.exists():
        pytest.skip(f"shared data not present at {CXR_LESIONS}")
    record = next(
        r for r in map(json.loads, annotations.read_text().splitlines()) if r["id"] == LESION_IMAGE
    )
    pixels = sitk.GetArrayFromImage(
        sitk.ReadImage(str(CXR_LESIONS / "images" / f"{LESION_IMAGE}.png"))
    )
    result = analyse(SourceImage(pixels=pixels), load_model(MODELS), PipelineConfig())
    shadows = [f for f in result.findings if f.group is FindingGroup.SHADOW]
    assert shadows, "no shadow finding on a validation image with tuberculosis"
    best = max(_iou(f.box, lesion["box"]) for f in shadows for lesion in record["findings"])
    assert best >= 0.3, f"best IoU {best:.2f}"


def _iou(a: tuple[float, ...], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
