"""Lesion-level and image-level metrics: FROC, AP50, hits at IoU, Dice, AUROC (numpy only).

Detections with equal scores are taken as one block (a threshold cannot separate them), so
the no-image baseline, whose boxes all score 1, gets a single honest operating point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import numpy.typing as npt

Box = tuple[float, float, float, float]
FROC_RATES = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    image: int
    box: Box
    score: float


class Froc(TypedDict):
    """``froc``'s result: sensitivity by false positives per image (``FROC_RATES`` as
    strings), the counts, and the curve's (false positives per image, sensitivity, score)."""

    sensitivity_at_fp: dict[str, float]
    lesions: int
    images: int
    curve: list[tuple[float, float, float]]


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(
    detections: Sequence[Detection], lesions: dict[int, list[Box]], threshold: float
) -> list[tuple[float, bool]]:
    """Greedy by score: each detection hits the unmatched lesion of best IoU ≥ threshold."""
    taken: dict[int, set[int]] = {}
    out = []
    for d in sorted(detections, key=lambda d: -d.score):
        best, best_iou = -1, threshold
        for j, box in enumerate(lesions.get(d.image, [])):
            if j in taken.get(d.image, set()):
                continue
            v = iou(d.box, box)
            if v >= best_iou:
                best, best_iou = j, v
        if best >= 0:
            taken.setdefault(d.image, set()).add(best)
        out.append((d.score, best >= 0))
    return out


def _blocks(matched: list[tuple[float, bool]]) -> list[tuple[float, int, int]]:
    """(score, cumulative TP, cumulative FP) at the end of each equal-score block."""
    out: list[tuple[float, int, int]] = []
    tp = fp = 0
    for i, (score, hit) in enumerate(matched):
        tp += hit
        fp += not hit
        if i + 1 == len(matched) or matched[i + 1][0] != score:
            out.append((score, tp, fp))
    return out


def froc(
    detections: Sequence[Detection],
    lesions: dict[int, list[Box]],
    n_images: int,
    threshold: float = 0.3,
) -> Froc:
    """Sensitivity at each of ``FROC_RATES`` false positives per image, and the curve."""
    n_lesions = sum(len(v) for v in lesions.values())
    blocks = _blocks(match(detections, lesions, threshold))
    curve = [(fp / n_images, tp / max(1, n_lesions), score) for score, tp, fp in blocks]
    at = {}
    for rate in FROC_RATES:
        reachable = [s for f, s, _ in curve if f <= rate]
        at[str(rate)] = round(max(reachable, default=0.0), 4)
    return {
        "sensitivity_at_fp": at,
        "lesions": n_lesions,
        "images": n_images,
        "curve": [(round(f, 4), round(s, 4), round(t, 4)) for f, s, t in curve],
    }


def average_precision(
    detections: Sequence[Detection], lesions: dict[int, list[Box]], threshold: float = 0.5
) -> float:
    """VOC all-point AP at the IoU threshold (AP50 by default)."""
    n_lesions = sum(len(v) for v in lesions.values())
    if n_lesions == 0:
        return float("nan")
    blocks = _blocks(match(detections, lesions, threshold))
    recall = np.array([0.0] + [tp / n_lesions for _, tp, _ in blocks])
    precision = np.array([1.0] + [tp / max(1, tp + fp) for _, tp, fp in blocks])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def hits(detections: Sequence[Detection], lesions: dict[int, list[Box]], threshold: float) -> int:
    """Lesions overlapped by any detection with IoU ≥ threshold."""
    count = 0
    for image, boxes in lesions.items():
        dets = [d.box for d in detections if d.image == image]
        count += sum(any(iou(d, b) >= threshold for d in dets) for b in boxes)
    return count


def dice(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2.0 * int((pred & truth).sum()) / denom


def auroc(scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_]) -> float:
    """Area under the ROC curve (Mann–Whitney), ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
