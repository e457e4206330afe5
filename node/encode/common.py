"""What every result object shares: who made it, which algorithm, which UIDs, which labels
and colours.

``Producer`` describes the product (Manufacturer "ShadowSpot", software version) and the
algorithm (model name and version) for General Equipment, Contributing Equipment and
Algorithm Identification. ``ResultUIDs`` are generated once per analysed source instance,
stored by ``node.deliveries`` and passed back in on retry so that a retry rebuilds byte-
identical identities instead of duplicates.

``finding_label`` is the one label of a finding — SEG segment label and Tracking ID, GSPS
text, SR comment and tracking identifier — so that a reader sees the same words in every
viewer. ``display_colour`` is the grade colour as
the objects recommend it for display: readable on OHIF's dark side panel, where the segment
colour is the only mark telling the grades apart.
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


def finding_label(finding: Finding) -> str:
    """The one label of a finding in every object: type, site with the patient's side, grade,
    probability and the alert: "Nodule, Right upper zone, G3, 91%, ALERT"."""
    site = sc.site_label(finding.side, finding.zone)
    parts = [
        sc.type_label(finding.finding_type),
        *([site] if site else []),
        f"G{finding.grade}",
        f"{finding.probability:.0%}",
        *(["ALERT"] if finding.alert else []),
    ]
    return ", ".join(parts)


def tracking_id(index: int, finding: Finding) -> str:
    """Tracking ID shared by the SEG segment and the GSPS graphic and text of a finding."""
    return f"finding {index + 1}: {finding_label(finding)}"


OHIF_PANEL_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((9, 12, 42), (4, 28, 73))
"""OHIF 3.13.2's side panel and its selected row (sRGB), read from viewer-check screenshots:
the segment colour is drawn as a swatch on them."""
MIN_CONTRAST = 3.0
"""WCAG 2.1 success criterion 1.4.11 (non-text contrast) for graphical marks."""


def _luminance(rgb: tuple[int, int, int]) -> float:
    """WCAG 2.1 relative luminance of an sRGB colour (components 0–255)."""

    def linear(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """WCAG 2.1 contrast ratio of two sRGB colours, 1 to 21."""
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def display_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The grade colour as written for display: as configured when it stands out by
    ``MIN_CONTRAST`` from each of ``OHIF_PANEL_BACKGROUNDS``, else mixed with white in the
    smallest step of 5 % that does (same hue, lighter)."""
    for step in range(20):
        r, g, b = (round(c + (255 - c) * step / 20) for c in rgb)
        if all(contrast((r, g, b), bg) >= MIN_CONTRAST for bg in OHIF_PANEL_BACKGROUNDS):
            return (r, g, b)
    return (255, 255, 255)  # white stands out from both by more than 15:1


def cielab(finding: Finding) -> hd.color.CIELabColor:
    """The finding's display colour as CIELab for Recommended Display CIELab Value."""
    r, g, b = display_colour(finding.colour)
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
