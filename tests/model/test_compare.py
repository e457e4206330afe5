"""models.training.compare: two models' goal figures on one split and a paired bootstrap of
their difference, drawn by patient within each source."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from models.training.compare import GOAL_FIGURES, compare, draws, main
from models.training.dataset import Record
from tests.model.test_metrics import _hit_and_miss

pytestmark = pytest.mark.training


def _record(i: int, source: str, patient: str) -> Record:
    return Record(
        id=f"{source}{i}",
        source=source,
        patient=patient,
        width=512,
        height=512,
        lungs=None,
        findings=(),
    )


def test_draws_take_each_sources_patients_with_all_their_images() -> None:
    """Per source as many patients as it has, drawn with replacement; a drawn patient
    brings every image of theirs; the draws are seeded."""
    records = [
        _record(0, "tbx11k", "a"),
        _record(1, "tbx11k", "a"),
        _record(2, "tbx11k", "b"),
        _record(3, "nih", "c"),
        _record(4, "nih", "d"),
        _record(5, "nih", "e"),
    ]
    got = draws(records, 200, seed=1)
    assert got == draws(records, 200, seed=1) and got != draws(records, 200, seed=2)
    for idx in got:
        patients = [records[i].patient for i in idx]
        assert patients.count("a") % 2 == 0  # patient a's two images come together
        tbx = [p for p in patients if p in "ab"]
        assert patients.count("a") // 2 + patients.count("b") == 2  # two tbx11k patients
        assert len(idx) - len(tbx) == 3  # three NIH patients, one image each
    assert any(0 in idx and 2 not in idx for idx in got)  # a patient can be left out


def test_a_model_against_itself_differs_by_nothing() -> None:
    records, run = _hit_and_miss()
    rows = compare(records, run(0.5, 0.9), run(0.5, 0.9), resamples=50)
    assert [r.figure for r in rows] == list(GOAL_FIGURES)
    shadow = next(r for r in rows if r.figure == "shadow_ap50")
    assert shadow.a == shadow.b and (shadow.low, shadow.high, shadow.b_higher) == (0, 0, 0)
    assert shadow.draws == 50 and shadow.a_interval == shadow.b_interval
    assert shadow.a_interval[0] <= shadow.a <= shadow.a_interval[1]
    spot = next(r for r in rows if r.figure == "spot_ap50")
    assert spot.draws == 0  # no spot lesion in any draw: undefined, not zero


def test_a_better_ranking_is_higher_in_every_draw() -> None:
    """B ranks each lesion's hit above the false positive, A the other way round: B's AP50
    is 1 and higher than A's in every draw, so the interval lies above 0."""
    records, run = _hit_and_miss()
    more = [*records, *(replace(r, id=r.id + "b", patient=r.patient + "b") for r in records)]
    rows = compare(more, run(0.5, 0.9) * 2, run(0.9, 0.5) * 2, resamples=100, seed=3)
    shadow = next(r for r in rows if r.figure == "shadow_ap50")
    assert shadow.b == 1.0 and shadow.a < 1.0
    assert shadow.low > 0 and shadow.b_higher == 1.0
    assert shadow.b_interval == (1.0, 1.0) and shadow.a_interval[1] < 1.0


def test_the_command_runs_both_models_through_the_pipeline(tmp_path: Path) -> None:
    """End to end on a generated folder: both models run through the pipeline, the JSON
    names them and holds every goal figure; the same model twice differs by nothing."""
    from tests.model.folders import folder_with_normals
    from tests.pipeline.tiny_model import build_tiny_model

    data = folder_with_normals(tmp_path / "data")
    model = build_tiny_model(tmp_path / "m", size=64)
    out = tmp_path / "compare.json"
    args = [str(data), "--split", "all", "--resamples", "20", "--out", str(out)]
    assert main([*args, "--model-dir", str(model), "--model-dir", str(model)]) == 0
    summary = json.loads(out.read_text())
    assert summary["a"]["name"] == summary["b"]["name"] == "tiny-test-model"
    assert summary["images"] == 11 and summary["resamples"] == 20
    figures = {f["figure"]: f for f in summary["figures"]}
    assert set(figures) == set(GOAL_FIGURES)
    assert figures["shadow_ap50"]["a"] == figures["shadow_ap50"]["b"]
    with pytest.raises(SystemExit):
        main([*args, "--model-dir", str(model)])
