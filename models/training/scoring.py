"""The figures of one engine's results on a split: per finding group FROC, AP50/AP30 and hits,
image-level AUROC (pooled, NIH only, per spot source), normal studies with findings or
alerts, Dice; the no-image baseline; the worst cases. The computations themselves are in
``metrics``; this module says which results and which truth they are taken over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.training import metrics as M
from models.training.dataset import Record, load_grey
from models.training.engines import Analysed, Found, upsample
from models.training.labels import GROUP_OF_LABEL, GROUPS

NIH = ("nih-chestxray14-mass50", "nih-cxr14-bbox", "nih-cxr14-nofinding")
SPOT_SOURCES = ("jsrt", "nih-cxr14-bbox", "nih-chestxray14-mass50")
"""Sources with spots, each scored on its own (with its own normals where it has them), so
that a source's look earns nothing: JSRT nodules against JSRT normals; the NIH spot sources
against NIH's normals."""

LABELLED_NORMALS = frozenset({"nih-cxr14-nofinding", "jsrt"})
"""Sources whose images without findings are labelled normal studies (NIH "No Finding",
three of which now carry RSNA opacity boxes; JSRT's 57 non-nodule films)."""


def normal_studies(records: Sequence[Record]) -> list[bool]:
    """Normal studies: images without findings from a labelled normal set
    (``LABELLED_NORMALS``) or from a source whose images all have none. An empty image of a
    lesion source (a COVID image whose lesions were not drawn) is neither normal nor abnormal
    for the image-level figures."""
    lesion_sources = {r.source for r in records if not r.normal} - LABELLED_NORMALS
    return [r.normal and r.source not in lesion_sources for r in records]


def truth(records: Sequence[Record], group: str) -> dict[int, list[M.Box]]:
    """The lesion boxes of ``group`` per image index."""
    return {
        i: [f.box for f in r.findings if GROUP_OF_LABEL.get(f.label) == group]
        for i, r in enumerate(records)
    }


def detections(
    results: Sequence[Analysed], group: str, keep: set[int] | None = None
) -> list[M.Detection]:
    """The findings of ``group`` as detections (of the images in ``keep``, where given)."""
    return [
        M.Detection(image=i, box=f.box, score=f.probability)
        for i, res in enumerate(results)
        if keep is None or i in keep
        for f in res.findings
        if f.group == group
    ]


def baseline(records: Sequence[Record]) -> list[Analysed]:
    """Four lung-quadrant boxes on every image, all with probability 1."""
    out = []
    for r in records:
        w, h = r.width, r.height
        boxes = [
            (0.10 * w, 0.12 * h, 0.48 * w, 0.50 * h),
            (0.52 * w, 0.12 * h, 0.90 * w, 0.50 * h),
            (0.10 * w, 0.50 * h, 0.48 * w, 0.88 * h),
            (0.52 * w, 0.50 * h, 0.90 * w, 0.88 * h),
        ]
        out.append(
            Analysed(
                findings=tuple(
                    Found(group=g, box=b, probability=1.0, alert=None)
                    for g in GROUPS
                    for b in boxes
                ),
                lung=None,
            )
        )
    return out


def _group_row(
    records: Sequence[Record],
    sweep: Sequence[Analysed],
    operating: Sequence[Analysed] | None,
    g: str,
) -> dict[str, Any]:
    """One finding group's figures: FROC, AP50, AP30; hits at the operating point; for the
    shadows, AP on TBX11K's images."""
    n = len(records)
    lesions = truth(records, g)
    dets = detections(sweep, g)
    row: dict[str, Any] = {
        "froc": M.froc(dets, lesions, n),
        "ap50": round(M.average_precision(dets, lesions, 0.5), 4),
        "ap30": round(M.average_precision(dets, lesions, 0.3), 4),
    }
    if operating is not None:
        op = detections(operating, g)
        row["hits_iou30"] = M.hits(op, lesions, 0.3)
        row["hits_iou50"] = M.hits(op, lesions, 0.5)
        row["findings_at_operating_point"] = len(op)
    if g == "shadow":
        tbx = {i for i, r in enumerate(records) if r.source == "tbx11k"}
        tb_truth = {i: v for i, v in lesions.items() if i in tbx}
        row["tbx11k_ap50"] = round(M.average_precision(detections(sweep, g, tbx), tb_truth, 0.5), 4)
        row["tbx11k_ap30"] = round(M.average_precision(detections(sweep, g, tbx), tb_truth, 0.3), 4)
    return row


