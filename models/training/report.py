"""What ``evaluate`` writes of its summary: the FROC plot (``froc.png``), the table it prints,
and the headline figures it keeps in a manifest's ``metrics``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from models.training.labels import GROUPS

COLOURS = {"spot": (220, 60, 40), "shadow": (30, 100, 220)}
WIDTH, HEIGHT, LEFT, BOTTOM, TOP, RIGHT = 720, 480, 70, 60, 30, 30
LOG_LO, LOG_HI = math.log2(1 / 16), math.log2(8)


def _xy(fp: float, s: float) -> tuple[float, float]:
    """Plot coordinates of a FROC point (false positives per image, log x; sensitivity)."""
    x = LEFT + (math.log2(max(fp, 1 / 16)) - LOG_LO) / (LOG_HI - LOG_LO) * (WIDTH - LEFT - RIGHT)
    return x, HEIGHT - BOTTOM - s * (HEIGHT - TOP - BOTTOM)


def _axes(d: ImageDraw.ImageDraw) -> None:
    w, h = WIDTH, HEIGHT
    for rate in (1 / 16, 1 / 8, 0.25, 0.5, 1, 2, 4, 8):
        x, _ = _xy(rate, 0)
        d.line([(x, TOP), (x, h - BOTTOM)], fill=(225, 225, 225))
        d.text((x - 10, h - BOTTOM + 6), f"{rate:g}", fill="black")
    for s in (0, 0.25, 0.5, 0.75, 1):
        _, y = _xy(1 / 16, s)
        d.line([(LEFT, y), (w - RIGHT, y)], fill=(225, 225, 225))
        d.text((LEFT - 34, y - 6), f"{s:.2f}", fill="black")
    d.rectangle([LEFT, TOP, w - RIGHT, h - BOTTOM], outline="black")
    d.text((w // 2 - 80, h - 28), "false positives per image (log)", fill="black")
    d.text((8, TOP - 20), "lesion sensitivity (IoU >= 0.3)", fill="black")


def plot_froc(summary: dict[str, Any], path: Path) -> None:
    """FROC curves (sensitivity vs FP per image, log x) for each group, baseline dotted."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(img)
    _axes(d)
    legend_y = TOP + 8
    for name, key, dotted in (("model", "model", False), ("baseline", "baseline", True)):
        for g in GROUPS:
            curve = summary[key]["groups"][g]["froc"]["curve"]
            pts = [_xy(f, s) for f, s, _ in curve if f > 0]
            colour = COLOURS[g]
            if dotted:
                for p in pts:
                    d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], outline=colour)
            elif len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            d.text((WIDTH - RIGHT - 170, legend_y), f"{g} ({name})", fill=colour)
            legend_y += 14
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _group_line(g: str, row: dict[str, Any]) -> str:
    froc = row["froc"]["sensitivity_at_fp"]
    return (
        f"{g:7s} lesions {row['froc']['lesions']:4d}  FROC@0.25/0.5/1/2 "
        + " ".join(f"{froc[k]:.3f}" for k in ("0.25", "0.5", "1.0", "2.0"))
        + f"  AP50 {row['ap50']:.3f}  AP30 {row['ap30']:.3f}"
        + (f"  hits@.3 {row['hits_iou30']} @.5 {row['hits_iou50']}" if "hits_iou30" in row else "")
        + (f"  TBX11K AP50 {row['tbx11k_ap50']:.3f}" if "tbx11k_ap50" in row else "")
    )


def table(summary: dict[str, Any]) -> str:
    """The summary's figures as the lines ``evaluate`` prints: the model, then the baseline."""
    lines = []
    for key in ("model", "baseline"):
        s = summary[key]
        lines.append(f"== {key} ({summary['engine'] if key == 'model' else 'four quadrants'})")
        lines += [_group_line(g, row) for g, row in s["groups"].items()]
        lines.append(f"image AUROC pooled {s['image_auroc']}  NIH-only {s['image_auroc_nih']}")
        if "normal_with_finding" in s:
            lines.append(
                f"normal studies {s['normal_studies']}: with finding {s['normal_with_finding']}, "
                f"with alert {s['normal_with_alert']}, FP/normal image {s['fp_per_normal_image']}"
            )
            lines.append(f"Dice {s['dice']}")
    return "\n".join(lines)


HEADLINE_FIGURES = (
    "image_auroc",
    "image_auroc_nih",
    "normal_with_finding",
    "normal_with_alert",
    "fp_per_normal_image",
    "dice",
)


def headline(summary: dict[str, Any]) -> dict[str, Any]:
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
    for k in HEADLINE_FIGURES:
        out[k] = m.get(k)
    return out


def manifest_metrics(metrics: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A manifest's ``metrics`` with this validation's headline and the baseline's figures."""
    metrics["validation"] = headline(summary)
    metrics["baseline_four_quadrants"] = {
        g: {"ap50": row["ap50"], "froc_sensitivity_at_fp": row["froc"]["sensitivity_at_fp"]}
        for g, row in summary["baseline"]["groups"].items()
    }
    return metrics
