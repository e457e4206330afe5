"""Patient values out of every log line and every stored reason.

Two layers, applied by ``scrub``:

1. **The values of the instance at hand.** ``patient_values`` reads the patient-module
   attributes of a dataset (name and its components, IDs, birth date in the forms a message
   may print it, sex, age, accession number, ...) from the stored text, never through
   pydicom's value conversion, which warns, quoting the value, about an invalid one. The
   worker protects them for the duration of an instance (``protecting``), so the log
   processor of ``node.logs`` removes them from every line emitted meanwhile, whoever emits
   it, and the failure reason it stores is scrubbed with them.
2. **A generic fallback for values we were not told about.** pydicom, highdicom and Python
   quote the value they refuse ("Unable to convert 'X' to 'DA' object", "Invalid value for
   VR CS: 'X'", "'X' is not a valid PatientSexValues", 'potentially invalid: "X"'):
   ``scrub_quoted`` replaces quoted text with ``<redacted>``, keeping what cannot be patient
   data (UIDs, VR names, DICOM keywords, Python type names).

Values shorter than ``MIN_LENGTH`` (Patient Sex "M", a two-letter name component) are not
searched for: they would blank every such letter pair in a line, and carry no identity alone.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import keyword_dict, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import VR

REDACTED = "<redacted>"
MIN_LENGTH = 3

PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "IssuerOfPatientID",
    "AccessionNumber",
    "AdmissionID",
    "MilitaryRank",
    "EthnicGroup",
    "Occupation",
    "ResponsiblePerson",
    "ReferringPhysicianName",
)
"""Attributes whose values never go into a log line or a stored reason."""

_SEQUENCES = ("OtherPatientIDsSequence",)
"""Sequences whose items carry further patient IDs (their PatientID)."""

_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)
_DIGITS = re.compile(r"^[0-9.]+$")


# Reading values without converting them ---------------------------------------------------


def _encodings(ds: Dataset) -> list[str]:
    element = ds.get_item(0x00080005)
    if element is None:
        return ["iso8859"]
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").split("\\")
    terms = [str(v).strip() for v in (value if isinstance(value, list | MultiValue) else [value])]
    try:
        return list(convert_encodings(terms))
    except (LookupError, ValueError):
        return ["iso8859"]


def raw_text(ds: Dataset, keyword: str) -> str | None:
    """The stored text of ``keyword`` in ``ds`` (values joined by backslashes, padding
    stripped), or None when the attribute is absent or not text. A value pydicom has not
    converted yet is decoded here, so an invalid one causes no pydicom warning (which would
    quote it); a converted one is read back as it is."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    element = ds.get_item(tag)
    if element is None:
        return None
    value = element.value
    if isinstance(element, RawDataElement):
        if element.VR is not None and element.VR not in _TEXT_VRS:
            return None
        if value is None:
            return ""
        data = bytes(value)
        for encoding in [*_encodings(ds), "utf-8", "latin-1"]:
            try:
                return data.decode(encoding).strip(" \x00")
            except (LookupError, UnicodeDecodeError):
                continue
        return data.decode("latin-1").strip(" \x00")  # pragma: no cover - latin-1 always decodes
    if value is None:
        return ""
    if isinstance(value, Sequence | bytes | bytearray):
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value).strip(" \x00")
    return str(value).strip(" \x00")


# The values to protect --------------------------------------------------------------------


def _variants(keyword: str, text: str) -> set[str]:
    """``text`` and the forms a message may print it in (PN components, date formats)."""
    found: set[str] = set()
    for value in text.split("\\"):
        value = value.strip()
        if not value:
            continue
        found.add(value)
        if keyword.endswith(("Name", "Names", "Person")):
            for group in value.split("="):
                parts = [p.strip() for p in group.split("^") if p.strip()]
                found.add(group)
                found.update(parts)
                if len(parts) >= 2:
                    found.add(" ".join(parts))
                    found.add(" ".join(reversed(parts)))
                    found.add(f"{parts[0]}, {' '.join(parts[1:])}")
        if keyword.endswith("Date") and re.fullmatch(r"\d{8}", value):
            y, m, d = value[:4], value[4:6], value[6:]
            found.update({f"{y}-{m}-{d}", f"{y}.{m}.{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}"})
    return {v for v in found if len(v) >= MIN_LENGTH}


