"""SEG, SR and GSPS built from real findings on real radiograph headers: content, geometry,
round trip through bytes, and dciodvfy with zero errors."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import ImageDraw
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from node import __version__
from node.analyze import render
from node.encode import ObjectKind, Producer, ResultUIDs, encode_results
from node.encode.common import OHIF_PANEL_BACKGROUNDS, contrast, display_colour, finding_label
from node.encode.sc import build_sc
from node.encode.seg import encoding
from node.encode.sr import CORNERSTONE_FREEHAND, IMAGE_LEVEL_IDENTIFIER
from node.errors import EncodeError
from pipeline.config import DEFAULT_GRADE_COLOURS, GradingConfig
from pipeline.result import AnalysisResult, FindingType, Side, Zone
from tests.results.helpers import dciodvfy, generated_cr, result_of, rg1, two_findings

PRODUCER = Producer(model_name="shadowspot-lesion-unet", model_version="1.0.0")


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _build(source: Dataset, result: AnalysisResult, **kwargs: object) -> dict[ObjectKind, Dataset]:
    objects = encode_results(
        source=source,
        result=result,
        uids=ResultUIDs.new(),
        producer=PRODUCER,
        **kwargs,  # type: ignore[arg-type]
    )
    return {o.kind: _roundtrip(o.dataset) for o in objects}


def _frames(seg: Dataset) -> dict[int, np.ndarray]:
    """Segment number → its frame, read with pydicom (highdicom's reader wants a Slice
    Thickness once a Plane Orientation is present, which a radiograph does not have)."""
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    numbers = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    return dict(zip(numbers, pixels, strict=True))


@pytest.fixture(params=["RG1_UNCI", "generated_cr"])
def source(request: pytest.FixtureRequest) -> Dataset:
    return rg1() if request.param == "RG1_UNCI" else generated_cr()


def test_objects_sit_in_the_source_study_each_in_a_new_series(source: Dataset) -> None:
    """Every object carries the source study and patient, a series of its own, and the
    product as manufacturer with its version and the algorithm as contributing equipment."""
    objects = _build(source, two_findings(source))
    assert set(objects) == {ObjectKind.SEG, ObjectKind.SR, ObjectKind.PR}
    series = {o.SeriesInstanceUID for o in objects.values()}
    assert len(series) == 3 and source.SeriesInstanceUID not in series
    for ds in objects.values():
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.Manufacturer == "ShadowSpot"
        equipment = ds.ContributingEquipmentSequence
        ours = [e for e in equipment if e.Manufacturer == "ShadowSpot"]
        assert ours and "1.0.0" in ours[0].SoftwareVersions
        assert (
            ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        )  # Processing Equipment
    assert objects[ObjectKind.SEG].SoftwareVersions == __version__


def test_seg_segments_carry_type_grade_colour_anatomy_and_masks(source: Dataset) -> None:
    """One segment per finding: the finding's label (type, side and zone, grade, probability,
    alert), SNOMED CT codes, lung and zone each with laterality, algorithm identification,
    grade colour as CIELab, and the finding's mask."""
    result = two_findings(source)
    seg_ds = _build(source, result)[ObjectKind.SEG]
    assert len(seg_ds.SegmentSequence) == 2
    nodule, consolidation = seg_ds.SegmentSequence
    assert nodule.SegmentLabel == "Nodule, Right upper zone, G3, 91%, ALERT"
    assert consolidation.SegmentLabel == "Consolidation, Left lower zone, G2, 64%"
    assert nodule.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
    assert nodule.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert consolidation.SegmentedPropertyTypeCodeSequence[0].CodeValue == "95436008"
    region = nodule.AnatomicRegionSequence[0]
    assert region.CodeValue == "39607008"  # lung
    assert region.AnatomicRegionModifierSequence[0].CodeValue == "24028007"  # right
    zone = nodule.PrimaryAnatomicStructureSequence[0]
    assert zone.CodeValue == "281392002"  # upper zone
    assert zone.PrimaryAnatomicStructureModifierSequence[0].CodeValue == "24028007"  # right
    left = consolidation.PrimaryAnatomicStructureSequence[0]
    assert left.PrimaryAnatomicStructureModifierSequence[0].CodeMeaning == "Left"
    assert nodule.SegmentAlgorithmName == "ShadowSpot shadowspot-lesion-unet"
    assert nodule.SegmentAlgorithmType == "AUTOMATIC"
    expected = hd.color.CIELabColor.from_rgb(230, 30, 30).value
    assert tuple(nodule.RecommendedDisplayCIELabValue) == expected
    frames = _frames(seg_ds)
    for number, finding in enumerate(result.findings, start=1):
        assert np.array_equal(frames[number].astype(bool), finding.mask)


