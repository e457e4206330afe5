"""Secondary Capture with the coloured overlay burned in, for displays that show nothing else.

The picture is the one ``shadowspot analyze`` writes (``node.analyze.render``): the
pipeline's enhanced image (S530) with each finding outlined in its grade colour and labelled
with ``finding_label`` (the words of its SEG segment, GSPS text and SR), and a legend bar
below (grades, finding count, alert). It
is sent as an 8-bit RGB Secondary Capture Image in its own series of the source study.

The image keeps the source's rows and columns in the same orientation (the legend bar is
added below), so the source's Patient Orientation is copied; highdicom needs it for the
"PATIENT" coordinate system, and a source without one gets no Secondary Capture
(``EncodeError``). Two values highdicom takes no argument for are set on the built object:
Conversion Type "WSD" (workstation: the image is rendered, not digitised) instead of its
"DI", and Burned In Annotation "YES" (text is in the pixels; no patient identifiers are).
"""

from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from node.encode.common import Producer, ResultUIDs, copy_body_part
from node.errors import EncodeError

SERIES_NUMBER = 9104


def _orientation(source: Dataset) -> tuple[str, str]:
    value = source.get("PatientOrientation", None)
    values = [str(v) for v in value] if value is not None and not isinstance(value, str) else []
    if len(values) != 2 or not all(values):
        raise EncodeError("a secondary capture needs the source's Patient Orientation")
    return values[0], values[1]


def build_sc(
    *,
    source: Dataset,
    picture: npt.NDArray[np.uint8],
    uids: ResultUIDs,
    producer: Producer,
) -> hd.sc.SCImage:
    """Build the Secondary Capture of ``picture`` (rows, columns, 3 RGB bytes) for ``source``."""
    if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise EncodeError(f"picture must be 8-bit RGB (rows, columns, 3), got {picture.shape}")
    try:
        with warnings.catch_warnings():
            # The source's Referring Physician's Name is copied as it is; highdicom warns about
            # single-component names (e.g. a ward), which are the source's business.
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=source,
                pixel_array=np.ascontiguousarray(picture),
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=uids.sc.series_instance_uid,
                series_number=SERIES_NUMBER,
                sop_instance_uid=uids.sc.sop_instance_uid,
                instance_number=1,
                manufacturer=producer.manufacturer,
                patient_orientation=_orientation(source),
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                contributing_equipment=producer.contributing_equipment(),
                manufacturer_model_name=producer.model_name[:64],
                software_versions=producer.software_version,
                device_serial_number=producer.device_serial_number,
                series_description=f"{producer.manufacturer} findings (burned-in overlay)",
            )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"secondary capture could not be built: {exc}") from exc
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    copy_body_part(sc, source)
    return sc
