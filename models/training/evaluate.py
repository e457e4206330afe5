"""Evaluate the shipped model on any ``cxr-lesions`` folder, through the real pipeline.

    python -m models.training.evaluate ../shared/data/cxr-lesions --split val --out bench/work/eval

For every image the engine returns findings (group, box in input pixels, probability, alert,
mask) and the lung mask. ``--engine pipeline`` (default) runs ``pipeline.analyse`` on a
``SourceImage``; ``--engine network`` runs the ONNX model alone with connected components
(the reference the pipeline must not fall below). Each engine runs twice: with the finding
thresholds lowered to ``--sweep-threshold`` (candidates for FROC, AP50, AUROC) and at the
manifest's operating point (hits, Dice, normal studies with findings / alerts). The no-image
baseline puts the same four lung-quadrant boxes on every image. Writes ``summary.json`` and
``froc.png`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import SimpleITK as sitk
from PIL import Image, ImageDraw

from models.training import metrics as M
from models.training.dataset import (
    TEST_PATIENTS,
    Record,
    load_grey,
    read_records,
    split_by_patient,
)
from models.training.ensemble import per_channel_boxes, reweight
from models.training.labels import GROUP_OF_LABEL, GROUPS
from models.training.preprocess import prepare
from pipeline.model import VIEW_FUSIONS

REPO = Path(__file__).resolve().parents[2]
NIH = ("nih-chestxray14-mass50", "nih-cxr14-bbox", "nih-cxr14-nofinding")
SPOT_SOURCES = ("jsrt", "nih-cxr14-bbox", "nih-chestxray14-mass50")
"""Sources with spots, each scored on its own (with its own normals where it has them), so
that a source's look earns nothing: JSRT nodules against JSRT normals; the NIH spot sources
against NIH's normals."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    group: str
    box: M.Box
    probability: float
    alert: bool | None
    mask: npt.NDArray[np.bool_] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Analysed:
    findings: tuple[Found, ...]
    lung: npt.NDArray[np.bool_] | None


Engine = Callable[[npt.NDArray[np.uint8]], Analysed]


# --- engines -------------------------------------------------------------------------------


def _components(
    prob: npt.NDArray[np.float32], threshold: float, relative: float
) -> list[tuple[npt.NDArray[np.bool_], float]]:
    """Connected components of prob ≥ threshold, each cut to ≥ relative × its peak."""
    labels = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray((prob >= threshold).astype(np.uint8)), True)
    )
    out = []
    for k in range(1, int(labels.max()) + 1):
        region = labels == k
        peak = float(prob[region].max())
        if relative > 0:
            region &= prob >= relative * peak
        out.append((region, peak))
    return out


