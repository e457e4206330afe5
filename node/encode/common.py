"""What every result object shares: who made it, which algorithm, which UIDs, which labels.

``Producer`` describes the product (Manufacturer "ShadowSpot", software version) and the
algorithm (model name and version) for General Equipment, Contributing Equipment and
Algorithm Identification. ``ResultUIDs`` are generated once per analysed source instance,
stored by ``node.deliveries`` and passed back in on retry so that a retry rebuilds byte-
identical identities instead of duplicates.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node import PRODUCT_NAME, __version__
from node.encode import codes as sc
from node.errors import EncodeError
from pipeline.result import Finding

ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence


@dataclass(frozen=True, slots=True, kw_only=True)
class Producer:
    """The equipment and algorithm that produced the results."""

    model_name: str
    model_version: str
    device_serial_number: str = "0"
    software_version: str = __version__
    manufacturer: str = PRODUCT_NAME
    institution_name: str | None = None

    @property
    def algorithm_name(self) -> str:
        return f"{PRODUCT_NAME} {self.model_name}"

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.algorithm_name,
            family=ALGORITHM_FAMILY,
            version=self.model_version,
            source=PRODUCT_NAME,
        )

    def sr_algorithm_id(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(name=self.algorithm_name, version=self.model_version)

    def contributing_equipment(self) -> list[hd.ContributingEquipment]:
        """Contributing Equipment: the processing algorithm that made the findings."""
        return [
            hd.ContributingEquipment(
                manufacturer=self.manufacturer,
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=self.model_name[:64],
                software_versions=[self.software_version, self.model_version],
                device_serial_number=self.device_serial_number,
                contribution_datetime=dt.datetime.now(dt.UTC).replace(tzinfo=None),
                contribution_description=(
                    f"Automated detection and grading of lung shadows and spots by "
                    f"{self.algorithm_name} {self.model_version}"
                )[:64],
            )
        ]


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectUIDs:
    """Series and SOP Instance UID of one result object."""

    series_instance_uid: str
    sop_instance_uid: str

    @classmethod
    def new(cls) -> ObjectUIDs:
        return cls(series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultUIDs:
    """The UIDs of every object built for one source instance, generated once and reused."""

    seg: ObjectUIDs
    sr: ObjectUIDs
    pr: ObjectUIDs
    sc: ObjectUIDs

    @classmethod
    def new(cls) -> ResultUIDs:
        return cls(
            seg=ObjectUIDs.new(), sr=ObjectUIDs.new(), pr=ObjectUIDs.new(), sc=ObjectUIDs.new()
        )

    def tracking_uid(self, index: int) -> str:
        """The Tracking UID of the finding at ``index`` (0-based): derived from the SEG's
        SOP Instance UID, so it is stable across retries and shared by SEG, SR and GSPS."""
        return str(generate_uid(entropy_srcs=[self.seg.sop_instance_uid, "finding", str(index)]))

    def image_tracking_uid(self) -> str:
        """The Tracking UID of the image-level evaluation group of the SR."""
        return str(generate_uid(entropy_srcs=[self.sr.sop_instance_uid, "image"]))


def finding_text(finding: Finding) -> str:
    """One line a radiologist reads: type, grade, probability, (alert)."""
    alert = ", ALERT" if finding.alert else ""
    return (
        f"{sc.finding_label(finding.finding_type)}, grade {finding.grade}, "
        f"probability {finding.probability:.0%}{alert}"
    )


def tracking_id(index: int, finding: Finding) -> str:
    """Short tracking identifier shared by SEG segment and GSPS objects."""
    return f"finding {index + 1}: {sc.finding_label(finding.finding_type)} grade {finding.grade}"


def cielab(finding: Finding) -> hd.color.CIELabColor:
    """The finding's grade colour (sRGB) as CIELab for Recommended Display CIELab Value."""
    r, g, b = finding.colour
    return hd.color.CIELabColor.from_rgb(r, g, b)


def closed_polyline(finding: Finding) -> list[tuple[float, float]]:
    """The contour as a closed polyline in image coordinates (column, row) of the pixel
    centres: vertices are pixel indices, DICOM puts the top-left corner of the first pixel
    at (0, 0), so each vertex moves by half a pixel; the first point is repeated last."""
    points = [(float(x) + 0.5, float(y) + 0.5) for x, y in finding.contour]
    points.append(points[0])
    return points


UNPAIRED_BODY_PARTS = frozenset({"CHEST"})
"""Body parts that need no Laterality (CID 4031 terms dciodvfy knows to be unpaired)."""


def copy_body_part(target: Dataset, source: Dataset) -> None:
    """General Series of an object highdicom takes no body part for (GSPS, SC): copy the
    source's Body Part Examined, and Laterality (Type 2C) unless the body part is known to be
    unpaired: the source's value, or empty (unknown) where it has none. A DX that says
    THORAX, a term outside CID 4031, thus keeps its Laterality as the modality sent it."""
    body_part = source.get("BodyPartExamined", None)
    if body_part:
        target.BodyPartExamined = body_part
    if body_part not in UNPAIRED_BODY_PARTS:
        target.Laterality = source.get("Laterality", None) or None


def check_source(source: Dataset, shape: tuple[int, int]) -> None:
    """The findings must be in the source image's pixel grid."""
    rows, cols = int(source.get("Rows", 0)), int(source.get("Columns", 0))
    if (rows, cols) != shape:
        raise EncodeError(f"result shape {shape} does not match the source image {(rows, cols)}")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise EncodeError("only single-frame source images are supported")
