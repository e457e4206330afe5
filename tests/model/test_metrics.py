"""Lesion metrics on hand-made cases with known answers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.training import metrics as M
from models.training.dataset import Lesion, Record

pytestmark = pytest.mark.training

LESIONS = {0: [(0.0, 0.0, 10.0, 10.0)], 1: [(50.0, 50.0, 60.0, 60.0)], 2: []}


def test_froc_counts_hits_and_false_positives_per_image() -> None:
    """One hit at top score, then one false positive, then the second hit."""
    dets = [
        M.Detection(image=0, box=(0, 0, 10, 10), score=0.9),
        M.Detection(image=2, box=(0, 0, 5, 5), score=0.8),
        M.Detection(image=1, box=(51, 51, 60, 60), score=0.7),
    ]
    out = M.froc(dets, LESIONS, n_images=3)
    assert out["sensitivity_at_fp"] == {"0.25": 0.5, "0.5": 1.0, "1.0": 1.0, "2.0": 1.0}


def test_ap50_penalises_ranking_a_false_positive_first() -> None:
    """A false positive above both hits: interpolated precision is 2/3 at both recall steps."""
    dets = [
        M.Detection(image=2, box=(0, 0, 5, 5), score=0.95),
        M.Detection(image=0, box=(0, 0, 10, 10), score=0.9),
        M.Detection(image=1, box=(50, 50, 60, 60), score=0.7),
    ]
    assert math.isclose(M.average_precision(dets, LESIONS), 2 / 3)
    assert math.isclose(M.average_precision(dets[1:], LESIONS), 1.0)


def test_tied_scores_form_one_block() -> None:
    """Equal scores cannot be separated by a threshold: the FROC has one point for them."""
    dets = [M.Detection(image=i, box=(0, 0, 10, 10), score=1.0) for i in range(3)]
    out = M.froc(dets, LESIONS, n_images=3)
    assert out["curve"] == [(0.6667, 0.5, 1.0)]
    assert out["sensitivity_at_fp"]["0.5"] == 0.0


def test_hits_respect_the_iou_threshold() -> None:
    """A box shifted by half its width hits at IoU 0.3 but not at 0.5."""
    dets = [M.Detection(image=0, box=(3, 0, 13, 10), score=0.5)]
    assert M.iou(dets[0].box, LESIONS[0][0]) == 70 / 130
    assert M.hits(dets, LESIONS, 0.3) == 1
    assert M.hits([M.Detection(image=0, box=(5, 0, 15, 10), score=0.5)], LESIONS, 0.5) == 0


def test_auroc_and_dice() -> None:
    """AUROC counts ties half; Dice of disjoint masks is 0 and of equal masks 1."""
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    assert M.auroc(scores, np.array([True, True, False, False])) == 0.875
    a = np.zeros((4, 4), dtype=bool)
    a[:2] = True
    assert M.dice(a, a) == 1.0 and M.dice(a, ~a) == 0.0


def _tbx_record(i: int, findings: tuple[Lesion, ...]) -> Record:
    return Record(
        id=f"x{i}",
        source="tbx11k",
        patient=f"p{i}",
        width=512,
        height=512,
        lungs=None,
        findings=findings,
    )


def test_extent_scale_fit_brings_findings_to_the_lesions_size() -> None:
    """Shadow findings twice as wide and 1.25× as high as the lesions they overlap give
    factors 0.5 × 0.8; findings that overlap nothing do not count; a group with fewer
    matches than the minimum (spots here) keeps (1, 1)."""
    from models.training.dataset import Lesion
    from models.training.engines import Analysed, Found
    from models.training.fits import EXTENT_MIN_MATCHES, fit_extent_scale

    n = EXTENT_MIN_MATCHES + 5
    tb = Lesion(label="active_tuberculosis", box=(100.0, 100.0, 120.0, 140.0), mask=None)
    nodule = Lesion(label="nodule", box=(300.0, 300.0, 310.0, 310.0), mask=None)
    records, results = [], []
    for i in range(n):
        records.append(_tbx_record(i, (tb, nodule)))
        found = [
            Found(group="shadow", box=(90.0, 95.0, 130.0, 145.0), probability=0.9, alert=None),
            Found(group="shadow", box=(400.0, 400.0, 450.0, 450.0), probability=0.9, alert=None),
        ]
        if i < 5:
            found.append(
                Found(group="spot", box=(295.0, 295.0, 315.0, 315.0), probability=0.5, alert=None)
            )
        results.append(Analysed(findings=tuple(found), lung=None))
    fitted = fit_extent_scale(records, results)
    assert fitted["shadow"] == (0.5, 0.8, n)
    assert fitted["spot"] == (1.0, 1.0, 5)


def test_box_weight_fit_picks_the_blend_closest_to_the_lesions() -> None:
    """Findings whose region box is too wide (IoU 0.45) and whose head box is too narrow
    (0.2) hit the lesion at IoU ≥ 0.5 only when blended (weights 0.25–0.75): the smallest of
    those is chosen; findings of the two runs pair by group and probability; a finding only
    one run kept keeps its own box; a group whose every weight scores alike (spots: none
    found) keeps weight 0."""
    from models.training.dataset import Lesion
    from models.training.engines import Analysed, Found
    from models.training.fits import blend_findings, fit_box_weight

    tb = Lesion(label="active_tuberculosis", box=(100.0, 100.0, 200.0, 200.0), mask=None)
    records, own, head = [], [], []
    for i in range(6):
        records.append(_tbx_record(i, (tb,)))
        p = 0.9 - 0.01 * i
        wide = Found(group="shadow", box=(40.0, 100.0, 260.0, 200.0), probability=p, alert=None)
        narrow = Found(group="shadow", box=(140.0, 100.0, 160.0, 200.0), probability=p, alert=None)
        extra = Found(group="shadow", box=(300.0, 300.0, 340.0, 340.0), probability=0.3, alert=None)
        own.append(Analysed(findings=(wide, extra), lung=None))
        head.append(Analysed(findings=(narrow,), lung=None))
    halfway = blend_findings(own[0], head[0], 0.5)
    assert [f.box for f in halfway] == [(90.0, 100.0, 210.0, 200.0), extra.box]
    fitted = fit_box_weight(records, own, head)
    weight, ap = fitted["shadow"]
    assert ap == {0.0: 0.0, 0.25: 1.0, 0.5: 1.0, 0.75: 1.0, 1.0: 0.0} and weight == 0.25
    assert fitted["spot"][0] == 0.0


def test_the_operating_point_is_chosen_on_the_normals_most_probable_findings() -> None:
    """Per channel, each normal study is scored by its most probable finding of the channel's
    group (0 without one): the threshold is the lowest grid value at most 7 % of them reach,
    the alert threshold the lowest at most 2 % reach, never below the threshold."""
    from models.training.engines import Analysed, Found
    from models.training.fits import choose_operating_point

    results = []
    for i in range(100):  # shadows: 10 studies at 0.9, 5 of them with a second at 0.99
        found = [Found(group="shadow", box=(0.0, 0.0, 1.0, 1.0), probability=0.3, alert=None)]
        if i < 10:
            found.append(
                Found(group="shadow", box=(0.0, 0.0, 1.0, 1.0), probability=0.9, alert=None)
            )
        if i < 5:
            found.append(
                Found(group="shadow", box=(2.0, 2.0, 3.0, 3.0), probability=0.99, alert=None)
            )
        if i < 3:  # spots: 3 studies, weakly
            found.append(Found(group="spot", box=(0.0, 0.0, 1.0, 1.0), probability=0.4, alert=None))
        results.append(Analysed(findings=tuple(found), lung=None))
    channels = [
        {"name": "spot", "kind": "finding", "group": "spot"},
        {"name": "shadow", "kind": "finding", "group": "shadow"},
        {"name": "lungs", "kind": "lung"},
    ]
    thresholds, alerts = choose_operating_point(results, channels)
    assert thresholds == {"spot": 0.2, "shadow": 0.925}  # 5 % reach 0.925, 10 % reach 0.9
    assert alerts == {"spot": 0.425, "shadow": 0.995}  # none reach 0.425 / 0.995
    with pytest.raises(SystemExit, match="no normal studies"):
        choose_operating_point([], channels)


def _hit_and_miss() -> tuple[list[Record], Callable[[float, float], list[Any]]]:
    """Two TBX11K images with one lesion each, and runs that find on each image the lesion
    (score ``hit``) and a false positive (score ``miss``): a fit's choice is the run whose
    scores put the hit first."""
    from models.training.engines import Analysed, Found

    tb = Lesion(label="active_tuberculosis", box=(100.0, 100.0, 200.0, 200.0), mask=None)
    records = [_tbx_record(i, (tb,)) for i in range(2)]

    def run(hit: float, miss: float) -> list[Any]:
        false_positive = (300.0, 300.0, 340.0, 340.0)
        return [
            Analysed(
                findings=(
                    Found(group="shadow", box=tb.box, probability=hit, alert=None),
                    Found(group="shadow", box=false_positive, probability=miss, alert=None),
                ),
                lung=None,
            )
            for _ in records
        ]

    return records, run


def test_support_power_fit_picks_the_run_with_the_best_ap50() -> None:
    """Runs at three powers rank a hit and a false positive differently: the power whose
    ranking puts the hit first wins; among equal AP50 the smaller power; a group with no
    findings keeps power 0."""
    from models.training.fits import fit_support_power

    records, run = _hit_and_miss()

    fitted = fit_support_power(
        records, {0.0: run(0.5, 0.9), 1.0: run(0.8, 0.4), 2.0: run(0.7, 0.2)}
    )
    power, ap = fitted["shadow"]
    assert ap[0.0] < ap[1.0] == ap[2.0] == 1.0 and power == 1.0
    assert fitted["spot"][0] == 0.0


def test_zoom_scale_fit_picks_the_best_mean_ap50_and_ties_to_fewer_scales() -> None:
    """Of the runs with different S300 zoom scales the one whose findings rank the hit above
    the false positive wins (AP50 averaged over both groups); of two equal runs the one with
    fewer scales."""
    from models.training.fits import fit_zoom_scales

    records, run = _hit_and_miss()

    best, ap = fit_zoom_scales(
        records, {(): run(0.5, 0.9), (1.2,): run(0.8, 0.4), (1.1, 1.2): run(0.9, 0.3)}
    )
    assert best == (1.2,)
    assert ap["[]"]["shadow"] < ap["[1.2]"]["shadow"] == ap["[1.1, 1.2]"]["shadow"] == 1.0
    best, _ = fit_zoom_scales(records, {(): run(0.5, 0.9), (1.1,): run(0.5, 0.9)})
    assert best == ()


def test_evaluate_fits_zoom_scales_into_the_manifest(tmp_path: Path) -> None:
    """``--fit-zoom-scales`` runs the pipeline with each choice and writes the best scales
    and their rule into the manifest's operating point; the pipeline loads them."""
    from models.training.evaluate import main
    from models.training.fits import ZOOM_CHOICES
    from pipeline.model import load_model
    from tests.model.folders import folder_with_normals
    from tests.pipeline.tiny_model import build_tiny_model

    data = folder_with_normals(tmp_path / "data")
    model = build_tiny_model(tmp_path / "model", size=64)
    common = [str(data), "--split", "all", "--model-dir", str(model), "--out", str(tmp_path / "e")]
    assert main([*common, "--fit-zoom-scales"]) == 0
    op = json.loads((model / "manifest.json").read_text())["operating_point"]
    assert tuple(op["zoom_scales"]) in ZOOM_CHOICES
    assert "AP50 by scales" in op["zoom_scales_rule"]
    assert load_model(model).manifest.zoom_scales == tuple(op["zoom_scales"])


def test_evaluate_fits_a_support_power_and_chooses_its_operating_point(tmp_path: Path) -> None:
    """``--fit-support-power`` writes a power per finding channel and its rule;
    ``--choose-operating-point`` then picks thresholds through the pipeline on the normal
    studies (grid values, alerts never below them) and the evaluation runs at them."""
    from models.training.evaluate import main
    from models.training.fits import ALERT_GRID, THRESHOLD_GRID
    from tests.model.folders import folder_with_normals
    from tests.pipeline.tiny_model import build_tiny_model

    data = folder_with_normals(tmp_path / "data")
    model = build_tiny_model(tmp_path / "model", size=64)
    common = [str(data), "--split", "all", "--model-dir", str(model), "--out", str(tmp_path / "e")]
    assert main([*common, "--fit-support-power"]) == 0
    op = json.loads((model / "manifest.json").read_text())["operating_point"]
    assert set(op["support_power"]) == {"spot", "shadow"}
    assert all(p in (0.0, 0.5, 1.0, 2.0) for p in op["support_power"].values())
    assert "AP50 by power" in op["support_power_rule"]
    assert main([*common, "--choose-operating-point"]) == 0
    op = json.loads((model / "manifest.json").read_text())["operating_point"]
    for name, t in op["thresholds"].items():
        assert t in THRESHOLD_GRID and op["alert_thresholds"][name] in ALERT_GRID
        assert op["alert_thresholds"][name] >= t
    assert "normal studies" in op["rule"] and "pipeline" in op["rule"]
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["model"]["operating_point"]["thresholds"] == op["thresholds"]


def test_evaluate_fits_a_box_weight_and_scores_a_folder_through_the_pipeline(
    tmp_path: Path,
) -> None:
    """The commands as a new model's author runs them, on a generated folder and the tiny
    ONNX model with a box head: ``--fit-box-weight`` writes a weight per finding channel
    and its rule into the manifest; the evaluation then writes its summary and FROC plot. A
    model without a box head is refused a box weight."""
    from models.training.evaluate import main
    from tests.model.folders import folder_with_normals
    from tests.pipeline.tiny_model import build_tiny_model

    data = folder_with_normals(tmp_path / "data")
    model = build_tiny_model(tmp_path / "model", size=64, box_px=(6.0, 6.0, 6.0, 6.0))
    common = [str(data), "--split", "all", "--model-dir", str(model), "--out", str(tmp_path / "e")]
    assert main([*common, "--fit-box-weight"]) == 0
    op = json.loads((model / "manifest.json").read_text())["operating_point"]
    assert set(op["box_weight"]) == {"spot", "shadow"}
    assert all(w in (0.0, 0.25, 0.5, 0.75, 1.0) for w in op["box_weight"].values())
    assert "AP50 by weight" in op["box_weight_rule"]
    assert main(common) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["model"]["operating_point"]["box_weight"] == op["box_weight"]
    assert (tmp_path / "e" / "froc.png").stat().st_size > 0
    plain = build_tiny_model(tmp_path / "plain", size=64)
    with pytest.raises(SystemExit, match="no box head"):
        main(
            [str(data), "--model-dir", str(plain), "--out", str(tmp_path / "p"), "--fit-box-weight"]
        )


def test_view_fusion_fit_picks_the_best_ap50_per_group_and_ties_to_mean() -> None:
    """Per group, the S300 view fusion whose run ranks the hit above the false positive
    wins; equal runs keep ``mean``."""
    from models.training.fits import fit_view_fusion

    records, run = _hit_and_miss()

    fitted = fit_view_fusion(records, {"mean": run(0.5, 0.9), "max": run(0.9, 0.5)})
    fusion, ap = fitted["shadow"]
    assert ap["mean"] < ap["max"] == 1.0 and fusion == "max"
    assert (
        fit_view_fusion(records, {"max": run(0.9, 0.5), "mean": run(0.9, 0.5)})["shadow"][0]
        == "mean"
    )


def test_evaluate_fits_view_fusion_into_the_manifest(tmp_path: Path) -> None:
    """``--fit-view-fusion`` runs the pipeline with each fusion and writes the choice per
    finding channel and its rule into the manifest; the pipeline loads it. A model without
    zoom scales has one view: the command refuses."""
    from models.training.evaluate import main
    from pipeline.manifest import VIEW_FUSIONS
    from pipeline.model import load_model
    from tests.model.folders import folder_with_normals
    from tests.pipeline.tiny_model import build_tiny_model

    data = folder_with_normals(tmp_path / "data")
    model = build_tiny_model(tmp_path / "model", size=64)
    common = [str(data), "--split", "all", "--model-dir", str(model), "--out", str(tmp_path / "e")]
    with pytest.raises(SystemExit, match="no zoom scales"):
        main([*common, "--fit-view-fusion"])
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["operating_point"]["zoom_scales"] = [1.2]
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert main([*common, "--fit-view-fusion"]) == 0
    op = json.loads((model / "manifest.json").read_text())["operating_point"]
    assert set(op["view_fusion"]) == {
        c["name"] for c in manifest["channels"] if c["kind"] == "finding"
    }
    assert set(op["view_fusion"].values()) <= set(VIEW_FUSIONS)
    assert "AP50 by fusion" in op["view_fusion_rule"] and "ties to mean" in op["view_fusion_rule"]
    loaded = {c.name: c.view_fusion for c in load_model(model).manifest.finding_channels}
    assert loaded == op["view_fusion"]