def score(
    records: Sequence[Record],
    sweep: Sequence[Analysed],
    operating: Sequence[Analysed] | None,
    data_dir: Path,
) -> dict[str, Any]:
    """All figures for one engine (``operating`` None: the baseline, sweep only)."""
    n = len(records)
    out: dict[str, Any] = {"images": n, "groups": {}}
    for g in GROUPS:
        out["groups"][g] = _group_row(records, sweep, operating, g)
    abnormal = np.array([not r.normal for r in records])
    normal = np.array(normal_studies(records))
    rated = abnormal | normal
    top = np.array([max((f.probability for f in s.findings), default=0.0) for s in sweep])
    nih = np.array([r.source in NIH for r in records]) & rated
    out["image_auroc"] = round(M.auroc(top[rated], abnormal[rated]), 4)
    out["image_auroc_nih"] = round(M.auroc(top[nih], abnormal[nih]), 4)
    out["spot_by_source"] = spot_by_source(records, sweep)
    if operating is None:
        return out
    normals = [i for i in range(n) if normal[i]]
    out["normal_studies"] = len(normals)
    out["normal_with_finding"] = _share(normals, lambda i: bool(operating[i].findings))
    out["normal_with_alert"] = _share(
        normals, lambda i: any(f.alert for f in operating[i].findings)
    )
    out["fp_per_normal_image"] = round(
        sum(len(operating[i].findings) for i in normals) / max(1, len(normals)), 3
    )
    out["dice"] = _dice(records, operating, data_dir)
    return out


def spot_by_source(records: Sequence[Record], sweep: Sequence[Analysed]) -> dict[str, Any]:
    """Per spot source: spot FROC sensitivity at 1 FP/image, AP50 and the image AUROC of
    its spot images against the normals of its own kind (JSRT's own normals; NIH normals for
    the NIH sources), each image scored by its most probable spot finding; the median of
    that score over the source's spot images (a source the model recognises by its look
    shows a high median for every image)."""
    out: dict[str, Any] = {}
    top = np.array(
        [max((f.probability for f in s.findings if f.group == "spot"), default=0.0) for s in sweep]
    )
    has_spot = np.array(
        [any(GROUP_OF_LABEL.get(f.label) == "spot" for f in r.findings) for r in records]
    )
    normal = np.array(normal_studies(records))
    for source in SPOT_SOURCES:
        own = np.array([r.source == source for r in records])
        if not (own & has_spot).any():
            continue
        normals_of = source if source == "jsrt" else "nih-cxr14-nofinding"
        negatives = normal & np.array([r.source == normals_of for r in records])
        keep = [i for i in range(len(records)) if own[i] or negatives[i]]
        recs, dets = [records[i] for i in keep], [sweep[i] for i in keep]
        lesions = truth(recs, "spot")
        rated = (own & has_spot) | negatives
        froc = M.froc(detections(dets, "spot"), lesions, len(recs))
        out[source] = {
            "spot_images": int((own & has_spot).sum()),
            "normals": int(negatives.sum()),
            "sensitivity_at_1fp": froc["sensitivity_at_fp"]["1.0"],
            "ap50": round(M.average_precision(detections(dets, "spot"), lesions, 0.5), 4),
            "auroc": round(M.auroc(top[rated], has_spot[rated]), 4),
            "median_top_spot_probability": round(float(np.median(top[own & has_spot])), 4),
        }
    return out


def _share(indices: list[int], pred: Callable[[int], bool]) -> float | None:
    return round(sum(pred(i) for i in indices) / len(indices), 4) if indices else None


def _dice(records: Sequence[Record], results: Sequence[Analysed], data_dir: Path) -> dict[str, Any]:
    lesion, lung = [], []
    for r, res in zip(records, results, strict=True):
        masks = [f.mask for f in r.findings if f.mask and GROUP_OF_LABEL.get(f.label) == "shadow"]
        if masks:
            expected = np.zeros((r.height, r.width), dtype=bool)
            for m in masks:
                expected |= load_grey(data_dir / m) > 127
            pred = np.zeros_like(expected)
            for f in res.findings:
                if f.group == "shadow" and f.mask is not None:
                    shape = (r.height, r.width)
                    pred |= upsample(f.mask, shape) if f.mask.shape != shape else f.mask
            lesion.append(M.dice(pred, expected))
        if r.lungs and res.lung is not None:
            expected = load_grey(data_dir / r.lungs) > 127
            shape = (expected.shape[0], expected.shape[1])
            pred = res.lung if res.lung.shape == shape else upsample(res.lung, shape)
            lung.append(M.dice(pred, expected))
    return {
        "shadow_mean": round(float(np.mean(lesion)), 4) if lesion else None,
        "shadow_images": len(lesion),
        "lung_mean": round(float(np.mean(lung)), 4) if lung else None,
        "lung_images": len(lung),
    }


def worst(
    records: Sequence[Record], sweep: Sequence[Analysed], operating: Sequence[Analysed]
) -> dict[str, Any]:
    """The normals scored highest and the lesions missed at the operating point (ids only)."""
    normals = sorted(
        (
            (max((f.probability for f in s.findings), default=0.0), r.id)
            for r, s, normal in zip(records, sweep, normal_studies(records), strict=True)
            if normal
        ),
        reverse=True,
    )[:10]
    missed = []
    for r, op in zip(records, operating, strict=True):
        for f in r.findings:
            g = GROUP_OF_LABEL.get(f.label)
            if g and not any(x.group == g and M.iou(x.box, f.box) >= 0.3 for x in op.findings):
                missed.append({"id": r.id, "label": f.label, "box": [round(v) for v in f.box]})
    return {
        "normals_highest_score": [{"id": i, "score": round(s, 3)} for s, i in normals],
        "missed_at_operating_point": missed,
    }
