"""DICOM Segmentation: one segment per finding, in the source image's pixel grid.

Projection radiographs (CR, DX) have no Frame of Reference, so highdicom builds the SEG
without plane positions and refuses ``plane_orientation`` as an argument ("the pixel array must
be spatially aligned with the source images"). Two attributes it does not take as arguments
are therefore set on the built object, and only for sources without a Frame of Reference:

* Patient Orientation (General Image, Type 2C: required when the image has no Image
  Orientation (Patient)), copied from the source; empty (Type 2) when the source has none.
* Plane Orientation Sequence in the Shared Functional Groups with the identity in-plane
  orientation cornerstone3D assumes for the radiograph itself: OHIF 3.13's SEG loader reads
  it and fails without it, so the overlay would never show.

Pixel Measures carry the spacing the source gives (its Pixel Spacing, else its Imager Pixel
Spacing) and are left out when it gives none: a nominal 1 mm would state a calibration the
source never had. OHIF 3.13's SEG viewport cannot open such a SEG (it reads the Pixel
Measures item, and Orthanc's DICOMweb drops an empty one); the SR's contours and the
Secondary Capture still show the findings there.

Each segment names the lung as its anatomic region and the zone as its primary structure,
both with the patient's side as modifier, and is labelled with ``common.finding_label``.

Encoding of binary masks: a BINARY SEG packs 8 pixels per byte across frame boundaries in
the native encoding, so when rows × columns is not a multiple of 8 every frame after the first
starts mid-byte and cannot be served on its own: Orthanc 1.10's DICOMweb ``/frames/N``
answers 400 "Bad file format" for it, and OHIF fetches SEG frames one by one, so the overlay
never shows. JPEG 2000 Lossless, the one encapsulated transfer syntax highdicom allows for
BINARY, does not help (Orthanc answers the same for 1-bit JPEG 2000 frames). Such SEGs (more
than one segment, frames not byte-aligned) are therefore written as FRACTIONAL with
Segmentation Fractional Type OCCUPANCY whose pixels are only 0 or the Maximum Fractional Value
(255) — the same masks, one byte per pixel, standard-conformant, and read by OHIF 3.13 as
binary ("pseudo-binary fractional") — in RLE Lossless, so that a 2000² frame is some 60 kB
instead of 4 MB. Every other binary SEG is BINARY in Explicit VR Little Endian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from node.encode import codes as sc
from node.encode.common import (
    ObjectUIDs,
    Producer,
    ResultUIDs,
    cielab,
    finding_label,
    tracking_id,
)
from node.errors import EncodeError
from pipeline.result import AnalysisResult, Finding

SERIES_NUMBER = 9101
_IDENTITY_ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _segment(
    index: int, finding: Finding, uids: ResultUIDs, producer: Producer
) -> hd.seg.SegmentDescription:
    anatomy = [sc.zone_code(finding.zone) or sc.LUNG]
    description = hd.seg.SegmentDescription(
        segment_number=index + 1,
        segment_label=finding_label(finding),
        segmented_property_category=sc.property_category(finding.finding_type),
        segmented_property_type=sc.finding_type_code(finding.finding_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=producer.algorithm_identification(),
        tracking_uid=uids.tracking_uid(index),
        tracking_id=tracking_id(index, finding),
        anatomic_regions=[sc.LUNG],
        primary_anatomic_structures=anatomy,
        display_color=cielab(finding),
    )
    laterality = sc.laterality_code(finding.side)
    if laterality is not None:
        # The side of the lung and of the zone in it: highdicom takes no modifiers.
        region = description.AnatomicRegionSequence[0]
        region.AnatomicRegionModifierSequence = [hd.sr.CodedConcept.from_code(laterality)]
        structure = description.PrimaryAnatomicStructureSequence[0]
        structure.PrimaryAnatomicStructureModifierSequence = [
            hd.sr.CodedConcept.from_code(laterality)
        ]
    return description


def _pixel_array(
    result: AnalysisResult, kind: Literal["binary", "fractional"], seg_encoding: SegEncoding
) -> npt.NDArray[np.generic]:
    """(1 frame, rows, columns, segments): booleans for BINARY, 0.0/1.0 for OCCUPANCY, or
    probabilities inside each mask."""
    masks = np.stack([f.mask for f in result.findings], axis=-1)[None]
    if kind == "binary":
        if seg_encoding.segmentation_type is hd.seg.SegmentationTypeValues.BINARY:
            return masks
        return masks.astype(np.float32)
    probabilities = np.array([f.probability for f in result.findings], dtype=np.float32)
    return (masks * probabilities).astype(np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class SegEncoding:
    """How the masks are written: SEG type, fractional type, transfer syntax."""

    segmentation_type: hd.seg.SegmentationTypeValues
    fractional_type: hd.seg.SegmentationFractionalTypeValues
    transfer_syntax_uid: UID


def encoding(
    rows: int, columns: int, frames: int, kind: Literal["binary", "fractional"]
) -> SegEncoding:
    """BINARY/Explicit VR Little Endian for binary masks whose bit-packed frames start on a
    byte boundary (or a single frame); FRACTIONAL OCCUPANCY (0 or max)/RLE Lossless for the
    other binary masks; FRACTIONAL PROBABILITY/Explicit VR Little Endian when configured."""
    fractional = hd.seg.SegmentationTypeValues.FRACTIONAL
    if kind == "fractional":
        return SegEncoding(
            segmentation_type=fractional,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    if frames > 1 and (rows * columns) % 8 != 0:
        return SegEncoding(
            segmentation_type=fractional,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.OCCUPANCY,
            transfer_syntax_uid=RLELossless,
        )
    return SegEncoding(
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,  # not written
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def build_seg(
    *,
    source: Dataset,
    result: AnalysisResult,
    uids: ResultUIDs,
    producer: Producer,
    segmentation_type: Literal["binary", "fractional"] = "binary",
) -> hd.seg.Segmentation:
    """Build the SEG for ``result`` (at least one finding) on ``source``."""
    if not result.findings:
        raise EncodeError("a segmentation needs at least one finding")
    own: ObjectUIDs = uids.seg
    rows, columns = result.shape
    seg_encoding = encoding(rows, columns, len(result.findings), segmentation_type)
    try:
        seg = hd.seg.Segmentation(
            source_images=[source],
            pixel_measures=pixel_measures(source),
            pixel_array=_pixel_array(result, segmentation_type, seg_encoding),
            segmentation_type=seg_encoding.segmentation_type,
            fractional_type=seg_encoding.fractional_type,
            segment_descriptions=[
                _segment(i, f, uids, producer) for i, f in enumerate(result.findings)
            ],
            series_instance_uid=own.series_instance_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=own.sop_instance_uid,
            instance_number=1,
            manufacturer=producer.manufacturer,
            manufacturer_model_name=producer.model_name[:64],
            software_versions=producer.software_version,
            device_serial_number=producer.device_serial_number,
            series_description=f"{producer.manufacturer} findings (SEG)",
            content_label="FINDINGS",
            content_description=f"{producer.algorithm_name} {producer.model_version}"[:64],
            contributing_equipment=producer.contributing_equipment(),
            omit_empty_frames=False,
            transfer_syntax_uid=seg_encoding.transfer_syntax_uid,
        )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"SEG could not be built: {exc}") from exc
    if "FrameOfReferenceUID" not in source:
        _add_projection_geometry(seg, source)
    return seg


def _valid_spacing(value: object) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def pixel_measures(source: Dataset) -> hd.PixelMeasuresSequence | None:
    """Pixel Measures of the SEG: the spacing the source gives, its Pixel Spacing, else its
    Imager Pixel Spacing (what viewers and the pipeline use for a radiograph); None when it
    gives neither as two positive numbers, so that the SEG has no Pixel Measures: a nominal
    spacing would state a calibration the source never had. ``source.usable_source`` has
    left out a Pixel Spacing of 0\\0, which highdicom would otherwise copy. A radiograph has
    no slice thickness, so none is written."""
    spacing = _valid_spacing(source.get("PixelSpacing")) or _valid_spacing(
        source.get("ImagerPixelSpacing")
    )
    if spacing is None:
        return None
    return hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=None)


def _add_projection_geometry(seg: hd.seg.Segmentation, source: Dataset) -> None:
    # Neither value is a highdicom argument for a source without a Frame of Reference (see
    # the module docstring); both are set here and nowhere else.
    seg.PatientOrientation = list(source.get("PatientOrientation", None) or [])
    orientation = Dataset()
    orientation.ImageOrientationPatient = _IDENTITY_ORIENTATION
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
