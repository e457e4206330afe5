"""The shipped ONNX model loads, matches its manifest and finds a lesion in a real image."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.result import FindingGroup, FindingType

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
DATA = REPO / ".." / "shared" / "data" / "cxr-lesions"
# A validation-split TBX11K image (patient not seen in training) with one large lesion box.
LESION_IMAGE = "tbx-tb0309"


def _manifest() -> dict[str, object]:
    return json.loads((MODELS / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_manifest_matches_the_onnx_file() -> None:
    """sha256, size limit, opset, input/output names and shapes, channels are as declared."""
    m = _manifest()
    path = MODELS / str(m["file"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == m["sha256"]
    assert path.stat().st_size < 20 * 1024 * 1024
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    size = m["input"]  # type: ignore[index]
    assert inp.name == size["name"] == "image" and out.name == "probabilities"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, size["height"], size["width"]]
    channels = m["channels"]  # type: ignore[index]
    batch = np.random.default_rng(0).random((2, 1, size["height"], size["width"]), np.float32)
    probs = session.run(["probabilities"], {"image": batch})[0]
    assert probs.shape == (2, len(channels), size["height"], size["width"])
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    kinds = [c["kind"] for c in channels]
    assert "lung" in kinds
    for c in channels:
        if c["kind"] == "finding":
            assert FindingType(c["finding_type"]).group is FindingGroup(c["group"])
            assert c["name"] in m["operating_point"]["thresholds"]  # type: ignore[index]


def test_finds_the_lesion_in_a_real_validation_image() -> None:
    """At the shipped operating point a shadow finding overlaps the annotated box (IoU ≥ 0.3)."""
    if not (DATA / "annotations.jsonl").exists():
        pytest.skip(f"shared data not present at {DATA}")
    from models.training.dataset import load_grey, read_records
    from models.training.evaluate import NetworkEngine
    from models.training.metrics import iou

    record = next(r for r in read_records(DATA) if r.id == LESION_IMAGE)
    thresholds = _manifest()["operating_point"]["thresholds"]  # type: ignore[index]
    engine = NetworkEngine(MODELS, thresholds, relative=0.5)
    result = engine(load_grey(DATA / "images" / f"{record.id}.png"))
    shadows = [f for f in result.findings if f.group == "shadow"]
    assert shadows, "no shadow finding on a validation image with tuberculosis"
    best = max(iou(f.box, lesion.box) for f in shadows for lesion in record.findings)
    assert best >= 0.3, f"best IoU {best:.2f}"


def test_the_shipped_unet_reads_back_as_the_default_trunk() -> None:
    """``train_boxes``'s default ``--trunk`` is the shipped file; its U-Net read back into
    PyTorch (of an ensemble, the first member's) gives the shipped probabilities of every
    channel whose ensemble weight is all on that member (all channels for a single model)."""
    torch = pytest.importorskip("torch")
    from models.training.export import unet_from_onnx
    from models.training.net import Exported
    from models.training.train_boxes import shipped_file

    m = _manifest()
    assert shipped_file() == MODELS / str(m["file"])
    weights = m.get("ensemble", {}).get("weights", {})  # type: ignore[union-attr]
    names = [c["name"] for c in m["channels"]]  # type: ignore[index]
    own = [i for i, n in enumerate(names) if not weights or weights[n][0] == 1.0]
    assert own, "no channel is the first member's alone"
    size = m["input"]  # type: ignore[index]
    batch = np.random.default_rng(1).random((1, 1, size["height"], size["width"]), np.float32)
    shipped = ort.InferenceSession(str(shipped_file()), providers=["CPUExecutionProvider"])
    want = shipped.run(["probabilities"], {"image": batch})[0]
    with torch.no_grad():
        got = Exported(unet_from_onnx(shipped_file())).eval()(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got[:, own], want[:, own], atol=1e-4)
