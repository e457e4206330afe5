"""Step S200 as the model was trained with it: robust percentile window, then resize.

The pipeline must prepare images exactly like this; ``models/manifest.json`` records every
number used here (``input.window`` and ``input.resize``). This module uses numpy and Pillow
only so the evaluation command and the tests can run without torch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

RESIZE_SPEC = {
    "method": "bilinear",
    "antialias": True,
    "aspect": "stretch",
    "implementation": "Pillow Image.resize(BILINEAR) on the float32 windowed image ('F' mode)",
}


def window(
    pixels: npt.NDArray[np.generic],
    low_percentile: float = LOW_PERCENTILE,
    high_percentile: float = HIGH_PERCENTILE,
) -> npt.NDArray[np.float32]:
    """S200: clip to the [low, high] percentiles of all pixels and rescale to [0, 1]."""
    grey = np.asarray(pixels, dtype=np.float32)
    low, high = np.percentile(grey, [low_percentile, high_percentile])
    if high <= low:
        return np.zeros(grey.shape, dtype=np.float32)
    return ((np.clip(grey, low, high) - low) / (high - low)).astype(np.float32)


def resize(image: npt.NDArray[np.float32], height: int, width: int) -> npt.NDArray[np.float32]:
    """Resize a float image to (height, width), stretching anisotropically."""
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def prepare(pixels: npt.NDArray[np.generic], height: int, width: int) -> npt.NDArray[np.float32]:
    """Window then resize: the model's input for one grey image, (height, width) in [0, 1]."""
    return resize(window(pixels), height, width)
