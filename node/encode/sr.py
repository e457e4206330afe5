"""Comprehensive 3D SR with a TID 1500 Measurement Report of the findings of one image.

One TID 1501 measurement group per finding, encoded the way OHIF 3.13 hydrates it into its
measurement panel (see ``../shared/tools/viewer-check/README.md``):

* Tracking Identifier ``Cornerstone3DTools@^0.1.0:PlanarFreehandROI:<label>`` and a Tracking
  UID equal to the SEG segment's;
* the **first** NUM is the Area and carries the closed POLYLINE contour (SCOORD selected from
  the source image) as its "inferred from" coordinates;
* a Comment TEXT (121106) with the finding's label (``common.finding_label``: type, site with
  the side, grade, probability, alert), which is what OHIF's panel shows.

The coded items (finding type, finding site with laterality and zone, probability, severity,
grade, alert) are there for every other reader.

Study-level evaluations — finding present or absent, the highest grade, the alert flag and a
one-line summary — go into TID 1500's own "Qualitative Evaluations" container (row 12), which
highdicom does not build, so it is appended to the report it built. They must not be a
measurement group without a region: OHIF 3.13 walks the groups from the last one and stops at
the first without coordinates (``coords[0]`` of an empty list), so no finding would load.

An image without findings: highdicom requires at least one measurement group, so the report
gets one image-level TID 1501 group stating "Clinical finding absent" for the source image.
OHIF 3.13's SR viewport crashes ("Something went wrong") on a report titled "Imaging
Measurement Report" that has no region to draw, and shows any other SR as text, so this
report is titled "Diagnostic Imaging Report" (``codes.NO_FINDINGS_REPORT``; CID 7021 is
extensible): OHIF shows its content as text and its measurement panel stays empty.

Every container is SEPARATE (Continuity of Content): its items are distinct statements, not
one running sentence; OHIF's text view prints each as "Concept: value" on its own line
instead of running the values together. highdicom builds its containers CONTINUOUS and takes
no argument for it, so the built content tree is set before the document is made.

Procedure Reported is LOINC 43468-8 "XR unspecified body region", the projection radiography
term of CID 100.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from node.encode import codes as sc
from node.encode.common import Producer, ResultUIDs, closed_polyline, finding_label
from node.errors import EncodeError
from pipeline.result import AnalysisResult, Finding

SERIES_NUMBER = 9102
CORNERSTONE_FREEHAND = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
IMAGE_LEVEL_IDENTIFIER = "ShadowSpot image-level evaluation"
UNIT_PIXELS = Code("{pixels}", "UCUM", "pixels")


def _area(finding: Finding, source: Dataset) -> hd.sr.Measurement:
    """Area, first NUM of the group, with the contour it was measured on."""
    coordinates = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(closed_polyline(finding), dtype=np.float32),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    if finding.area_mm2 is not None:
        value, unit = round(finding.area_mm2, 2), sc.UNIT_MM2
    else:  # no pixel spacing known: the area is given in pixels, never as a fake mm²
        value, unit = float(np.count_nonzero(finding.mask)), UNIT_PIXELS
    return hd.sr.Measurement(
        name=sc.AREA, value=value, unit=unit, referenced_coordinates=[coordinates]
    )


def _group(
    index: int, finding: Finding, source: Dataset, uids: ResultUIDs, producer: Producer
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    label = finding_label(finding)
    site = hd.sr.FindingSite(
        anatomic_location=sc.zone_code(finding.zone) or sc.LUNG,
        laterality=sc.laterality_code(finding.side),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid(index), identifier=f"{CORNERSTONE_FREEHAND}:{label}"
        ),
        finding_type=sc.finding_type_code(finding.finding_type),
        algorithm_id=producer.sr_algorithm_id(),
        finding_sites=[site],
        measurements=[
            _area(finding, source),
            hd.sr.Measurement(
                name=sc.PROBABILITY, value=round(finding.probability, 4), unit=sc.UNIT_NONE
            ),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(sc.SEVERITY, sc.severity_code(finding.grade)),
            hd.sr.QualitativeEvaluation(sc.GRADE, sc.grade_code(finding.grade)),
            hd.sr.QualitativeEvaluation(sc.ALERT, sc.yes_no(finding.alert)),
        ],
    )
    # TID 1501 has no Comment row in highdicom's constructor; OHIF labels the measurement
    # with it, so it carries the readable summary.
    group[0].ContentSequence.append(_text(sc.COMMENT, label))
    return group


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def summary_text(result: AnalysisResult) -> str:
    """The study-level sentence: no findings, or how many, the highest grade, the alert."""
    if not result.findings:
        return "No shadows or spots found."
    alert = " ALERT raised." if result.alert else ""
    return f"{len(result.findings)} finding(s); highest grade {result.highest_grade}.{alert}"


def _study_evaluations(result: AnalysisResult) -> list[hd.sr.CodeContentItem]:
    """Finding present or absent, the highest grade (severity and grade), the alert flag."""
    pairs = [(sc.FINDING, sc.FINDING_PRESENT if result.findings else sc.FINDING_ABSENT)]
    if result.highest_grade is not None:
        pairs.append((sc.SEVERITY, sc.severity_code(result.highest_grade)))
        pairs.append((sc.GRADE, sc.grade_code(result.highest_grade)))
    pairs.append((sc.ALERT, sc.yes_no(result.alert)))
    return [
        hd.sr.CodeContentItem(
            name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        for name, value in pairs
    ]


def _qualitative_evaluations(result: AnalysisResult) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the study-level evaluations (rows 13, CODE, and 14, TEXT)."""
    container = hd.sr.ContainerContentItem(
        name=sc.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [*_study_evaluations(result), _text(sc.COMMENT, summary_text(result))]
    )
    return container