def patient_values(ds: Dataset) -> frozenset[str]:
    """The patient values of ``ds`` (``PATIENT_KEYWORDS`` and the IDs in Other Patient IDs
    Sequence) in every form ``scrub`` looks for; read without converting any value."""
    found: set[str] = set()
    for keyword in PATIENT_KEYWORDS:
        text = raw_text(ds, keyword)
        if text:
            found |= _variants(keyword, text)
    for keyword in _SEQUENCES:
        try:
            items = ds.get(keyword, None) or []
        except (ValueError, TypeError, KeyError):  # an unreadable sequence has nothing to add
            continue
        for item in items:
            text = raw_text(item, "PatientID")
            if text:
                found |= _variants("PatientID", text)
    return frozenset(found)


def values_of_file(path: Path) -> frozenset[str]:
    """``patient_values`` of the DICOM file at ``path`` (its header only); empty when the
    file cannot be read (the analysis then reports the file as it is)."""
    tags = [t for t in (tag_for_keyword(k) for k in (*PATIENT_KEYWORDS, *_SEQUENCES)) if t]
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=[0x00080005, *tags], force=True
        )
    except (OSError, ValueError, TypeError, EOFError, KeyError, AttributeError):
        return frozenset()
    return patient_values(ds)


_protected: ContextVar[frozenset[str]] = ContextVar("shadowspot_protected", default=frozenset())


@contextmanager
def protecting(values: Iterable[str]) -> Iterator[None]:
    """Within the block (this thread or task), every log line is scrubbed of ``values``."""
    token = _protected.set(_protected.get() | frozenset(values))
    try:
        yield
    finally:
        _protected.reset(token)


def protected() -> frozenset[str]:
    """The values ``protecting`` blocks around this call protect."""
    return _protected.get()


# Scrubbing ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _pattern(values: frozenset[str]) -> re.Pattern[str] | None:
    alternatives = []
    for value in sorted(values, key=len, reverse=True):
        escaped = re.escape(value)
        if _DIGITS.match(value):  # not a component of a UID or of a longer number
            alternatives.append(rf"(?<![0-9.]){escaped}(?![0-9]|\.[0-9])")
        else:
            alternatives.append(rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])")
    if not alternatives:
        return None
    return re.compile("|".join(alternatives), re.IGNORECASE)


def scrub_values(text: str, values: Iterable[str] | Dataset | None = None) -> str:
    """``text`` with every occurrence of ``values`` (a dataset's ``patient_values``, or the
    values themselves) and of the ``protected`` values replaced by ``<redacted>``."""
    if isinstance(values, Dataset):
        values = patient_values(values)
    wanted = protected() | frozenset(v for v in (values or ()) if len(v) >= MIN_LENGTH)
    pattern = _pattern(wanted) if wanted else None
    return text if pattern is None else pattern.sub(REDACTED, text)


_QUOTED = re.compile(r"""(?P<q>['"])(?P<v>(?:(?!(?P=q)).){1,512}?)(?P=q)(?P<after> object)?""")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_VRS = frozenset(str(vr) for vr in VR)


def _keep(value: str, type_name: bool) -> bool:
    return (
        type_name
        or value == REDACTED
        or value in _VRS
        or value in keyword_dict
        or bool(_UID.match(value))
    )


def scrub_quoted(text: str) -> str:
    """``text`` with every quoted value replaced by ``<redacted>``, except UIDs, VR names,
    DICOM keywords and Python type names ("'Dataset' object ..."): what pydicom, highdicom and
    Python quote in their messages may be a patient's name, ID, birth date or sex."""

    def redact(match: re.Match[str]) -> str:
        value = match.group("v")
        if _keep(value, match.group("after") is not None):
            return match.group(0)
        quote = match.group("q")
        return f"{quote}{REDACTED}{quote}{match.group('after') or ''}"

    return _QUOTED.sub(redact, text)


def scrub(text: str, values: Iterable[str] | Dataset | None = None) -> str:
    """``text`` without patient values: those of ``values`` and the ``protected`` ones
    (``scrub_values``), then any other quoted value (``scrub_quoted``). For every text that
    is stored or logged and may quote a header (exception messages, third-party messages)."""
    return scrub_quoted(scrub_values(text, values))
