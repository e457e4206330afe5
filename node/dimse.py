"""DIMSE status codes the node answers with, named as in PS3.4 (Annex B, Storage Service Class)
and PS3.7 (Annex C, general statuses). No bare hex anywhere else in the node."""

from __future__ import annotations

from enum import IntEnum

from pydicom.uid import UID

VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")
"""Verification SOP Class (PS3.4 Annex A), answered by C-ECHO."""


class Status(IntEnum):
    """C-STORE / C-ECHO response statuses (PS3.4 Table B.2-1, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    # Warning (PS3.4 B.2.3)
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # Failure (PS3.7 C.5)
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    # Failure (PS3.4 B.2.3)
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000

    @property
    def is_success(self) -> bool:
        return self is Status.SUCCESS

    @property
    def is_failure(self) -> bool:
        return not self.is_success and not 0xB000 <= self.value <= 0xBFFF


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ diagnostics with source "DICOM UL service-user" (PS3.8 Table 9-21)."""

    NO_REASON_GIVEN = 0x01
    APPLICATION_CONTEXT_NAME_NOT_SUPPORTED = 0x02
    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result (PS3.8 Table 9-21)."""

    REJECTED_PERMANENT = 0x01
    REJECTED_TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ source (PS3.8 Table 9-21)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03
