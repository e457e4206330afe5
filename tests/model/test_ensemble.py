"""models.training.ensemble: two exported models as one ONNX graph of weighted means, read
back by the pipeline's own loader; its weights fitted through the pipeline by ``evaluate``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from models.training.ensemble import ENSEMBLE_FILE, main, reweight
from models.training.ensemble_spec import EnsembleError
from pipeline.model import load_model
from pipeline.result import SourceImage
from tests.pipeline.tiny_model import build_tiny_model

pytestmark = pytest.mark.training

SIZE = 64
WEIGHTS = ["spot=1,0", "shadow=0.25,0.75", "lung=1,0", "boxes=0.5,0.5"]


def _member(folder: Path, box: float, shadow_gain: float | None = None) -> Path:
    """The tiny test model with a box head of ``box`` pixels; with ``shadow_gain``, its
    shadow channel's slope changed, so that the members' shadow maps differ."""
    build_tiny_model(folder, size=SIZE, box_px=(box, box, box, box))
    if shadow_gain is not None:
        path = folder / "tiny.onnx"
        model = onnx.load(str(path))
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output[0] == "k_shadow":
                node.attribute[0].t.CopyFrom(
                    helper.make_tensor("k_shadow_t", onnx.TensorProto.FLOAT, [], [shadow_gain])
                )
        onnx.save(model, str(path))
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _ensemble(tmp_path: Path, weights: list[str] = WEIGHTS) -> Path:
    a = _member(tmp_path / "a", 6.0)
    b = _member(tmp_path / "b", 12.0, shadow_gain=3.0)
    args = ["--member", str(a), "--member", str(b), "--out", str(tmp_path / "ens")]
    args += ["--version", "9.9.9", *[x for w in weights for x in ("--weight", w)]]
    assert main(args) == 0
    return tmp_path / "ens"


def _disk() -> SourceImage:
    """A 600 × 500 radiograph-like image with a bright 20 mm disk, as the pipeline reads it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:600, :500]
    image = 1200 + 300 * np.cos((xx - 250) / 500 * np.pi) + 80 * rng.standard_normal((600, 500))
    image[(yy - 300) ** 2 + (xx - 120) ** 2 <= 40**2] += 2500
    return SourceImage(pixels=image.astype(np.uint16), spacing_mm=(0.25, 0.25))


def _images() -> np.ndarray:
    rng = np.random.default_rng(1)
    images = rng.random((2, SIZE, SIZE), dtype=np.float32) * 0.3
    images[:, 20:40, 20:40] += 0.6  # a bright square: shadow and spot maps away from 0 and 1
    return images


def test_the_ensemble_outputs_the_weighted_means_of_its_members(tmp_path: Path) -> None:
    """Loaded by the pipeline's loader (manifest, digest, shapes), the one file gives per
    channel the weighted mean of the members' probabilities and the mean of their boxes; the
    manifest names the members and the weights and keeps the first member's contract."""
    ens = _ensemble(tmp_path)
    model = load_model(ens)
    pa, ba = load_model(tmp_path / "a").predict_with_boxes(_images())
    pb, bb = load_model(tmp_path / "b").predict_with_boxes(_images())
    assert ba is not None and bb is not None
    assert not np.allclose(pa[:, 1], pb[:, 1], atol=1e-3)  # the members differ where it counts
    p, boxes = model.predict_with_boxes(_images())
    assert boxes is not None
    np.testing.assert_allclose(p[:, 0], pa[:, 0], atol=1e-6)
    np.testing.assert_allclose(p[:, 1], 0.25 * pa[:, 1] + 0.75 * pb[:, 1], atol=1e-6)
    np.testing.assert_allclose(p[:, 2], pa[:, 2], atol=1e-6)
    np.testing.assert_allclose(boxes, 9.0, atol=1e-5)
    manifest = json.loads((ens / "manifest.json").read_text())
    assert manifest["file"] == ENSEMBLE_FILE and manifest["version"] == "9.9.9"
    assert manifest["box_output"] == {"name": "boxes"}  # both outputs in the one file
    assert [m["file"] for m in manifest["ensemble"]["members"]] == ["tiny.onnx", "tiny.onnx"]
    assert manifest["ensemble"]["weights"]["shadow"] == [0.25, 0.75]
    assert manifest["ensemble"]["parity"]["probabilities"] <= 1e-4
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for key in ("input", "output", "channels", "operating_point"):
        assert manifest[key] == first[key]
    assert manifest["training"] == {
        "members": "each member's own record: ensemble.members[].training"
    }  # the tiny members have no training record to share


