"""What holds a joint box run's U-Net near the one it started from (``--distill-spot``,
``--distill-peaks``): the spot channel's drift from the starting U-Net's, over the whole map
(``spot_drift``) and over its peaks (``peak_drift``), per batch and over a split.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from models.training.dataset import FINDING_CHANNELS, Arrays
from models.training.net import UNet, normalise

SPOT = FINDING_CHANNELS.index("spot")  # the channel --distill-spot keeps


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


@torch.no_grad()
def drift_over(
    net: UNet, teacher: UNet, arrays: Arrays, distill: dict[str, float]
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
