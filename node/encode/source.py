"""The source header as our objects may copy it: Type 2 patient and study attributes that are
absent or do not parse for their VR become empty; a missing or invalid Type 1 UID is a clear
failure.

Modalities and anonymisers send headers slightly wrong (no Patient Birth Date, a Patient Sex
of "unknown", a date with letters in it). highdicom copies the Patient and Study modules
from the source image into every object it builds and refuses a value that does not parse,
so one bad Type 2 value used to cost the whole result. ``usable_source`` returns a copy of
the source (the source itself is never changed) in which

* each Type 2 attribute our objects carry (``TYPE_2``) is present: empty where the source
  has none or one that is not valid for its VR (Type 2 allows empty);
* each other Patient or Study attribute highdicom copies (``TYPE_3``) that is not valid for
  its VR is left out (it is optional);
* a Pixel Spacing that is not two positive numbers is left out: some CR writers put ``0\\0``
  for "uncalibrated", which highdicom would copy into the SEG's Pixel Measures (an error
  there, and a spacing the source does not have);

and logs one warning naming the keywords, never a value. Values are read from the stored
text (``node.scrub.raw_text``), not through pydicom's conversion, which warns, quoting the
value, about an invalid one.
"""

from __future__ import annotations

import datetime as dt
import re

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from node.errors import EncodeError
from node.logs import get_logger
from node.scrub import raw_text

TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Patient and General Study attributes of Type 2 that our objects copy from the source."""

TYPE_3 = (
    "IssuerOfPatientID",
    "PatientBirthTime",
    "OtherPatientNames",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "QualityControlSubject",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "ConsultingPhysicianName",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "LastMenstrualDate",
    "AdmissionID",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "PatientState",
)
"""Other text attributes of the Patient, General Study and Patient Study modules that
highdicom copies from the source when present: left out of the copy when invalid."""

TYPE_1 = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
"""UIDs every object we build needs from the source (study, references, evidence)."""

_SEX = frozenset({"M", "F", "O"})
_TM = re.compile(r"^([01]\d|2[0-3])(([0-5]\d)(([0-5]\d|60)(\.\d{1,6})?)?)?$")
_UID = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))+$")
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f]")  # ESC (0x1b) introduces ISO 2022 escapes
_SINGLE_TEXT = frozenset({"LT", "ST", "UT", "UR"})
"""VRs whose value is one text that may contain backslashes and line breaks."""


def _valid_date(text: str) -> bool:
    if not re.fullmatch(r"\d{8}", text):
        return False
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _valid_one(vr: str, text: str) -> bool:
    if vr == "DA":
        return _valid_date(text)
    if vr == "TM":
        return bool(_TM.match(text))
    if vr not in _SINGLE_TEXT and _CONTROL.search(text):
        return False
    try:
        validate_value(vr, text, pydicom_config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def valid_text(keyword: str, text: str) -> bool:
    """Whether ``text`` (the stored value, backslash-separated) is valid for ``keyword``:
    its VR, its value multiplicity, and for Patient Sex the enumerated values M, F, O."""
    if text == "":
        return True
    if keyword == "PatientSex":
        return text in _SEX
    tag = tag_for_keyword(keyword)
    if tag is None:
        return False
    vr = dictionary_VR(tag)
    if vr in _SINGLE_TEXT:
        return _valid_one(vr, text)
    values = text.split("\\")
    if len(values) > 1 and dictionary_VM(tag) == "1":
        return False
    return all(_valid_one(vr, v.strip(" ")) for v in values)


def check_type_1(source: Dataset) -> None:
    """``EncodeError`` naming the attribute when a Type 1 UID (``TYPE_1``) is missing, empty or
    not a valid UID: no result object can reference such a source."""
    for keyword in TYPE_1:
        text = raw_text(source, keyword)
        if not text:
            raise EncodeError(f"the source image lacks {keyword} (Type 1)")
        if len(text) > 64 or not _UID.match(text):
            raise EncodeError(f"the source image's {keyword} is not a valid UID (Type 1)")


def _copy(source: Dataset) -> Dataset:
    """A new dataset holding the source's elements as they are (not yet converted ones stay
    unconverted), so that replacing or removing one leaves the source untouched."""
    copied = Dataset()
    file_meta = getattr(source, "file_meta", None)
    if file_meta is not None:
        copied.file_meta = file_meta
    implicit, little = source.original_encoding
    copied.set_original_encoding(implicit, little, source.original_character_set)
    tags = source.keys()  # iterating the dataset itself would convert every value
    for tag in tags:
        element = source.get_item(tag)
        if element is not None:
            copied[tag] = element
    return copied


def _positive_spacing(text: str) -> bool:
    """Whether a stored Pixel Spacing is two positive numbers (row\\column, in mm)."""
    try:
        values = [float(v) for v in text.split("\\")]
    except ValueError:
        return False
    return len(values) == 2 and min(values) > 0


def usable_source(source: Dataset) -> Dataset:
    """A copy of ``source`` (which is not changed) whose Type 2 attributes (``TYPE_2``) are
    present and valid, empty where they were absent or invalid, without the invalid ones of
    ``TYPE_3`` and without a Pixel Spacing that is not positive; ``EncodeError`` when a
    Type 1 UID is missing or invalid (``check_type_1``). Logs one warning with the keywords
    it changed, never their values."""
    check_type_1(source)
    fixed = _copy(source)
    absent: list[str] = []
    emptied: list[str] = []
    removed: list[str] = []
    for keyword in TYPE_2:
        text = raw_text(source, keyword)
        if text is not None and valid_text(keyword, text):
            continue
        (absent if text is None else emptied).append(keyword)
        setattr(fixed, keyword, None)
    for keyword in TYPE_3:
        text = raw_text(source, keyword)
        if text is not None and not valid_text(keyword, text):
            removed.append(keyword)
            delattr(fixed, keyword)
    spacing = raw_text(source, "PixelSpacing")
    if spacing is not None and not _positive_spacing(spacing):
        removed.append("PixelSpacing")
        del fixed.PixelSpacing
    if absent or emptied or removed:
        get_logger("node.encode").warning(
            "source_attributes_emptied",
            detail="written empty (Type 2) or left out (Type 3) in the result objects",
            absent=absent,
            invalid=emptied,
            left_out=removed,
        )
    return fixed


def is_grey(source: Dataset) -> bool:
    """A greyscale softcopy presentation state can only reference a MONOCHROME image."""
    return (raw_text(source, "PhotometricInterpretation") or "").startswith("MONOCHROME")