class NetworkEngine:
    """The ONNX model alone: S200 preprocessing, components per finding channel."""

    def __init__(self, model_dir: Path, thresholds: dict[str, float], relative: float) -> None:
        self.manifest = json.loads((model_dir / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            str(model_dir / self.manifest["file"]), options, providers=["CPUExecutionProvider"]
        )
        self.thresholds = thresholds
        self.relative = relative
        self.size = (self.manifest["input"]["height"], self.manifest["input"]["width"])

    def probabilities(self, grey: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        x = prepare(grey, *self.size)[None, None]
        out: npt.NDArray[np.float32] = self.session.run(["probabilities"], {"image": x})[0][0]
        return out

    def __call__(self, grey: npt.NDArray[np.uint8]) -> Analysed:
        probs = self.probabilities(grey)
        h, w = grey.shape
        sy, sx = h / self.size[0], w / self.size[1]
        found = []
        lung = None
        for c, spec in enumerate(self.manifest["channels"]):
            if spec["kind"] == "lung":
                lung = _upsample(probs[c] >= 0.5, grey.shape)
                continue
            for region, peak in _components(probs[c], self.thresholds[spec["name"]], self.relative):
                ys, xs = np.nonzero(region)
                box = (xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy)
                found.append(
                    Found(group=spec["group"], box=box, probability=peak, alert=None, mask=region)
                )
        return Analysed(findings=tuple(found), lung=lung)


def _upsample(mask: npt.NDArray[np.bool_], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    ri = np.minimum(
        ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int), mask.shape[0] - 1
    )
    ci = np.minimum(
        ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int), mask.shape[1] - 1
    )
    return mask[np.ix_(ri, ci)]


def pipeline_engine(model_dir: Path, config_path: Path | None = None) -> Engine:
    """The real pipeline (``pipeline.analyse.analyse``, S100–S742) with the model in
    ``model_dir`` and the ``[pipeline]`` section of the node configuration ``config_path``
    (validated by ``node.config.load_config``; None: the embedded defaults)."""
    import logging

    import structlog

    from node.config import load_config
    from pipeline.analyse import analyse
    from pipeline.config import PipelineConfig
    from pipeline.model import load_model
    from pipeline.result import SourceImage

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    base = PipelineConfig() if config_path is None else load_config(config_path).pipeline
    config = dataclasses.replace(base, model_dir=model_dir)
    model = load_model(model_dir, threads=2)

    def run(grey: npt.NDArray[np.uint8]) -> Analysed:
        result = analyse(SourceImage(pixels=grey), model, config)
        found = tuple(
            Found(
                group=str(f.finding_type.group),
                box=tuple(map(float, f.box)),
                probability=float(f.probability),
                alert=bool(f.alert),
                mask=f.mask,
            )
            for f in result.findings
        )
        lung = None if result.lung_mask is None else np.asarray(result.lung_mask, dtype=bool)
        return Analysed(findings=found, lung=lung)

    return run


def _model_dir_with_thresholds(
    model_dir: Path,
    value: float,
    tmp: Path,
    *,
    extent_scale: bool = True,
    box_weight: float | None = None,
    support_power: float | None = None,
    zoom_scales: Sequence[float] | None = None,
    view_fusion: str | None = None,
    ensemble_weights: EnsembleChoice | None = None,
) -> Path:
    """A copy of the model folder whose manifest has every finding threshold set to value
    (with ``extent_scale=False``, no fitted extent: the regions as found; with
    ``box_weight``, that weight of the box head for every finding channel; with
    ``support_power``, that power of the support for every finding channel; with
    ``zoom_scales``, those S300 zoom scales; with ``view_fusion``, that S300 view fusion
    for every finding channel; with ``ensemble_weights``, an ensemble's graph with those
    weights, ``models.training.ensemble.reweight``)."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for name in manifest["operating_point"]["thresholds"]:
        manifest["operating_point"]["thresholds"][name] = value
    if not extent_scale:
        manifest["operating_point"].pop("extent_scale", None)
    if box_weight is not None:
        manifest["operating_point"]["box_weight"] = dict.fromkeys(
            manifest["operating_point"]["thresholds"], box_weight
        )
    if support_power is not None:
        manifest["operating_point"]["support_power"] = dict.fromkeys(
            manifest["operating_point"]["thresholds"], support_power
        )
    if zoom_scales is not None:
        manifest["operating_point"]["zoom_scales"] = list(zoom_scales)
    if view_fusion is not None:
        manifest["operating_point"]["view_fusion"] = dict.fromkeys(
            manifest["operating_point"]["thresholds"], view_fusion
        )
    for file in (manifest["file"], manifest.get("box_output", {}).get("file")):
        if file is not None:
            shutil.copy(model_dir / file, tmp / file)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if ensemble_weights is not None:
        reweight(tmp, dict(ensemble_weights))
    return tmp


# --- scoring -------------------------------------------------------------------------------


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


def _truth(records: Sequence[Record], group: str) -> dict[int, list[M.Box]]:
    return {
        i: [f.box for f in r.findings if GROUP_OF_LABEL.get(f.label) == group]
        for i, r in enumerate(records)
    }


def _dets(
    results: Sequence[Analysed], group: str, keep: set[int] | None = None
) -> list[M.Detection]:
    return [
        M.Detection(image=i, box=f.box, score=f.probability)
        for i, res in enumerate(results)
        if keep is None or i in keep
        for f in res.findings
        if f.group == group
    ]


def _baseline(records: Sequence[Record]) -> list[Analysed]:
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


def score(
    records: Sequence[Record],
    sweep: Sequence[Analysed],
    operating: Sequence[Analysed] | None,
    data_dir: Path,
) -> dict[str, Any]:
    """All figures for one engine (``operating`` None: the baseline, sweep only)."""
    n = len(records)
    out: dict[str, Any] = {"images": n, "groups": {}}
    tbx = {i for i, r in enumerate(records) if r.source == "tbx11k"}
    for g in GROUPS:
        truth = _truth(records, g)
        dets = _dets(sweep, g)
        row: dict[str, Any] = {
            "froc": M.froc(dets, truth, n),
            "ap50": round(M.average_precision(dets, truth, 0.5), 4),
            "ap30": round(M.average_precision(dets, truth, 0.3), 4),
        }
        if operating is not None:
            op = _dets(operating, g)
            row["hits_iou30"] = M.hits(op, truth, 0.3)
            row["hits_iou50"] = M.hits(op, truth, 0.5)
            row["findings_at_operating_point"] = len(op)
        if g == "shadow":
            tb_truth = {i: v for i, v in truth.items() if i in tbx}
            row["tbx11k_ap50"] = round(M.average_precision(_dets(sweep, g, tbx), tb_truth, 0.5), 4)
            row["tbx11k_ap30"] = round(M.average_precision(_dets(sweep, g, tbx), tb_truth, 0.3), 4)
        out["groups"][g] = row
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
        truth = _truth(recs, "spot")
        rated = (own & has_spot) | negatives
        out[source] = {
            "spot_images": int((own & has_spot).sum()),
            "normals": int(negatives.sum()),
            "sensitivity_at_1fp": M.froc(_dets(dets, "spot"), truth, len(recs))[
                "sensitivity_at_fp"
            ]["1.0"],
            "ap50": round(M.average_precision(_dets(dets, "spot"), truth, 0.5), 4),
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
            truth = np.zeros((r.height, r.width), dtype=bool)
            for m in masks:
                truth |= load_grey(data_dir / m) > 127
            pred = np.zeros_like(truth)
            for f in res.findings:
                if f.group == "shadow" and f.mask is not None:
                    pred |= (
                        _upsample(f.mask, truth.shape) if f.mask.shape != truth.shape else f.mask
                    )
            lesion.append(M.dice(pred, truth))
        if r.lungs and res.lung is not None:
            truth = load_grey(data_dir / r.lungs) > 127
            pred = res.lung if res.lung.shape == truth.shape else _upsample(res.lung, truth.shape)
            lung.append(M.dice(pred, truth))
    return {
        "shadow_mean": round(float(np.mean(lesion)), 4) if lesion else None,
        "shadow_images": len(lesion),
        "lung_mean": round(float(np.mean(lung)), 4) if lung else None,
        "lung_images": len(lung),
    }


# --- output --------------------------------------------------------------------------------

COLOURS = {"spot": (220, 60, 40), "shadow": (30, 100, 220)}


def plot_froc(summary: dict[str, Any], path: Path) -> None:
    """FROC curves (sensitivity vs FP per image, log x) for each group, baseline dotted."""
    w, h, left, bottom, top, right = 720, 480, 70, 60, 30, 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = math.log2(1 / 16), math.log2(8)

    def xy(fp: float, s: float) -> tuple[float, float]:
        x = left + (math.log2(max(fp, 1 / 16)) - lo) / (hi - lo) * (w - left - right)
        return x, h - bottom - s * (h - top - bottom)

    for rate in (1 / 16, 1 / 8, 0.25, 0.5, 1, 2, 4, 8):
        x, _ = xy(rate, 0)
        d.line([(x, top), (x, h - bottom)], fill=(225, 225, 225))
        d.text((x - 10, h - bottom + 6), f"{rate:g}", fill="black")
    for s in (0, 0.25, 0.5, 0.75, 1):
        _, y = xy(1 / 16, s)
        d.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        d.text((left - 34, y - 6), f"{s:.2f}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((w // 2 - 80, h - 28), "false positives per image (log)", fill="black")
    d.text((8, top - 20), "lesion sensitivity (IoU >= 0.3)", fill="black")
    legend_y = top + 8
    for name, key, dotted in (("model", "model", False), ("baseline", "baseline", True)):
        for g in GROUPS:
            curve = summary[key]["groups"][g]["froc"]["curve"]
            pts = [xy(f, s) for f, s, _ in curve if f > 0]
            colour = COLOURS[g]
            if dotted:
                for p in pts:
                    d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], outline=colour)
            elif len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            d.text((w - right - 170, legend_y), f"{g} ({name})", fill=colour)
            legend_y += 14
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _table(summary: dict[str, Any]) -> str:
    lines = []
    for key in ("model", "baseline"):
        s = summary[key]
        lines.append(f"== {key} ({summary['engine'] if key == 'model' else 'four quadrants'})")
        for g, row in s["groups"].items():
            froc = row["froc"]["sensitivity_at_fp"]
            lines.append(
                f"{g:7s} lesions {row['froc']['lesions']:4d}  FROC@0.25/0.5/1/2 "
                + " ".join(f"{froc[k]:.3f}" for k in ("0.25", "0.5", "1.0", "2.0"))
                + f"  AP50 {row['ap50']:.3f}  AP30 {row['ap30']:.3f}"
                + (
                    f"  hits@.3 {row['hits_iou30']} @.5 {row['hits_iou50']}"
                    if "hits_iou30" in row
                    else ""
                )
                + (f"  TBX11K AP50 {row['tbx11k_ap50']:.3f}" if "tbx11k_ap50" in row else "")
            )
        lines.append(f"image AUROC pooled {s['image_auroc']}  NIH-only {s['image_auroc_nih']}")
        if "normal_with_finding" in s:
            lines.append(
                f"normal studies {s['normal_studies']}: with finding {s['normal_with_finding']}, "
                f"with alert {s['normal_with_alert']}, FP/normal image {s['fp_per_normal_image']}"
            )
            lines.append(f"Dice {s['dice']}")
    return "\n".join(lines)


NORMAL_SHARE_PER_CHANNEL = 0.07
NORMAL_ALERT_SHARE_PER_CHANNEL = 0.02
THRESHOLD_GRID = tuple(round(0.2 + 0.025 * i, 3) for i in range(31))
ALERT_GRID = (*THRESHOLD_GRID, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 0.998, 0.999)


def _lowest(grid: Sequence[float], peaks: npt.NDArray[np.float32], share: float) -> float:
    """The lowest threshold of ``grid`` reached by at most ``share`` of the ``peaks``."""
    ok = [t for t in grid if (peaks >= t).mean() <= share]
    return ok[0] if ok else grid[-1]


def choose_operating_point(
    results: Sequence[Analysed], channels: Sequence[dict[str, Any]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per finding channel, from ``results``, an engine's findings on normal studies with
    every threshold at the sweep value, each study scored by its most probable finding of
    the channel's group (0 without one): the finding threshold, the lowest grid value that at
    most ``NORMAL_SHARE_PER_CHANNEL`` of the studies reach, and the alert threshold, the
    lowest that at most ``NORMAL_ALERT_SHARE_PER_CHANNEL`` reach (never below the finding
    threshold)."""
    if not results:
        raise SystemExit("no normal studies in this split: cannot choose an operating point")
    thresholds, alerts = {}, {}
    for spec in channels:
        if spec["kind"] != "finding":
            continue
        top = np.array(
            [
                max((f.probability for f in r.findings if f.group == spec["group"]), default=0.0)
                for r in results
            ]
        )
        t = _lowest(THRESHOLD_GRID, top, NORMAL_SHARE_PER_CHANNEL)
        thresholds[spec["name"]] = t
        alerts[spec["name"]] = max(t, _lowest(ALERT_GRID, top, NORMAL_ALERT_SHARE_PER_CHANNEL))
    return thresholds, alerts


EXTENT_MIN_IOU = 0.1
EXTENT_MIN_MATCHES = 50


def fit_extent_scale(
    records: Sequence[Record], results: Sequence[Analysed]
) -> dict[str, tuple[float, float, int]]:
    """Per group, (width, height) factors that bring the findings' boxes to the size of the
    lesions they overlap best (IoU ≥ ``EXTENT_MIN_IOU``): the probability-weighted geometric
    mean of the lesion / finding size ratios, rounded to 0.01, and the number of matches. A
    group with fewer than ``EXTENT_MIN_MATCHES`` matches keeps (1, 1): too few to fit."""
    out = {}
    for g in GROUPS:
        truth = _truth(records, g)
        logs, weights = [], []
        for i, res in enumerate(results):
            for f in res.findings:
                if f.group != g:
                    continue
                best, lesion = max(
                    ((M.iou(f.box, t), t) for t in truth.get(i, [])),
                    default=(0.0, None),
                    key=lambda pair: pair[0],
                )
                if lesion is None or best < EXTENT_MIN_IOU:
                    continue
                logs.append(
                    (
                        math.log((lesion[2] - lesion[0]) / (f.box[2] - f.box[0])),
                        math.log((lesion[3] - lesion[1]) / (f.box[3] - f.box[1])),
                    )
                )
                weights.append(f.probability)
        if len(logs) < EXTENT_MIN_MATCHES:
            out[g] = (1.0, 1.0, len(logs))
            continue
        mean = np.average(np.array(logs), axis=0, weights=np.array(weights) + 1e-6)
        out[g] = (round(float(np.exp(mean[0])), 2), round(float(np.exp(mean[1])), 2), len(logs))
    return out


BOX_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def blend_findings(own: Analysed, head: Analysed, weight: float) -> list[Found]:
    """One image's findings with boxes ``weight`` × the box head's + the rest × the region's
    own: ``own`` and ``head`` are the pipeline's findings at box weight 0 and 1, which differ
    only in S700's box, so they pair by group and probability; a finding only one run kept
    keeps its box. Of same-group findings overlapping at IoU > 0.5 the more probable stays."""
    by_key: dict[tuple[str, float], list[Found]] = {}
    for f in head.findings:
        by_key.setdefault((f.group, round(f.probability, 6)), []).append(f)
    blended = []
    for f in own.findings:
        mates = by_key.get((f.group, round(f.probability, 6)))
        if not mates:
            blended.append(f)
            continue
        h = mates.pop(0)
        box = tuple(weight * a + (1 - weight) * b for a, b in zip(h.box, f.box, strict=True))
        blended.append(dataclasses.replace(f, box=box))
    blended += [f for mates in by_key.values() for f in mates]
    kept: list[Found] = []
    for f in sorted(blended, key=lambda f: f.probability, reverse=True):
        if not any(k.group == f.group and M.iou(k.box, f.box) > 0.5 for k in kept):
            kept.append(f)
    return kept


def fit_box_weight(
    records: Sequence[Record], own: Sequence[Analysed], head: Sequence[Analysed]
) -> dict[str, tuple[float, dict[float, float]]]:
    """Per group, the weight of ``BOX_WEIGHTS`` whose blended boxes (``blend_findings``)
    reach the highest AP50 on ``records``, ties to the smaller weight, and every weight's
    AP50."""
    out = {}
    for g in GROUPS:
        truth = _truth(records, g)
        ap = {}
        for w in BOX_WEIGHTS:
            dets = [
                M.Detection(image=i, box=f.box, score=f.probability)
                for i, (o, h) in enumerate(zip(own, head, strict=True))
                for f in blend_findings(o, h, w)
                if f.group == g
            ]
            ap[w] = round(M.average_precision(dets, truth, 0.5), 4)
        best = max(BOX_WEIGHTS, key=lambda w: (ap[w], -w))
        out[g] = (best, ap)
    return out


SUPPORT_POWERS = (0.0, 0.5, 1.0, 2.0)
ZOOM_CHOICES: tuple[tuple[float, ...], ...] = (
    (),
    (1.1,),
    (1.2,),
    (1.1, 1.2),
    (0.85,),
    (0.85, 1.2),
)
"""S300 zoom scales tried by ``--fit-zoom-scales``: within the training augmentation's scale
range (0.85–1.2), so that each view looks like what the model was trained on."""


def fit_per_group(
    records: Sequence[Record], runs: dict[Any, Sequence[Analysed]]
) -> dict[str, tuple[Any, dict[Any, float]]]:
    """Per group, the choice whose run (the pipeline's findings with that choice) reaches the
    highest AP50 on ``records``, ties to the earlier choice in ``runs``, and every choice's
    AP50."""
    order = list(runs)
    out = {}
    for g in GROUPS:
        truth = _truth(records, g)
        ap = {
            c: round(M.average_precision(_dets(run, g), truth, 0.5), 4) for c, run in runs.items()
        }
        best = max(order, key=lambda c: (ap[c], -order.index(c)))
        out[g] = (best, ap)
    return out


def fit_support_power(
    records: Sequence[Record], runs: dict[float, Sequence[Analysed]]
) -> dict[str, tuple[float, dict[float, float]]]:
    """Per group, the power whose run (the pipeline's findings at that support power) reaches
    the highest AP50 on ``records``, ties to the smaller power, and every power's AP50."""
    return fit_per_group(records, dict(sorted(runs.items())))


def fit_view_fusion(
    records: Sequence[Record], runs: dict[str, Sequence[Analysed]]
) -> dict[str, tuple[str, dict[str, float]]]:
    """Per group, the S300 view fusion (``VIEW_FUSIONS``) whose run reaches the highest AP50
    on ``records``, ties to ``mean`` (the views averaged), and every fusion's AP50."""
    return fit_per_group(records, {f: runs[f] for f in VIEW_FUSIONS})


def ap50_by_choice(
    records: Sequence[Record], runs: dict[Any, Sequence[Analysed]]
) -> dict[str, dict[str, float]]:
    """Each run's AP50 per finding group on ``records``, keyed by ``choice_key``."""
    return {
        choice_key(choice): {
            g: round(M.average_precision(_dets(run, g), _truth(records, g), 0.5), 4) for g in GROUPS
        }
        for choice, run in runs.items()
    }


def choice_key(choice: Any) -> str:
    """How a fit's choice is named in its AP50 record (a list of scales; ensemble weights
    as ``spot 1/0, shadow 0.5/0.5, boxes 1/0``)."""
    if isinstance(choice, tuple) and choice and isinstance(choice[0], tuple):
        return ", ".join(f"{name} {'/'.join(f'{w:g}' for w in ws)}" for name, ws in choice)
    return str(list(choice))


def mean_ap50(row: dict[str, float]) -> float:
    """AP50 averaged over the finding groups, groups without lesions (NaN) left out."""
    values = [v for v in row.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else 0.0


def fit_zoom_scales(
    records: Sequence[Record], runs: dict[tuple[float, ...], Sequence[Analysed]]
) -> tuple[tuple[float, ...], dict[str, dict[str, float]]]:
    """The zoom scales whose run (the pipeline's findings with those S300 scales) reaches
    the highest AP50 averaged over the finding groups with lesions in ``records``, ties to
    fewer scales, and every run's AP50 per group. One choice for all channels: the scales
    decide the model runs, which serve every channel at once."""
    ap = ap50_by_choice(records, runs)
    return max(runs, key=lambda s: (mean_ap50(ap[choice_key(s)]), -len(s))), ap


EnsembleChoice = tuple[tuple[str, tuple[float, ...]], ...]
ENSEMBLE_CHOICES: tuple[EnsembleChoice, ...] = (
    (("spot", (1.0, 0.0)), ("shadow", (1.0, 0.0)), ("boxes", (1.0, 0.0))),
    (("spot", (1.0, 0.0)), ("shadow", (0.5, 0.5)), ("boxes", (1.0, 0.0))),
    (("spot", (1.0, 0.0)), ("shadow", (0.5, 0.5)), ("boxes", (0.5, 0.5))),
    (("spot", (0.5, 0.5)), ("shadow", (0.5, 0.5)), ("boxes", (0.5, 0.5))),
)
"""Weights of a two-member ensemble (``models.training.ensemble``) tried by
``--fit-ensemble-weights``, from the first member alone to both members alike everywhere
(the lung channel keeps its weights)."""


GROUP_ENSEMBLE_CHOICES: tuple[EnsembleChoice, ...] = (
    (("map", (1.0, 0.0)), ("boxes", (1.0, 0.0))),
    (("map", (0.5, 0.5)), ("boxes", (1.0, 0.0))),
    (("map", (0.5, 0.5)), ("boxes", (0.5, 0.5))),
    (("map", (0.0, 1.0)), ("boxes", (0.0, 1.0))),
)
"""For a two-member ensemble with boxes per finding channel: the weights of one group's
probability map and of its boxes, from the first member alone to the second alone. Each
choice runs for every finding channel at once; ``--fit-ensemble-weights`` then keeps, per
group, the choice with that group's highest AP50 (the groups' findings read their own maps
and boxes)."""


def group_choice_weights(
    choice: EnsembleChoice, findings: Sequence[str]
) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """A ``GROUP_ENSEMBLE_CHOICES`` entry as ensemble weights for every finding channel."""
    weights = dict(choice)
    return tuple(
        pair for f in findings for pair in ((f, weights["map"]), (f"boxes.{f}", weights["boxes"]))
    )


def fit_ensemble_weights(
    records: Sequence[Record], runs: dict[EnsembleChoice, Sequence[Analysed]]
) -> tuple[EnsembleChoice, dict[str, dict[str, float]]]:
    """The ensemble weights whose run reaches the highest AP50 averaged over the finding
    groups on ``records``, ties to the earlier choice in ``runs`` (less of the second
    member), and every run's AP50 per group. One choice for all groups: the box weights
    serve every channel at once."""
    ap = ap50_by_choice(records, runs)
    order = list(runs)
    return max(order, key=lambda c: (mean_ap50(ap[choice_key(c)]), -order.index(c))), ap


def _update_manifest(model_dir: Path, **sections: Any) -> None:
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(sections)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures worth keeping in the manifest."""
    m = summary["model"]
    out: dict[str, Any] = {
        "split": summary["split"],
        "engine": summary["engine"],
        "images": m["images"],
    }
    for g, row in m["groups"].items():
        out[g] = {k: row[k] for k in ("ap50", "hits_iou30", "hits_iou50") if k in row}
        out[g]["froc_sensitivity_at_fp"] = row["froc"]["sensitivity_at_fp"]
        out[g]["lesions"] = row["froc"]["lesions"]
        if "tbx11k_ap50" in row:
            out[g]["tbx11k_ap50"] = row["tbx11k_ap50"]
    for k in (
        "image_auroc",
        "image_auroc_nih",
        "normal_with_finding",
        "normal_with_alert",
        "fp_per_normal_image",
        "dice",
    ):
        out[k] = m.get(k)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument(
        "--split",
        choices=("val", "train", "test", "all"),
        default="all",
        help="test: the locked test split (test-patients.json), once per release candidate, "
        "after its rule to ship is written down; never with a --fit-* or "
        "--choose-operating-point",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models")
    parser.add_argument("--engine", choices=("pipeline", "network"), default="pipeline")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="pipeline engine: a node configuration whose [pipeline] section is used "
        "(default: the embedded defaults)",
    )
    parser.add_argument("--sweep-threshold", type=float, default=0.05)
    parser.add_argument(
        "--relative",
        type=float,
        default=0.5,
        help="network engine: cut each component to ≥ this share of its peak",
    )
    parser.add_argument("--limit", type=int, default=0, help="first N images only (smoke runs)")
    parser.add_argument(
        "--choose-operating-point",
        action="store_true",
        help="pick thresholds on this split's normals through the engine and write them to "
        "the manifest",
    )
    parser.add_argument(
        "--fit-extent-scale",
        action="store_true",
        help="fit each finding group's region scale on this split (use train) through the "
        "pipeline, write it to the manifest's operating point, exit",
    )
    parser.add_argument(
        "--fit-box-weight",
        action="store_true",
        help="a model with a box head: fit each finding group's box weight on this split "
        "(use train) through the pipeline, write it to the manifest's operating point, exit",
    )
    parser.add_argument(
        "--fit-support-power",
        action="store_true",
        help="fit each finding group's support power on this split (use train) through the "
        "pipeline, write it to the manifest's operating point, exit",
    )
    parser.add_argument(
        "--fit-zoom-scales",
        action="store_true",
        help="choose the S300 zoom scales on this split (use train) through the pipeline, "
        "write them to the manifest's operating point, exit",
    )
    parser.add_argument(
        "--fit-view-fusion",
        action="store_true",
        help="a model with zoom scales: choose each finding group's S300 view fusion (mean "
        "or max of the views) on this split (use train) through the pipeline, write it to the "
        "manifest's operating point, exit",
    )
    parser.add_argument(
        "--fit-ensemble-weights",
        action="store_true",
        help="a two-member ensemble (models.training.ensemble): choose its weights of "
        "ENSEMBLE_CHOICES (with boxes per finding channel: per group, of "
        "GROUP_ENSEMBLE_CHOICES) on this split (use train) through the pipeline, write them "
        "into its graph and manifest, exit",
    )
    parser.add_argument(
        "--write-metrics",
        action="store_true",
        help="write the headline figures into the manifest's metrics",
    )
    args = parser.parse_args(argv)

    records = read_records(args.data_dir)
    fits = [k for k, v in vars(args).items() if k.startswith(("fit_", "choose_")) and v]
    if fits and _sees_locked_test(records, args.split):
        flag = "--" + fits[0].replace("_", "-")
        raise SystemExit(
            f"{flag} on --split {args.split}: fits and choices never see the test split"
        )
    if args.split != "all":
        records = split_by_patient(records)[args.split]
    if args.limit:
        records = records[: args.limit]
    if args.fit_extent_scale:
        return _fit_extent_scale(args, records)
    if args.fit_box_weight:
        return _fit_box_weight(args, records)
    if args.fit_support_power:
        return _fit_support_power(args, records)
    if args.fit_zoom_scales:
        return _fit_zoom_scales(args, records)
    if args.fit_view_fusion:
        return _fit_view_fusion(args, records)
    if args.fit_ensemble_weights:
        return _fit_ensemble_weights(args, records)
    if args.choose_operating_point:
        _choose_operating_point(args, records)
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        sweep_engine, op_engine = _engine(args, Path(tmp)), _engine(args, None)
        t0 = time.monotonic()
        sweep, operating = [], []
        for r in records:
            grey = load_grey(args.data_dir / "images" / f"{r.id}.png")
            sweep.append(sweep_engine(grey))
            operating.append(op_engine(grey))
        seconds = time.monotonic() - t0
    summary = {
        "data_dir": str(args.data_dir),
        "split": args.split,
        "engine": args.engine,
        "model": {
            "name": manifest["name"],
            "version": manifest["version"],
            "sha256": manifest["sha256"],
            "operating_point": manifest["operating_point"],
        },
        "pipeline_config": str(args.config) if args.config else "embedded defaults",
        "sweep_threshold": args.sweep_threshold,
        "seconds_per_image_both_runs": round(seconds / max(1, len(records)), 3),
    }
    summary["model"] = {**summary["model"], **score(records, sweep, operating, args.data_dir)}
    summary["baseline"] = score(records, _baseline(records), None, args.data_dir)
    summary["worst"] = _worst(records, sweep, operating)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_froc(summary, args.out / "froc.png")
    if args.write_metrics:
        metrics = json.loads((args.model_dir / "manifest.json").read_text()).get("metrics", {})
        metrics["validation"] = _headline(summary)
        metrics["baseline_four_quadrants"] = {
            g: {"ap50": row["ap50"], "froc_sensitivity_at_fp": row["froc"]["sensitivity_at_fp"]}
            for g, row in summary["baseline"]["groups"].items()
        }
        _update_manifest(args.model_dir, metrics=metrics)
    print(_table(summary))
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'froc.png'}")
    return 0


def _sees_locked_test(records: Sequence[Record], split: str) -> bool:
    """Whether ``split`` of ``records`` holds a patient of the committed locked test split."""
    if split == "test":
        return True
    if split != "all" or not TEST_PATIENTS.exists():
        return False
    listed = json.loads(TEST_PATIENTS.read_text())["patients"]
    locked = {p for patients in listed.values() for p in patients}
    return any(r.patient in locked for r in records)


def _engine(args: argparse.Namespace, sweep_dir: Path | None) -> Engine:
    """The chosen engine at the manifest's operating point or, with ``sweep_dir`` (an empty
    folder for the pipeline's copy of the model), with every finding threshold at the sweep
    value."""
    if args.engine == "network":
        manifest = json.loads((args.model_dir / "manifest.json").read_text())
        thresholds = manifest["operating_point"]["thresholds"]
        if sweep_dir is not None:
            thresholds = dict.fromkeys(thresholds, args.sweep_threshold)
        return NetworkEngine(args.model_dir, thresholds, args.relative)
    if sweep_dir is None:
        return pipeline_engine(args.model_dir, args.config)
    folder = _model_dir_with_thresholds(args.model_dir, args.sweep_threshold, sweep_dir)
    return pipeline_engine(folder, args.config)


def _choose_operating_point(args: argparse.Namespace, records: Sequence[Record]) -> None:
    """Run the engine (thresholds at the sweep value) on the normal studies of ``records``,
    choose the operating point and write it to the manifest."""
    normals = [r for r, normal in zip(records, normal_studies(records), strict=True) if normal]
    with tempfile.TemporaryDirectory() as tmp:
        engine = _engine(args, Path(tmp))
        results = [engine(load_grey(args.data_dir / "images" / f"{r.id}.png")) for r in normals]
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    chosen, alerts = choose_operating_point(results, manifest["channels"])
    op = manifest["operating_point"]
    op["thresholds"] = chosen
    op["alert_thresholds"] = alerts
    op["rule"] = (
        f"per channel, through the {args.engine} (thresholds {args.sweep_threshold}) on the "
        f"{len(normals)} normal studies of the {args.split} split, each scored by its most "
        f"probable finding of the channel: thresholds = the lowest of 0.2..0.95 (step 0.025) "
        f"reached by at most {NORMAL_SHARE_PER_CHANNEL:.0%} of them; alert_thresholds = the "
        f"lowest of 0.2..0.999 reached by at most {NORMAL_ALERT_SHARE_PER_CHANNEL:.0%} of them"
    )
    _update_manifest(args.model_dir, operating_point=op)
    print(f"operating point: thresholds {chosen}, alert thresholds {alerts}")


def _sweep(args: argparse.Namespace, records: Sequence[Record], **changes: Any) -> list[Analysed]:
    """``sweep_findings`` with the command's model, data, sweep threshold and config."""
    return sweep_findings(
        args.model_dir, records, args.data_dir, args.sweep_threshold, args.config, **changes
    )


def sweep_findings(
    model_dir: Path,
    records: Sequence[Record],
    data_dir: Path,
    threshold: float,
    config: Path | None = None,
    **changes: Any,
) -> list[Analysed]:
    """The pipeline's findings on ``records`` with every finding threshold at ``threshold``
    and the manifest changed as ``_model_dir_with_thresholds`` does with ``changes``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = _model_dir_with_thresholds(model_dir, threshold, Path(tmp), **changes)
        engine = pipeline_engine(folder, config)
        return [engine(load_grey(data_dir / "images" / f"{r.id}.png")) for r in records]


def _fit_extent_scale(args: argparse.Namespace, records: Sequence[Record]) -> int:
    """Run the pipeline without a fitted extent (finding thresholds at the sweep value) on
    ``records``, fit ``extent_scale`` per group and write it to the manifest."""
    fitted = fit_extent_scale(records, _sweep(args, records, extent_scale=False))
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    op = manifest["operating_point"]
    op["extent_scale"] = {
        spec["name"]: list(fitted[spec["group"]][:2])
        for spec in manifest["channels"]
        if spec["kind"] == "finding"
    }
    op["extent_rule"] = (
        f"per group, on the {args.split} split through the pipeline (thresholds "
        f"{args.sweep_threshold}): probability-weighted geometric mean of lesion / finding "
        f"box size ratios over findings overlapping a lesion at IoU >= {EXTENT_MIN_IOU}, "
        f"(1, 1) with fewer than {EXTENT_MIN_MATCHES} matches; matches "
        + ", ".join(f"{g} {v[2]}" for g, v in fitted.items())
    )
    _update_manifest(args.model_dir, operating_point=op)
    print(f"extent scale (width, height, matches): {fitted}")
    return 0


def _write_best_of(
    args: argparse.Namespace,
    manifest: dict[str, Any],
    key: str,
    noun: str,
    choices: Sequence[Any],
    fitted: dict[str, tuple[Any, dict[Any, float]]],
    ties: str = "the smaller",
) -> None:
    """Write a per-group choice among ``choices`` (``fitted``: group -> (chosen, AP50 by
    choice)) to the manifest's operating point as ``key``, with its rule as ``key_rule``."""
    op = manifest["operating_point"]
    op[key] = {
        spec["name"]: fitted[spec["group"]][0]
        for spec in manifest["channels"]
        if spec["kind"] == "finding"
    }
    op[f"{key}_rule"] = (
        f"per group, on the {args.split} split through the pipeline (thresholds "
        f"{args.sweep_threshold}): the {noun} of {list(choices)} with the highest AP50, "
        f"ties to {ties}; AP50 by {noun}: " + "; ".join(f"{g} {v[1]}" for g, v in fitted.items())
    )
    _update_manifest(args.model_dir, operating_point=op)


def _fit_box_weight(args: argparse.Namespace, records: Sequence[Record]) -> int:
    """Run the pipeline at box weight 0 and 1 (finding thresholds at the sweep value) on
    ``records``, fit ``box_weight`` per group and write it to the manifest."""
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    if "box_output" not in manifest:
        raise SystemExit(f"{args.model_dir}: the model has no box head (box_output)")
    own, head = (_sweep(args, records, box_weight=weight) for weight in (0.0, 1.0))
    fitted = fit_box_weight(records, own, head)
    _write_best_of(args, manifest, "box_weight", "weight", BOX_WEIGHTS, fitted)
    print(f"box weight (weight, AP50 by weight): {fitted}")
    return 0


def _fit_support_power(args: argparse.Namespace, records: Sequence[Record]) -> int:
    """Run the pipeline at each power of ``SUPPORT_POWERS`` (finding thresholds at the sweep
    value) on ``records``, fit ``support_power`` per group and write it to the manifest."""
    runs = {power: _sweep(args, records, support_power=power) for power in SUPPORT_POWERS}
    fitted = fit_support_power(records, runs)
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    _write_best_of(args, manifest, "support_power", "power", SUPPORT_POWERS, fitted)
    print(f"support power (power, AP50 by power): {fitted}")
    print("the thresholds were chosen for the former power: --choose-operating-point again")
    return 0


def _fit_view_fusion(args: argparse.Namespace, records: Sequence[Record]) -> int:
    """Run the pipeline with each S300 view fusion of ``VIEW_FUSIONS`` (finding thresholds
    at the sweep value) on ``records``, fit ``view_fusion`` per group and write it to the
    manifest."""
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    if not manifest["operating_point"].get("zoom_scales"):
        raise SystemExit(f"{args.model_dir}: no zoom scales, one view: nothing to fuse")
    runs = {fusion: _sweep(args, records, view_fusion=fusion) for fusion in VIEW_FUSIONS}
    fitted = fit_view_fusion(records, runs)
    _write_best_of(args, manifest, "view_fusion", "fusion", VIEW_FUSIONS, fitted, "mean")
    print(f"view fusion (fusion, AP50 by fusion): {fitted}")
    print("the thresholds were chosen for the former fusion: --choose-operating-point again")
    return 0


def _fit_zoom_scales(args: argparse.Namespace, records: Sequence[Record]) -> int:
    """Run the pipeline with each choice of ``ZOOM_CHOICES`` (finding thresholds at the
    sweep value) on ``records``, fit the S300 zoom scales and write them to the manifest."""
    runs = {scales: _sweep(args, records, zoom_scales=scales) for scales in ZOOM_CHOICES}
    best, ap = fit_zoom_scales(records, runs)
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    op = manifest["operating_point"]
    op["zoom_scales"] = list(best)
    op["zoom_scales_rule"] = (
        f"on the {args.split} split through the pipeline (thresholds {args.sweep_threshold}): "
        f"the scales of {[list(c) for c in ZOOM_CHOICES]} with the highest AP50 averaged over "
        f"the finding groups, ties to fewer scales; AP50 by scales: {ap}"
    )
    _update_manifest(args.model_dir, operating_point=op)
    print(f"zoom scales {list(best)} (AP50 by scales: {ap})")
    print("the thresholds were chosen for the former scales: --choose-operating-point again")
    return 0


def _fit_ensemble_weights(args: argparse.Namespace, records: Sequence[Record]) -> int:
    """Run the pipeline with each choice of ``ENSEMBLE_CHOICES`` (finding thresholds at the
    sweep value) on ``records``, choose the ensemble's weights and write them into its
    graph and manifest."""
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    if len(manifest.get("ensemble", {}).get("members", ())) != 2:
        raise SystemExit(f"{args.model_dir}: not an ensemble of two members")
    if per_channel_boxes(manifest["ensemble"]["weights"]):
        return _fit_group_ensemble_weights(args, records, manifest)
    runs = {c: _sweep(args, records, ensemble_weights=c) for c in ENSEMBLE_CHOICES}
    best, ap = fit_ensemble_weights(records, runs)
    rule = (
        f": the weights of [{'; '.join(choice_key(c) for c in ENSEMBLE_CHOICES)}] with the "
        f"highest AP50 averaged over the finding groups, ties to the earlier; AP50 by "
        f"weights: {ap}"
    )
    return _write_ensemble_fit(args, dict(best), rule, choice_key(best))


def _fit_group_ensemble_weights(
    args: argparse.Namespace, records: Sequence[Record], manifest: dict[str, Any]
) -> int:
    """``_fit_ensemble_weights`` for an ensemble with boxes per finding channel: each of
    ``GROUP_ENSEMBLE_CHOICES`` runs for every finding channel at once, and each group keeps
    its own best (``fit_per_group``: its highest AP50, ties to the earlier choice)."""
    channels = [c for c in manifest["channels"] if c.get("kind") == "finding"]
    findings = [c["name"] for c in channels]
    runs = {
        c: _sweep(args, records, ensemble_weights=group_choice_weights(c, findings))
        for c in GROUP_ENSEMBLE_CHOICES
    }
    fitted = fit_per_group(records, runs)
    changes: dict[str, Sequence[float]] = {}
    for c in channels:
        changes.update(dict(group_choice_weights(fitted[c["group"]][0], [c["name"]])))
    ap = {g: {choice_key(k): v for k, v in row.items()} for g, (_, row) in fitted.items()}
    rule = (
        f", per finding group: the map and box weights of "
        f"[{'; '.join(choice_key(c) for c in GROUP_ENSEMBLE_CHOICES)}] with the group's "
        f"highest AP50, ties to the earlier; AP50 by weights: {ap}"
    )
    chosen = {g: choice_key(best) for g, (best, _) in fitted.items()}
    return _write_ensemble_fit(args, changes, rule, f"per group {chosen}")


def _write_ensemble_fit(
    args: argparse.Namespace, changes: dict[str, Sequence[float]], rule: str, chosen: str
) -> int:
    """Write fitted ensemble weights into the graph and their rule into the manifest."""
    reweight(args.model_dir, changes)
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    manifest["ensemble"]["weights_rule"] = (
        f"on the {args.split} split through the pipeline (thresholds {args.sweep_threshold})" + rule
    )
    _update_manifest(args.model_dir, ensemble=manifest["ensemble"])
    print(f"ensemble weights {chosen} ({manifest['ensemble']['weights_rule']})")
    print("the thresholds were chosen for the former weights: --choose-operating-point again")
    return 0


def _worst(
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


if __name__ == "__main__":
    sys.exit(main())