def test_reweight_changes_the_graph_its_digest_and_the_record(tmp_path: Path) -> None:
    """``reweight`` rewrites the weights in place: the shadow channel becomes the first
    member's alone, the other outputs keep their weights, and the loader accepts the new
    digest. Weights that do not sum to 1 are refused and change nothing."""
    ens = _ensemble(tmp_path)
    reweight(ens, {"shadow": (1.0, 0.0)})
    pa, _ = load_model(tmp_path / "a").predict_with_boxes(_images())
    p, boxes = load_model(ens).predict_with_boxes(_images())
    np.testing.assert_allclose(p[:, 1], pa[:, 1], atol=1e-6)
    np.testing.assert_allclose(boxes, 9.0, atol=1e-5)
    weights = json.loads((ens / "manifest.json").read_text())["ensemble"]["weights"]
    assert weights["shadow"] == [1.0, 0.0] and weights["boxes"] == [0.5, 0.5]
    before = (ens / ENSEMBLE_FILE).read_bytes()
    with pytest.raises(EnsembleError, match="summing to 1"):
        reweight(ens, {"boxes": (0.7, 0.7)})
    assert (ens / ENSEMBLE_FILE).read_bytes() == before
    with pytest.raises(EnsembleError, match="not an ensemble"):
        reweight(tmp_path / "a", {"shadow": (1.0, 0.0)})


