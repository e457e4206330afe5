"""End to end with real parts on 127.0.0.1: DCMTK ``storescu`` sends RG1_UNCI.dcm to a
``shadowspot serve`` process whose caller sends its results to a real Orthanc; the SEG, SR and
GSPS that Orthanc holds say what ``shadowspot analyze`` says about the same image."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.node.conftest import needs_dcmtk
from tests.node.test_process import SHADOWSPOT, Server
from tests.results.helpers import RG1, Orthanc, orthanc, wait_for

pytestmark = [pytest.mark.network, pytest.mark.slow]
MODELS = Path(__file__).resolve().parents[2] / "models"
CALLER = "MODALITY"
NODE = "SHADOWSPOT"


def _config(folder: Path, pacs: Orthanc) -> Path:
    path = folder / "shadowspot.toml"
    path.write_text(
        f"""
[node]
ae_title = "{NODE}"
host = "127.0.0.1"
port = 0
storage = "{folder / "var"}"
study_quiet_seconds = 0.2
min_free_mb = 1
[http]
enabled = false
[logging]
format = "json"
[pipeline]
model_dir = "{MODELS}"
[export]
retry_schedule_seconds = [0.5, 1.0, 2.0]
[[callers]]
ae_title = "{CALLER}"
send_results_to = "pacs"
[[destinations]]
name = "pacs"
ae_title = "{pacs.ae_title}"
host = "127.0.0.1"
port = {pacs.dicom_port}
timeout_seconds = 10
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.kill()


def _analyze(folder: Path) -> dict[str, Any]:
    """``shadowspot analyze`` on the same file: the pipeline's JSON."""
    done = subprocess.run(
        [str(SHADOWSPOT), "analyze", "--out", str(folder), str(RG1)],
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads((folder / f"{RG1.stem}.json").read_text("utf-8"))
    return document


def _study_instances(pacs: Orthanc, study_uid: str) -> dict[str, Dataset]:
    """Modality → the one instance of that modality Orthanc holds in the study."""
    found = pacs.post("/tools/lookup", study_uid.encode())
    study_id = next(f["ID"] for f in found if f["Type"] == "Study")
    instances: dict[str, Dataset] = {}
    for item in pacs.get(f"/studies/{study_id}/instances"):
        ds = pacs.instance(item["ID"])
        assert ds.Modality not in instances, f"two {ds.Modality} objects in the study"
        instances[str(ds.Modality)] = ds
    return instances


def _box(frame: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(frame)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _content(item: Dataset, code: str) -> list[Dataset]:
    return [i for i in item.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code]


def test_storescu_to_serve_to_orthanc_matches_analyze(
    tmp_path: Path, servers: list[Server]
) -> None:
    """RG1 sent by storescu → SEG, SR and GSPS arrive in Orthanc, in the source study, each
    referencing the source image, and their findings (count, type, grade, probability,
    alert, box) are those of ``shadowspot analyze`` for the same file."""
    if not RG1.is_file():
        pytest.skip(f"shared test data absent: {RG1}")
    if not (MODELS / "manifest.json").is_file():
        pytest.skip(f"no trained model in {MODELS} (models/manifest.json is absent)")
    storescu = needs_dcmtk("storescu")
    expected = _analyze(tmp_path / "analyze")
    findings = expected["findings"]
    if not findings:
        pytest.skip("the model finds nothing on RG1: nothing to compare")
    source = pydicom.dcmread(RG1, stop_before_pixels=True)
    with orthanc(tmp_path / "orthanc") as pacs:
        servers.append(Server(_config(tmp_path, pacs), tmp_path / "serve.log"))
        assert servers[-1].wait_for("node_started")["pipeline"] == "ready"
        sent = subprocess.run(
            [storescu, "-aet", CALLER, "-aec", NODE, "127.0.0.1", str(servers[-1].port), str(RG1)],
            capture_output=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        servers[-1].wait_for("study_processed", timeout=180)
        assert wait_for(lambda: len(pacs.get("/instances")) == 3, timeout=60, interval=0.5), (
            pacs.get("/instances")
        )
        instances = _study_instances(pacs, str(source.StudyInstanceUID))
        assert servers[-1].terminate() == 0

    assert set(instances) == {"SEG", "SR", "PR"}
    for ds in instances.values():
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert len({ds.SeriesInstanceUID for ds in instances.values()}) == 3

    # SEG: one segment per finding, referencing the source, masks where analyze boxed them
    seg = instances["SEG"]
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert len(seg.SegmentSequence) == len(findings)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for segment, frame, finding in zip(seg.SegmentSequence, frames, findings, strict=True):
        assert f"G{finding['grade']}" in segment.SegmentLabel
        assert _box(frame) == finding["box"]

    # SR: one group per finding with the SEG's tracking UIDs, probability, grade, alert
    sr = instances["SR"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (measurements,) = _content(sr, "126010")
    groups = list(measurements.ContentSequence)
    assert len(groups) == len(findings)
    for group, segment, finding in zip(groups, seg.SegmentSequence, findings, strict=True):
        assert segment.TrackingUID == _content(group, "112040")[0].UID
        probability = _content(group, "122157")[0].MeasuredValueSequence[0]
        assert float(probability.NumericValue) == pytest.approx(finding["probability"], abs=1e-4)
        codes = {
            i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
            for i in group.ContentSequence
            if i.ValueType == "CODE"
        }
        assert codes["GRADE"] == f"G{finding['grade']}"
        assert codes["ALERT"] == ("373066001" if finding["alert"] else "373067005")
        scoord = _content(group, "42798000")[0].ContentSequence[0]
        image = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (study_level,) = _content(sr, "C0034375")
    alert = _content(study_level, "ALERT")[0].ConceptCodeSequence[0].CodeValue
    assert alert == ("373066001" if expected["alert"] else "373067005")

    # GSPS: one annotation per finding on the source image, labelled with its grade
    pr = instances["PR"]
    annotations = pr.GraphicAnnotationSequence
    assert len(annotations) == len(findings)
    for annotation, finding in zip(annotations, findings, strict=True):
        image = annotation.ReferencedImageSequence[0]
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert f"G{finding['grade']}" in annotation.TextObjectSequence[0].UnformattedTextValue
