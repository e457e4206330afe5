"""The node's branch of the exception hierarchy (the root is in ``pipeline.errors``)::

ShadowSpotError (pipeline.errors)
├── PipelineError, InputImageError, ModelError   (pipeline.errors)
└── NodeError
    ├── ConfigError           the configuration file is invalid; carries every problem
    ├── DecodeError           the pixel data cannot be decoded (also an InputImageError)
    │   └── DecodeMemoryError     decoding needs more than ``[node] decode_memory_mb``
    ├── ListenError           the Storage SCP cannot listen on its address and port
    ├── DatabaseError         the database cannot be used (``[database] url``, connection)
    │   └── SchemaError           its schema is newer than this code, or older and not upgraded
    ├── IngestError           an incoming instance is refused; carries its DIMSE status
    ├── EncodeError           a result object (SEG/SR/GSPS/SC) could not be built
    └── ExportError           a delivery failed; ``retryable`` says whether to try again
"""

from __future__ import annotations

from pipeline.errors import InputImageError, ShadowSpotError
from pipeline.schema import Problem


class NodeError(ShadowSpotError):
    """Something in the DICOM node went wrong."""


ConfigProblem = Problem
"""One mistake in a configuration file (``pipeline.schema.Problem``): file, key, reason."""


class ConfigError(NodeError):
    """The configuration is invalid. ``problems`` lists every mistake found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")


class DecodeError(NodeError, InputImageError):
    """The DICOM pixel data cannot be turned into an image the pipeline understands.

    A node error (raised by the node's decoder) that is also an ``InputImageError``: the
    instance itself is unusable, retrying cannot help."""


class DecodeMemoryError(DecodeError):
    """Decoding the pixel data needs more memory than the decoder process is allowed."""


class ListenError(NodeError):
    """The Storage SCP cannot listen on its host and port (in use, not ours, no permission)."""


class DatabaseError(NodeError):
    """The node's database cannot be used: its URL names no backend we support, or it fails."""


class SchemaError(DatabaseError):
    """The database's schema is not the one this code expects.

    Newer (written by a later ShadowSpot): refused, never downgraded. Older: ``shadowspot
    migrate`` upgrades it."""


class IngestError(NodeError):
    """An incoming instance is refused; ``status`` is the DIMSE status to answer with."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class EncodeError(NodeError):
    """A result object could not be built from the findings and the source header."""


class ExportError(NodeError):
    """A delivery to a destination failed; ``retryable`` is False when retrying cannot help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
