"""Train the learned box head on a frozen U-Net; time-budgeted, resumable, seeded.

    python -m models.training.train_boxes --minutes 45

The U-Net (``--trunk``: by default the shipped model's file, ``models/manifest.json``'s
``file``, read back into PyTorch, float32 as shipped: of an ensemble, its first member's; or a
``train`` run's ``best.pt``, or a box run's checkpoint
whose U-Net is taken) stays frozen in evaluation mode, so its probabilities are exactly those
of the model it came from; only ``models.training.boxhead.BoxHead`` learns: from nothing, or
from another run's head (``--init-head``, same shape: ``--head-width``, ``--head-dilations``).
Each epoch draws as many abnormal training images as there are, with replacement, weighted by
source as in ``train``; they get the same augmentation as in ``train`` and their boxes move
with the geometry. After
every epoch the run validates (loss, and the IoU of the box predicted at each validation
lesion's centre), writes ``runs/<run>/last.pt`` and, when the validation loss improved,
``best.pt`` (U-Net + head) and the ONNX model + manifest in ``--export-dir``. The same command
resumes from ``last.pt``; ``--export-best`` exports ``best.pt`` again and exits.

``--joint`` trains the U-Net and the head together instead: every training image (normals
too) drawn as in ``train``, the U-Net's own loss (``train.loss_terms``) plus the head's
(``--box-loss-weight`` ×), the U-Net at ``--trunk-lr`` (the head at ``--lr``) with its
BatchNorm statistics fixed. The probabilities change with it, so such a model needs its own
operating point. Validation is then the sum of both losses over the validation split (the box
loss over its abnormal images). ``--distill-spot W`` adds W × how far the spot channel has
moved from the starting U-Net's (``spot_drift``), on training and validation images alike:
the boxes and shadows learn while the spots stay as they were. ``--distill-peaks W`` adds W ×
the drift over each image's spot peaks alone (``peak_drift``), which an average over the
whole map lets fade.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from models.training import augment
from models.training.boxhead import (
    DILATIONS,
    STRIDE,
    WIDTH,
    Detector,
    box_targets,
    cell_iou,
    iou_loss,
)
from models.training.dataset import FINDING_CHANNELS, LABEL_CHANNEL, packed, read_records
from models.training.export import (
    BOX_FILE,
    DEFAULT_OPERATING_POINT,
    FILE,
    export_detector_onnx,
    export_onnx,
    sha256_of,
    unet_from_onnx,
    write_manifest,
)
from models.training.loop import run_epochs, torch_device, write_best
from models.training.net import WIDTHS, UNet, normalise, parameter_count
from models.training.train import (
    DEFAULT_DATA,
    REPO,
    SOURCE_WEIGHT,
    WARMUP_STEPS,
    _cosine,
    data_record,
    loss_terms,
    run_record,
    write_compact_checkpoint,
)
from models.training.train import validate as validate_unet

VERSION = "1.4.0"
JOINT_VERSION = "1.6.0"
SPOT = FINDING_CHANNELS.index("spot")  # the channel --distill-spot keeps


def record_boxes(data_dir: Path, size: int) -> dict[str, torch.Tensor]:
    """Each record's lesion boxes (K, 4: x0, y0, x1, y1) at the working size, by id."""
    out = {}
    for r in read_records(data_dir):
        sx, sy = size / r.width, size / r.height
        rows = [
            (f.box[0] * sx, f.box[1] * sy, f.box[2] * sx, f.box[3] * sy)
            for f in r.findings
            if f.label in LABEL_CHANNEL
        ]
        out[r.id] = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
    return out


def _name(path: Path | None) -> str | None:
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
        origin: dict[str, Any] = {"from": _name(path), "sha256": sha256_of(path)}
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
    name = _name(path)
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