def test_seg_geometry_is_that_of_a_projection_radiograph(source: Dataset) -> None:
    """No frame of reference, Patient Orientation copied, identity Plane Orientation (what
    OHIF's SEG loader needs), the source image referenced, the source's own pixel spacing
    (none for RG1, whose Pixel Spacing is 0\\0)."""
    seg = _build(source, two_findings(source))[ObjectKind.SEG]
    assert "FrameOfReferenceUID" not in seg
    assert list(seg.PatientOrientation) == list(source.PatientOrientation)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        1,
        0,
        0,
        0,
        1,
        0,
    ]
    if min(float(v) for v in source.PixelSpacing) > 0:
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == [float(v) for v in source.PixelSpacing]
    else:
        assert "PixelMeasuresSequence" not in shared
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)


def test_fractional_seg_stores_probability_inside_the_mask() -> None:
    """segmentation_type = fractional: each segment holds the finding's probability."""
    source = generated_cr()
    result = two_findings(source)
    seg_ds = _build(source, result, segmentation_type="fractional")[ObjectKind.SEG]
    assert seg_ds.SegmentationType == "FRACTIONAL"
    frame = _frames(seg_ds)[1] / float(seg_ds.MaximumFractionalValue)
    assert np.allclose(frame[result.findings[0].mask], 0.91, atol=1 / 255)
    assert not frame[~result.findings[0].mask].any()


def _groups(sr: Dataset) -> list[Dataset]:
    container = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    return list(container.ContentSequence)


def _items(group: Dataset, code: str) -> list[Dataset]:
    return [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code]


def test_sr_groups_are_hydratable_by_ohif_and_share_the_seg_tracking_uids(source: Dataset) -> None:
    """Each finding group: Cornerstone PlanarFreehandROI tracking identifier, the SEG segment's
    tracking UID, Area as the first NUM carrying the closed contour, and the segment's label
    as Comment (what OHIF's measurement panel shows)."""
    objects = _build(source, two_findings(source))
    sr, seg = objects[ObjectKind.SR], objects[ObjectKind.SEG]
    groups = _groups(sr)
    assert len(groups) == 2  # one per finding; study-level evaluations are elsewhere
    for group, segment in zip(groups, seg.SegmentSequence, strict=True):
        ident = _items(group, "112039")[0].TextValue
        uid = _items(group, "112040")[0].UID
        assert ident.startswith(CORNERSTONE_FREEHAND + ":")
        assert uid == segment.TrackingUID
        nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        assert nums[0].ConceptNameCodeSequence[0].CodeMeaning == "Area"
        assert (
            nums[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm2"
            or "PixelSpacing" not in source
            or float(source.PixelSpacing[0]) == 0
        )
        scoord = nums[0].ContentSequence[0]
        assert scoord.ValueType == "SCOORD" and scoord.GraphicType == "POLYLINE"
        points = np.asarray(scoord.GraphicData).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1]) and len(points) == 33
        image = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        comment = _items(group, "121106")[0].TextValue
        assert comment == segment.SegmentLabel and ident == f"{CORNERSTONE_FREEHAND}:{comment}"
    first = groups[0]
    assert _items(first, "121106")[0].TextValue == "Nodule, Right upper zone, G3, 91%, ALERT"
    assert _items(first, "121071")[0].ConceptCodeSequence[0].CodeValue == "27925004"
    site = _items(first, "363698007")[0]
    assert site.ConceptCodeSequence[0].CodeValue == "281392002"
    assert site.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "24028007"
    probability = _items(first, "122157")[0].MeasuredValueSequence[0]
    assert float(probability.NumericValue) == pytest.approx(0.91)
    values = {
        i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
        for i in first.ContentSequence
        if i.ValueType == "CODE"
    }
    assert values["246112005"] == "24484000"  # severity: severe (grade 3)
    assert values["GRADE"] == "G3" and values["ALERT"] == "373066001"


