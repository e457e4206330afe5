"""``shadowspot analyze INPUT... --out DIR``: the pipeline on files, without the network.

Reads DICOM, PNG or JPEG files (PNG/JPEG for research and demos: their spacing is unknown
unless ``--spacing`` gives it). For each input writes ``DIR/<stem>.json`` (the contract in
the README: source, alert, findings with label/probability/grade/alert/box/area_mm2/side/
zone, timings_ms, plus colour, contour and model details) and ``DIR/<stem>.png``: the
enhanced image (S530) with each finding outlined in its grade colour, labelled, and a legend.
Progress goes to stderr when more than a few inputs are given. The model is loaded once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from node.analysis import Analyser
from node.config import Config
from node.decode import DecodeError
from node.logs import configure_logging
from pipeline.config import GradingConfig
from pipeline.errors import ShadowSpotError
from pipeline.result import AnalysisResult, Finding, Photometric, SourceImage

_RASTER = {".png", ".jpg", ".jpeg"}
_PROGRESS_ABOVE = 3
_GRADE_NAMES = {1: "low", 2: "moderate", 3: "high", 4: "urgent"}


def read_raster(path: Path, spacing: float | None) -> SourceImage:
    """A PNG/JPEG file as a grey (or RGB) ``SourceImage``; larger values are brighter."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(im).astype(
                    np.uint16 if im.mode.startswith("I;16") else np.int32
                )
                photometric = Photometric.MONOCHROME2
            elif im.mode in ("L", "LA", "P", "1"):
                pixels = np.asarray(im.convert("L"))
                photometric = Photometric.MONOCHROME2
            else:
                pixels = np.asarray(im.convert("RGB"))
                photometric = Photometric.RGB
    except (UnidentifiedImageError, OSError) as exc:
        raise DecodeError(f"{path.name}: not a readable image: {exc}") from exc
    return SourceImage(
        pixels=pixels,
        photometric=photometric,
        spacing_mm=(spacing, spacing) if spacing else None,
    )


def finding_json(f: Finding) -> dict[str, Any]:
    """One finding in the JSON contract."""
    return {
        "label": f.finding_type.value,
        "group": f.group.value,
        "probability": round(f.probability, 4),
        "grade": f.grade,
        "alert": f.alert,
        "box": list(f.box),
        "area_mm2": round(f.area_mm2, 1) if f.area_mm2 is not None else None,
        "side": f.side.value if f.side else None,
        "zone": f.zone.value if f.zone else None,
        "colour": list(f.colour),
        "contour": [[round(x, 1), round(y, 1)] for x, y in f.contour],
    }


def result_json(source: str, result: AnalysisResult) -> dict[str, Any]:
    """The whole JSON document of one input."""
    return {
        "source": source,
        "alert": result.alert,
        "highest_grade": result.highest_grade,
        "findings": [finding_json(f) for f in result.findings],
        "shape": list(result.shape),
        "spacing_mm": list(result.spacing_mm) if result.spacing_mm else None,
        "model": {"name": result.model_name, "version": result.model_version},
        "timings_ms": result.timings_ms,
    }


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(result: AnalysisResult, grading: GradingConfig) -> Image.Image:
    """The enhanced image with findings outlined in their grade colours and a legend."""
    grey = np.round(result.enhanced_image * 255.0).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    rows, cols = result.shape
    line = max(2, round(min(rows, cols) / 400))
    text = _font(max(12, round(min(rows, cols) / 60)))
    for f in result.findings:
        points = [(x, y) for x, y in f.contour]
        draw.line([*points, points[0]], fill=f.colour, width=line, joint="curve")
        label = f"{f.finding_type.value} {f.probability:.2f} G{f.grade}" + (
            " ALERT" if f.alert else ""
        )
        x0, y0 = f.box[0], f.box[1]
        ty = y0 - text.size - 2 * line if y0 > text.size + 2 * line else f.box[3] + line  # type: ignore[union-attr]
        draw.text(
            (x0, ty),
            label,
            fill=f.colour,
            font=text,
            stroke_width=max(1, line // 2),
            stroke_fill=(0, 0, 0),
        )
    _legend(draw, result, grading, text, line)
    return image


def _legend(
    draw: ImageDraw.ImageDraw,
    result: AnalysisResult,
    grading: GradingConfig,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    line: int,
) -> None:
    size = int(getattr(font, "size", 12))
    pad = size // 2
    entries = [(grading.colour_of(g), f"grade {g}: {_GRADE_NAMES[g]}") for g in (1, 2, 3, 4)]
    status = "ALERT" if result.alert else ("findings" if result.findings else "no findings")
    heading = f"ShadowSpot · {len(result.findings)} finding(s) · {status}"
    width = int(max(draw.textlength(t, font=font) for t in [heading] + [e[1] for e in entries]))
    height = (len(entries) + 1) * (size + pad) + pad
    draw.rectangle((0, 0, width + 3 * pad + size, height), fill=(0, 0, 0))
    draw.text(
        (pad, pad), heading, fill=(255, 64, 64) if result.alert else (255, 255, 255), font=font
    )
    for i, (colour, label) in enumerate(entries, start=1):
        y = pad + i * (size + pad)
        draw.rectangle((pad, y, pad + size, y + size), outline=colour, width=line)
        draw.text((2 * pad + size, y), label, fill=colour, font=font)


def _out_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def analyse_path(analyser: Analyser, path: Path, spacing: float | None) -> AnalysisResult:
    """Analyse one DICOM/PNG/JPEG file."""
    if path.suffix.lower() in _RASTER:
        return analyser.analyse_image(read_raster(path, spacing))
    return analyser.analyse_file(path)[1]


def run(args: argparse.Namespace, config: Config) -> int:
    """Analyse every input; 0 when all succeeded, 1 when any failed."""
    inputs: list[Path] = list(args.inputs)
    missing = [p for p in inputs if not p.is_file()]
    if missing:
        print(f"shadowspot analyze: no such file: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # An interactive command: only warnings and errors besides the progress lines.
    configure_logging(fmt=getattr(args, "log_format", None) or "console", level="warning")
    analyser = Analyser(config.pipeline)
    used: set[str] = set()
    failed = 0
    progress = len(inputs) > _PROGRESS_ABOVE
    for i, path in enumerate(inputs, start=1):
        start = time.perf_counter()
        try:
            result = analyse_path(analyser, path, args.spacing)
        except ShadowSpotError as exc:
            failed += 1
            print(f"shadowspot analyze: {path}: {exc}", file=sys.stderr)
            continue
        stem = _out_stem(path, used)
        doc = result_json(str(path), result)
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        render(result, config.pipeline.grading).save(out / f"{stem}.png", optimize=False)
        if progress:
            ms = (time.perf_counter() - start) * 1000.0
            print(
                f"[{i}/{len(inputs)}] {path.name}: {len(result.findings)} finding(s)"
                f"{' ALERT' if result.alert else ''} in {ms:.0f} ms",
                file=sys.stderr,
            )
    return 1 if failed else 0
