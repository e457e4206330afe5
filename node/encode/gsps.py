"""Grayscale Softcopy Presentation State: each finding's contour in its grade colour with its
label (``common.finding_label``, the same as in the SEG and the SR), for viewers that do not
display SEG.

One graphic layer per grade colour carries the Recommended Display CIELab Value (the colour
a viewer draws the layer's graphics in); graphics and text share the finding's Tracking ID
with the SEG segment, and the contour its Tracking UID with the segment and the SR
measurement group.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.encode.common import (
    Producer,
    ResultUIDs,
    cielab,
    closed_polyline,
    copy_body_part,
    finding_label,
    tracking_id,
)
from node.errors import EncodeError
from pipeline.result import AnalysisResult, Finding

SERIES_NUMBER = 9103


def _layers(result: AnalysisResult) -> dict[tuple[int, tuple[int, int, int]], hd.pr.GraphicLayer]:
    layers: dict[tuple[int, tuple[int, int, int]], hd.pr.GraphicLayer] = {}
    for finding in sorted(result.findings, key=lambda f: f.grade):
        key = (finding.grade, finding.colour)
        if key not in layers:
            layers[key] = hd.pr.GraphicLayer(
                layer_name=f"GRADE{finding.grade}_{len(layers) + 1}",
                order=len(layers) + 1,
                description=f"ShadowSpot findings of grade {finding.grade}",
                display_color=cielab(finding),
            )
    return layers


def _annotation(
    index: int,
    finding: Finding,
    source: Dataset,
    layer: hd.pr.GraphicLayer,
    uids: ResultUIDs,
) -> hd.pr.GraphicAnnotation:
    x0, y0, _, _ = finding.box
    uid = uids.tracking_uid(index)
    ident = tracking_id(index, finding)
    contour = hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(closed_polyline(finding), dtype=np.float32),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        tracking_id=ident,
        tracking_uid=uid,
    )
    text = hd.pr.TextObject(
        text_value=finding_label(finding),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        anchor_point=(float(x0) + 0.5, float(y0) + 0.5),
        anchor_point_visible=False,
        tracking_id=ident,
        tracking_uid=str(hd.UID()),
    )
    return hd.pr.GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=[contour],
        text_objects=[text],
    )


def build_gsps(
    *, source: Dataset, result: AnalysisResult, uids: ResultUIDs, producer: Producer
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Build the presentation state for ``result`` (at least one finding) on ``source``."""
    if not result.findings:
        raise EncodeError("a presentation state needs at least one finding")
    layers = _layers(result)
    annotations = [
        _annotation(i, f, source, layers[(f.grade, f.colour)], uids)
        for i, f in enumerate(result.findings)
    ]
    try:
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[source],
            series_instance_uid=uids.pr.series_instance_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=uids.pr.sop_instance_uid,
            instance_number=1,
            manufacturer=producer.manufacturer,
            manufacturer_model_name=producer.model_name[:64],
            software_versions=producer.software_version,
            device_serial_number=producer.device_serial_number,
            content_label="SHADOWSPOT",
            content_description=f"{producer.algorithm_name} findings"[:64],
            graphic_annotations=annotations,
            graphic_layers=list(layers.values()),
            series_description=f"{producer.manufacturer} findings (GSPS)",
            contributing_equipment=producer.contributing_equipment(),
        )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"presentation state could not be built: {exc}") from exc
    copy_body_part(gsps, source)
    return gsps
