"""Coded concepts for the result objects: finding types, anatomy, laterality, zones, grades,
report titles and the procedure; and the words the labels use for them.

SNOMED CT (``SCT``), DICOM (``DCM``) and LOINC (``LN``) codes with their standard meanings
(viewers such as OHIF match SR items by meaning text, so the meanings are kept exactly). Two
concepts have no standard code — the product's early-warning alert flag and its grade scale —
and use the private coding scheme ``99SHSP``, declared in each SR's Coding Scheme
Identification.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

from node.errors import EncodeError
from pipeline.result import FindingType, Side, Zone

PRIVATE_SCHEME = "99SHSP"
PRIVATE_SCHEME_NAME = "ShadowSpot private codes"

# --- segmented property category / type (SEG) and finding type (SR) -------------------------
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically abnormal structure")
FINDING_CATEGORY = Code("404684003", "SCT", "Finding")

_FINDING_TYPE_CODE: dict[FindingType, Code] = {
    FindingType.NODULE: Code("27925004", "SCT", "Nodule"),
    FindingType.MASS: Code("4147007", "SCT", "Mass"),
    FindingType.TUBERCULOSIS: Code("56717001", "SCT", "Tuberculosis"),
    FindingType.CONSOLIDATION: Code("95436008", "SCT", "Lung consolidation"),
    FindingType.GROUND_GLASS_OPACITY: Code("112120", "DCM", "Ground glass opacity"),
    FindingType.INFILTRATION: Code("112121", "DCM", "Infiltrate"),
    FindingType.OPACITY: Code("112001", "DCM", "Opacity"),
    FindingType.PLEURAL_EFFUSION: Code("60046008", "SCT", "Pleural effusion"),
}

_FINDING_TYPE_LABEL: dict[FindingType, str] = {
    FindingType.NODULE: "Nodule",
    FindingType.MASS: "Mass",
    FindingType.TUBERCULOSIS: "Tuberculosis-like opacity",
    FindingType.CONSOLIDATION: "Consolidation",
    FindingType.GROUND_GLASS_OPACITY: "Ground glass opacity",
    FindingType.INFILTRATION: "Infiltrate",
    FindingType.OPACITY: "Opacity",
    FindingType.PLEURAL_EFFUSION: "Pleural effusion",
}


def finding_type_code(finding_type: FindingType) -> Code:
    """The SNOMED CT / DCM code of a finding type (SEG property type, SR finding type)."""
    return _FINDING_TYPE_CODE[finding_type]


def type_label(finding_type: FindingType) -> str:
    """The human name of a finding type, the first part of every finding label."""
    return _FINDING_TYPE_LABEL[finding_type]


def property_category(finding_type: FindingType) -> Code:
    """SEG property category: a structure for lesions, a finding for effusion."""
    if finding_type is FindingType.PLEURAL_EFFUSION:
        return FINDING_CATEGORY
    return MORPHOLOGICALLY_ABNORMAL_STRUCTURE


# --- anatomy --------------------------------------------------------------------------------
LUNG = Code("39607008", "SCT", "Lung")
_LATERALITY: dict[Side, Code] = {
    Side.RIGHT: Code("24028007", "SCT", "Right"),
    Side.LEFT: Code("7771000", "SCT", "Left"),
}
_ZONE: dict[Zone, Code] = {
    Zone.UPPER: Code("281392002", "SCT", "Upper zone of lung"),
    Zone.MIDDLE: Code("281393007", "SCT", "Middle zone of lung"),
    Zone.LOWER: Code("281394001", "SCT", "Lower zone of lung"),
}


_SIDE_WORD: dict[Side, str] = {Side.RIGHT: "Right", Side.LEFT: "Left"}
_ZONE_WORD: dict[Zone, str] = {Zone.UPPER: "upper", Zone.MIDDLE: "middle", Zone.LOWER: "lower"}


def laterality_code(side: Side | None) -> Code | None:
    return None if side is None else _LATERALITY[side]


def zone_code(zone: Zone | None) -> Code | None:
    return None if zone is None else _ZONE[zone]


def site_label(side: Side | None, zone: Zone | None) -> str | None:
    """Where a finding is, the patient's side first: "Right upper zone"; "Left lung" without
    a zone, "Upper zone" without a side, None when neither is known."""
    if zone is None:
        return None if side is None else f"{_SIDE_WORD[side]} lung"
    if side is None:
        return f"{_ZONE_WORD[zone].capitalize()} zone"
    return f"{_SIDE_WORD[side]} {_ZONE_WORD[zone]} zone"


# --- report titles and procedure ------------------------------------------------------------
MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
"""TID 1500 title (CID 7021) of a report with findings; OHIF 3.13 hydrates its measurements."""
NO_FINDINGS_REPORT = Code("18748-4", "LN", "Diagnostic Imaging Report")
"""TID 1500 title of a report without findings: CID 7021 is extensible and this is the
general title of CID 7000 "Diagnostic Imaging Report Document Titles". OHIF 3.13 shows an SR
with any title but 126000 as text; one titled 126000 without a region to draw crashes its SR
viewport ("Something went wrong")."""
PROCEDURE_REPORTED = Code("43468-8", "LN", "XR unspecified body region")
"""TID 1500 row 4, Procedure Reported (DCID 100 "Quantitative Diagnostic Imaging
Procedures"): its term for a radiograph; the group has none for the chest alone."""

# --- grades, alert --------------------------------------------------------------------------
SEVERITY = Code("246112005", "SCT", "Severity")
_SEVERITY_OF_GRADE: tuple[Code, ...] = (
    Code("255604002", "SCT", "Mild"),
    Code("6736007", "SCT", "Moderate"),
    Code("24484000", "SCT", "Severe"),
    Code("442452003", "SCT", "Life threatening severity"),
)
GRADE = Code("GRADE", PRIVATE_SCHEME, "ShadowSpot grade")
ALERT = Code("ALERT", PRIVATE_SCHEME, "Early warning alert")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
FINDING = Code("121071", "DCM", "Finding")
FINDING_PRESENT = Code("373573001", "SCT", "Clinical finding present")
FINDING_ABSENT = Code("373572006", "SCT", "Clinical finding absent")
PROBABILITY = Code("122157", "DCM", "Probability")
AREA = Code("42798000", "SCT", "Area")
COMMENT = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")
UNIT_NONE = Code("1", "UCUM", "no units")


def severity_code(grade: int) -> Code:
    """Grade 1–4 → SNOMED CT severity (mild, moderate, severe, life threatening); grades above
    4 (a longer grading table) map to the most severe."""
    if grade < 1:
        raise EncodeError(f"grade must be 1 or more, got {grade}")
    return _SEVERITY_OF_GRADE[min(grade, len(_SEVERITY_OF_GRADE)) - 1]


def grade_code(grade: int) -> Code:
    """The product's own grade as a private code (``G3`` = "ShadowSpot grade 3")."""
    return Code(f"G{grade}", PRIVATE_SCHEME, f"ShadowSpot grade {grade}")


def yes_no(value: bool) -> Code:
    return YES if value else NO
