"""The training code cannot rot: one step on a tiny generated batch, then the export path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is the training-only extra (pip install -e .[train]; make test does)"
)

from models.training.export import FILE, export_onnx, sha256_of, write_manifest  # noqa: E402
from models.training.net import UNet  # noqa: E402
from models.training.unet_training import train_step  # noqa: E402

pytestmark = pytest.mark.training

SIZE = 64


def _batch() -> dict[str, torch.Tensor]:
    """Two 64² images: a bright disc with its ellipse target, and an empty normal."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    disc = ((xs - 40) ** 2 + (ys - 24) ** 2 <= 64).astype(np.uint8)
    rng = np.random.default_rng(0)
    images = rng.integers(60, 120, size=(2, SIZE, SIZE)).astype(np.uint8)
    images[0][disc > 0] = 230
    targets = np.zeros((2, 3, SIZE, SIZE), dtype=np.uint8)
    targets[0, 1] = disc * 255
    targets[:, 2, 8:56, 8:56] = 255
    weights = np.full((2, 2, SIZE, SIZE), 255, dtype=np.uint8)
    return {
        "images": torch.from_numpy(images),
        "targets": torch.from_numpy(targets),
        "weights": torch.from_numpy(weights),
        "has_lung": torch.tensor([True, False]),
    }


def test_one_training_step_changes_the_weights_and_the_loss_is_finite() -> None:
    """A step with augmentation runs, returns a finite loss and moves the parameters."""
    torch.manual_seed(0)
    net = UNet(widths=(8, 16, 24, 32, 48))
    before = [p.detach().clone() for p in net.parameters()]
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss = train_step(net, optimiser, _batch(), torch.Generator().manual_seed(1))
    assert np.isfinite(loss) and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_the_scale_range_bounds_the_augmentation_geometry() -> None:
    """``random_affine`` draws its isotropic scale from the range it is given: the area
    factor of each affine (1 / det of its linear part = sx·sy = scale²·(1 − stretch²), stretch
    within ±8 %) lies within the range's bounds; the default is ``SCALE``."""
    from models.training import augment

    g = torch.Generator().manual_seed(0)
    for lo, hi in [(0.85, 1.2), (1.4, 1.5), (0.6, 0.7)]:
        theta = augment.random_affine(256, g, (lo, hi))
        area = 1.0 / torch.linalg.det(theta[:, :, :2])
        assert float(area.min()) >= lo**2 * (1 - 0.08**2) - 1e-5
        assert float(area.max()) <= hi**2 + 1e-5
    wide = 1.0 / torch.linalg.det(augment.random_affine(256, g, (1.4, 1.5))[:, :, :2])
    default = 1.0 / torch.linalg.det(augment.random_affine(256, g)[:, :, :2])
    assert float(default.max()) <= 1.2**2 + 1e-5 < float(wide.min())


def test_export_matches_pytorch_and_manifest_describes_the_file(tmp_path: Path) -> None:
    """The exported graph agrees with PyTorch and the manifest names its sha256 and shape."""
    import onnx

    net = UNet(widths=(8, 16, 24, 32, 48)).eval()
    diff = export_onnx(net, tmp_path / FILE, SIZE)
    assert diff <= 1e-4
    graph = onnx.load(str(tmp_path / FILE))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, SIZE, SIZE]
    write_manifest(tmp_path, size=SIZE, version="0.0.1", training={}, metrics={})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_of(tmp_path / FILE)
    assert [c["name"] for c in manifest["channels"]] == ["spot", "shadow", "lung"]


def test_train_command_runs_from_a_pack_and_resumes(tmp_path: Path) -> None:
    """The whole command as a machine without the data runs it: ``--write-pack``, then
    ``--pack`` on the CPU device for a few seconds (steps, validation, checkpoint, ONNX and
    manifest), then the same command with a larger budget resumes from ``last.pt``."""
    from models.training.train import main
    from tests.model.folders import folder_with_normals

    data = folder_with_normals(tmp_path / "data")
    pack = tmp_path / "pack.npz"
    common = ["--size", str(SIZE), "--cache-dir", str(tmp_path / "cache")]
    assert main(["--data", str(data), *common, "--write-pack", str(pack)]) == 0
    run = [
        *common,
        "--pack",
        str(pack),
        "--device",
        "cpu",
        "--batch",
        "2",
        "--threads",
        "1",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--model-dir",
        str(tmp_path / "model"),
    ]
    assert main([*run, "--minutes", "0.01"]) == 0
    last = tmp_path / "runs" / "main" / "last.pt"
    first = torch.load(last, weights_only=False)["state"]
    assert first["epoch"] >= 1 and first["step"] >= 1
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_of(tmp_path / "model" / FILE)
    assert manifest["input"]["height"] == SIZE
    assert main([*run, "--minutes", "0.03"]) == 0
    second = torch.load(last, weights_only=False)["state"]
    assert second["step"] > first["step"] and second["budget_s"] == pytest.approx(1.8)
    assert "lr_ramp" in second


