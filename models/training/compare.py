"""Two models on one split through the pipeline, with a paired bootstrap of their difference.

    python -m models.training.compare ../shared/data/cxr-lesions --split val \\
        --model-dir models --model-dir bench/work/candidate --out bench/work/compare.json

Each model runs once on every image of the split, its finding thresholds at the sweep value
(0.05), as ``evaluate`` runs it for FROC, AP50 and AUROC. ``GOAL_FIGURES`` are computed for
both on the whole split and then on ``--resamples`` draws of it: each draw takes, within
every source, as many patients as the source has, with replacement, and all their images,
so that every draw keeps the split's mix of sources. Both models are scored on the same
draws. Per figure it reports A and B, each with its 95 % interval over the draws (2.5th to 97.5th
percentile), the difference B - A with its own interval, and the share of draws in which B
is higher. A difference whose
interval holds 0 is within what this split's size lets one tell apart.

The figures at the operating point (normal studies with findings and alerts, hits, Dice)
are ``evaluate``'s; the thresholds do not enter the figures compared here.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.training.dataset import Record, read_records, split_by_patient
from models.training.engines import Analysed, sweep_findings
from models.training.scoring import score

GOAL_FIGURES = (
    "shadow_sensitivity_at_1fp",
    "shadow_ap50",
    "tbx11k_ap50",
    "spot_sensitivity_at_1fp",
    "spot_ap50",
    "auroc_nih",
    "auroc_pooled",
    "spot_auroc_jsrt",
    "spot_sensitivity_jsrt",
    "spot_auroc_nih_bbox",
)
"""The issue's goal figures that the sweep run gives (sensitivity at 1 false positive per
image, AP50 at IoU 0.5, image-level AUROC of abnormal against normal studies)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Difference:
    """One figure of two models on the whole split and over the draws."""

    figure: str
    a: float
    b: float
    low: float  # 2.5th percentile of B - A over the draws
    high: float  # 97.5th percentile
    b_higher: float  # share of the draws in which B is higher
    draws: int  # draws in which the figure is defined for both
    a_interval: tuple[float, float]  # 2.5th and 97.5th percentiles of A's figure
    b_interval: tuple[float, float]  # and of B's


def goal_figures(records: Sequence[Record], sweep: Sequence[Analysed]) -> dict[str, float]:
    """``GOAL_FIGURES`` of one model's sweep run (``scoring.score``); nan where a draw has
    no lesion of the group or no image of a class."""
    s = score(records, sweep, None, Path("."))
    shadow, spot = s["groups"]["shadow"], s["groups"]["spot"]
    return {
        "shadow_sensitivity_at_1fp": shadow["froc"]["sensitivity_at_fp"]["1.0"],
        "shadow_ap50": shadow["ap50"],
        "tbx11k_ap50": shadow["tbx11k_ap50"],
        "spot_sensitivity_at_1fp": spot["froc"]["sensitivity_at_fp"]["1.0"],
        "spot_ap50": spot["ap50"],
        "auroc_nih": s["image_auroc_nih"],
        "auroc_pooled": s["image_auroc"],
        "spot_auroc_jsrt": s["spot_by_source"].get("jsrt", {}).get("auroc", math.nan),
        "spot_sensitivity_jsrt": s["spot_by_source"]
        .get("jsrt", {})
        .get("sensitivity_at_1fp", math.nan),
        "spot_auroc_nih_bbox": s["spot_by_source"].get("nih-cxr14-bbox", {}).get("auroc", math.nan),
    }


