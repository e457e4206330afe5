"""A small generated ``cxr-lesions`` folder for the training-data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def folder(tmp_path: Path) -> Path:
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


def folder_with_normals(tmp_path: Path, normals: int = 8) -> Path:
    """``folder`` with textured images for every record and ``normals`` more normal
    patients, so that both splits of ``split_by_patient`` hold images."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = folder(tmp_path)
    rows = [json.loads(line) for line in (data / "annotations.jsonl").read_text().splitlines()]
    rows += [{**rows[2], "id": f"n{i}", "patient": f"q{i}"} for i in range(normals)]
    rng = np.random.default_rng(3)
    for row in rows:
        image = rng.integers(40, 200, (100, 200)).astype(np.uint8)
        Image.fromarray(image).save(data / "images" / f"{row['id']}.png")
    (data / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data