def _forward(detector: Detector, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, decoded = detector.net.decode(normalise(image))
    return detector.boxes([d.detach() for d in decoded])


def _batch(
    arrays: dict[str, np.ndarray], idx: np.ndarray, boxes: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    idx = np.sort(idx)
    image = torch.from_numpy(arrays["images"][idx]).float().unsqueeze(1) / 255.0
    target = torch.from_numpy(arrays["targets"][idx]).float() / 255.0
    weight = torch.from_numpy(arrays["weights"][idx]).float() / 255.0
    return image, target, weight, [boxes[str(i)] for i in arrays["ids"][idx]]


def _has_lung(arrays: dict[str, np.ndarray], idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arrays["has_lung"][np.sort(idx)])


def _augmented(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]],
    g: torch.Generator,
    augment_batch: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch after the augmentation (its boxes moved with the geometry) and its box targets
    (``box_targets``): image, target, weight, box distances, lesion index."""
    image, target, weight, boxes = batch
    size = (image.shape[-2], image.shape[-1])
    if augment_batch:
        theta = augment.random_affine(image.shape[0], g)
        image, target, weight = augment.geometry(image, target, weight, g, theta=theta)
        image = augment.intensity(image, g)
        boxes = [augment.transform_boxes(b, t, size) for b, t in zip(boxes, theta, strict=True)]
    positive = target[:, :2].amax(dim=1) >= 0.5
    return (image, target, weight, *box_targets(positive, boxes))


def _spot_kl(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spot channel's Bernoulli KL divergence per pixel (N×H×W) of the student from the
    teacher (logits in, N×C×H×W), and where either is high: the larger probability
    (no gradient)."""
    s, t = student[:, SPOT], teacher[:, SPOT].detach()
    pt = torch.sigmoid(t)
    kl = F.binary_cross_entropy_with_logits(s, pt, reduction="none") - (
        F.binary_cross_entropy_with_logits(t, pt, reduction="none")
    )
    return kl, torch.maximum(pt, torch.sigmoid(s)).detach()


def spot_drift(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """How far the spot channel's probabilities (logits in, N×C×H×W) have moved from the
    teacher's: the Bernoulli KL divergence per pixel, averaged with weights that follow where
    either is high (plus 0.01), so a spot's peak that fades or a new one on a normal image
    counts, not only the background around it. Zero where they agree."""
    kl, high = _spot_kl(student, teacher)
    w = high + 0.01
    return (w * kl).sum() / w.sum()


def peak_drift(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The spot channel's drift over its peaks alone: per image, the mean KL divergence over
    the pixels where either map reaches 0.5 (a peak that fades, or one that appears),
    averaged over the images that have such pixels; 0 where none has. A peak of a few
    hundred pixels counts as much as a whole image's background does in ``spot_drift``."""
    kl, high = _spot_kl(student, teacher)
    peak = (high >= 0.5).to(kl.dtype)
    area = peak.sum(dim=(1, 2))
    has = area > 0
    if not bool(has.any()):
        return (kl * peak).sum()  # zero, on the graph
    return ((kl * peak).sum(dim=(1, 2))[has] / area[has]).mean()


TEACHER_TERMS = {
    "spot_drift": (spot_drift, "distill_spot"),
    "peak_drift": (peak_drift, "distill_peaks"),
}
"""The terms that hold the joint run's U-Net near the one it started from (metric name ->
the term, and the key of its weight in the run's record)."""


def teacher_loss(
    student: torch.Tensor, teacher: torch.Tensor, distill: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Each teacher term with a weight in ``distill`` (term name -> weight), unweighted."""
    return {name: TEACHER_TERMS[name][0](student, teacher) for name in distill}


def train_step(
    detector: Detector,
    optimiser: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]],
    g: torch.Generator,
    augment_batch: bool = True,
) -> float:
    """One step of the head on a batch (images, targets, weights, boxes per image)."""
    image, _, _, tgt, index = _augmented(batch, g, augment_batch)
    device = next(detector.boxes.parameters()).device
    detector.boxes.train()
    log_pred = _forward(detector, image.to(device))
    loss = iou_loss(log_pred, tgt.to(device), index.to(device))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.item())


def joint_step(
    detector: Detector,
    optimiser: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]],
    has_lung: torch.Tensor,
    g: torch.Generator,
    box_loss_weight: float,
    augment_batch: bool = True,
    teacher: UNet | None = None,
    distill: dict[str, float] | None = None,
) -> float:
    """One step of the U-Net and its head together: the U-Net's loss terms on its targets
    plus ``box_loss_weight`` × the head's IoU loss on the batch's boxes (none on normals),
    plus each term of ``distill`` (``TEACHER_TERMS`` name -> weight) from ``teacher``
    (frozen) where one is given.
    The U-Net's BatchNorm layers keep their statistics (evaluation mode): a U-Net read back
    from ONNX has them folded into its convolutions, and batches of 8 are too small to
    estimate them again; their scale and shift learn with the rest."""
    image, target, weight, tgt, index = _augmented(batch, g, augment_batch)
    device = next(detector.boxes.parameters()).device
    detector.train()
    for module in detector.net.modules():  # statistics as trained (or as folded by export)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    logits, log_pred = detector(normalise(image.to(device)))
    terms = loss_terms(logits, target.to(device), weight.to(device), has_lung.to(device))
    loss = sum(terms.values()) + box_loss_weight * iou_loss(
        log_pred, tgt.to(device), index.to(device)
    )
    if teacher is not None and distill:
        with torch.no_grad():
            taught = teacher(normalise(image.to(device)))
        for name, term in teacher_loss(logits, taught, distill).items():
            loss = loss + distill[name] * term
    assert isinstance(loss, torch.Tensor)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.item())


def validate_joint(
    detector: Detector,
    arrays: dict[str, np.ndarray],
    rows: np.ndarray,
    boxes: dict[str, Any],
    box_loss_weight: float,
    teacher: UNet | None = None,
    distill: dict[str, float] | None = None,
) -> dict[str, float]:
    """The U-Net's validation (its loss terms over every validation image, ``unet_``) and the
    head's (over the abnormal ones, ``box_``), with a teacher the terms of ``distill`` over
    every validation image; ``loss`` is their weighted sum as trained."""
    unet = validate_unet(detector.net, arrays, 8)
    box = validate(detector, arrays, rows, boxes)
    out = {f"unet_{k}": v for k, v in unet.items()}
    out.update({f"box_{k}": v for k, v in box.items()})
    out["loss"] = unet["loss"] + box_loss_weight * box["loss"]
    if teacher is not None and distill:
        for name, value in drift_over(detector.net, teacher, arrays, distill).items():
            out[name] = value
            out["loss"] += distill[name] * value
    return out


@torch.no_grad()
def drift_over(
    net: UNet, teacher: UNet, arrays: dict[str, np.ndarray], distill: dict[str, float]
) -> dict[str, float]:
    """The teacher terms of ``distill`` of ``net`` from ``teacher`` over all of ``arrays``'
    images: batches of 8, each weighted by its number of images."""
    net.eval()
    teacher.eval()
    device = next(net.parameters()).device
    n, total = len(arrays["images"]), dict.fromkeys(distill, 0.0)
    for start in range(0, n, 8):
        image = torch.from_numpy(arrays["images"][start : start + 8]).float().unsqueeze(1) / 255.0
        x = normalise(image.to(device))
        for name, term in teacher_loss(net(x), teacher(x), distill).items():
            total[name] += float(term) * len(image)
    return {name: value / n for name, value in total.items()}


@torch.no_grad()
def validate(
    detector: Detector, arrays: dict[str, np.ndarray], rows: np.ndarray, boxes: dict[str, Any]
) -> dict[str, float]:
    """Loss on the abnormal validation images (no augmentation); the IoU of the box each
    lesion's centre cell predicts: its mean and the shares at ≥ 0.3 and ≥ 0.5."""
    detector.eval()
    device = next(detector.boxes.parameters()).device
    losses, centre = [], []
    for start in range(0, len(rows), 8):
        image, target, _, bxs = _batch(arrays, rows[start : start + 8], boxes)
        positive = target[:, :2].amax(dim=1) >= 0.5
        tgt, index = box_targets(positive, bxs)
        log_pred = _forward(detector, image.to(device)).cpu()
        losses.append(float(iou_loss(log_pred, tgt, index)) * len(image))
        # each lesion's centre cell alone: a positive-only index
        only = torch.full_like(index, -1)
        h, w = index.shape[-2:]
        for i, b in enumerate(bxs):
            for k, (x0, y0, x1, y1) in enumerate(b.tolist()):
                cy = min(h - 1, int((y0 + y1) / 2 / STRIDE))
                cx = min(w - 1, int((x0 + x1) / 2 / STRIDE))
                if index[i, cy, cx] >= 0:
                    only[i, cy, cx] = k
        if bool((only >= 0).any()):
            centre += cell_iou(log_pred, tgt, only).tolist()
    ious = np.array(centre)
    return {
        "loss": sum(losses) / len(rows),
        "centre_iou": float(ious.mean()) if len(ious) else math.nan,
        "centre_iou_ge_0_3": float((ious >= 0.3).mean()) if len(ious) else math.nan,
        "centre_iou_ge_0_5": float((ious >= 0.5).mean()) if len(ious) else math.nan,
    }


def export(detector: Detector, export_dir: Path, best: dict[str, Any], size: int) -> Path:
    """For a best checkpoint, in ``export_dir``: the U-Net alone (``FILE``, probabilities:
    the runs that need no boxes), the U-Net with its head (``BOX_FILE``, both outputs) and the
    manifest naming both."""
    export_onnx(detector.net, export_dir / FILE, size)
    diffs = export_detector_onnx(detector, export_dir / BOX_FILE, size)
    training = {
        **data_record(best),
        "unet": best["trunk"],
        "box_head": {
            **run_record(best),
            "abnormal_images": best["data"]["abnormal_train"],
            "params": parameter_count(detector.boxes),
            "shape": best.get("head") or head_shape(best),
        },
        "params": parameter_count(detector),
        "split_seed_and_share": "by patient, per source, 15 % val, seed 20261125",
    }
    joint = best["args"].get("joint") == "True"
    prefix = "joint_val_" if joint else "box_val_"
    metrics = {f"{prefix}{k}": round(v, 4) for k, v in best["metrics"].items()}
    metrics["onnx_parity_max_abs_diff"] = diffs["probabilities"]
    metrics["onnx_parity_boxes_max_abs_diff_px"] = diffs["boxes"]
    return write_manifest(
        export_dir,
        size=size,
        version=JOINT_VERSION if joint else VERSION,
        training=training,
        metrics=metrics,
        operating_point=_operating_point(export_dir),
        boxes=True,
    )


def _operating_point(export_dir: Path) -> dict[str, Any]:
    """The export's own operating point, else the shipped model's (same U-Net, so the same
    thresholds and extent scale; the box weight is fitted afterwards)."""
    for manifest in (export_dir / "manifest.json", REPO / "models" / "manifest.json"):
        if manifest.exists():
            return dict(json.loads(manifest.read_text()).get("operating_point", {}))
    return dict(DEFAULT_OPERATING_POINT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--trunk",
        type=Path,
        default=shipped_file(),
        help="the U-Net: an exported ONNX file (default: the shipped model's, exactly; of an "
        "ensemble, its first member's U-Net), a train run's best.pt, or a train_boxes "
        "checkpoint (its U-Net)",
    )
    parser.add_argument("--minutes", type=float, default=45.0)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--run", default="boxes")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "models" / "training" / "runs")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "models" / "training" / "cache")
    parser.add_argument("--export-dir", type=Path, default=None, help="default: runs/<run>/export")
    parser.add_argument("--export-best", action="store_true", help="export best.pt, exit")
    parser.add_argument("--head-width", type=int, default=WIDTH, help="channels of the body")
    parser.add_argument(
        "--head-dilations",
        default=",".join(str(d) for d in DILATIONS),
        help="one 3×3 convolution per dilation, comma-separated",
    )
    parser.add_argument(
        "--init-head",
        type=Path,
        default=None,
        help="start the head from this train_boxes checkpoint's head (same shape); the "
        "learning rate warms up again and follows a fresh cosine",
    )
    parser.add_argument(
        "--joint",
        action="store_true",
        help="train the U-Net with the head (its own loss too, every training image)",
    )
    parser.add_argument("--trunk-lr", type=float, default=1e-4, help="the U-Net's lr (--joint)")
    parser.add_argument(
        "--box-loss-weight", type=float, default=1.0, help="the head's loss weight (--joint)"
    )
    parser.add_argument(
        "--distill-spot",
        type=float,
        default=0.0,
        help="weight of the spot channel's drift from the starting U-Net (--joint; 0: none)",
    )
    parser.add_argument(
        "--distill-peaks",
        type=float,
        default=0.0,
        help="weight of the spot channel's drift over its peaks from the starting U-Net's "
        "(--joint; 0: none)",
    )
    parser.add_argument(
        "--write-checkpoint",
        type=Path,
        default=None,
        help="write the run's best.pt in float16 to this path (a --trunk to commit), exit",
    )
    args = parser.parse_args(argv)
    run_dir = args.runs_dir / args.run
    export_dir = args.export_dir or run_dir / "export"
    if args.write_checkpoint is not None:
        write_compact_checkpoint(run_dir / "best.pt", args.write_checkpoint)
        return 0
    if args.export_best:
        best = torch.load(run_dir / "best.pt", weights_only=False, map_location="cpu")
        widths = tuple(best["widths"])
        detector = Detector(UNet(widths=widths), widths, **head_shape(best))
        detector.load_state_dict(best["model"])
        export(detector.eval(), export_dir, best, int(best["args"]["size"]))
        print(f"exported epoch {best['state']['epoch']} to {export_dir}", flush=True)
        return 0

    device = torch_device(args.device, args.threads, args.seed)
    paths, digest, counts = packed(args.data.resolve(), args.size, args.cache_dir)
    train = dict(np.load(paths["train"]))
    val = dict(np.load(paths["val"]))
    boxes = record_boxes(args.data.resolve(), args.size)
    box_rows = np.array([i for i, x in enumerate(train["ids"]) if len(boxes[str(x)])])
    val_rows = np.array([i for i, x in enumerate(val["ids"]) if len(boxes[str(x)])])
    train_rows = np.arange(len(train["ids"])) if args.joint else box_rows
    if len(box_rows) < args.batch or len(val_rows) == 0:
        raise SystemExit(
            f"{args.data}: {len(box_rows)} abnormal training and {len(val_rows)} validation "
            f"images; the box head needs at least --batch ({args.batch}) and 1"
        )

    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "last.pt"
    resume = torch.load(last, weights_only=False, map_location="cpu") if last.exists() else None
    if resume is not None and (resume["args"].get("joint") == "True") != args.joint:
        raise SystemExit(
            f"{last}: a {'joint' if args.joint else 'head-only'} command cannot resume this "
            f"run; give --joint exactly as it was given, or another --run"
        )
    net, widths, trunk = load_trunk(args.trunk if resume is None else last)
    if resume is not None:  # the head's shape and origin are the run's, whatever the flags
        head_record = resume.get("head") or {**head_shape(resume), "init": None}
    else:
        dilations = [int(d) for d in args.head_dilations.split(",")]
        head_record = {"width": args.head_width, "dilations": dilations}
        head_record["init"] = _name(args.init_head)
        if args.joint:  # the U-Net learns on: the manifest says from what, and how
            trunk = {"init": trunk, "trained_with_head": True, "trunk_lr": args.trunk_lr}
            for _, key in TEACHER_TERMS.values():  # --distill-spot, --distill-peaks
                if getattr(args, key) > 0:
                    trunk[key] = getattr(args, key)
    detector = Detector(net, widths, **head_shape({"head": head_record}))
    if resume is not None:
        detector.load_state_dict(resume["model"])
        trunk = resume["trunk"]
    elif args.init_head is not None:
        load_head(detector, args.init_head)
    distill = {
        name: float(trunk[key])
        for name, (_, key) in TEACHER_TERMS.items()
        if args.joint and trunk.get(key, 0.0) > 0
    }
    teacher = starting_unet(net, trunk, args.trunk, resume is not None) if distill else None
    detector.to(device)
    if teacher is not None:
        teacher.to(device)
    if args.joint:
        groups = [
            {"params": detector.net.parameters(), "scale": args.trunk_lr / args.lr},
            {"params": detector.boxes.parameters(), "scale": 1.0},
        ]
    else:
        freeze(detector.net)
        groups = [{"params": detector.boxes.parameters(), "scale": 1.0}]
    optimiser = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-4)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "elapsed_s": 0.0, "best": math.inf}
    state["history"] = []
    if resume is not None:
        optimiser.load_state_dict(resume["optimiser"])
        state = resume["state"]
        print(f"resumed {last} at epoch {state['epoch']}", flush=True)
    print(
        f"box head params {parameter_count(detector.boxes)} on U-Net {trunk} "
        f"{'joint, ' if args.joint else ''}train {len(train_rows)} "
        f"(abnormal {len(box_rows)}) abnormal val {len(val_rows)} device {device}",
        flush=True,
    )
    budget = args.minutes * 60
    source_w = np.array([SOURCE_WEIGHT.get(str(train["sources"][i]), 1.0) for i in train_rows])
    source_w /= source_w.sum()
    run_args = {k: str(v) for k, v in vars(args).items()}

    def after_epoch(metrics: dict[str, float], improved: bool) -> None:
        ckpt = {
            "model": detector.state_dict(),
            "optimiser": optimiser.state_dict(),
            "state": state,
            "widths": list(widths),
            "head": head_record,
            "trunk": trunk,
            "args": run_args,
        }
        torch.save(ckpt, run_dir / "last.tmp.pt")
        (run_dir / "last.tmp.pt").replace(last)
        if not improved:
            return
        data = {"digest": digest, "counts": counts, "abnormal_train": len(box_rows)}
        best = {k: v for k, v in ckpt.items() if k != "optimiser"}
        best.update(data=data, metrics=metrics)
        write_best(best, run_dir, lambda: export(detector, export_dir, best, args.size), export_dir)

    run_epochs(
        state,
        budget_s=budget,
        rows=train_rows,
        weights=source_w,
        batch=args.batch,
        seed=args.seed,
        optimiser=optimiser,
        lr=lambda st: (
            args.lr * min(1.0, (st["step"] + 1) / WARMUP_STEPS) * _cosine(st["elapsed_s"], budget)
        ),
        step=lambda idx, g: (
            joint_step(
                detector,
                optimiser,
                _batch(train, idx, boxes),
                _has_lung(train, idx),
                g,
                args.box_loss_weight,
                teacher=teacher,
                distill=distill,
            )
            if args.joint
            else train_step(detector, optimiser, _batch(train, idx, boxes), g)
        ),
        validate=lambda: (
            validate_joint(detector, val, val_rows, boxes, args.box_loss_weight, teacher, distill)
            if args.joint
            else validate(detector, val, val_rows, boxes)
        ),
        after_epoch=after_epoch,
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
