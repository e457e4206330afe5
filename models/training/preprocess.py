"""Step S200 as the model is trained with it: the pipeline's own ``model_input``.

Training packs its data with ``pipeline.window.model_input`` (S100 exposed-field
distribution, percentile window, clip, stretch to [0, 1], area-averaging shrink then linear
resize to the working size, anisotropic), so training and inference cannot drift apart.
``models/manifest.json`` records the percentiles and the working size; the pipeline reads them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

RESIZE_SPEC = {
    "method": "pipeline.window.resize",
    "detail": "SimpleITK BinShrink by the integer factor, then linear to the exact size, "
    "pixel centres aligned; aspect not kept (stretch)",
}
WINDOW_SPEC = {
    "low_percentile": LOW_PERCENTILE,
    "high_percentile": HIGH_PERCENTILE,
    "over": "the S100 exposed field (pipeline.grey.analyse_distribution, default GreyConfig)",
}


def prepare(pixels: npt.NDArray[np.generic], height: int, width: int) -> npt.NDArray[np.float32]:
    """S100 + S200 for a 2-D grey array: the model's input, (height, width) float32 in [0, 1].

    The pipeline is imported here, not at the top: a machine that trains from a pack (the
    GPU machine) has torch and numpy but not the node's imaging stack."""
    from pipeline.window import model_input

    return model_input(
        pixels,
        working_shape=(height, width),
        low_percentile=LOW_PERCENTILE,
        high_percentile=HIGH_PERCENTILE,
    )
