"""The model loader: manifest, sha256 and shape checks through onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ModelError
from pipeline.model import load_model
from tests.pipeline.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


def test_tiny_model_loads_and_predicts(tmp_path: Path) -> None:
    """A real ONNX file through the real loader gives (N, C, H, W) probabilities."""
    model = load_model(build_tiny_model(tmp_path, size=64), threads=1)
    out = model.predict(np.zeros((2, 64, 64), dtype=np.float32))
    assert out.shape == (2, 3, 64, 64)
    assert ((out >= 0) & (out <= 1)).all()
    assert [c.name for c in model.manifest.finding_channels] == ["spot", "shadow"]
    assert model.manifest.lung_channel is not None


def test_missing_manifest_is_a_model_error(tmp_path: Path) -> None:
    """No manifest → ModelError naming the path."""
    with pytest.raises(ModelError, match="manifest"):
        load_model(tmp_path)


def test_wrong_sha256_is_a_model_error(tmp_path: Path) -> None:
    """A model file that does not match the manifest's digest is refused."""
    folder = build_tiny_model(tmp_path, size=64)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="sha256"):
        load_model(folder)


def test_size_mismatch_is_a_model_error(tmp_path: Path) -> None:
    """A manifest whose input size differs from the graph's is refused at load."""
    folder = build_tiny_model(tmp_path, size=64)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["input"]["height"] = 96
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="shape"):
        load_model(folder)


def test_channel_count_mismatch_is_a_model_error(tmp_path: Path) -> None:
    """A manifest listing a different number of channels than the output has is refused."""
    folder = build_tiny_model(
        tmp_path,
        size=64,
        channels_spec=[
            {"name": "spot", "kind": "finding", "group": "spot", "finding_type": "nodule"}
        ],
    )
    with pytest.raises(ModelError, match="output shape"):
        load_model(folder)


def test_unknown_finding_type_is_a_model_error(tmp_path: Path) -> None:
    """A channel naming a finding type the pipeline does not know is refused."""
    spec = [
        {"name": "spot", "kind": "finding", "group": "spot", "finding_type": "wart"},
        {"name": "shadow", "kind": "finding", "group": "shadow", "finding_type": "opacity"},
        {"name": "lung", "kind": "lung"},
    ]
    with pytest.raises(ModelError, match="channels"):
        load_model(build_tiny_model(tmp_path, size=64, channels_spec=spec))


def test_alert_thresholds_reach_their_channels(tmp_path: Path) -> None:
    """``operating_point.alert_thresholds`` is read per channel; one outside (0, 1) is
    refused at load."""
    folder = build_tiny_model(tmp_path, size=64)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["operating_point"]["alert_thresholds"] = {"shadow": 0.97}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    channels = {c.name: c for c in load_model(folder).manifest.finding_channels}
    assert channels["shadow"].alert_threshold == 0.97
    assert channels["spot"].alert_threshold is None
    manifest["operating_point"]["alert_thresholds"] = {"shadow": 1.5}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"alert_thresholds\.shadow"):
        load_model(folder)


def test_extent_scales_reach_their_channels(tmp_path: Path) -> None:
    """``operating_point.extent_scale`` is read per channel as (width, height); absent means
    (1, 1); a factor outside [0.5, 2] or a malformed entry is refused at load."""
    folder = build_tiny_model(tmp_path, size=64)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["operating_point"]["extent_scale"] = {"shadow": [0.9, 0.85]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    channels = {c.name: c for c in load_model(folder).manifest.finding_channels}
    assert channels["shadow"].extent_scale == (0.9, 0.85)
    assert channels["spot"].extent_scale == (1.0, 1.0)
    for bad in ([0.3, 1.0], [1.0], "0.9"):
        manifest["operating_point"]["extent_scale"] = {"shadow": bad}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelError, match=r"extent_scale\.shadow"):
            load_model(folder)


