"""Results despite imperfect headers: Type 2 patient and study attributes that are absent or
invalid in the source are written empty and their values never reach our objects or the
log; a colour source gets its SEG and SR (no greyscale presentation state); a missing Type 1
UID is a clear EncodeError. Every object written passes dciodvfy."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, uid

from node.analysis import Analyser
from node.config import default_config
from node.encode import ObjectKind, ResultUIDs, encode_results
from node.errors import EncodeError
from node.results import producer_for
from pipeline.result import AnalysisResult
from tests.results.helpers import dciodvfy, rg1


@pytest.fixture(scope="module")
def analysed() -> tuple[Dataset, AnalysisResult]:
    source = rg1()
    result = Analyser(default_config().pipeline).analyse_dataset(source)
    assert result.findings, "RG1 has findings with the shipped model"
    return source, result


def _encode(source: Dataset, result: AnalysisResult) -> dict[ObjectKind, Dataset]:
    objects = encode_results(
        source=source,
        result=result,
        uids=ResultUIDs.new(),
        producer=producer_for(default_config(), result),
    )
    return {o.kind: o.dataset for o in objects}


def _valid(objects: dict[ObjectKind, Dataset], folder: Path) -> None:
    for kind, ds in objects.items():
        path = folder / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(path)
        assert errors == [], (kind, errors)


def test_absent_type_2_patient_attributes_are_written_empty(
    analysed: tuple[Dataset, AnalysisResult], tmp_path: Path
) -> None:
    source, result = analysed
    stripped = copy.deepcopy(source)
    for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID"):
        if keyword in stripped:
            delattr(stripped, keyword)
    objects = _encode(stripped, result)
    assert set(objects) == {ObjectKind.SEG, ObjectKind.SR, ObjectKind.PR}
    for ds in objects.values():
        assert "PatientBirthDate" in ds and not ds.PatientBirthDate
        assert "PatientSex" in ds and not ds.PatientSex
    _valid(objects, tmp_path)


def test_invalid_type_2_values_are_written_empty_and_never_logged(
    analysed: tuple[Dataset, AnalysisResult],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, result = analysed
    bad = copy.deepcopy(source)
    with pytest.warns(UserWarning):  # pydicom warns about the invalid values as they are set
        bad.PatientBirthDate = "ZZSECRETDOB"
        bad.PatientSex = "zzsecret-sex"
    objects = _encode(bad, result)
    assert set(objects) == {ObjectKind.SEG, ObjectKind.SR, ObjectKind.PR}
    for ds in objects.values():
        assert not ds.PatientBirthDate and not ds.PatientSex
        assert ds.PatientName == source.PatientName  # valid values are kept
    _valid(objects, tmp_path)
    captured = capsys.readouterr()
    logged = captured.out + captured.err + caplog.text
    assert "source_attribute_emptied" in logged and "PatientBirthDate" in logged
    ours = "\n".join(line for line in logged.splitlines() if "pydicom" not in line)
    assert "ZZSECRET" not in ours.upper()  # pydicom's own warnings: scrubbed by node.logs


def test_a_colour_source_gets_seg_and_sr_without_a_greyscale_presentation_state(
    analysed: tuple[Dataset, AnalysisResult], tmp_path: Path
) -> None:
    source, result = analysed
    rgb = copy.deepcopy(source)
    grey = (source.pixel_array >> 7).astype(np.uint8)
    rgb.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    rgb.SOPClassUID = uid.SecondaryCaptureImageStorage
    rgb.file_meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    rgb.Modality = "OT"
    rgb.SamplesPerPixel = 3
    rgb.PhotometricInterpretation = "RGB"
    rgb.PlanarConfiguration = 0
    rgb.BitsAllocated = rgb.BitsStored = 8
    rgb.HighBit = 7
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if keyword in rgb:
            delattr(rgb, keyword)
    rgb.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
    objects = _encode(rgb, result)
    assert set(objects) == {ObjectKind.SEG, ObjectKind.SR}


def test_a_missing_type_1_uid_is_a_clear_failure(analysed: tuple[Dataset, AnalysisResult]) -> None:
    source, result = analysed
    broken = copy.deepcopy(source)
    del broken.StudyInstanceUID
    with pytest.raises(EncodeError, match="lacks StudyInstanceUID"):
        _encode(broken, result)
