"""The learned box head cannot rot: its targets, its loss, a training step that leaves the
U-Net alone, and the command from a trained U-Net to an ONNX model the pipeline loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is the training-only extra (pip install -e .[train]; make test does)"
)

from models.training import augment  # noqa: E402
from models.training.boxhead import (  # noqa: E402
    SCALE_PX,
    Detector,
    box_targets,
    cell_iou,
    iou_loss,
)
from models.training.net import UNet  # noqa: E402

pytestmark = pytest.mark.training

SIZE = 64
WIDTHS = (8, 16, 24, 32, 48)


def test_boxes_move_with_the_augmentation_geometry() -> None:
    """A filled rectangle warped by ``geometry`` has the bounding box ``transform_boxes``
    computes for it, within a pixel."""
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[10.0, 12.0, 30.0, 40.0], [40.0, 5.0, 60.0, 20.0]])
    image = torch.zeros(2, 1, SIZE, SIZE)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        image[i, 0, y0:y1, x0:x1] = 1.0
    theta = augment.random_affine(2, g)
    warped, _, _ = augment.geometry(image, image.clone(), image.clone(), g, theta=theta)
    for i in range(2):
        ys, xs = torch.nonzero(warped[i, 0] > 0.5, as_tuple=True)
        seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        moved = augment.transform_boxes(boxes[i : i + 1], theta[i], (SIZE, SIZE))[0]
        assert moved.tolist() == pytest.approx([float(v) for v in seen], abs=1.0)


def test_targets_give_each_lesion_cell_the_distances_to_its_smallest_box() -> None:
    """Cells on a lesion get the distances to the edges of the smallest box holding them;
    a lesion smaller than a cell still gets its centre cell; other cells are no target."""
    positive = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    positive[0, 8:40, 8:40] = True  # a large lesion, with a small one inside
    boxes = [
        torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 20.0, 28.0, 28.0], [50.0, 50.0, 51.0, 51.0]])
    ]
    target, index = box_targets(positive, boxes, stride=4)
    # cell (row 2, col 2): centre (10, 10), in the large box only
    assert index[0, 2, 2] == 0
    assert target[0, :, 2, 2].tolist() == pytest.approx([2.0, 2.0, 30.0, 30.0])
    # cell (5, 5): centre (22, 22), in both boxes: the smaller one
    assert index[0, 5, 5] == 1
    assert target[0, :, 5, 5].tolist() == pytest.approx([2.0, 2.0, 6.0, 6.0])
    # the 1-pixel lesion at (50, 50) is not on ``positive`` but its centre cell is a target
    assert index[0, 12, 12] == 2
    assert int((index[0] >= 0).sum()) == 64 + 1
    assert index[0, 0, 0] == -1


def test_iou_loss_is_zero_for_the_right_boxes_and_grows_with_the_error() -> None:
    positive = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    positive[0, 16:48, 16:48] = True
    target, index = box_targets(positive, [torch.tensor([[16.0, 16.0, 48.0, 48.0]])], stride=4)
    exact = torch.log(target.clamp(min=1e-3) / SCALE_PX)
    assert float(iou_loss(exact, target, index)) == pytest.approx(0.0, abs=1e-4)
    assert cell_iou(exact, target, index).min() > 0.999
    worse = exact + 0.3
    assert float(iou_loss(worse, target, index)) > 0.1
    none = torch.full_like(index, -1)
    assert float(iou_loss(worse, target, none)) == 0.0


def test_a_box_step_trains_the_head_and_leaves_the_unet_as_it_was() -> None:
    from models.training.box_training import train_step
    from models.training.trunk import freeze

    torch.manual_seed(0)
    detector = Detector(UNet(widths=WIDTHS), WIDTHS)
    freeze(detector.net)
    unet = {k: v.clone() for k, v in detector.net.state_dict().items()}
    head = [p.detach().clone() for p in detector.boxes.parameters()]
    optimiser = torch.optim.AdamW(detector.boxes.parameters(), lr=1e-2)
    images = torch.rand(2, 1, SIZE, SIZE)
    targets = torch.zeros(2, 3, SIZE, SIZE)
    targets[0, 1, 20:40, 10:30] = 1.0
    targets[1, 0, 40:48, 40:48] = 1.0
    boxes = [torch.tensor([[10.0, 20.0, 30.0, 40.0]]), torch.tensor([[40.0, 40.0, 48.0, 48.0]])]
    batch = (images, targets, torch.ones(2, 2, SIZE, SIZE), boxes)
    losses = [
        train_step(detector, optimiser, batch, torch.Generator().manual_seed(i)) for i in range(3)
    ]
    assert all(np.isfinite(loss) and loss > 0 for loss in losses)
    assert any(
        not torch.equal(a, b) for a, b in zip(head, detector.boxes.parameters(), strict=True)
    )
    for k, v in detector.net.state_dict().items():
        assert torch.equal(v, unet[k]), k  # weights and BatchNorm statistics


def test_a_joint_step_trains_unet_and_head_and_keeps_the_batchnorm_statistics() -> None:
    from models.training.box_training import joint_step

    torch.manual_seed(0)
    detector = Detector(UNet(widths=WIDTHS), WIDTHS)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    optimiser = torch.optim.AdamW(detector.parameters(), lr=1e-2)
    images = torch.rand(2, 1, SIZE, SIZE)
    targets = torch.zeros(2, 3, SIZE, SIZE)
    targets[0, 1, 20:40, 10:30] = 1.0  # image 1 is a normal study: no box, no lesion
    boxes = [torch.tensor([[10.0, 20.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    batch = (images, targets, torch.ones(2, 2, SIZE, SIZE), boxes)
    has_lung = torch.tensor([False, False])
    losses = [
        joint_step(detector, optimiser, batch, has_lung, torch.Generator().manual_seed(i), 1.0)
        for i in range(3)
    ]
    assert all(np.isfinite(loss) and loss > 0 for loss in losses)
    after = detector.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert "net.stem.0.weight" in changed and any(k.startswith("boxes.") for k in changed)
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "batches_tracked"))]
    assert stats and not changed.intersection(stats)


def test_spot_drift_is_zero_where_the_spot_channel_agrees_and_grows_as_it_moves() -> None:
    from models.training.distill import spot_drift

    teacher = torch.randn(2, 3, SIZE, SIZE)
    student = teacher.clone()
    student[:, 1] += 3.0  # the shadow and lung channels are free to move
    student[:, 2] -= 3.0
    assert float(spot_drift(student, teacher)) == pytest.approx(0.0, abs=1e-6)
    faded, gone = teacher.clone(), teacher.clone()
    faded[:, 0, 10:20, 10:20] -= 2.0
    gone[:, 0, 10:20, 10:20] -= 6.0
    assert 0 < float(spot_drift(faded, teacher)) < float(spot_drift(gone, teacher))


def test_peak_drift_follows_the_spot_peaks_only() -> None:
    """``peak_drift`` is the mean KL over the pixels where either map reaches 0.5: zero where
    the peaks agree however the background moves, as large for a faded 10 × 10 peak as for a
    whole faded image, and it counts a peak that appears; 0 with no peak anywhere."""
    from models.training.distill import peak_drift, spot_drift

    teacher = torch.full((2, 3, SIZE, SIZE), -4.0)
    teacher[0, 0, 10:20, 10:20] = 3.0  # one spot peak on the first image
    moved = teacher.clone()
    moved[:, 0][teacher[:, 0] < 0] = -2.0  # background 0.018 → 0.12, still below 0.5
    moved[:, 1:] += 5.0
    assert float(peak_drift(moved, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(spot_drift(moved, teacher)) > 0.01
    faded = teacher.clone()
    faded[0, 0, 10:20, 10:20] = 0.2
    whole = torch.full_like(teacher, 3.0), torch.full_like(teacher, 0.2)
    assert float(peak_drift(faded, teacher)) == pytest.approx(
        float(peak_drift(whole[1], whole[0])), rel=1e-5
    )
    assert float(peak_drift(faded, teacher)) > 3 * float(spot_drift(faded, teacher))
    appeared = teacher.clone()
    appeared[1, 0, 30:34, 30:34] = 2.0  # a new peak on the second image
    assert float(peak_drift(appeared, teacher)) > 0.5
    blank = torch.full((2, 3, SIZE, SIZE), -4.0)
    assert float(peak_drift(blank, blank)) == 0.0


def test_a_joint_step_with_a_teacher_pulls_the_spot_channel_back_and_leaves_it_alone() -> None:
    from models.training.box_training import joint_step
    from models.training.distill import spot_drift
    from models.training.trunk import starting_unet

    torch.manual_seed(0)
    detector = Detector(UNet(widths=WIDTHS), WIDTHS)
    teacher = starting_unet(detector.net, {}, Path("unused"), resumed=False)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = torch.rand(2, 1, SIZE, SIZE)
    targets = torch.zeros(2, 3, SIZE, SIZE)
    targets[0, 0, 20:40, 10:30] = 1.0  # a spot target the teacher has not learned
    boxes = [torch.tensor([[10.0, 20.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    batch = (images, targets, torch.ones(2, 2, SIZE, SIZE), boxes)
    drift = {}
    for weight in (0.0, 50.0):
        torch.manual_seed(1)
        student = Detector(UNet(widths=WIDTHS), WIDTHS)
        student.load_state_dict(detector.state_dict())
        optimiser = torch.optim.AdamW(student.parameters(), lr=1e-2)
        for i in range(4):
            joint_step(
                student,
                optimiser,
                batch,
                torch.tensor([False, False]),
                torch.Generator().manual_seed(i),
                1.0,
                augment_batch=False,
                teacher=teacher,
                distill={"spot_drift": weight},
            )
        with torch.no_grad():
            x = torch.rand(2, 1, SIZE, SIZE)
            drift[weight] = float(spot_drift(student.eval().net(x), teacher(x)))
    assert 0 < drift[50.0] < drift[0.0]
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())


def test_box_command_from_a_trained_unet_to_a_model_the_pipeline_loads(tmp_path: Path) -> None:
    """``train`` a tiny U-Net, ``train_boxes`` a head on it for a moment: the export has both
    outputs, its manifest names the box output and the U-Net it extends, and
    ``pipeline.model.load_model`` opens it and returns probabilities equal to the U-Net's
    own export and box distances of the working size."""
    from models.training.train import main as train_main
    from models.training.train_boxes import main as boxes_main
    from pipeline.model import load_model
    from tests.model.folders import folder_with_normals

    data = folder_with_normals(tmp_path / "data")
    rows = [json.loads(line) for line in (data / "annotations.jsonl").read_text().splitlines()]
    for i in range(4):  # more abnormal patients, so that training has lesions too
        rows.append({**rows[0], "id": f"a{i}", "patient": f"pa{i}"})
        (data / "images" / f"a{i}.png").write_bytes((data / "images" / "a.png").read_bytes())
    (data / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--data", str(data), "--size", str(SIZE), "--cache-dir", str(tmp_path / "cache")]
    runs = ["--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "--threads", "1"]
    widths = ",".join(map(str, WIDTHS))
    unet_dir, box_dir = tmp_path / "unet", tmp_path / "boxes"
    unet_args = [*common, *runs, "--batch", "2", "--minutes", "0.01", "--widths", widths]
    assert train_main([*unet_args, "--model-dir", str(unet_dir)]) == 0
    trunk = tmp_path / "runs" / "main" / "best.pt"
    args = [*common, *runs, "--batch", "1", "--trunk", str(trunk), "--export-dir", str(box_dir)]
    assert boxes_main([*args, "--minutes", "0.01"]) == 0
    manifest = json.loads((box_dir / "manifest.json").read_text())
    assert manifest["box_output"]["name"] == "boxes"
    assert (box_dir / manifest["file"]).is_file() and (
        box_dir / manifest["box_output"]["file"]
    ).is_file()
    assert manifest["training"]["unet"]["from"] == str(trunk)
    assert boxes_main([*args, "--minutes", "0.02"]) == 0  # resumes
    state = torch.load(tmp_path / "runs" / "boxes" / "last.pt", weights_only=False)["state"]
    assert state["epoch"] >= 2
    # the float16 checkpoint to commit keeps where its U-Net came from and serves as --trunk
    compact = tmp_path / "box-checkpoint.pt"
    assert boxes_main([*args, "--write-checkpoint", str(compact)]) == 0
    saved = torch.load(compact, weights_only=False)
    assert saved["trunk"]["from"] == str(trunk)
    assert all(v.dtype != torch.float32 for v in saved["model"].values())
    again = [*common, *runs, "--batch", "1", "--trunk", str(compact), "--run", "again"]
    assert boxes_main([*again, "--export-dir", str(tmp_path / "again"), "--minutes", "0.01"]) == 0

    # a head of another shape, on the U-Net of an exported file (as shipped, not rounded),
    # started from nothing; the default shape started from the compact checkpoint's head
    onnx_trunk = unet_dir / "shadowspot-lesion.onnx"
    other = [*common, *runs, "--batch", "1", "--trunk", str(onnx_trunk), "--minutes", "0.01"]
    wide_dir = tmp_path / "wide"
    assert (
        boxes_main(
            [*other, "--run", "wide", "--head-dilations", "1,2", "--export-dir", str(wide_dir)]
        )
        == 0
    )
    wide = json.loads((wide_dir / "manifest.json").read_text())["training"]
    assert wide["box_head"]["shape"] == {"width": 64, "dilations": [1, 2], "init": None}
    assert wide["unet"]["sha256"] == hashlib.sha256(onnx_trunk.read_bytes()).hexdigest()
    init = [*other, "--run", "init", "--init-head", str(compact)]
    assert boxes_main([*init, "--export-dir", str(tmp_path / "init")]) == 0
    with pytest.raises(SystemExit, match="another shape"):
        boxes_main([*init, "--run", "init2", "--head-dilations", "1"])

    # --joint: the U-Net learns with the head; its own version, record and metrics
    joint_dir = tmp_path / "joint"
    joint = [*other, "--run", "joint", "--joint", "--init-head", str(compact)]
    assert boxes_main([*joint, "--export-dir", str(joint_dir)]) == 0
    joint_manifest = json.loads((joint_dir / "manifest.json").read_text())
    assert joint_manifest["version"] == "1.6.0"
    assert joint_manifest["training"]["unet"]["trained_with_head"] is True
    assert joint_manifest["training"]["unet"]["init"]["sha256"] == wide["unet"]["sha256"]
    assert "joint_val_unet_loss" in joint_manifest["metrics"]
    with pytest.raises(SystemExit, match="cannot resume"):
        boxes_main([*other, "--run", "joint"])  # the joint run, without --joint
    # --distill-spot: recorded, validated, and resumed only from the U-Net it started from
    distill = [*other, "--init-head", str(compact), "--run", "distill", "--joint"]
    distill += ["--distill-spot", "2", "--distill-peaks", "3"]
    assert boxes_main([*distill, "--export-dir", str(tmp_path / "distill")]) == 0
    distilled = json.loads((tmp_path / "distill" / "manifest.json").read_text())
    assert distilled["training"]["unet"]["distill_spot"] == 2.0
    assert distilled["training"]["unet"]["distill_peaks"] == 3.0
    assert distilled["metrics"]["joint_val_spot_drift"] >= 0
    assert distilled["metrics"]["joint_val_peak_drift"] >= 0
    assert boxes_main(distill) == 0  # resumes against the same --trunk
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(onnx_trunk.read_bytes() + b"\0")
    with pytest.raises(SystemExit, match="not the U-Net this run started from"):
        boxes_main([*distill, "--trunk", str(changed)])

    model, plain = load_model(box_dir, threads=1), load_model(unet_dir, threads=1)
    image = np.random.default_rng(0).random((1, SIZE, SIZE), dtype=np.float32)
    probabilities, distances = model.predict_with_boxes(image)
    assert distances is not None and distances.shape == (1, 4, SIZE, SIZE)
    assert (distances > 0).all()
    np.testing.assert_allclose(probabilities, plain.predict(image), atol=1e-4)
    assert plain.predict_with_boxes(image)[1] is None
    wide_probabilities, _ = load_model(wide_dir, threads=1).predict_with_boxes(image)
    np.testing.assert_allclose(wide_probabilities, plain.predict(image), atol=1e-5)
    joint_probabilities, joint_boxes = load_model(joint_dir, threads=1).predict_with_boxes(image)
    assert np.abs(joint_probabilities - plain.predict(image)).max() > 0  # the U-Net learned

    # an ensemble of the head's model and the joint one (models.training.ensemble): the
    # pipeline loads the one file; each member comes back out of it unchanged, and its U-Net
    # as a --trunk is the first member's
    from models.training.ensemble import ENSEMBLE_FILE, extract
    from models.training.ensemble import main as ensemble_main
    from models.training.export import unet_from_onnx

    ens = tmp_path / "ens"
    weights = ["spot=1,0", "shadow=0.5,0.5", "lung=1,0", "boxes=0.5,0.5"]
    members = ["--member", str(box_dir), "--member", str(joint_dir)]
    assert (
        ensemble_main(
            [*members, "--out", str(ens), "--version", "2.0.0"]
            + [x for w in weights for x in ("--weight", w)]
        )
        == 0
    )
    mixed, _ = load_model(ens, threads=1).predict_with_boxes(image)
    digest = json.loads((box_dir / "manifest.json").read_text())["training"]["data_digest"]
    assert json.loads((ens / "manifest.json").read_text())["training"]["data_digest"] == digest
    np.testing.assert_allclose(mixed[:, 0], probabilities[:, 0], atol=1e-6)
    np.testing.assert_allclose(
        mixed[:, 1], (probabilities[:, 1] + joint_probabilities[:, 1]) / 2, atol=1e-6
    )
    extract(ens, 1, tmp_path / "member1")
    back_probabilities, back_boxes = load_model(tmp_path / "member1").predict_with_boxes(image)
    np.testing.assert_array_equal(back_probabilities, joint_probabilities)
    assert back_boxes is not None and joint_boxes is not None
    np.testing.assert_array_equal(back_boxes, joint_boxes)
    first = unet_from_onnx(box_dir / manifest["box_output"]["file"]).state_dict()
    from_ensemble = unet_from_onnx(ens / ENSEMBLE_FILE).state_dict()
    assert all(torch.equal(first[k], from_ensemble[k]) for k in first)


def test_a_unet_comes_back_from_its_onnx_file_as_shipped(tmp_path: Path) -> None:
    """``unet_from_onnx`` undoes the exporter's BatchNorm folding: the U-Net read back from
    an exported file gives that file's probabilities, so a head trained on it extends the
    shipped U-Net itself, not a rounded copy."""
    import onnxruntime as ort

    from models.training.export import export_onnx, unet_from_onnx
    from models.training.net import Exported

    torch.manual_seed(0)
    net = UNet(widths=WIDTHS)
    for m in net.modules():  # statistics far from the identity, so that the folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "unet.onnx"
    export_onnx(net.eval(), path, SIZE)
    back = unet_from_onnx(path)
    assert tuple(int(m[0].out_channels) for m in [back.stem, *back.down]) == WIDTHS
    image = torch.rand(2, 1, SIZE, SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shipped = session.run(None, {"image": image.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(Exported(back)(image).numpy(), shipped, atol=1e-5)
        assert not torch.allclose(
            Exported(UNet(widths=WIDTHS).eval())(image), Exported(back)(image)
        )

    # as a --trunk, the file's own manifest says where it came from: a record that was itself
    # read from this file (same sha256) passes on its origin instead of nesting
    from models.training.trunk import load_trunk

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    first = {"from": "runs/main/best.pt", "epoch": 7}
    unet = {"from": str(path), "sha256": digest, "record": first}
    (tmp_path / "manifest.json").write_text(json.dumps({"training": {"unet": unet}}))
    _, widths, origin = load_trunk(path)
    assert widths == WIDTHS
    assert origin["sha256"] == digest and origin["record"] == first