def test_the_support_power_is_read_per_channel_and_checked(tmp_path: Path) -> None:
    """``operating_point.support_power`` is read per channel (absent: 0, the peak alone) and
    must be a number in [0, 4]."""
    folder = build_tiny_model(tmp_path, size=64)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["operating_point"]["support_power"] = {"shadow": 0.5}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    channels = {c.name: c for c in load_model(folder).manifest.finding_channels}
    assert (channels["shadow"].support_power, channels["spot"].support_power) == (0.5, 0.0)
    for bad in (4.5, -0.1, "1", True, [1.0]):
        manifest["operating_point"]["support_power"] = {"shadow": bad}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelError, match=r"support_power\.shadow"):
            load_model(folder)
    manifest["operating_point"]["support_power"] = [1.0]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"support_power: must be an object"):
        load_model(folder)


def test_a_box_head_is_checked_at_load_and_its_weights_read(tmp_path: Path) -> None:
    """``box_output`` names an output the graph must have, of shape (1, 4, H, W) (with
    ``channels``, four planes per finding channel, named in order);
    ``operating_point.box_weight`` is read per channel (absent: 1, the head alone) and must
    be a number in [0, 1]."""
    folder = build_tiny_model(tmp_path, size=64, box_px=(3.0, 3.0, 3.0, 3.0))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["operating_point"]["box_weight"] = {"shadow": 0.25}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    model = load_model(folder)
    channels = {c.name: c for c in model.manifest.finding_channels}
    assert (channels["shadow"].box_weight, channels["spot"].box_weight) == (0.25, 1.0)
    _, distances = model.predict_with_boxes(np.zeros((2, 64, 64), dtype=np.float32))
    assert distances is not None and distances.shape == (2, 4, 64, 64)
    for bad in (1.5, -0.1, "0.5", True):
        manifest["operating_point"]["box_weight"] = {"shadow": bad}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelError, match=r"box_weight\.shadow"):
            load_model(folder)
    manifest["operating_point"].pop("box_weight")
    # the head in a file of its own: named, with its sha256 checked
    manifest["box_output"] = {"name": "boxes", "file": "tiny.onnx", "sha256": manifest["sha256"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert load_model(folder).predict_with_boxes(np.zeros((1, 64, 64), np.float32))[1] is not None
    manifest["box_output"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="sha256"):
        load_model(folder)
    manifest["box_output"] = {"name": "box_distances"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="no output named 'box_distances'"):
        load_model(folder)
    # boxes per finding channel: named in the manifest's order, and the graph must have them
    manifest["box_output"] = {"name": "boxes", "channels": ["shadow", "spot"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"must name the finding channels in order"):
        load_model(folder)
    manifest["box_output"]["channels"] = ["spot", "shadow"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"box output shape \(1, 4, 64, 64\) ≠ \(1, 8, 64, 64\)"):
        load_model(folder)


def test_the_shipped_model_loads() -> None:
    """models/manifest.json and its ONNX file agree (skipped until the model is shipped)."""
    if not (REPO / "models" / "manifest.json").is_file():
        pytest.skip("models/manifest.json not shipped yet")
    model = load_model(REPO / "models", threads=1)
    h, w = model.manifest.working_shape
    assert model.predict(np.zeros((1, h, w), dtype=np.float32)).shape[1] == len(
        model.manifest.channels
    )


def test_every_manifest_mistake_is_named_at_once(tmp_path: Path) -> None:
    """The manifest goes through the config's typed validator (``pipeline.schema``): three
    mistakes in three places come back in one ModelError, each at its key."""
    from pipeline.manifest import parse_manifest

    folder = build_tiny_model(tmp_path, size=64)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["input"]["height"] = "64"
    manifest["operating_point"]["thresholds"] = {"spot": 1.2}
    manifest["channels"][0]["finding_type"] = "polyp"
    with pytest.raises(ModelError) as caught:
        parse_manifest(manifest)
    message = str(caught.value)
    assert "input.height: must be an integer" in message
    assert "operating_point.thresholds.spot: must be in (0, 1)" in message
    assert "channels[0].finding_type: must be one of" in message
