"""The U-Net's training, as ``train`` runs it: the loss (weighted BCE + soft Dice per finding
channel, masked BCE + Dice for the lung), one optimisation step on an augmented uint8 batch,
the validation (loss terms and a quick image-level AUROC), the draw weights of the training
images (``sample_weights``) and the learning-rate schedule (warm-up, then a cosine over the
time budget).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from models.training import augment
from models.training.dataset import FINDING_CHANNELS, Arrays
from models.training.loop import descend
from models.training.metrics import auroc
from models.training.net import UNet, normalise

SOURCE_WEIGHT = {"covid-seg": 2.0}
SPOT_SHARE = 0.2  # 0.35 in the v3 run taught the spot channel to fire on normals
POS_WEIGHT = 2.0
LUNG_WEIGHT = 0.5
WARMUP_STEPS = 50


def loss_terms(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, has_lung: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Weighted BCE + soft Dice per finding channel; masked BCE + Dice for the lung channel."""
    nf = len(FINDING_CHANNELS)
    terms: dict[str, torch.Tensor] = {}
    f, t = logits[:, :nf], target[:, :nf]
    w = weight * (1.0 + (POS_WEIGHT - 1.0) * t)
    terms["bce"] = F.binary_cross_entropy_with_logits(f, t, weight=w, reduction="sum") / w.sum()
    p = torch.sigmoid(f)
    for c, name in enumerate(FINDING_CHANNELS):
        wc, pc, tc = weight[:, c], p[:, c], t[:, c]
        inter = (wc * pc * tc).sum()
        terms[f"dice_{name}"] = 1 - (2 * inter + 1) / ((wc * pc).sum() + (wc * tc).sum() + 1)
    if bool(has_lung.any()):
        lz, lt = logits[has_lung, nf], target[has_lung, nf]
        lp = torch.sigmoid(lz)
        dice = 1 - (2 * (lp * lt).sum() + 1) / (lp.sum() + lt.sum() + 1)
        terms["lung"] = LUNG_WEIGHT * (F.binary_cross_entropy_with_logits(lz, lt) + dice)
    return terms


def train_step(
    net: UNet,
    optimiser: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    g: torch.Generator,
    augment_batch: bool = True,
    scale_range: tuple[float, float] = augment.SCALE,
) -> float:
    """One optimisation step on a uint8 batch (images N×H×W, targets, weights, has_lung),
    augmented with the isotropic scale drawn from ``scale_range``."""
    images = batch["images"]
    if augment_batch:
        images = torch.from_numpy(augment.jpeg(images.numpy(), g))
    image = images.float().unsqueeze(1) / 255.0
    target = batch["targets"].float() / 255.0
    weight = batch["weights"].float() / 255.0
    if augment_batch:
        image, target, weight = augment.geometry(image, target, weight, g, scale_range=scale_range)
        image = augment.intensity(image, g)
    device = next(net.parameters()).device
    image, target, weight = image.to(device), target.to(device), weight.to(device)
    net.train()
    logits = net(normalise(image))
    loss = sum(loss_terms(logits, target, weight, batch["has_lung"].to(device)).values())
    assert isinstance(loss, torch.Tensor)
    return descend(optimiser, loss)


def batch_of(arrays: Arrays, idx: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
    """The rows ``idx`` of a split's arrays (in order) as tensors."""
    idx = np.sort(idx)
    return {
        "images": torch.from_numpy(arrays["images"][idx]),
        "targets": torch.from_numpy(arrays["targets"][idx]),
        "weights": torch.from_numpy(arrays["weights"][idx]),
        "has_lung": torch.from_numpy(arrays["has_lung"][idx]),
    }


@torch.no_grad()
def validate(net: UNet, arrays: Arrays, batch_size: int) -> dict[str, float]:
    """Mean loss terms on the validation arrays (no augmentation) and image-level AUROC."""
    net.eval()
    device = next(net.parameters()).device
    sums: dict[str, float] = {}
    scores: list[float] = []
    labels: list[bool] = []
    n = len(arrays["images"])
    for start in range(0, n, batch_size):
        b = {
            k: v.to(device)
            for k, v in batch_of(arrays, np.arange(start, min(n, start + batch_size))).items()
        }
        image = b["images"].float().unsqueeze(1) / 255.0
        logits = net(normalise(image))
        terms = loss_terms(
            logits, b["targets"].float() / 255, b["weights"].float() / 255, b["has_lung"]
        )
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(image)
        probs = torch.sigmoid(logits[:, : len(FINDING_CHANNELS)])
        scores += probs.amax(dim=(1, 2, 3)).tolist()
        labels += (b["targets"][:, : len(FINDING_CHANNELS)].amax(dim=(1, 2, 3)) > 127).tolist()
    out = {k: v / n for k, v in sums.items()}
    out["loss"] = sum(v for k, v in out.items())
    out["auroc"] = auroc(np.array(scores), np.array(labels, dtype=bool))
    return out


def sample_weights(
    sources: npt.NDArray[np.generic], has_spot: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float64]:
    """Draw probabilities per training image: by ``SOURCE_WEIGHT``; images with a spot scaled
    to ``SPOT_SHARE`` of the mass; JSRT's normals to the mass of JSRT's nodules (so that within
    JSRT the film's look says nothing)."""
    w = np.array([SOURCE_WEIGHT.get(str(s), 1.0) for s in sources], dtype=np.float64)
    if has_spot.any() and (~has_spot).any():
        spot, rest = w[has_spot].sum(), w[~has_spot].sum()
        w[has_spot] *= SPOT_SHARE / (1 - SPOT_SHARE) * rest / spot
    jsrt = np.array([str(s) == "jsrt" for s in sources])
    if (jsrt & has_spot).any() and (jsrt & ~has_spot).any():
        w[jsrt & ~has_spot] *= w[jsrt & has_spot].sum() / w[jsrt & ~has_spot].sum()
    out: npt.NDArray[np.float64] = w / w.sum()
    return out


def cosine(elapsed: float, budget: float) -> float:
    """The schedule's factor after ``elapsed`` of ``budget`` seconds (floor 2 %)."""
    frac = min(1.0, elapsed / budget)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))


def learning_rate(
    base: float, step: int, elapsed: float, budget: float, ramp: dict[str, float] | None = None
) -> float:
    """Warmup, then a cosine over the whole budget (floor 2 % of ``base``). When a resumed
    run extends the budget, ``ramp`` (``step``, ``factor``: where the old schedule stood)
    eases the factor linearly over ``WARMUP_STEPS`` from where it was to the cosine of the
    extended budget, so the rest of the run follows the schedule it would have had had the
    larger budget been set from the start, without a jump in the learning rate."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    target = cosine(elapsed, budget)
    if ramp is not None and step - ramp["step"] < WARMUP_STEPS:
        t = max(0.0, (step - ramp["step"] + 1) / WARMUP_STEPS)
        target = ramp["factor"] + (target - ramp["factor"]) * t
    return base * warm * target