def draws(records: Sequence[Record], resamples: int, seed: int) -> list[list[int]]:
    """``resamples`` lists of image indices: per source, its patients drawn with replacement
    (as many as it has), each drawn patient bringing all its images."""
    by_source: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, r in enumerate(records):
        by_source[r.source][r.patient].append(i)
    sources = [[by_source[s][p] for p in sorted(by_source[s])] for s in sorted(by_source)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(resamples):
        idx: list[int] = []
        for patients in sources:
            for k in rng.integers(0, len(patients), len(patients)):
                idx.extend(patients[k])
        out.append(idx)
    return out


def compare(
    records: Sequence[Record],
    a: Sequence[Analysed],
    b: Sequence[Analysed],
    resamples: int,
    seed: int = 0,
) -> list[Difference]:
    """Per goal figure: A and B on ``records`` and the paired bootstrap of B - A."""
    whole_a, whole_b = goal_figures(records, a), goal_figures(records, b)
    pairs: dict[str, list[tuple[float, float]]] = {f: [] for f in GOAL_FIGURES}
    for idx in draws(records, resamples, seed):
        recs = [records[i] for i in idx]
        fa = goal_figures(recs, [a[i] for i in idx])
        fb = goal_figures(recs, [b[i] for i in idx])
        for f in GOAL_FIGURES:
            if not (math.isnan(fa[f]) or math.isnan(fb[f])):
                pairs[f].append((fa[f], fb[f]))
    out = []
    for f in GOAL_FIGURES:
        ab = np.asarray(pairs[f], dtype=np.float64).reshape(-1, 2)
        d = ab[:, 1] - ab[:, 0]
        out.append(
            Difference(
                figure=f,
                a=whole_a[f],
                b=whole_b[f],
                low=_percentile(d, 2.5),
                high=_percentile(d, 97.5),
                b_higher=float(np.mean(d > 0)) if d.size else math.nan,
                draws=int(d.size),
                a_interval=(_percentile(ab[:, 0], 2.5), _percentile(ab[:, 0], 97.5)),
                b_interval=(_percentile(ab[:, 1], 2.5), _percentile(ab[:, 1], 97.5)),
            )
        )
    return out


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, tuple):
        return [_rounded(v) for v in value]
    return value


def table(rows: Sequence[Difference]) -> str:
    lines = [
        f"{'figure':26s} {'A [95% interval]':>22s} {'B [95% interval]':>22s} {'B-A':>7s} "
        f"{'95% interval':>18s} {'B higher':>9s}"
    ]
    for r in rows:
        lines.append(
            f"{r.figure:26s} {r.a:6.3f} [{r.a_interval[0]:5.3f}, {r.a_interval[1]:5.3f}] "
            f"{r.b:6.3f} [{r.b_interval[0]:5.3f}, {r.b_interval[1]:5.3f}] {r.b - r.a:+7.3f} "
            f"[{r.low:+7.3f}, {r.high:+7.3f}] {r.b_higher:9.1%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.training.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", choices=("val", "train", "test", "all"), default="val")
    parser.add_argument("--model-dir", type=Path, action="append", required=True, help="A, then B")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep-threshold", type=float, default=0.05)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True, help="the JSON summary to write")
    args = parser.parse_args(argv)
    if len(args.model_dir) != 2:
        parser.error("give --model-dir twice: A, then B")
    if args.resamples < 1:
        parser.error("--resamples must be at least 1")
    records = read_records(args.data_dir)
    if args.split != "all":
        records = split_by_patient(records)[args.split]
    runs = [
        sweep_findings(d, records, args.data_dir, args.sweep_threshold, args.config)
        for d in args.model_dir
    ]
    rows = compare(records, runs[0], runs[1], args.resamples, args.seed)
    models = []
    for d in args.model_dir:
        manifest = json.loads((d / "manifest.json").read_text())
        models.append({"dir": str(d), "name": manifest["name"], "version": manifest["version"]})
    summary: dict[str, Any] = {
        "data_dir": str(args.data_dir),
        "split": args.split,
        "images": len(records),
        "patients": len({r.patient for r in records}),
        "sweep_threshold": args.sweep_threshold,
        "resamples": args.resamples,
        "seed": args.seed,
        "a": models[0],
        "b": models[1],
        "figures": [{k: _rounded(v) for k, v in asdict(r).items()} for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"A = {args.model_dir[0]}, B = {args.model_dir[1]}, {len(records)} images")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
