"""Training targets and the patient split, on a small generated cxr-lesions folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.training.dataset import (
    BOX_EDGE_WEIGHT,
    packed,
    read_pack,
    read_records,
    split_by_patient,
    targets,
    write_pack,
)
from models.training.scoring import normal_studies
from models.training.shared_data import CXR_LESIONS
from tests.model.folders import folder as _folder
from tests.model.folders import folder_with_normals

pytestmark = pytest.mark.training


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


SHARED = CXR_LESIONS


def test_the_locked_test_split_is_the_committed_draw_and_never_trained_on() -> None:
    """``test-patients.json`` is what ``draw_test_patients`` draws on the shared data (20 %
    of each source's patients); no test patient is in train or val, and the pack holds none."""
    import json

    from models.training.dataset import TEST_PATIENTS, draw_test_patients

    if not (SHARED / "annotations.jsonl").is_file():
        pytest.skip("../shared/data is absent")
    records = read_records(SHARED)
    committed = json.loads(TEST_PATIENTS.read_text())["patients"]
    assert committed == draw_test_patients(records)
    for source, patients in committed.items():
        total = len({r.patient for r in records if r.source == source})
        assert abs(len(patients) - 0.2 * total) <= 1
    splits = split_by_patient(records)
    test = {r.patient for r in splits["test"]}
    assert test == {p for ps in committed.values() for p in ps}
    assert not test & {r.patient for r in splits["train"] + splits["val"]}


def test_unboxed_spots_are_not_negatives_and_loose_opacities_are_ignored(tmp_path: Path) -> None:
    """An image whose ``unboxed`` labels say it may hold unmarked nodules learns no spot
    negatives; a lung_opacity box is ignored by the shadow channel, not a shadow target."""
    import dataclasses

    from models.training.dataset import Lesion

    data = _folder(tmp_path)
    base = read_records(data)[2]  # a normal of the generated folder
    record = dataclasses.replace(
        base,
        unboxed=("nodule",),
        findings=(Lesion(label="lung_opacity", box=(20.0, 20.0, 60.0, 60.0), mask=None),),
    )
    tgt, wgt = targets(record, data, base.height, base.width)
    assert wgt[0].max() == 0.0  # spot channel: nothing to learn here
    assert tgt[1].max() == 0.0 and wgt[1][40, 40] == 0.0  # opacity: ignored, not a target
    assert wgt[1][90, 190] == 1.0  # elsewhere a shadow negative


def test_sampling_shows_spots_and_jsrt_normals_as_often_as_jsrt_nodules() -> None:
    from models.training.unet_training import SPOT_SHARE, sample_weights

    sources = np.array(["tbx11k"] * 80 + ["jsrt"] * 15 + ["jsrt"] * 5)
    has_spot = np.array([False] * 80 + [True] * 15 + [False] * 5)
    w = sample_weights(sources, has_spot)
    assert w.sum() == pytest.approx(1.0)
    jsrt = sources == "jsrt"
    assert w[jsrt & ~has_spot].sum() == pytest.approx(w[jsrt & has_spot].sum())
    assert 0.5 * SPOT_SHARE < w[has_spot].sum() <= SPOT_SHARE + 1e-9


def test_jpeg_augmentation_reencodes_some_images() -> None:
    import torch

    from models.training.augment import jpeg

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 64, 64)).astype(np.uint8)
    out = jpeg(images, torch.Generator().manual_seed(0))
    changed = [not np.array_equal(a, b) for a, b in zip(images, out, strict=True)]
    assert 3 <= sum(changed) <= 13 and out.dtype == np.uint8
