"""``shadowspot analyze INPUT... --out DIR``: the pipeline on files, without the network.

Reads DICOM, PNG or JPEG files (PNG/JPEG for research and demos: their spacing is unknown
unless ``--spacing`` gives it). For each input writes ``DIR/<stem>.json`` (the contract in
the README: source, alert, findings with label/probability/grade/alert/box/area_mm2/side/
zone, timings_ms, plus colour, contour and model details) and ``DIR/<stem>.png``: the
enhanced image (S530) with each finding outlined in its grade colour, labelled with
``node.encode.common.finding_label`` (the words of the SEG, GSPS and SR), and a legend.
Progress goes to stderr when more than a few inputs are given. The model is loaded once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from node.analysis import Analyser
from node.config import Config
from node.decode import DecodeError, max_pixels
from node.encode.common import finding_label
from node.logs import configure_logging
from pipeline.config import GradingConfig
from pipeline.errors import ShadowSpotError
from pipeline.result import AnalysisResult, Finding, Photometric, SourceImage

_RASTER = {".png", ".jpg", ".jpeg"}
_PROGRESS_ABOVE = 3
_MIN_RENDERED_SIDE = 768
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


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True, slots=True, kw_only=True)
class _Style:
    scale: int  # rendered pixels per input pixel (small images are enlarged to be readable)
    line: int
    font: Font
    text: int  # font size in pixels


def _style(shape: tuple[int, int]) -> _Style:
    short = min(shape)
    scale = max(1, math.ceil(_MIN_RENDERED_SIDE / short)) if short < _MIN_RENDERED_SIDE else 1
    size = short * scale
    text = max(14, round(size / 60))
    return _Style(scale=scale, line=max(2, round(size / 400)), font=_font(text), text=text)


def _points(f: Finding, k: int) -> list[tuple[float, float]]:
    """Contour vertices (input pixel centres) in rendered coordinates."""
    return [((x + 0.5) * k - 0.5, (y + 0.5) * k - 0.5) for x, y in f.contour]


def _outline(image: Image.Image, findings: tuple[Finding, ...], style: _Style) -> None:
    draw = ImageDraw.Draw(image)
    k, line = style.scale, style.line
    for f in findings:
        points = _points(f, k)
        draw.line([*points, points[0]], fill=f.colour, width=line, joint="curve")
        label = finding_label(f)  # the same words as the SEG, GSPS and SR of the finding
        x0, y0, y1 = f.box[0] * k, f.box[1] * k, f.box[3] * k
        ty = y0 - style.text - 2 * line if y0 > style.text + 2 * line else y1 + line
        draw.text(
            (x0, ty),
            label,
            fill=f.colour,
            font=style.font,
            stroke_width=max(1, line // 2),
            stroke_fill=(0, 0, 0),
        )


def _flash(image: Image.Image, findings: tuple[Finding, ...], style: _Style) -> Image.Image:
    """S742: the alerted regions filled with their colour (the second frame of the blink)."""
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for f in findings:
        if f.alert:
            draw.polygon(_points(f, style.scale), fill=(*f.colour, 110), outline=(*f.colour, 255))
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _legend_bar(
    result: AnalysisResult, grading: GradingConfig, width: int, style: _Style
) -> Image.Image:
    """A black bar under the image: the status line, then one swatch per grade."""
    size, pad, font = style.text, style.text // 2, style.font
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(grading.colour_of(g), f"grade {g}: {_GRADE_NAMES[g]}") for g in (1, 2, 3, 4)]
    spans = [int(probe.textlength(t, font=font)) + size + 3 * pad for _, t in entries]
    lines, x = 1, pad
    for span in spans:
        if x + span > width and x > pad:
            lines, x = lines + 1, pad
        x += span
    bar = Image.new("RGB", (width, (lines + 1) * (size + pad) + pad), (0, 0, 0))
    draw = ImageDraw.Draw(bar)
    status = "ALERT" if result.alert else ("findings" if result.findings else "no findings")
    heading = f"ShadowSpot · {len(result.findings)} finding(s) · {status} · {result.model_name}"
    draw.text(
        (pad, pad), heading, fill=(255, 64, 64) if result.alert else (255, 255, 255), font=font
    )
    x, y = pad, pad + size + pad
    for (colour, label), span in zip(entries, spans, strict=True):
        if x + span > width and x > pad:
            x, y = pad, y + size + pad
        draw.rectangle((x, y, x + size, y + size), outline=colour, width=style.line)
        draw.text((x + size + pad, y), label, fill=colour, font=font)
        x += span
    return bar


def render(result: AnalysisResult, grading: GradingConfig) -> list[Image.Image]:
    """The enhanced image with findings outlined in their grade colours, labelled, and a
    legend bar below it. Images with a short side under 768 pixels are enlarged by an
    integer factor. With an alert, a second frame fills the alerted regions (S742 flashing:
    the PNG is then an animated PNG; viewers without animation show the first frame)."""
    style = _style(result.shape)
    grey = np.round(result.enhanced_image * 255.0).astype(np.uint8)
    base = Image.fromarray(grey, mode="L").convert("RGB")
    if style.scale > 1:
        rows, cols = result.shape
        base = base.resize((cols * style.scale, rows * style.scale), Image.Resampling.BILINEAR)
    _outline(base, result.findings, style)
    bar = _legend_bar(result, grading, base.width, style)
    frames = [base, _flash(base, result.findings, style)] if result.alert else [base]
    out = []
    for frame in frames:
        canvas = Image.new("RGB", (base.width, base.height + bar.height))
        canvas.paste(frame, (0, 0))
        canvas.paste(bar, (0, base.height))
        out.append(canvas)
    return out


def save_png(frames: list[Image.Image], path: Path) -> None:
    """One PNG, animated (blinking, endless loop) when there is more than one frame."""
    if len(frames) == 1:
        frames[0].save(path, format="PNG")
    else:
        frames[0].save(
            path, format="PNG", save_all=True, append_images=frames[1:], duration=600, loop=0
        )


def _out_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def analyse_path(analyser: Analyser, path: Path, spacing: float | None) -> AnalysisResult:
    """Analyse one DICOM/PNG/JPEG file. ``spacing`` (mm) applies to PNG/JPEG, and to DICOM
    files only when they carry no usable pixel spacing of their own."""
    if path.suffix.lower() in _RASTER:
        return analyser.analyse_image(read_raster(path, spacing))
    try:
        ds = pydicom.dcmread(path)
    except RecursionError as exc:  # sequences nested deeper than the interpreter's stack
        raise DecodeError(f"{path.name}: not a readable DICOM file: nested too deep") from exc
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc
    if not spacing:
        return analyser.analyse_dataset(ds)
    image = analyser.decode(ds)
    if image.spacing_mm is None:
        image = dataclasses.replace(image, spacing_mm=(spacing, spacing))
    return analyser.analyse_image(image)


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
    analyser = Analyser(
        config.pipeline,
        max_pixels=max_pixels(config),
        decode_memory_mb=config.node.decode_memory_mb,
    )
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
        save_png(render(result, config.pipeline.grading), out / f"{stem}.png")
        if progress:
            ms = (time.perf_counter() - start) * 1000.0
            print(
                f"[{i}/{len(inputs)}] {path.name}: {len(result.findings)} finding(s)"
                f"{' ALERT' if result.alert else ''} in {ms:.0f} ms",
                file=sys.stderr,
            )
    return 1 if failed else 0
