"""A tiny but real ONNX lesion model for the tests, written with the ``onnx`` package.

The graph maps brightness to probabilities: after removing a local background (average pool)
a pixel much brighter than its surround is a ``spot``; broad brightness is a ``shadow``; dark
(air) pixels are ``lung``. It goes through the real loader (manifest, sha256, shapes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node(
        "Constant",
        [],
        [name],
        value=helper.make_tensor(name + "_t", TensorProto.FLOAT, [], [value]),
    )


def build_tiny_model(
    folder: Path,
    *,
    size: int = 128,
    channels_spec: list[dict] | None = None,
    box_px: tuple[float, float, float, float] | None = None,
) -> Path:
    """Write ``tiny.onnx`` and ``manifest.json`` into ``folder``; return the folder. With
    ``box_px`` the model has a box head too: output ``boxes`` holds those distances (left,
    top, right, bottom, working pixels) at every pixel."""
    pool = max(3, size // 8) | 1
    nodes = [
        _const("k_spot", 30.0),
        _const("b_spot", 0.12),
        _const("k_shadow", 12.0),
        _const("b_shadow", 0.75),
        _const("k_lung", -20.0),
        _const("b_lung", 0.35),
        helper.make_node(
            "AveragePool",
            ["image"],
            ["local"],
            kernel_shape=[pool, pool],
            pads=[pool // 2] * 4,
            count_include_pad=0,
        ),
        helper.make_node("Sub", ["image", "local"], ["detail"]),
        helper.make_node("Sub", ["detail", "b_spot"], ["d1"]),
        helper.make_node("Mul", ["d1", "k_spot"], ["z_spot"]),
        helper.make_node("Sigmoid", ["z_spot"], ["spot"]),
        helper.make_node("Sub", ["local", "b_shadow"], ["d2"]),
        helper.make_node("Mul", ["d2", "k_shadow"], ["z_shadow"]),
        helper.make_node("Sigmoid", ["z_shadow"], ["shadow"]),
        helper.make_node("Sub", ["local", "b_lung"], ["d3"]),
        helper.make_node("Mul", ["d3", "k_lung"], ["z_lung"]),
        helper.make_node("Sigmoid", ["z_lung"], ["lung"]),
        helper.make_node("Concat", ["spot", "shadow", "lung"], ["probabilities"], axis=1),
    ]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3, size, size])
    ]
    if box_px is not None:
        nodes.append(_const("zero", 0.0))
        nodes.append(helper.make_node("Mul", ["image", "zero"], ["blank"]))
        for k, value in enumerate(box_px):
            nodes.append(_const(f"box_d{k}", float(value)))
            nodes.append(helper.make_node("Add", ["blank", f"box_d{k}"], [f"plane{k}"]))
        nodes.append(helper.make_node("Concat", [f"plane{k}" for k in range(4)], ["boxes"], axis=1))
        outputs.append(
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4, size, size])
        )
    graph = helper.make_graph(
        nodes,
        "tiny-lesion",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.onnx"
    path.write_bytes(model.SerializeToString())
    manifest = {
        "name": "tiny-test-model",
        "version": "0.0.1",
        "file": "tiny.onnx",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "input": {
            "name": "image",
            "height": size,
            "width": size,
            "window": {"low_percentile": 0.5, "high_percentile": 99.5},
        },
        "output": {"name": "probabilities", "activation": "sigmoid"},
        "channels": channels_spec
        or [
            {"name": "spot", "kind": "finding", "group": "spot", "finding_type": "nodule"},
            {"name": "shadow", "kind": "finding", "group": "shadow", "finding_type": "opacity"},
            {"name": "lung", "kind": "lung"},
        ],
        "operating_point": {"thresholds": {"spot": 0.5, "shadow": 0.5}, "alert_grade": 3},
    }
    if box_px is not None:
        manifest["box_output"] = {"name": "boxes"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder
