"""Result objects for one analysed image: findings + source header → SEG, TID 1500 SR, GSPS.

``encode_results`` is the one entry point (``node.results.publish`` calls it); the modules
``seg``, ``sr`` and ``gsps`` each build one object kind with highdicom, ``codes`` holds the
coded concepts and ``common`` what they share (equipment, algorithm, UIDs, labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydicom.dataset import Dataset

from node.encode.common import ObjectUIDs, Producer, ResultUIDs, check_source
from node.encode.gsps import build_gsps
from node.encode.seg import build_seg
from node.encode.sr import build_sr
from pipeline.result import AnalysisResult

__all__ = ["EncodedObject", "ObjectKind", "ObjectUIDs", "Producer", "ResultUIDs", "encode_results"]


class ObjectKind(StrEnum):
    """The kinds of result object; values are the DICOM Modality of each."""

    SEG = "SEG"
    SR = "SR"
    PR = "PR"


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedObject:
    """One built result object, ready to be written and sent."""

    kind: ObjectKind
    dataset: Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)


def encode_results(
    *,
    source: Dataset,
    result: AnalysisResult,
    uids: ResultUIDs,
    producer: Producer,
    segmentation_type: Literal["binary", "fractional"] = "binary",
    presentation_state: bool = True,
) -> list[EncodedObject]:
    """Build the objects for one image: always an SR; with findings also a SEG and (unless
    disabled) a GSPS. Raises ``EncodeError`` when an object cannot be built."""
    check_source(source, result.shape)
    objects = [
        EncodedObject(
            kind=ObjectKind.SR,
            dataset=build_sr(source=source, result=result, uids=uids, producer=producer),
        )
    ]
    if result.findings:
        seg = build_seg(
            source=source,
            result=result,
            uids=uids,
            producer=producer,
            segmentation_type=segmentation_type,
        )
        objects.insert(0, EncodedObject(kind=ObjectKind.SEG, dataset=seg))
        if presentation_state:
            pr = build_gsps(source=source, result=result, uids=uids, producer=producer)
            objects.append(EncodedObject(kind=ObjectKind.PR, dataset=pr))
    return objects
