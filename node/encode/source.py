"""The source header as our objects may copy it: Type 2 patient and study attributes that are
absent or do not parse for their VR become empty; a missing Type 1 UID is a clear failure.

Modalities and anonymisers send headers slightly wrong (no Patient Birth Date, a Patient Sex
of "unknown", a date with letters in it). highdicom copies these attributes from the source
image into every object it builds and refuses a value that does not parse, so one bad Type 2
value used to cost the whole result. Here each such attribute is written empty (Type 2 allows
that) in a shallow copy of the source; the log names the keyword, never the value.
"""

from __future__ import annotations

import copy
import re

from pydicom import Dataset
from structlog.stdlib import get_logger

from node.errors import EncodeError

log = get_logger("node.encode")

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

TYPE_1 = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

_VALID = {
    "DA": re.compile(r"^\d{8}$"),
    "TM": re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$"),
    "SH": re.compile(r"^[^\\\x00-\x1f]{0,16}$"),
    "LO": re.compile(r"^[^\\\x00-\x1f]{0,64}$"),
    "PN": re.compile(r"^[^\x00-\x1a\x1c-\x1f]{0,324}$"),
}
_SEX = frozenset({"M", "F", "O"})


def _raw_text(source: Dataset, keyword: str) -> str | None:
    """The attribute's stored text, without letting pydicom convert (and refuse) it."""
    element = source.get(keyword, None) if keyword in source else None
    if element is None:
        return None
    raw = source.data_element(keyword)
    if raw is None:
        return None
    value = raw.value
    if isinstance(value, bytes):
        return value.decode("latin-1").strip()
    return "" if value is None else str(value).strip()


def _valid(keyword: str, text: str) -> bool:
    if text == "":
        return True
    if keyword == "PatientSex":
        return text in _SEX
    vr = {"PatientBirthDate": "DA", "StudyDate": "DA", "StudyTime": "TM", "StudyID": "SH"}.get(
        keyword, "PN" if keyword.endswith("Name") else "LO"
    )
    return bool(_VALID[vr].match(text))


def usable_source(source: Dataset) -> Dataset:
    """A shallow copy of ``source`` whose Type 2 attributes (``TYPE_2``) are present and
    parse, empty where they did not; ``EncodeError`` when a Type 1 UID (``TYPE_1``) is
    missing."""
    missing = [k for k in TYPE_1 if not str(source.get(k, "") or "").strip()]
    if missing:
        raise EncodeError(f"the source image lacks {', '.join(missing)} (Type 1)")
    fixed = copy.copy(source)
    for keyword in TYPE_2:
        try:
            text = _raw_text(source, keyword)
        except (ValueError, TypeError, KeyError):
            text = "\x00"  # unreadable: treated as invalid
        if text is not None and _valid(keyword, text):
            continue
        setattr(fixed, keyword, None)
        log.warning(
            "source_attribute_emptied",
            keyword=keyword,
            why="absent" if text is None else "not valid for its VR",
        )
    return fixed


def is_grey(source: Dataset) -> bool:
    """A greyscale softcopy presentation state can only reference a MONOCHROME image."""
    return str(source.get("PhotometricInterpretation", "")).strip().startswith("MONOCHROME")