def test_widths_travel_through_checkpoints_and_fresh_schedule_restarts(tmp_path: Path) -> None:
    """A run with ``--widths`` keeps them in last.pt, best.pt and the compact checkpoint;
    ``--init`` of that checkpoint with ``--fresh-schedule`` builds the same network and starts
    at epoch 0; ``--export-best`` writes the ONNX model and a manifest naming the widths.
    Without ``--model-dir`` a run exports into its own folder, never the shipped models/."""
    from models.training.train import main
    from tests.model.folders import folder_with_normals

    data = folder_with_normals(tmp_path / "data")
    pack = tmp_path / "pack.npz"
    common = ["--size", str(SIZE), "--cache-dir", str(tmp_path / "cache")]
    assert main(["--data", str(data), *common, "--write-pack", str(pack)]) == 0
    runs = ["--runs-dir", str(tmp_path / "runs")]
    run = [*common, "--pack", str(pack), "--device", "cpu", "--batch", "2", "--threads", "1"]
    run += [*runs, "--minutes", "0.01"]
    widths = "6,12,18"
    with pytest.raises(SystemExit):
        main([*run, "--scale-range", "1.5,0.7"])
    # no --model-dir: the run's own export folder
    assert main([*run, "--widths", widths, "--scale-range", "0.7,1.5"]) == 0
    exported = tmp_path / "runs" / "main" / "export"
    assert (
        sha256_of(exported / FILE) == json.loads((exported / "manifest.json").read_text())["sha256"]
    )
    best = torch.load(tmp_path / "runs" / "main" / "best.pt", weights_only=False)
    assert best["widths"] == [6, 12, 18] and best["data"]["counts"]["train"] > 0
    record = json.loads((exported / "manifest.json").read_text())["training"]
    assert record["scale_range"] == [0.7, 1.5]

    compact = tmp_path / "compact.pt"
    assert main([*runs, "--write-checkpoint", str(compact)]) == 0
    assert torch.load(compact, weights_only=False)["widths"] == [6, 12, 18]
    fresh = [*run, "--run", "ft", "--init", str(compact), "--fresh-schedule"]
    assert main([*fresh, "--model-dir", str(tmp_path / "m2")]) == 0
    state = torch.load(tmp_path / "runs" / "ft" / "last.pt", weights_only=False)["state"]
    assert state["history"][0]["epoch"] == 1 and state["init"]["from"] == str(compact)

    assert main([*runs, "--run", "ft", "--export-best", "--model-dir", str(tmp_path / "m3")]) == 0
    manifest = json.loads((tmp_path / "m3" / "manifest.json").read_text())
    assert manifest["training"]["widths"] == [6, 12, 18]
    assert manifest["training"]["scale_range"] == [0.85, 1.2]  # the default
    assert manifest["training"]["initialised_from"]["from"] == str(compact)
    assert manifest["sha256"] == sha256_of(tmp_path / "m3" / FILE)


def test_a_failed_export_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ONNX parity failure on one epoch is reported and the run goes on: best.pt is
    saved, no ONNX file is written, and ``--export-best`` can retry later."""
    from models.training import train
    from tests.model.folders import folder_with_normals

    def parity_fails(*args: object, **kwargs: object) -> float:
        raise RuntimeError("ONNX output differs from PyTorch by 1.0e+00")

    monkeypatch.setattr(train, "export_onnx", parity_fails)
    data = folder_with_normals(tmp_path / "data")
    run = ["--data", str(data), "--size", str(SIZE), "--cache-dir", str(tmp_path / "cache")]
    run += ["--device", "cpu", "--batch", "2", "--threads", "1", "--minutes", "0.01"]
    run += ["--runs-dir", str(tmp_path / "runs"), "--model-dir", str(tmp_path / "model")]
    assert train.main(run) == 0
    assert (tmp_path / "runs" / "main" / "best.pt").exists()
    assert not (tmp_path / "model" / FILE).exists()