def _study_evaluations(sr: Dataset) -> Dataset:
    """TID 1500 row 12, the Qualitative Evaluations container, after Imaging Measurements."""
    codes = [i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence]
    assert codes.index("C0034375") > codes.index("126010")
    return sr.ContentSequence[codes.index("C0034375")]


def _code_values(item: Dataset) -> dict[str, str]:
    return {
        i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
        for i in item.ContentSequence
        if i.ValueType == "CODE"
    }


def test_sr_says_highest_grade_and_alert_at_study_level() -> None:
    """TID 1500's Qualitative Evaluations: finding present, the highest grade (severity and
    grade), the alert and a summary; every measurement group has a region (OHIF stops at the
    first group without one)."""
    source = generated_cr()
    sr = _build(source, two_findings(source))[ObjectKind.SR]
    evaluations = _study_evaluations(sr)
    assert evaluations.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS"
    values = _code_values(evaluations)
    assert values == {
        "121071": "373573001",
        "246112005": "24484000",
        "GRADE": "G3",
        "ALERT": "373066001",
    }
    assert "highest grade 3" in _items(evaluations, "121106")[0].TextValue
    for group in _groups(sr):
        assert _items(group, "112039")[0].TextValue != IMAGE_LEVEL_IDENTIFIER
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99SHSP"


def test_an_image_without_findings_gets_only_an_sr_saying_so() -> None:
    """No findings: no SEG, no GSPS, and an SR whose image-level group says absent, no alert."""
    source = generated_cr()
    objects = _build(source, result_of((source.Rows, source.Columns), (), 0.7))
    assert set(objects) == {ObjectKind.SR}
    sr = objects[ObjectKind.SR]
    (group,) = _groups(sr)
    assert _items(group, "112039")[0].TextValue == IMAGE_LEVEL_IDENTIFIER
    assert _code_values(group) == {"121071": "373572006", "363698007": "39607008"}
    assert "No shadows or spots" in _items(group, "121106")[0].TextValue
    evaluations = _study_evaluations(sr)
    assert _code_values(evaluations) == {"121071": "373572006", "ALERT": "373067005"}
    assert "No shadows or spots" in _items(evaluations, "121106")[0].TextValue


def test_gsps_draws_each_contour_in_its_grade_colour_with_a_label() -> None:
    """GSPS: one layer per grade colour (CIELab), a closed polyline and the finding's label
    per finding."""
    source = generated_cr()
    result = two_findings(source)
    pr = _build(source, result)[ObjectKind.PR]
    layers = {layer.GraphicLayer: layer for layer in pr.GraphicLayerSequence}
    annotations = pr.GraphicAnnotationSequence
    assert len(annotations) == 2
    texts = []
    for annotation, finding in zip(annotations, result.findings, strict=True):
        layer = layers[annotation.GraphicLayer]
        assert tuple(layer.GraphicLayerRecommendedDisplayCIELabValue) == (
            hd.color.CIELabColor.from_rgb(*finding.colour).value
        )
        graphic = annotation.GraphicObjectSequence[0]
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        assert graphic.NumberOfGraphicPoints == len(finding.contour) + 1
        texts.append(annotation.TextObjectSequence[0].UnformattedTextValue)
        assert (
            annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        )
    assert texts == [
        "Nodule, Right upper zone, G3, 91%, ALERT",
        "Consolidation, Left lower zone, G2, 64%",
    ]


