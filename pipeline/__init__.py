"""ShadowSpot image analysis: the shadow-and-spot method S100–S742 as pure image steps.

Arrays in, findings out. Nothing here knows about networks or DICOM encoding; the
import-linter contract in ``pyproject.toml`` keeps it that way.
"""
