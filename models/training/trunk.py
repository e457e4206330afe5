"""Where a box run's networks come from: its U-Net (``--trunk``: the shipped model's ONNX
file read back into PyTorch, a ``train`` run's ``best.pt`` or a box run's checkpoint), the
starting U-Net a joint run is held near, and its head's shape and starting weights
(``--init-head``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from models.training.boxhead import DILATIONS, WIDTH, Detector
from models.training.export import FILE, sha256_of, unet_from_onnx
from models.training.net import WIDTHS, UNet
from models.training.run_records import REPO


def recorded_path(path: Path | None) -> str | None:
    """A path as the records give it: relative to the repository where it lies inside."""
    if path is None:
        return None
    where = path.resolve()
    return str(where.relative_to(REPO)) if where.is_relative_to(REPO) else str(where)


def shipped_file() -> Path:
    """The shipped model's ONNX file (``models/manifest.json``'s ``file``); without a
    manifest, where ``export`` writes the U-Net."""
    manifest = REPO / "models" / "manifest.json"
    if not manifest.is_file():
        return REPO / "models" / FILE
    return REPO / "models" / str(json.loads(manifest.read_text())["file"])


def load_trunk(path: Path) -> tuple[UNet, tuple[int, ...], dict[str, Any]]:
    """The frozen U-Net of a ``train`` or ``train_boxes`` checkpoint, or of an exported ONNX
    file (float32 as shipped: a head trained on it extends that file's U-Net exactly), and
    where it came from."""
    if path.suffix == ".onnx":
        net = unet_from_onnx(path)
        origin: dict[str, Any] = {"from": recorded_path(path), "sha256": sha256_of(path)}
        manifest = path.parent / "manifest.json"
        if manifest.exists():  # what that file's own record says it is
            unet = json.loads(manifest.read_text()).get("training", {}).get("unet")
            if unet and unet.get("sha256") == origin["sha256"]:
                unet = unet.get("record")  # itself read from this file: its own origin
            origin = {**origin, **({"record": unet} if unet else {})}
        return net, net.widths, origin
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    widths = tuple(int(w) for w in ckpt.get("widths", WIDTHS))
    net = UNet(widths=widths)
    weights = ckpt["model"]
    if any(k.startswith("net.") for k in weights):  # a Detector's state: take its U-Net
        weights = {k[4:]: v for k, v in weights.items() if k.startswith("net.")}
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    name = recorded_path(path)
    origin = ckpt.get("trunk") or {"from": name, "epoch": ckpt["state"]["epoch"]}
    if any(v.dtype == torch.float16 for v in weights.values()):
        origin = {**origin, "float16_from": name}  # a compact checkpoint: weights rounded
    return net, widths, origin


def starting_unet(net: UNet, trunk: dict[str, Any], trunk_path: Path, resumed: bool) -> UNet:
    """The U-Net as the joint run started (frozen, evaluation mode): a copy of ``net`` before
    it learns, or, on resume, read again from ``--trunk``, which must be the file it started
    from."""
    if resumed:
        init = trunk.get("init", {})
        if init.get("sha256") and init["sha256"] != sha256_of(trunk_path):
            raise SystemExit(
                f"{trunk_path} is not the U-Net this run started from ({init.get('from')}); "
                f"give that file as --trunk to resume it"
            )
        net = load_trunk(trunk_path)[0]
    teacher = copy.deepcopy(net)
    freeze(teacher)
    return teacher


def head_shape(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The box head's shape a checkpoint was trained with (the first heads had no record:
    the defaults)."""
    head = ckpt.get("head") or {}
    return {
        "width": int(head.get("width", WIDTH)),
        "dilations": tuple(int(d) for d in head.get("dilations", DILATIONS)),
    }


def load_head(detector: Detector, path: Path) -> None:
    """Start the head from a ``train_boxes`` checkpoint's head (same shape)."""
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    head = {k[6:]: v.float() for k, v in ckpt["model"].items() if k.startswith("boxes.")}
    if not head:
        raise SystemExit(f"{path}: no box head in this checkpoint")
    try:
        detector.boxes.load_state_dict(head)
    except RuntimeError as exc:
        raise SystemExit(f"{path}: its head has another shape than this run's: {exc}") from exc


def freeze(net: UNet) -> None:
    """The U-Net learns nothing and stays in evaluation mode (BatchNorm statistics fixed)."""
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
