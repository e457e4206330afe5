"""Time the whole pipeline, decode → findings, for a 2048 × 2500 chest radiograph.

    .venv/bin/python bench/bench_pipeline.py [--runs 7] [--threads 2] [--model-dir models]

The input is the real CR chest of ../shared/data/dicom/RG1_UNCI.dcm resampled to 2500 rows ×
2048 columns, 15 bits stored, MONOCHROME1, written as an uncompressed DICOM file in memory
(a smooth synthetic chest when the shared data is absent). Each run reads the file from bytes
(pydicom), decodes it (``node.decode``) and runs ``pipeline.analyse``; after one warm-up run,
the median and maximum of each step over ``--runs`` runs are printed as a table, with the
process's peak RSS. Also ``--json`` for one JSON object, ``--attend-all`` for the worst case
where every candidate gets an S331 window. This is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.training.shared_data import DICOM  # noqa: E402
from node.analysis import Analyser  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.window import resize  # noqa: E402

ROWS, COLS = 2500, 2048
SHARED_CR = DICOM / "RG1_UNCI.dcm"


def _phantom() -> np.ndarray:
    yy, xx = np.mgrid[:ROWS, :COLS].astype(np.float32)
    lungs = np.exp(-((((xx - 600) / 380) ** 2 + ((yy - 1200) / 800) ** 2) ** 2))
    lungs += np.exp(-((((xx - 1450) / 380) ** 2 + ((yy - 1200) / 800) ** 2) ** 2))
    return 20000 + 8000 * lungs  # MONOCHROME1: air is bright in stored values


def source_pixels() -> tuple[np.ndarray, str]:
    """2500 × 2048 15-bit stored values (MONOCHROME1) and where they came from."""
    if SHARED_CR.is_file():
        ds = pydicom.dcmread(SHARED_CR)
        stored = resize(ds.pixel_array.astype(np.float32), (ROWS, COLS))
        origin = f"{SHARED_CR.name} resampled to {ROWS}x{COLS}"
    else:
        stored, origin = _phantom(), "synthetic phantom"
    noise = np.random.default_rng(0).normal(0, 40, stored.shape)
    return np.clip(stored + noise, 0, 32767).astype(np.uint16), origin


def dicom_bytes(pixels: np.ndarray) -> bytes:
    """A minimal but well-formed CR instance holding ``pixels``."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 14, 0
    ds.PixelSpacing = [0.139, 0.139]
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run(runs: int, threads: int, model_dir: Path, attend_all: bool = False) -> dict[str, object]:
    pixels, origin = source_pixels()
    blob = dicom_bytes(pixels)
    del pixels
    config = PipelineConfig(model_dir=model_dir, threads=threads)
    if attend_all:  # worst case: every candidate gets its S331 window (max_windows of them)
        attention = dataclasses.replace(config.attention, max_probability=1.0)
        config = dataclasses.replace(config, attention=attention)
    analyser = Analyser(config)
    samples: dict[str, list[float]] = {}
    for i in range(runs + 1):
        start = time.perf_counter()
        ds = pydicom.dcmread(io.BytesIO(blob))
        read_ms = (time.perf_counter() - start) * 1000.0
        result = analyser.analyse_dataset(ds)
        wall = (time.perf_counter() - start) * 1000.0
        if i == 0:
            continue  # warm-up
        timings = {"read": read_ms, **result.timings_ms, "wall (read→findings)": wall}
        for step, ms in timings.items():
            samples.setdefault(step, []).append(ms)
        findings = len(result.findings)
    return {
        "input": origin,
        "shape": [ROWS, COLS],
        "model": f"{analyser.model.name} {analyser.model.version}",
        "threads": threads,
        "attend_all": attend_all,
        "runs": runs,
        "findings": findings,
        "median_ms": {k: round(statistics.median(v), 1) for k, v in samples.items()},
        "max_ms": {k: round(max(v), 1) for k, v in samples.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--attend-all",
        action="store_true",
        help="re-score every candidate in an S331 window (worst case: more model runs)",
    )
    args = parser.parse_args(argv)
    report = run(args.runs, args.threads, args.model_dir, args.attend_all)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"input: {report['input']}  model: {report['model']}  threads: {report['threads']}"
        f"  attend-all: {report['attend_all']}"
    )
    print(f"runs: {report['runs']} (after 1 warm-up)  findings: {report['findings']}")
    print(f"{'step':<24}{'median ms':>12}{'max ms':>12}")
    med, top = report["median_ms"], report["max_ms"]
    assert isinstance(med, dict) and isinstance(top, dict)
    for step in med:
        print(f"{step:<24}{med[step]:>12.1f}{top[step]:>12.1f}")
    print(f"peak RSS: {report['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
