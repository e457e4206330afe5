"""Configuration of the analysis: the ``[pipeline]`` section of the node's TOML file.

Every threshold the method's steps use is a field here with a documented default; the node's
config loader (``node.config``) builds this object from TOML and validates it. The pipeline
never reads files or environment variables for its settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    """Settings of S100–S742. Fields are added by the steps that use them."""

    model_dir: Path = field(default=Path("models"))
    """Folder holding ``manifest.json`` and the ONNX model it names."""

    alert_grade: int = 3
    """S741: a finding whose grade is at least this raises an alert."""

    def __post_init__(self) -> None:
        if not 1 <= self.alert_grade <= 4:
            raise ValueError("alert_grade must be between 1 and 4")
