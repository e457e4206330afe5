"""Training targets and the patient split, on a small generated cxr-lesions folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.training.dataset import BOX_EDGE_WEIGHT, read_records, split_by_patient, targets
from models.training.evaluate import normal_studies


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((100, 200), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    lesion = np.zeros((100, 200), np.uint8)
    lesion[60:80, 20:60] = 255
    Image.fromarray(lesion).save(tmp_path / "masks" / "a_1.png")
    lungs = np.zeros((100, 200), np.uint8)
    lungs[10:90, 10:190] = 255
    Image.fromarray(lungs).save(tmp_path / "masks" / "a_lungs.png")
    rows = [
        {
            "id": "a",
            "source": "s",
            "patient": "p1",
            "width": 200,
            "height": 100,
            "lungs": "masks/a_lungs.png",
            "findings": [
                {"label": "active_tuberculosis", "box": [100, 10, 180, 50], "mask": None},
                {"label": "consolidation", "box": [20, 60, 60, 80], "mask": "masks/a_1.png"},
                {"label": "pleural_effusion", "box": [150, 80, 190, 95], "mask": None},
            ],
        },
        {
            "id": "b",
            "source": "s",
            "patient": "p1",
            "width": 200,
            "height": 100,
            "lungs": None,
            "findings": [],
        },
        {
            "id": "c",
            "source": "n",
            "patient": "p2",
            "width": 200,
            "height": 100,
            "lungs": None,
            "findings": [],
        },
    ]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_box_becomes_inscribed_ellipse_with_soft_edges(tmp_path: Path) -> None:
    """Box: ellipse positive, corners down-weighted; mask: itself; unknown label: ignored."""
    data = _folder(tmp_path)
    record = read_records(data)[0]
    tgt, wgt = targets(record, data, 50, 100)  # half size
    shadow, w = tgt[1], wgt[1]
    assert shadow[15, 70] == 1.0 and w[15, 70] == 1.0  # centre of the TB box
    assert shadow[6, 51] == 0.0 and w[6, 51] == BOX_EDGE_WEIGHT  # corner inside the box
    assert shadow[35, 20] == 1.0  # inside the consolidation mask
    assert w[44, 85] == 0.0  # pleural effusion: neither spot nor shadow, ignored
    assert tgt[0].max() == 0.0  # no spot
    assert tgt[2][25, 50] == 1.0 and tgt[2][1, 1] == 0.0  # lung mask


def test_split_keeps_a_patient_together_and_normal_sources_are_recognised(
    tmp_path: Path,
) -> None:
    """Both images of one patient land in the same split; an empty image of a lesion source
    is not a normal study, one of an all-normal source is."""
    records = read_records(_folder(tmp_path))
    splits = split_by_patient(records)
    where = {r.id: name for name, rs in splits.items() for r in rs}
    assert where["a"] == where["b"]
    assert normal_studies(records) == [False, False, True]
