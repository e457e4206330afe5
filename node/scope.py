"""What the model is for, read from the source header: adults' chests, never our own objects.

``not_analysed_because`` (node.worker) decides from the instance header kept in the queue
(SOP class, modality, body part, view, frames). The checks here need the dataset's own header:
the patient's age (the model was trained on adults only) and whether the image is one of the
node's own results that a PACS forwarded back (a loop in a routed set-up). The reasons they
give name the rule, never the patient's value.
"""

from __future__ import annotations

import re
from datetime import date

from pydicom import Dataset

OUR_MANUFACTURER = "ShadowSpot"
OUR_SERIES_NUMBERS = frozenset({9101, 9102, 9103, 9104})
"""SEG, SR, GSPS and SC series of node.encode."""

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS = {"D": 1.0, "W": 7.0, "M": 30.44, "Y": 365.25}


def age_years(ds: Dataset) -> float | None:
    """The patient's age in years from Patient Age (AS), else from Birth Date and Study (or
    Content) Date; None when the header does not say."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    match = _AGE.match(text)
    if match:
        return int(match.group(1)) * _DAYS[match.group(2)] / 365.25
    born = _date(ds.get("PatientBirthDate", ""))
    taken = _date(ds.get("StudyDate", "")) or _date(ds.get("ContentDate", ""))
    if born is None or taken is None or taken < born:
        return None
    return (taken - born).days / 365.25


def _date(value: object) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def out_of_scope(ds: Dataset, *, min_age_years: float) -> str | None:
    """Why this chest image is not for the model, or None."""
    if str(ds.get("Manufacturer", "") or "").strip() == OUR_MANUFACTURER:
        return "one of ShadowSpot's own result objects (Manufacturer), sent back"
    try:
        series = int(ds.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        series = 0
    if series in OUR_SERIES_NUMBERS:
        return f"one of ShadowSpot's own result series ({series}), sent back"
    age = age_years(ds)
    if age is not None and age < min_age_years:
        return f"patient younger than {min_age_years:g} years by the header: adults only"
    return None