def test_retry_with_stored_uids_rebuilds_the_same_identities() -> None:
    """The same ResultUIDs give the same SOP Instance, series and tracking UIDs."""
    source = generated_cr()
    result = two_findings(source)
    uids = ResultUIDs.new()
    first = encode_results(source=source, result=result, uids=uids, producer=PRODUCER)
    second = encode_results(source=source, result=result, uids=uids, producer=PRODUCER)
    for a, b in zip(first, second, strict=True):
        assert a.sop_instance_uid == b.sop_instance_uid
        assert a.dataset.SeriesInstanceUID == b.dataset.SeriesInstanceUID
    seg_a, seg_b = first[0].dataset, second[0].dataset
    assert [s.TrackingUID for s in seg_a.SegmentSequence] == [
        s.TrackingUID for s in seg_b.SegmentSequence
    ]


def test_findings_in_another_grid_are_refused() -> None:
    """A result whose shape is not the source image's cannot be encoded."""
    source = generated_cr()
    other = dataclasses.replace(two_findings(generated_cr(rows=300, cols=300)))
    with pytest.raises(EncodeError):
        encode_results(source=source, result=other, uids=ResultUIDs.new(), producer=PRODUCER)


def _picture(source: Dataset) -> np.ndarray:
    """An RGB picture the size ``shadowspot analyze`` renders: the image plus a legend bar."""
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (int(source.Rows) + 40, int(source.Columns), 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", [ObjectKind.SEG, ObjectKind.SR, ObjectKind.PR, ObjectKind.SC])
def test_every_object_passes_dciodvfy_without_errors(
    source: Dataset, kind: ObjectKind, tmp_path: Path
) -> None:
    """dciodvfy (dicom3tools) reports zero errors for each object kind."""
    ds = _build(source, two_findings(source), burned_in=_picture(source))[kind]
    path = tmp_path / f"{kind}.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == []


@pytest.mark.parametrize("kind", [ObjectKind.PR, ObjectKind.SC])
def test_thorax_source_with_unknown_laterality_passes_dciodvfy(
    kind: ObjectKind, tmp_path: Path
) -> None:
    """A DX may say THORAX (outside CID 4031, so not known to be unpaired) with an empty
    Laterality, as ``dx_image.dcm`` in the shared data does: the GSPS and SC, which highdicom
    builds without a body part, copy both, so that Laterality (Type 2C) is present."""
    source = generated_cr()
    source.BodyPartExamined = "THORAX"
    source.Laterality = None
    ds = _build(source, two_findings(source), burned_in=_picture(source))[kind]
    assert ds.BodyPartExamined == "THORAX" and "Laterality" in ds
    path = tmp_path / f"{kind}.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == []


def test_no_findings_sr_passes_dciodvfy(tmp_path: Path) -> None:
    """The SR of an image without findings is valid too."""
    source = rg1()
    objects = _build(source, result_of((source.Rows, source.Columns), (), None))
    path = tmp_path / "sr.dcm"
    objects[ObjectKind.SR].save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == []


def test_binary_masks_not_on_byte_boundaries_are_occupancy_in_rle() -> None:
    """RG1 is 1955 × 1841 (not a multiple of 8 pixels): bit-packed frames after the first
    would start mid-byte, so the masks are FRACTIONAL OCCUPANCY holding only 0 or the
    maximum, RLE Lossless with one fragment per frame, each frame equal to its mask."""
    source = rg1()
    result = two_findings(source)
    seg = _build(source, result)[ObjectKind.SEG]
    assert seg.file_meta.TransferSyntaxUID == RLELossless
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "OCCUPANCY"
    assert seg.BitsAllocated == 8 and int(seg.MaximumFractionalValue) == 255
    assert len(list(generate_frames(seg.PixelData, number_of_frames=2))) == 2
    frames = _frames(seg)
    for number, finding in enumerate(result.findings, start=1):
        assert set(np.unique(frames[number])) == {0, 255}
        assert np.array_equal(frames[number] == 255, finding.mask)


def test_seg_encoding_is_binary_native_where_frames_are_byte_aligned() -> None:
    """BINARY in Explicit VR Little Endian for byte-aligned frames or a single frame;
    configured fractional is PROBABILITY, native."""
    source = generated_cr()  # 480 × 400: a multiple of 8
    seg = _build(source, two_findings(source))[ObjectKind.SEG]
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    binary, occupancy = hd.seg.SegmentationTypeValues.BINARY, "OCCUPANCY"
    assert encoding(1955, 1841, 1, "binary").segmentation_type is binary
    assert encoding(1024, 1024, 3, "binary").segmentation_type is binary
    assert encoding(1955, 1841, 2, "binary").fractional_type.value == occupancy
    probability = encoding(1955, 1841, 2, "fractional")
    assert probability.fractional_type.value == "PROBABILITY"
    assert probability.transfer_syntax_uid == ExplicitVRLittleEndian


def test_secondary_capture_is_the_rgb_picture_in_its_own_series(source: Dataset) -> None:
    """burned_in → an RGB Secondary Capture of exactly that picture, same study and patient,
    its own series, orientation copied, marked as having burned-in annotation."""
    picture = _picture(source)
    objects = _build(source, two_findings(source), burned_in=picture)
    sc = objects[ObjectKind.SC]
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert np.array_equal(sc.pixel_array, picture)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID
    assert sc.SeriesInstanceUID not in {
        source.SeriesInstanceUID,
        *(o.SeriesInstanceUID for k, o in objects.items() if k is not ObjectKind.SC),
    }
    assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    assert sc.BurnedInAnnotation == "YES" and sc.ConversionType == "WSD"
    assert sc.Manufacturer == "ShadowSpot"


def test_secondary_capture_also_for_an_image_without_findings() -> None:
    """The burned-in picture is sent findings or not (its legend says "no findings")."""
    source = generated_cr()
    empty = result_of((source.Rows, source.Columns), (), 0.7)
    objects = _build(source, empty, burned_in=_picture(source))
    assert set(objects) == {ObjectKind.SR, ObjectKind.SC}


def test_secondary_capture_needs_the_source_orientation_and_an_rgb_picture() -> None:
    """build_sc refuses a non-RGB picture and a source without Patient Orientation; then
    encode_results leaves the Secondary Capture out and still builds the other objects."""
    source = generated_cr()
    result = two_findings(source)
    uids = ResultUIDs.new()
    with pytest.raises(EncodeError, match="RGB"):
        build_sc(source=source, picture=_picture(source)[..., 0], uids=uids, producer=PRODUCER)
    del source.PatientOrientation
    with pytest.raises(EncodeError, match="Patient Orientation"):
        build_sc(source=source, picture=_picture(source), uids=uids, producer=PRODUCER)
    objects = _build(source, result, burned_in=_picture(source))
    assert set(objects) == {ObjectKind.SEG, ObjectKind.SR, ObjectKind.PR}


# Readers: OHIF 3.13 and others --------------------------------------------------------------


def test_the_burned_in_picture_labels_each_finding_as_seg_gsps_and_sr_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The picture of the Secondary Capture and of ``shadowspot analyze`` (``render``) writes
    each finding's ``finding_label``, the words of its SEG segment, GSPS text and SR."""
    drawn: list[str] = []
    text = ImageDraw.ImageDraw.text

    def record(self: ImageDraw.ImageDraw, xy: object, label: str, *a: object, **k: object) -> None:
        drawn.append(label)
        text(self, xy, label, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    result = two_findings(generated_cr())
    render(result, GradingConfig())
    labels = [finding_label(f) for f in result.findings]
    assert labels[0] == "Nodule, Right upper zone, G3, 91%, ALERT"
    assert [t for t in drawn if t in labels] == labels


def _no_findings(source: Dataset) -> AnalysisResult:
    return result_of((int(source.Rows), int(source.Columns)), (), 0.7)


def test_a_report_without_findings_is_one_ohif_shows_as_text() -> None:
    """No findings: the TID 1500 report is titled "Diagnostic Imaging Report" (LN 18748-4), not
    "Imaging Measurement Report", which OHIF 3.13's SR viewport crashes on without a region to
    draw; it stays a TID 1500 that highdicom reads back with its one image-level group. A
    report with findings keeps the title whose measurements OHIF hydrates."""
    source = generated_cr()
    without = _build(source, _no_findings(source))[ObjectKind.SR]
    title = without.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "18748-4",
        "LN",
        "Diagnostic Imaging Report",
    )
    assert without.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report = hd.sr.Comprehensive3DSR.from_dataset(without).content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert len(report.get_image_measurement_groups()) == 1
    with_findings = _build(source, two_findings(source))[ObjectKind.SR]
    assert with_findings.ConceptNameCodeSequence[0].CodeValue == "126000"


def _containers(item: Dataset) -> list[Dataset]:
    found = [item] if item.get("ValueType") == "CONTAINER" else []
    for child in item.get("ContentSequence", []):
        found += _containers(child)
    return found


@pytest.mark.parametrize("findings", [True, False], ids=["findings", "no-findings"])
def test_every_sr_container_is_separate(findings: bool) -> None:
    """Continuity of Content is SEPARATE on the document and on every container in it (image
    library, measurements, each group, the study-level evaluations): separate statements,
    which OHIF's text view prints one per line with their concept names."""
    source = generated_cr()
    result = two_findings(source) if findings else _no_findings(source)
    sr = _build(source, result)[ObjectKind.SR]
    assert sr.ContinuityOfContent == "SEPARATE"
    containers = _containers(sr)
    assert len(containers) >= (6 if findings else 5)
    assert {c.ContinuityOfContent for c in containers} == {"SEPARATE"}


def test_procedure_reported_is_a_cid_100_term() -> None:
    """TID 1500 row 4 (Procedure Reported) holds a term of CID 100 "Quantitative Diagnostic
    Imaging Procedures" with its standard meaning: LN 43468-8 "XR unspecified body region"."""
    source = generated_cr()
    for result in (two_findings(source), _no_findings(source)):
        sr = _build(source, result)[ObjectKind.SR]
        (item,) = _items(sr, "121058")
        code = item.ConceptCodeSequence[0]
        cid100 = {
            (c.value, c.scheme_designator): c.meaning
            for c in (getattr(codes.cid100, name) for name in codes.cid100.dir())
        }
        assert cid100.get((code.CodeValue, code.CodingSchemeDesignator)) == code.CodeMeaning
        assert code.CodeValue == "43468-8"


@pytest.mark.parametrize(
    ("side", "zone", "site"),
    [
        (Side.RIGHT, Zone.UPPER, "Right upper zone"),
        (Side.LEFT, Zone.MIDDLE, "Left middle zone"),
        (Side.LEFT, None, "Left lung"),
        (None, Zone.LOWER, "Lower zone"),
        (None, None, None),
    ],
)
def test_one_label_with_the_side_for_a_finding_in_seg_gsps_and_sr(
    side: Side | None, zone: Zone | None, site: str | None
) -> None:
    """A finding has one label — type, site with the patient's side ("Right upper zone"),
    grade, probability, alert — and the SEG segment, the GSPS text, the SR comment and the SR
    tracking identifier all say exactly that; the SEG's and GSPS's Tracking ID carry it too."""
    source = generated_cr()
    nodule = dataclasses.replace(two_findings(source).findings[0], side=side, zone=zone)
    objects = _build(source, result_of((int(source.Rows), int(source.Columns)), (nodule,), 0.7))
    expected = ", ".join(["Nodule", *([site] if site else []), "G3", "91%", "ALERT"])
    segment = objects[ObjectKind.SEG].SegmentSequence[0]
    annotation = objects[ObjectKind.PR].GraphicAnnotationSequence[0]
    (group,) = _groups(objects[ObjectKind.SR])
    assert finding_label(nodule) == expected
    assert segment.SegmentLabel == expected
    assert annotation.TextObjectSequence[0].UnformattedTextValue == expected
    assert _items(group, "121106")[0].TextValue == expected
    assert _items(group, "112039")[0].TextValue == f"{CORNERSTONE_FREEHAND}:{expected}"
    assert segment.TrackingID == f"finding 1: {expected}"
    assert annotation.GraphicObjectSequence[0].TrackingID == segment.TrackingID


def test_the_longest_label_fits_a_segment_label() -> None:
    """Every finding type with either side, any zone, grade 4, 100 % and the alert gives a
    label within the 64 characters of Segment Label (LO)."""
    source = generated_cr()
    nodule = two_findings(source).findings[0]
    longest = max(
        len(
            finding_label(
                dataclasses.replace(
                    nodule, finding_type=kind, side=side, zone=zone, grade=4, probability=1.0
                )
            )
        )
        for kind in FindingType
        for side in Side
        for zone in Zone
    )
    assert longest <= 64


def _seg_spacing(source: Dataset, tmp_path: Path) -> list[float] | None:
    seg = _build(source, two_findings(source))[ObjectKind.SEG]
    path = tmp_path / f"seg-{seg.SOPInstanceUID}.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy(path)[0] == []
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" not in shared:
        return None
    return [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]


def test_seg_pixel_spacing_is_only_what_the_source_gives(tmp_path: Path) -> None:
    """The SEG's Pixel Spacing is the source's Pixel Spacing, else its Imager Pixel Spacing;
    a source with neither, or with 0\\0, gets a SEG without Pixel Measures (never a nominal
    1 mm); the caller's source keeps its 0\\0; dciodvfy accepts every one of these SEGs."""
    calibrated = generated_cr(spacing=0.7)
    calibrated.PixelSpacing = [0.5, 0.5]
    assert _seg_spacing(calibrated, tmp_path) == [0.5, 0.5]
    detector_only = generated_cr(spacing=0.7)
    del detector_only.PixelSpacing
    assert _seg_spacing(detector_only, tmp_path) == [0.7, 0.7]
    neither = generated_cr()
    del neither.PixelSpacing, neither.ImagerPixelSpacing
    assert _seg_spacing(neither, tmp_path) is None
    zero = generated_cr()
    zero.PixelSpacing = [0, 0]
    del zero.ImagerPixelSpacing
    assert _seg_spacing(zero, tmp_path) is None
    assert [float(v) for v in zero.PixelSpacing] == [0.0, 0.0]


def _segment_rgb(seg: Dataset, number: int) -> tuple[int, int, int]:
    lab = seg.SegmentSequence[number - 1].RecommendedDisplayCIELabValue
    r, g, b = hd.color.CIELabColor.from_dicom_value(lab).to_rgb(clip=True)
    return (r, g, b)


def test_grade_colours_stand_out_on_ohif_dark_panel() -> None:
    """A configured grade colour too dark for OHIF's side panel (navy, 1.2:1) is written
    lighter with the same hue, at least 3:1 (WCAG non-text contrast) against the panel and
    its selected row, in the SEG segment and the GSPS layer; the shipped palette and colours
    that already stand out are written as configured."""
    for colour in DEFAULT_GRADE_COLOURS:
        rgb = (colour.rgb[0], colour.rgb[1], colour.rgb[2])
        assert display_colour(rgb) == rgb
    source = generated_cr()
    nodule, consolidation = two_findings(source).findings
    dark = dataclasses.replace(nodule, colour=(0, 0, 128))
    objects = _build(
        source, result_of((int(source.Rows), int(source.Columns)), (dark, consolidation), 0.7)
    )
    seg, pr = objects[ObjectKind.SEG], objects[ObjectKind.PR]
    written = _segment_rgb(seg, 1)
    assert all(contrast(written, bg) >= 2.9 for bg in OHIF_PANEL_BACKGROUNDS)  # Lab rounding
    assert written[2] > max(written[:2]) + 40 and abs(written[0] - written[1]) <= 2  # blue
    assert _segment_rgb(seg, 2) == consolidation.colour  # (250, 200, 0) stands out already
    layer = next(
        layer
        for layer in pr.GraphicLayerSequence
        if layer.GraphicLayer == pr.GraphicAnnotationSequence[0].GraphicLayer
    )
    assert tuple(layer.GraphicLayerRecommendedDisplayCIELabValue) == tuple(
        seg.SegmentSequence[0].RecommendedDisplayCIELabValue
    )
