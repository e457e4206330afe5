"""ShadowSpot DICOM node: association, storage, queue, DICOM encoding and export."""

from importlib.metadata import PackageNotFoundError, version

PRODUCT_NAME = "ShadowSpot"
try:
    __version__ = version("shadowspot")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
