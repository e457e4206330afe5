"""The one exception hierarchy of ShadowSpot.

The root lives here, in ``pipeline``, because ``pipeline`` may not import ``node``;
``node.errors`` extends it::

    ShadowSpotError
    ├── PipelineError                 analysis could not run
    │   ├── InputImageError           the image itself is unusable (shape, dtype, empty)
    │   └── ModelError                the model is missing, corrupt or mismatches its manifest
    └── NodeError (node.errors)       see node/errors.py for the node's branch

Third-party exceptions are translated at one boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class ShadowSpotError(Exception):
    """Root of every error ShadowSpot raises on purpose."""


class PipelineError(ShadowSpotError):
    """The analysis of one image could not run."""


class InputImageError(PipelineError):
    """The input image is unusable: wrong shape or type, empty, or constant."""


class ModelError(PipelineError):
    """The model is missing, cannot be loaded, or does not match its manifest."""
