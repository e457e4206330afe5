"""Where the project reads its shared data: ``../shared/data`` beside the repository.

The one place that names that folder; the lab, the tests and the benchmark import it. The
data is read in place and never copied into the repository. ``SHADOWSPOT_SHARED_DATA`` points
elsewhere (a machine that mounts it at another path).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("SHADOWSPOT_SHARED_DATA") or REPO.parent / "shared" / "data")
CXR_LESIONS = SHARED_DATA / "cxr-lesions"
"""The lesion data set: ``images/``, ``masks/``, ``annotations.jsonl``."""
DICOM = SHARED_DATA / "dicom"
"""Real radiograph DICOM files (RG1 uncompressed and JPEG 2000, a DX)."""