def _no_findings_group(
    source: Dataset, result: AnalysisResult, uids: ResultUIDs, producer: Producer
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The image-level TID 1501 group of an image without findings (highdicom requires at
    least one group): "Clinical finding absent" for the whole source image."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.image_tracking_uid(), identifier=IMAGE_LEVEL_IDENTIFIER
        ),
        algorithm_id=producer.sr_algorithm_id(),
        finding_sites=[hd.sr.FindingSite(anatomic_location=sc.LUNG)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(sc.FINDING, sc.FINDING_ABSENT)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    group[0].ContentSequence.append(_text(sc.COMMENT, summary_text(result)))
    return group


def _separate(item: Dataset) -> None:
    """Continuity of Content SEPARATE for ``item`` and every container below it."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate(child)


def _library_describable(source: Dataset) -> bool:
    """highdicom's Image Library entry for a projection radiograph reads Patient Orientation
    and Imager Pixel Spacing unconditionally; without them the library is left out."""
    return bool(source.get("PatientOrientation")) and bool(source.get("ImagerPixelSpacing"))


def _observer(producer: Producer) -> hd.sr.ObservationContext:
    device_uid = generate_uid(
        entropy_srcs=[producer.manufacturer, producer.model_name, producer.device_serial_number]
    )
    return hd.sr.ObservationContext(
        observer_person_context=None,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=str(device_uid),
                name=producer.algorithm_name[:64],
                manufacturer_name=producer.manufacturer,
                model_name=producer.model_name[:64],
                serial_number=producer.device_serial_number,
            ),
        ),
    )


def build_sr(
    *, source: Dataset, result: AnalysisResult, uids: ResultUIDs, producer: Producer
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report for ``result`` (findings or none) on ``source``."""
    try:
        groups = [_group(i, f, source, uids, producer) for i, f in enumerate(result.findings)]
        if not groups:
            groups.append(_no_findings_group(source, result, uids, producer))
        report = hd.sr.MeasurementReport(
            observation_context=_observer(producer),
            procedure_reported=sc.PROCEDURE_REPORTED,
            imaging_measurements=groups,
            title=sc.MEASUREMENT_REPORT if result.findings else sc.NO_FINDINGS_REPORT,
            referenced_images=[source] if _library_describable(source) else None,
        )
        # Row 12 comes after the Imaging Measurements container (row 6).
        report[0].ContentSequence.append(_qualitative_evaluations(result))
        _separate(report[0])
        return hd.sr.Comprehensive3DSR(
            evidence=[source],
            content=report[0],
            series_instance_uid=uids.sr.series_instance_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=uids.sr.sop_instance_uid,
            instance_number=1,
            manufacturer=producer.manufacturer,
            manufacturer_model_name=producer.model_name[:64],
            software_versions=producer.software_version,
            device_serial_number=producer.device_serial_number,
            series_description=f"{producer.manufacturer} findings (SR)",
            is_complete=True,
            contributing_equipment=producer.contributing_equipment(),
            coding_schemes=[
                hd.coding_schemes.CodingSchemeIdentificationItem(
                    designator=sc.PRIVATE_SCHEME, name=sc.PRIVATE_SCHEME_NAME
                )
            ],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"SR could not be built: {exc}") from exc
