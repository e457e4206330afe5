"""The node's adapter to the pipeline: load the model once, analyse files or datasets.

``Analyser`` is what the worker holds (one per process): it loads and verifies the model
from ``PipelineConfig.model_dir`` at construction (a missing or mismatched model is a
``ModelError`` at start-up, not at the first study), then turns DICOM files or datasets into
``AnalysisResult``s. ``decode`` time is added to the result's timings as ``decode``. It also
holds the ``DecoderPool`` whose memory-limited processes decode compressed pixel data.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pydicom
import structlog
from pydicom.errors import InvalidDicomError

from node import metrics
from node.decode import MAX_PIXELS, DecodeError, DecoderPool, decode
from node.decode_pool import DECODE_MEMORY_MB
from pipeline import analyse, load_model
from pipeline.config import PipelineConfig
from pipeline.model import LesionModel
from pipeline.result import AnalysisResult, SourceImage

log = structlog.get_logger(__name__)


class Analyser:
    """Runs the pipeline with one model loaded for the life of the process."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        model: LesionModel | None = None,
        max_pixels: int = MAX_PIXELS,
        decode_memory_mb: float | None = DECODE_MEMORY_MB,
    ) -> None:
        """``decode_memory_mb``: ``[node] decode_memory_mb``; None decodes compressed data in
        this process, without a memory limit (only for trusted files)."""
        self.config = config
        self.max_pixels = max_pixels
        self.pool = None if decode_memory_mb is None else DecoderPool(decode_memory_mb)
        self.model = (
            model if model is not None else load_model(config.model_dir, threads=config.threads)
        )
        log.info(
            "model_loaded",
            model=self.model.name,
            model_version=self.model.version,
            model_dir=str(config.model_dir),
        )
        metrics.set_model_loaded(self.model.name, self.model.version)

    def analyse_image(self, image: SourceImage) -> AnalysisResult:
        """Run S100–S742 on an already decoded image."""
        return analyse(image, self.model, self.config)

    def decode(self, ds: pydicom.Dataset) -> SourceImage:
        """``node.decode.decode`` with this analyser's pixel budget and decoder processes."""
        return decode(ds, max_pixels=self.max_pixels, pool=self.pool)

    def close(self) -> None:
        """End the idle decoder processes (they end with the process anyway)."""
        if self.pool is not None:
            self.pool.close()

    def analyse_dataset(self, ds: pydicom.Dataset) -> AnalysisResult:
        """Decode ``ds`` and analyse it; decode failures raise ``DecodeError``."""
        start = time.perf_counter()
        image = self.decode(ds)
        decode_ms = round((time.perf_counter() - start) * 1000.0, 2)
        result = self.analyse_image(image)
        timings = {"decode": decode_ms, **result.timings_ms}
        timings["total"] = round(result.timings_ms.get("total", 0.0) + decode_ms, 2)
        return dataclasses.replace(result, timings_ms=timings)

    def analyse_file(self, path: Path) -> tuple[pydicom.Dataset, AnalysisResult]:
        """Read a DICOM file and analyse it; returns the dataset (for the encoders) too."""
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc
        return ds, self.analyse_dataset(ds)