def test_boxes_weighed_per_finding_channel(tmp_path: Path) -> None:
    """``boxes.spot`` and ``boxes.shadow`` give each finding channel its own four planes:
    the spot channel keeps the first member's boxes, the shadow channel averages both; the
    manifest names the channels, the loader checks the eight planes and the pipeline's
    traversal and analysis run it. ``reweight``'s ``boxes`` sets both channels' weights;
    a member comes back out with its own four planes."""
    from pipeline import analyse
    from pipeline.config import PipelineConfig

    weights = ["spot=1,0", "shadow=0.25,0.75", "lung=1,0", "boxes.spot=1,0"]
    ens = _ensemble(tmp_path, [*weights, "boxes.shadow=0.5,0.5"])
    manifest = json.loads((ens / "manifest.json").read_text())
    assert manifest["box_output"]["channels"] == ["spot", "shadow"]
    assert manifest["ensemble"]["weights"]["boxes.shadow"] == [0.5, 0.5]
    model = load_model(ens)
    assert model.manifest.box_channel_indices == (0, 1)
    _, boxes = model.predict_with_boxes(_images())
    assert boxes is not None and boxes.shape == (2, 8, SIZE, SIZE)
    np.testing.assert_allclose(boxes[:, :4], 6.0, atol=1e-5)
    np.testing.assert_allclose(boxes[:, 4:], 9.0, atol=1e-5)
    result = analyse(_disk(), model, PipelineConfig())
    spots = [f for f in result.findings if f.group.value == "spot"]
    assert spots, "the bright disk is found through the eight planes"
    x0, y0, x1, y1 = spots[0].box  # the spot's own planes: 6 px to each edge, 12 px of 64
    assert (y1 - y0, x1 - x0) == (
        pytest.approx(12 * 600 / SIZE, rel=0.1),
        pytest.approx(12 * 500 / SIZE, rel=0.1),
    )
    reweight(ens, {"boxes": (0.0, 1.0)})
    _, boxes = load_model(ens).predict_with_boxes(_images())
    assert boxes is not None
    np.testing.assert_allclose(boxes, 12.0, atol=1e-5)
    assert main(["--extract", "0", "--model-dir", str(ens), "--out", str(tmp_path / "m0")]) == 0
    _, own = load_model(tmp_path / "m0").predict_with_boxes(_images())
    assert own is not None and own.shape == (2, 4, SIZE, SIZE)
    np.testing.assert_allclose(own, 6.0, atol=1e-6)
    member = json.loads((tmp_path / "m0" / "manifest.json").read_text())["box_output"]
    assert "channels" not in member
    shared = _ensemble(tmp_path / "shared")
    with pytest.raises(EnsembleError, match="one set for every channel"):
        reweight(shared, {"boxes.spot": (1.0, 0.0)})


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (["spot=1,0", "shadow=0.5,0.5", "lung=1,0", "boxes=0.6,0.6"], "summing to 1"),
        (["spot=1,0", "shadow=0.5,0.5", "lung=1,0"], "no weights for boxes"),
        (["spot=1,0", "shadow=1", "lung=1,0", "boxes=1,0"], "needs 2 weights"),
        (["spot=1,0", "shade=1,0", "lung=1,0", "boxes=1,0"], "unknown output 'shade'"),
        (["spot=a,b", "shadow=1,0", "lung=1,0", "boxes=1,0"], "not a list of numbers"),
        (["spot=1,0", "shadow=1,0", "lung=1,0", "boxes.spot=1,0"], "no weights for boxes.shadow"),
        (
            ["spot=1,0", "shadow=1,0", "lung=1,0", "boxes=1,0", "boxes.spot=1,0"],
            "give one or the other",
        ),
        (["spot=1,0", "shadow=1,0", "lung=1,0", "boxes.lung=1,0"], "unknown output 'boxes.lung'"),
    ],
)
def test_the_command_refuses_weights_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: list[str], message: str
) -> None:
    a = _member(tmp_path / "a", 6.0)
    b = _member(tmp_path / "b", 12.0)
    args = ["--member", str(a), "--member", str(b), "--out", str(tmp_path / "e")]
    assert main([*args, "--version", "1", *[x for w in weights for x in ("--weight", w)]]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_the_command_refuses_members_it_cannot_combine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A member without a box head, of another input size, or whose file does not match its
    digest is refused with a message; so is an ensemble of one."""
    a = _member(tmp_path / "a", 6.0)
    plain = build_tiny_model(tmp_path / "plain", size=SIZE)
    other = build_tiny_model(tmp_path / "other", size=32, box_px=(6.0, 6.0, 6.0, 6.0))
    tampered = _member(tmp_path / "t", 6.0)
    (tampered / "tiny.onnx").write_bytes((tampered / "tiny.onnx").read_bytes() + b"\0")
    common = ["--out", str(tmp_path / "e"), "--version", "1"]
    for second, message in [
        (plain, "no box head"),
        (other, "'input' differs"),
        (tampered, "sha256 does not match"),
    ]:
        assert main(["--member", str(a), "--member", str(second), *common]) == 2
        assert message in capsys.readouterr().err
    assert main(["--member", str(a), *common]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["--member", str(a), "--member", str(tmp_path / "nothing"), *common]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_ensemble_weight_fit_picks_the_best_mean_ap50_and_ties_to_the_earlier() -> None:
    """Of the runs with different ensemble weights the one whose findings rank the hit above
    the false positive wins; of equal runs the earlier (less of the second member)."""
    from models.training.fits import ENSEMBLE_CHOICES, choice_key, fit_ensemble_weights
    from tests.model.test_metrics import _hit_and_miss

    records, run = _hit_and_miss()
    first, second, third = ENSEMBLE_CHOICES[:3]
    best, ap = fit_ensemble_weights(
        records, {first: run(0.5, 0.9), second: run(0.8, 0.4), third: run(0.9, 0.1)}
    )
    assert best == second
    assert ap[choice_key(first)]["shadow"] < ap[choice_key(second)]["shadow"] == 1.0
    assert choice_key(second) == "spot 1/0, shadow 0.5/0.5, boxes 1/0"
    best, _ = fit_ensemble_weights(records, {first: run(0.8, 0.4), second: run(0.8, 0.4)})
    assert best == first


def test_evaluate_fits_ensemble_weights_into_its_graph(tmp_path: Path) -> None:
    """``--fit-ensemble-weights`` runs the pipeline with each choice, writes the best into
    the graph and the manifest with its rule, and the loader accepts the result; a model
    that is not an ensemble is refused."""
    from models.training.evaluate import main as evaluate
    from models.training.fits import ENSEMBLE_CHOICES, choice_key
    from tests.model.folders import folder_with_normals

    data = folder_with_normals(tmp_path / "data")
    ens = _ensemble(tmp_path)
    common = [str(data), "--split", "all", "--out", str(tmp_path / "e")]
    assert evaluate([*common, "--model-dir", str(ens), "--fit-ensemble-weights"]) == 0
    record = json.loads((ens / "manifest.json").read_text())["ensemble"]
    chosen = {k: tuple(v) for k, v in record["weights"].items() if k != "lung"}
    assert tuple(chosen.items()) in ENSEMBLE_CHOICES
    assert record["weights"]["lung"] == [1.0, 0.0]
    assert all(choice_key(c) in record["weights_rule"] for c in ENSEMBLE_CHOICES)
    load_model(ens)
    with pytest.raises(SystemExit, match="not an ensemble"):
        evaluate([*common, "--model-dir", str(tmp_path / "a"), "--fit-ensemble-weights"])


def test_evaluate_fits_per_group_weights_into_an_ensemble_with_boxes_per_channel(
    tmp_path: Path,
) -> None:
    """With boxes per finding channel, ``--fit-ensemble-weights`` runs each of
    ``GROUP_ENSEMBLE_CHOICES`` and keeps, per group, its own best map and box weights: each
    group's written weights are one of the choices, its rule records every choice's AP50
    per group, and the loader accepts the result."""
    from models.training.evaluate import main as evaluate
    from models.training.fits import GROUP_ENSEMBLE_CHOICES, choice_key
    from tests.model.folders import folder_with_normals

    data = folder_with_normals(tmp_path / "data")
    ens = _ensemble(tmp_path, [*WEIGHTS[:3], "boxes.spot=1,0", "boxes.shadow=0.5,0.5"])
    common = [str(data), "--split", "all", "--out", str(tmp_path / "e")]
    assert evaluate([*common, "--model-dir", str(ens), "--fit-ensemble-weights"]) == 0
    record = json.loads((ens / "manifest.json").read_text())["ensemble"]
    weights = record["weights"]
    for group in ("spot", "shadow"):
        pair = (("map", tuple(weights[group])), ("boxes", tuple(weights[f"boxes.{group}"])))
        assert pair in GROUP_ENSEMBLE_CHOICES
    assert weights["lung"] == [1.0, 0.0]
    assert all(choice_key(c) in record["weights_rule"] for c in GROUP_ENSEMBLE_CHOICES)
    assert "per finding group" in record["weights_rule"]
    load_model(ens)


def test_group_choices_become_weights_for_every_finding_channel() -> None:
    from models.training.fits import GROUP_ENSEMBLE_CHOICES, group_choice_weights

    both = GROUP_ENSEMBLE_CHOICES[2]
    assert group_choice_weights(both, ["spot", "shadow"]) == (
        ("spot", (0.5, 0.5)),
        ("boxes.spot", (0.5, 0.5)),
        ("shadow", (0.5, 0.5)),
        ("boxes.shadow", (0.5, 0.5)),
    )


def test_a_member_comes_back_out_of_the_ensemble(tmp_path: Path) -> None:
    """``--extract K`` writes member K back as a model folder the loader opens, with the
    member's outputs exactly and its own name, version, operating point and metrics; a
    member it does not have and a model that is not an ensemble are refused."""
    ens = _ensemble(tmp_path)
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    ensemble = json.loads((ens / "manifest.json").read_text())
    assert ensemble["ensemble"]["members"][1]["operating_point"] == b["operating_point"]
    ensemble["operating_point"]["thresholds"]["shadow"] = 0.9  # chosen again for the ensemble
    (ens / "manifest.json").write_text(json.dumps(ensemble))
    assert main(["--extract", "1", "--model-dir", str(ens), "--out", str(tmp_path / "m1")]) == 0
    pb, bb = load_model(tmp_path / "b").predict_with_boxes(_images())
    p, boxes = load_model(tmp_path / "m1").predict_with_boxes(_images())
    np.testing.assert_array_equal(p, pb)
    assert boxes is not None and bb is not None
    np.testing.assert_array_equal(boxes, bb)
    manifest = json.loads((tmp_path / "m1" / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"]) == ("tiny-test-model", "0.0.1")
    assert manifest["operating_point"] == b["operating_point"]  # the member's, not 0.9
    assert "ensemble" not in manifest
    assert main(["--extract", "2", "--model-dir", str(ens), "--out", str(tmp_path / "x")]) == 2
    not_one = ["--extract", "0", "--model-dir", str(tmp_path / "a"), "--out", str(tmp_path / "y")]
    assert main(not_one) == 2
