"""ShadowSpot image analysis: the shadow-and-spot method S100–S742 as pure image steps.

Arrays in, findings out. Nothing here knows about networks or DICOM encoding; the
import-linter contract in ``pyproject.toml`` keeps it that way.
"""

from pipeline.analyse import analyse
from pipeline.config import PipelineConfig
from pipeline.manifest import Manifest
from pipeline.model import LesionModel, load_model
from pipeline.result import AnalysisResult, Finding, SourceImage
from pipeline.window import model_input

__all__ = [
    "AnalysisResult",
    "Finding",
    "LesionModel",
    "Manifest",
    "PipelineConfig",
    "SourceImage",
    "analyse",
    "load_model",
    "model_input",
]
