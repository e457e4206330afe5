"""The box head's training, as ``train_boxes`` runs it: each record's lesion boxes at the
working size, a batch augmented with its boxes moved by the geometry and turned into the
head's targets, one step of the head alone (the U-Net frozen) or of both together
(``joint_step``: the U-Net's own loss too, and the teacher terms of ``distill``), and the
validations (the head's loss and the IoU of the box at each lesion's centre; with the U-Net's
for a joint run).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from models.training import augment
from models.training.boxhead import STRIDE, Detector, box_targets, cell_iou, iou_loss
from models.training.dataset import LABEL_CHANNEL, Arrays, read_records
from models.training.distill import drift_over, teacher_loss
from models.training.loop import descend
from models.training.net import UNet, normalise
from models.training.unet_training import loss_terms
from models.training.unet_training import validate as validate_unet

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]
"""Images, targets, weights (as floats in [0, 1]) and each image's lesion boxes (K, 4)."""
Rows = npt.NDArray[np.int64]


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


def _forward(detector: Detector, image: torch.Tensor) -> torch.Tensor:
    """The head's log-distances on the frozen U-Net's decoder (no gradient into it)."""
    with torch.no_grad():
        _, decoded = detector.net.decode(normalise(image))
    out: torch.Tensor = detector.boxes([d.detach() for d in decoded])
    return out


def batch_of(arrays: Arrays, idx: Rows, boxes: dict[str, torch.Tensor]) -> Batch:
    """The rows ``idx`` of a split's arrays (in order) and their boxes."""
    idx = np.sort(idx)
    image = torch.from_numpy(arrays["images"][idx]).float().unsqueeze(1) / 255.0
    target = torch.from_numpy(arrays["targets"][idx]).float() / 255.0
    weight = torch.from_numpy(arrays["weights"][idx]).float() / 255.0
    return image, target, weight, [boxes[str(i)] for i in arrays["ids"][idx]]


def has_lung_of(arrays: Arrays, idx: Rows) -> torch.Tensor:
    """Which of the rows ``idx`` (in order) have a lung mask."""
    return torch.from_numpy(arrays["has_lung"][np.sort(idx)])


def _augmented(
    batch: Batch,
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


def train_step(
    detector: Detector,
    optimiser: torch.optim.Optimizer,
    batch: Batch,
    g: torch.Generator,
    augment_batch: bool = True,
) -> float:
    """One step of the head on a batch (images, targets, weights, boxes per image)."""
    image, _, _, tgt, index = _augmented(batch, g, augment_batch)
    device = next(detector.boxes.parameters()).device
    detector.boxes.train()
    log_pred = _forward(detector, image.to(device))
    loss = iou_loss(log_pred, tgt.to(device), index.to(device))
    return descend(optimiser, loss)


def joint_step(
    detector: Detector,
    optimiser: torch.optim.Optimizer,
    batch: Batch,
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
    return descend(optimiser, loss)


def validate_joint(
    detector: Detector,
    arrays: Arrays,
    rows: Rows,
    boxes: dict[str, torch.Tensor],
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
def validate(
    detector: Detector, arrays: Arrays, rows: Rows, boxes: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Loss on the abnormal validation images (no augmentation); the IoU of the box each
    lesion's centre cell predicts: its mean and the shares at ≥ 0.3 and ≥ 0.5."""
    detector.eval()
    device = next(detector.boxes.parameters()).device
    losses: list[float] = []
    centre: list[float] = []
    for start in range(0, len(rows), 8):
        image, target, _, bxs = batch_of(arrays, rows[start : start + 8], boxes)
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
