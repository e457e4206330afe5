"""Result objects for one analysed image: findings + source header → SEG, TID 1500 SR, GSPS
and, optionally, a Secondary Capture with the overlay burned in.

``encode_results`` is the one entry point (``node.results.publish`` calls it); the modules
``seg``, ``sr``, ``gsps`` and ``sc`` each build one object kind with highdicom, ``codes``
holds the coded concepts and ``common`` what they share (equipment, algorithm, UIDs, labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from node.encode.common import ObjectUIDs, Producer, ResultUIDs, check_source
from node.encode.gsps import build_gsps
from node.encode.sc import build_sc
from node.encode.seg import build_seg
from node.encode.source import is_grey, usable_source
from node.encode.sr import build_sr
from node.errors import EncodeError
from node.logs import get_logger
from pipeline.result import AnalysisResult

__all__ = ["EncodedObject", "ObjectKind", "ObjectUIDs", "Producer", "ResultUIDs", "encode_results"]


class ObjectKind(StrEnum):
    """The kinds of result object; values are the DICOM Modality of each, except ``SC``
    (Secondary Capture, Modality "OT")."""

    SEG = "SEG"
    SR = "SR"
    PR = "PR"
    SC = "SC"


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
    burned_in: npt.NDArray[np.uint8] | None = None,
) -> list[EncodedObject]:
    """Build the objects for one image: always an SR; with findings also a SEG and (unless
    disabled) a GSPS; with ``burned_in`` (the rendered RGB picture) also a Secondary
    Capture, findings or not (left out, with a warning, when the source cannot have one).
    Type 2 attributes the source lacks or gives invalid are written empty, invalid optional
    ones left out (``source.usable_source``; the source itself is not changed); a colour
    source gets no GSPS (a greyscale presentation state cannot reference it), logged. Raises
    ``EncodeError`` when the source lacks a valid Type 1 UID, or SEG, SR or (for a greyscale
    source) GSPS cannot be built."""
    check_source(source, result.shape)
    source = usable_source(source)
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
        if presentation_state and not is_grey(source):
            get_logger("node.encode").warning(
                "presentation_state_skipped",
                reason="the source image is not MONOCHROME1/2 (Photometric Interpretation "
                f"{source.get('PhotometricInterpretation', '') or 'absent'}): a greyscale "
                "presentation state cannot reference it; SEG and SR carry the findings",
            )
        elif presentation_state:
            pr = build_gsps(source=source, result=result, uids=uids, producer=producer)
            objects.append(EncodedObject(kind=ObjectKind.PR, dataset=pr))
    if burned_in is not None:
        try:
            sc = build_sc(source=source, picture=burned_in, uids=uids, producer=producer)
        except EncodeError as exc:  # optional extra: the other objects still go out
            get_logger("node.encode").warning("secondary_capture_skipped", error=str(exc))
        else:
            objects.append(EncodedObject(kind=ObjectKind.SC, dataset=sc))
    return objects
