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
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from node import __version__
from node.encode import ObjectKind, Producer, ResultUIDs, encode_results
from node.encode.sc import build_sc
from node.encode.seg import encoding
from node.encode.sr import CORNERSTONE_FREEHAND, IMAGE_LEVEL_IDENTIFIER
from node.errors import EncodeError
from pipeline.result import AnalysisResult
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
    """One segment per finding: label with type and grade, SNOMED CT codes, lung with
    laterality, algorithm identification, grade colour as CIELab, and the finding's mask."""
    result = two_findings(source)
    seg_ds = _build(source, result)[ObjectKind.SEG]
    assert len(seg_ds.SegmentSequence) == 2
    nodule, consolidation = seg_ds.SegmentSequence
    assert nodule.SegmentLabel == "Nodule G3" and consolidation.SegmentLabel == "Consolidation G2"
    assert nodule.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
    assert nodule.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert consolidation.SegmentedPropertyTypeCodeSequence[0].CodeValue == "95436008"
    region = nodule.AnatomicRegionSequence[0]
    assert region.CodeValue == "39607008"  # lung
    assert region.AnatomicRegionModifierSequence[0].CodeValue == "24028007"  # right
    assert nodule.PrimaryAnatomicStructureSequence[0].CodeValue == "281392002"  # upper zone
    assert nodule.SegmentAlgorithmName == "ShadowSpot shadowspot-lesion-unet"
    assert nodule.SegmentAlgorithmType == "AUTOMATIC"
    expected = hd.color.CIELabColor.from_rgb(230, 30, 30).value
    assert tuple(nodule.RecommendedDisplayCIELabValue) == expected
    frames = _frames(seg_ds)
    for number, finding in enumerate(result.findings, start=1):
        assert np.array_equal(frames[number].astype(bool), finding.mask)


def test_seg_geometry_is_that_of_a_projection_radiograph(source: Dataset) -> None:
    """No frame of reference, Patient Orientation copied, identity Plane Orientation (what
    OHIF's SEG loader needs), the source image referenced, valid pixel measures only."""
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
    assert min(float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing) > 0
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
    tracking UID, Area as the first NUM carrying the closed contour, a readable Comment."""
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
        assert "grade" in comment and "probability" in comment
    first = groups[0]
    assert "Nodule, grade 3, probability 91%, ALERT" in _items(first, "121106")[0].TextValue
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
    """GSPS: one layer per grade colour (CIELab), a closed polyline and a text per finding."""
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
    assert texts == ["Nodule G3 91% !", "Consolidation G2 64%"]


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
