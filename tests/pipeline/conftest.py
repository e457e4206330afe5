"""Shared fixtures of the pipeline tests: the real data folder and a tiny real ONNX model."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.training.shared_data import CXR_LESIONS, DICOM

DICOM_DIR = DICOM
CXR_DIR = CXR_LESIONS


def need(path: Path) -> Path:
    """``path`` if it exists, else skip the test saying what is missing."""
    if not path.exists():
        pytest.skip(f"shared data not available: {path} is absent")
    return path
