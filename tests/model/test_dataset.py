"""Training targets and the patient split, on a small generated cxr-lesions folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.training.dataset import (
    BOX_EDGE_WEIGHT,
    packed,
    read_pack,
    read_records,
    split_by_patient,
    targets,
    write_pack,
)
from models.training.evaluate import normal_studies
from tests.model.folders import folder as _folder
from tests.model.folders import folder_with_normals


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


def test_pack_carries_both_splits_and_the_digest(tmp_path: Path) -> None:
    """``write_pack`` → ``read_pack`` gives the cache's splits back: targets, weights and
    flags exactly, images within JPEG's small losses, and the same data digest."""
    data = folder_with_normals(tmp_path / "data")
    paths, digest, counts = packed(data, 32, tmp_path / "cache")
    out = write_pack(data, 32, tmp_path / "cache", tmp_path / "pack" / "data.npz")
    splits, got_digest, size, got_counts = read_pack(out)
    assert (got_digest, size, got_counts) == (digest, 32, counts)
    assert counts["train"] > 0 and counts["val"] > 0
    for split, path in paths.items():
        with np.load(path) as cache:
            for key in ("targets", "weights", "has_lung", "sources", "ids"):
                np.testing.assert_array_equal(splits[split][key], cache[key])
            diff = np.abs(splits[split]["images"].astype(int) - cache["images"].astype(int))
            assert splits[split]["images"].shape == cache["images"].shape
            assert diff.mean() < 4.0
