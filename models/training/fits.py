"""The operating-point fits: from the pipeline's findings on a split, each part of the
operating point chosen by a written rule (the steps that run the pipeline and write the
manifest are in ``fit_steps``).

- ``choose_operating_point``: thresholds and alert thresholds on the normal studies;
- ``fit_extent_scale``: the scale of each group's regions about their centres;
- ``fit_box_weight``: how much of a finding's box is the box head's;
- ``fit_support_power``, ``fit_view_fusion``, ``fit_zoom_scales``, ``fit_ensemble_weights``:
  the choice of a grid whose run reaches the highest AP50 (``fit_per_group`` per group).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard, TypeVar

import numpy as np
import numpy.typing as npt

from models.training import metrics as M
from models.training.dataset import Record
from models.training.engines import Analysed, EnsembleChoice, Found, as_box
from models.training.labels import GROUPS
from models.training.scoring import detections, truth
from pipeline.manifest import VIEW_FUSIONS

Choice = TypeVar("Choice")

NORMAL_SHARE_PER_CHANNEL = 0.07
NORMAL_ALERT_SHARE_PER_CHANNEL = 0.02
THRESHOLD_GRID = tuple(round(0.2 + 0.025 * i, 3) for i in range(31))
ALERT_GRID = (*THRESHOLD_GRID, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 0.998, 0.999)


def _lowest(grid: Sequence[float], peaks: npt.NDArray[np.float64], share: float) -> float:
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


def _size_ratios(
    lesions: dict[int, list[M.Box]], results: Sequence[Analysed], group: str
) -> tuple[list[tuple[float, float]], list[float]]:
    """Per finding of ``group`` overlapping a lesion at IoU ≥ ``EXTENT_MIN_IOU`` (the lesion
    it overlaps best): the log lesion / finding (width, height) ratios, and its probability."""
    logs, weights = [], []
    for i, res in enumerate(results):
        for f in res.findings:
            if f.group != group:
                continue
            best, lesion = max(
                ((M.iou(f.box, t), t) for t in lesions.get(i, [])),
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
    return logs, weights


def fit_extent_scale(
    records: Sequence[Record], results: Sequence[Analysed]
) -> dict[str, tuple[float, float, int]]:
    """Per group, (width, height) factors that bring the findings' boxes to the size of the
    lesions they overlap best (IoU ≥ ``EXTENT_MIN_IOU``): the probability-weighted geometric
    mean of the lesion / finding size ratios, rounded to 0.01, and the number of matches. A
    group with fewer than ``EXTENT_MIN_MATCHES`` matches keeps (1, 1): too few to fit."""
    out = {}
    for g in GROUPS:
        logs, weights = _size_ratios(truth(records, g), results, g)
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
        box = as_box([weight * a + (1 - weight) * b for a, b in zip(h.box, f.box, strict=True)])
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
        lesions = truth(records, g)
        ap = {}
        for w in BOX_WEIGHTS:
            dets = [
                M.Detection(image=i, box=f.box, score=f.probability)
                for i, (o, h) in enumerate(zip(own, head, strict=True))
                for f in blend_findings(o, h, w)
                if f.group == g
            ]
            ap[w] = round(M.average_precision(dets, lesions, 0.5), 4)
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
    records: Sequence[Record], runs: Mapping[Choice, Sequence[Analysed]]
) -> dict[str, tuple[Choice, dict[Choice, float]]]:
    """Per group, the choice whose run (the pipeline's findings with that choice) reaches the
    highest AP50 on ``records``, ties to the earlier choice in ``runs``, and every choice's
    AP50."""
    order = list(runs)
    out = {}
    for g in GROUPS:
        lesions = truth(records, g)
        ap = {
            c: round(M.average_precision(detections(run, g), lesions, 0.5), 4)
            for c, run in runs.items()
        }
        best = max(order, key=lambda c: (ap[c], -order.index(c)))
        out[g] = (best, ap)
    return out


def fit_support_power(
    records: Sequence[Record], runs: Mapping[float, Sequence[Analysed]]
) -> dict[str, tuple[float, dict[float, float]]]:
    """Per group, the power whose run (the pipeline's findings at that support power) reaches
    the highest AP50 on ``records``, ties to the smaller power, and every power's AP50."""
    return fit_per_group(records, dict(sorted(runs.items())))


def fit_view_fusion(
    records: Sequence[Record], runs: Mapping[str, Sequence[Analysed]]
) -> dict[str, tuple[str, dict[str, float]]]:
    """Per group, the S300 view fusion (``VIEW_FUSIONS``) whose run reaches the highest AP50
    on ``records``, ties to ``mean`` (the views averaged), and every fusion's AP50."""
    return fit_per_group(records, {f: runs[f] for f in VIEW_FUSIONS})


def ap50_by_choice(
    records: Sequence[Record], runs: Mapping[tuple[Any, ...], Sequence[Analysed]]
) -> dict[str, dict[str, float]]:
    """Each run's AP50 per finding group on ``records``, keyed by ``choice_key``."""
    return {
        choice_key(choice): {
            g: round(M.average_precision(detections(run, g), truth(records, g), 0.5), 4)
            for g in GROUPS
        }
        for choice, run in runs.items()
    }


def _is_weights(choice: tuple[Any, ...]) -> TypeGuard[EnsembleChoice]:
    return bool(choice) and isinstance(choice[0], tuple)


def choice_key(choice: tuple[Any, ...]) -> str:
    """How a fit's choice is named in its AP50 record (a list of scales; ensemble weights
    as ``spot 1/0, shadow 0.5/0.5, boxes 1/0``)."""
    if _is_weights(choice):
        return ", ".join(f"{name} {'/'.join(f'{w:g}' for w in ws)}" for name, ws in choice)
    return str(list(choice))


def mean_ap50(row: dict[str, float]) -> float:
    """AP50 averaged over the finding groups, groups without lesions (NaN) left out."""
    values = [v for v in row.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else 0.0


def fit_zoom_scales(
    records: Sequence[Record], runs: Mapping[tuple[float, ...], Sequence[Analysed]]
) -> tuple[tuple[float, ...], dict[str, dict[str, float]]]:
    """The zoom scales whose run (the pipeline's findings with those S300 scales) reaches
    the highest AP50 averaged over the finding groups with lesions in ``records``, ties to
    fewer scales, and every run's AP50 per group. One choice for all channels: the scales
    decide the model runs, which serve every channel at once."""
    ap = ap50_by_choice(records, runs)
    return max(runs, key=lambda s: (mean_ap50(ap[choice_key(s)]), -len(s))), ap


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


def group_choice_weights(choice: EnsembleChoice, findings: Sequence[str]) -> EnsembleChoice:
    """A ``GROUP_ENSEMBLE_CHOICES`` entry as ensemble weights for every finding channel."""
    weights = dict(choice)
    return tuple(
        pair for f in findings for pair in ((f, weights["map"]), (f"boxes.{f}", weights["boxes"]))
    )


def fit_ensemble_weights(
    records: Sequence[Record], runs: Mapping[EnsembleChoice, Sequence[Analysed]]
) -> tuple[EnsembleChoice, dict[str, dict[str, float]]]:
    """The ensemble weights whose run reaches the highest AP50 averaged over the finding
    groups on ``records``, ties to the earlier choice in ``runs`` (less of the second
    member), and every run's AP50 per group. One choice for all groups: the box weights
    serve every channel at once."""
    ap = ap50_by_choice(records, runs)
    order = list(runs)
    return max(order, key=lambda c: (mean_ap50(ap[choice_key(c)]), -order.index(c))), ap
