"""The lab reads the shipped file back: ``train_boxes``'s default trunk is the shipped U-Net.

This knows the architecture (the in-house U-Net of ``models/training/net.py``); the product's
contract with whatever model ships is ``test_shipped_model.py``. A shipped model that is not
the lab's U-Net skips this, since the lab then has nothing of it to read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.training.dataset import Record, read_records, split_by_patient
from models.training.shared_data import CXR_LESIONS
from tests.model.test_shipped_model import LESION_IMAGE

pytestmark = pytest.mark.training

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_the_contract_tests_lesion_image_is_a_validation_image_chosen_by_its_rule() -> None:
    """``LESION_IMAGE`` is, of the validation split's TBX11K images, the one with the largest
    lesion box: never a test-split image, never one picked by what a model finds on it."""
    if not (CXR_LESIONS / "annotations.jsonl").exists():
        pytest.skip(f"shared data not present at {CXR_LESIONS}")
    val = [r for r in split_by_patient(read_records(CXR_LESIONS))["val"] if r.source == "tbx11k"]

    def largest(r: Record) -> float:
        return max((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in r.findings)

    assert max((r for r in val if r.findings), key=largest).id == LESION_IMAGE


def test_the_shipped_unet_reads_back_as_the_default_trunk() -> None:
    """``train_boxes``'s default ``--trunk`` is the shipped file; its U-Net read back into
    PyTorch (of an ensemble, the first member's) gives the shipped probabilities of every
    channel whose ensemble weight is all on that member (all channels for a single model)."""
    torch = pytest.importorskip("torch")
    from models.training.export import unet_from_onnx
    from models.training.net import Exported
    from models.training.trunk import shipped_file

    m = json.loads((MODELS / "manifest.json").read_text())
    assert shipped_file() == MODELS / str(m["file"])
    try:
        unet = unet_from_onnx(shipped_file())
    except (KeyError, ValueError) as exc:
        pytest.skip(f"the shipped model is not the lab's U-Net: {exc}")
    weights = m.get("ensemble", {}).get("weights", {})
    names = [c["name"] for c in m["channels"]]
    own = [i for i, n in enumerate(names) if not weights or weights[n][0] == 1.0]
    assert own, "no channel is the first member's alone"
    size = m["input"]
    batch = np.random.default_rng(1).random((1, 1, size["height"], size["width"]), np.float32)
    shipped = ort.InferenceSession(str(shipped_file()), providers=["CPUExecutionProvider"])
    want = shipped.run(["probabilities"], {"image": batch})[0]
    with torch.no_grad():
        got = Exported(unet).eval()(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got[:, own], want[:, own], atol=1e-4)
