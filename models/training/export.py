"""Export the trained U-Net to ONNX and write ``models/manifest.json`` (the model contract)."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from models.training.boxhead import Detector, ExportedDetector
from models.training.dataset import CHANNELS
from models.training.net import Exported, UNet
from models.training.preprocess import RESIZE_SPEC, WINDOW_SPEC

NAME = "shadowspot-lesion-unet"
FILE = "shadowspot-lesion.onnx"
OPSET = 17
PARITY_TOLERANCE = 5e-4
BOX_OUTPUT = "boxes"
BOX_PARITY_TOLERANCE_PX = 0.05
BOX_FILE = "shadowspot-lesion-boxes.onnx"
BOX_OUTPUT_SPEC = {
    "name": BOX_OUTPUT,
    "file": BOX_FILE,
    "layout": "(N, 4, H, W): per pixel, distances (left, top, right, bottom) in working "
    "pixels from the pixel centre to the edges of the box of the lesion it belongs to",
}

CHANNEL_SPECS: dict[str, dict[str, str]] = {
    "spot": {"name": "spot", "kind": "finding", "group": "spot", "finding_type": "nodule"},
    "shadow": {"name": "shadow", "kind": "finding", "group": "shadow", "finding_type": "opacity"},
    "lung": {"name": "lung", "kind": "lung"},
}
DEFAULT_OPERATING_POINT: dict[str, Any] = {
    "thresholds": {"spot": 0.5, "shadow": 0.5},
    "alert_grade": 3,
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_onnx(net: UNet, path: Path, size: int) -> float:
    """Write the U-Net's ONNX file (output ``probabilities``) and return the max
    |ONNX − PyTorch| on a random batch of two.

    Raises ``RuntimeError`` when the difference exceeds ``PARITY_TOLERANCE``.
    """
    model = Exported(copy.deepcopy(net).cpu()).eval()  # wherever it trained
    return _export(model, path, size, {"probabilities": PARITY_TOLERANCE})["probabilities"]


def export_detector_onnx(detector: Detector, path: Path, size: int) -> dict[str, float]:
    """Write the U-Net + box head's ONNX file (outputs ``probabilities`` and ``boxes``) and
    return the max |ONNX − PyTorch| of each; the boxes (working pixels) may differ by
    ``BOX_PARITY_TOLERANCE_PX``."""
    model = ExportedDetector(copy.deepcopy(detector).cpu()).eval()
    return _export(
        model,
        path,
        size,
        {"probabilities": PARITY_TOLERANCE, BOX_OUTPUT: BOX_PARITY_TOLERANCE_PX},
    )


def _export(
    model: torch.nn.Module, path: Path, size: int, tolerances: dict[str, float]
) -> dict[str, float]:
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    names = list(tolerances)
    # The TorchScript exporter (dynamo=False) needs no onnxscript, which the train extra
    # does not install; torch marks it deprecated, which is all these warnings say.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=names,
            dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=OPSET,
            dynamo=False,
        )
    with torch.no_grad():
        expected = model(example)
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(names, {"image": example.numpy()})
    pairs = zip(names, got, expected, strict=True)
    diffs = {n: float(np.max(np.abs(g - e.numpy()))) for n, g, e in pairs}
    for name, diff in diffs.items():
        if diff > tolerances[name]:
            tmp.unlink()
            raise RuntimeError(f"ONNX output {name} differs from PyTorch by {diff:.2e}")
    tmp.replace(path)
    return diffs


def write_manifest(
    model_dir: Path,
    *,
    size: int,
    version: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
    operating_point: dict[str, Any] | None = None,
    boxes: bool = False,
) -> Path:
    """Write ``manifest.json`` for ``model_dir/FILE`` (keeps an existing operating point)."""
    path = model_dir / "manifest.json"
    if operating_point is None:
        operating_point = DEFAULT_OPERATING_POINT
        if path.exists():
            operating_point = json.loads(path.read_text()).get("operating_point", operating_point)
    manifest = {
        "name": NAME,
        "version": version,
        "file": FILE,
        "sha256": sha256_of(model_dir / FILE),
        "input": {
            "name": "image",
            "height": size,
            "width": size,
            "window": WINDOW_SPEC,
            "resize": RESIZE_SPEC,
            "normalisation": "inside the graph: per-image (x - mean) / (std + 1e-3)",
        },
        "output": {"name": "probabilities", "activation": "sigmoid"},
        **(
            {"box_output": {**BOX_OUTPUT_SPEC, "sha256": sha256_of(model_dir / BOX_FILE)}}
            if boxes
            else {}
        ),
        "channels": [CHANNEL_SPECS[c] for c in CHANNELS],
        "operating_point": operating_point,
        "training": training,
        "metrics": metrics,
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def unet_from_onnx(path: Path) -> UNet:
    """The U-Net of an exported ONNX file, back in PyTorch, float32 as shipped: the U-Net
    file, a file with the box head too (the head left out), or an ensemble
    (``models.training.ensemble``: its first member's U-Net).

    The exporter folds each BatchNorm into the convolution before it, so each such pair
    comes back as the folded convolution and an identity BatchNorm (mean 0, variance 1 − ε,
    scale 1) whose shift is the folded bias. Convolutions are matched to the modules by the
    module path in their node names (``/net/down.0/down.0.3/Conv`` → ``down.0.3``).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    stems = [n.name for n in graph.node if n.op_type == "Conv" and n.name.endswith("/stem.0/Conv")]
    if not stems:
        raise ValueError(f"{path}: no U-Net in the graph (no stem convolution)")
    scope = stems[0][: stems[0].index("stem/")]  # "/net/", "/detector/", "m0//detector/"
    convs: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for node in graph.node:
        inside = node.name.startswith(scope) and not node.name.startswith(f"{scope}boxes/")
        if node.op_type == "Conv" and inside:
            module = node.name.split("/")[-2]
            bias = init[node.input[2]] if len(node.input) > 2 else None
            convs[module] = (init[node.input[1]], bias)
    levels = sum(1 for k in convs if k.startswith("down.") and k.endswith(".0"))
    widths = tuple(
        int(convs[m][0].shape[0]) for m in ["stem.0", *(f"down.{i}.0" for i in range(levels))]
    )
    net = UNet(channels=int(convs["head.2"][0].shape[0]), widths=widths)
    modules = dict(net.named_modules())
    state: dict[str, torch.Tensor] = {}
    for name, (weight, bias) in convs.items():
        state[f"{name}.weight"] = torch.from_numpy(weight.copy())
        parent, index = name.rsplit(".", 1)
        bn = f"{parent}.{int(index) + 1}"  # the module after the convolution
        norm = modules.get(bn)
        if isinstance(norm, torch.nn.BatchNorm2d):
            assert bias is not None
            n = int(bias.shape[0])
            state[f"{bn}.weight"] = torch.ones(n)
            state[f"{bn}.bias"] = torch.from_numpy(bias.copy())
            state[f"{bn}.running_mean"] = torch.zeros(n)
            state[f"{bn}.running_var"] = torch.full((n,), 1.0 - norm.eps)
            state[f"{bn}.num_batches_tracked"] = torch.tensor(0)
        elif bias is not None:
            state[f"{name}.bias"] = torch.from_numpy(bias.copy())
    net.load_state_dict(state)
    return net.eval()
