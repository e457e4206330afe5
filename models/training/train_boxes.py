"""Train the learned box head on a frozen U-Net; time-budgeted, resumable, seeded.

    python -m models.training.train_boxes --minutes 45

The U-Net (``--trunk``: by default the shipped model's file, ``models/manifest.json``'s
``file``, read back into PyTorch, float32 as shipped: of an ensemble, its first member's; or a
``train`` run's ``best.pt``, or a box run's checkpoint
whose U-Net is taken) stays frozen in evaluation mode, so its probabilities are exactly those
of the model it came from; only ``models.training.boxhead.BoxHead`` learns: from nothing, or
from another run's head (``--init-head``, same shape: ``--head-width``, ``--head-dilations``).
Each epoch draws as many abnormal training images as there are, with replacement, weighted by
source as in ``train``; they get the same augmentation as in ``train`` and their boxes move
with the geometry. After
every epoch the run validates (loss, and the IoU of the box predicted at each validation
lesion's centre), writes ``runs/<run>/last.pt`` and, when the validation loss improved,
``best.pt`` (U-Net + head) and the ONNX model + manifest in ``--export-dir``. The same command
resumes from ``last.pt``; ``--export-best`` exports ``best.pt`` again and exits.

``--joint`` trains the U-Net and the head together instead: every training image (normals
too) drawn as in ``train``, the U-Net's own loss (``unet_training.loss_terms``) plus the
head's (``--box-loss-weight`` ×), the U-Net at ``--trunk-lr`` (the head at ``--lr``) with its
BatchNorm statistics fixed. The probabilities change with it, so such a model needs its own
operating point. Validation is then the sum of both losses over the validation split (the box
loss over its abnormal images). ``--distill-spot W`` adds W × how far the spot channel has
moved from the starting U-Net's (``spot_drift``), on training and validation images alike:
the boxes and shadows learn while the spots stay as they were. ``--distill-peaks W`` adds W ×
the drift over each image's spot peaks alone (``peak_drift``), which an average over the
whole map lets fade.

This module is the command line: how a run starts, what it writes after each epoch, and its
export. How a run starts (data, networks, optimiser) is in ``box_run``, the steps and
validations in ``box_training``, the teacher terms in ``distill``, where the networks come
from in ``trunk``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.training.box_run import (
    BoxData,
    Networks,
    box_data,
    networks,
    optimiser_for,
    resumed,
)
from models.training.box_training import (
    Rows,
    batch_of,
    has_lung_of,
    joint_step,
    train_step,
    validate,
    validate_joint,
)
from models.training.boxhead import DILATIONS, WIDTH, Detector
from models.training.export import (
    BOX_FILE,
    DEFAULT_OPERATING_POINT,
    FILE,
    export_detector_onnx,
    export_onnx,
    write_manifest,
)
from models.training.loop import run_epochs, torch_device, write_best
from models.training.net import UNet, parameter_count
from models.training.run_records import (
    CACHE_DIR,
    REPO,
    RUNS_DIR,
    data_record,
    run_record,
    write_compact_checkpoint,
)
from models.training.shared_data import CXR_LESIONS
from models.training.trunk import head_shape, shipped_file
from models.training.unet_training import SOURCE_WEIGHT, WARMUP_STEPS, cosine

VERSION = "1.4.0"
JOINT_VERSION = "1.6.0"


def export(detector: Detector, export_dir: Path, best: dict[str, Any], size: int) -> Path:
    """For a best checkpoint, in ``export_dir``: the U-Net alone (``FILE``, probabilities:
    the runs that need no boxes), the U-Net with its head (``BOX_FILE``, both outputs) and the
    manifest naming both."""
    export_onnx(detector.net, export_dir / FILE, size)
    diffs = export_detector_onnx(detector, export_dir / BOX_FILE, size)
    training = {
        **data_record(best),
        "unet": best["trunk"],
        "box_head": {
            **run_record(best),
            "abnormal_images": best["data"]["abnormal_train"],
            "params": parameter_count(detector.boxes),
            "shape": best.get("head") or head_shape(best),
        },
        "params": parameter_count(detector),
        "split_seed_and_share": "by patient, per source, 15 % val, seed 20261125",
    }
    joint = best["args"].get("joint") == "True"
    prefix = "joint_val_" if joint else "box_val_"
    metrics = {f"{prefix}{k}": round(v, 4) for k, v in best["metrics"].items()}
    metrics["onnx_parity_max_abs_diff"] = diffs["probabilities"]
    metrics["onnx_parity_boxes_max_abs_diff_px"] = diffs["boxes"]
    return write_manifest(
        export_dir,
        size=size,
        version=JOINT_VERSION if joint else VERSION,
        training=training,
        metrics=metrics,
        operating_point=_operating_point(export_dir),
        boxes=True,
    )


def _operating_point(export_dir: Path) -> dict[str, Any]:
    """The export's own operating point, else the shipped model's (same U-Net, so the same
    thresholds and extent scale; the box weight is fitted afterwards)."""
    for manifest in (export_dir / "manifest.json", REPO / "models" / "manifest.json"):
        if manifest.exists():
            return dict(json.loads(manifest.read_text()).get("operating_point", {}))
    return dict(DEFAULT_OPERATING_POINT)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=CXR_LESIONS)
    parser.add_argument(
        "--trunk",
        type=Path,
        default=shipped_file(),
        help="the U-Net: an exported ONNX file (default: the shipped model's, exactly; of an "
        "ensemble, its first member's U-Net), a train run's best.pt, or a train_boxes "
        "checkpoint (its U-Net)",
    )
    parser.add_argument("--minutes", type=float, default=45.0)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--run", default="boxes")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--export-dir", type=Path, default=None, help="default: runs/<run>/export")
    parser.add_argument("--export-best", action="store_true", help="export best.pt, exit")


def _add_head_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head-width", type=int, default=WIDTH, help="channels of the body")
    parser.add_argument(
        "--head-dilations",
        default=",".join(str(d) for d in DILATIONS),
        help="one 3×3 convolution per dilation, comma-separated",
    )
    parser.add_argument(
        "--init-head",
        type=Path,
        default=None,
        help="start the head from this train_boxes checkpoint's head (same shape); the "
        "learning rate warms up again and follows a fresh cosine",
    )


def _add_joint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--joint",
        action="store_true",
        help="train the U-Net with the head (its own loss too, every training image)",
    )
    parser.add_argument("--trunk-lr", type=float, default=1e-4, help="the U-Net's lr (--joint)")
    parser.add_argument(
        "--box-loss-weight", type=float, default=1.0, help="the head's loss weight (--joint)"
    )
    parser.add_argument(
        "--distill-spot",
        type=float,
        default=0.0,
        help="weight of the spot channel's drift from the starting U-Net (--joint; 0: none)",
    )
    parser.add_argument(
        "--distill-peaks",
        type=float,
        default=0.0,
        help="weight of the spot channel's drift over its peaks from the starting U-Net's "
        "(--joint; 0: none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    _add_run_options(parser)
    _add_head_options(parser)
    _add_joint_options(parser)
    parser.add_argument(
        "--write-checkpoint",
        type=Path,
        default=None,
        help="write the run's best.pt in float16 to this path (a --trunk to commit), exit",
    )
    return parser


def _exit_step(args: argparse.Namespace, run_dir: Path, export_dir: Path) -> bool:
    """``--write-checkpoint`` or ``--export-best``, where one is given."""
    if args.write_checkpoint is not None:
        write_compact_checkpoint(run_dir / "best.pt", args.write_checkpoint)
        return True
    if args.export_best:
        best = torch.load(run_dir / "best.pt", weights_only=False, map_location="cpu")
        widths = tuple(best["widths"])
        detector = Detector(UNet(widths=widths), widths, **head_shape(best))
        detector.load_state_dict(best["model"])
        export(detector.eval(), export_dir, best, int(best["args"]["size"]))
        print(f"exported epoch {best['state']['epoch']} to {export_dir}", flush=True)
        return True
    return False


def _after_epoch(
    args: argparse.Namespace,
    run_dir: Path,
    nets: Networks,
    optimiser: torch.optim.Optimizer,
    state: dict[str, Any],
    data: BoxData,
) -> Callable[[dict[str, float], bool], None]:
    """What the run writes after each epoch: ``last.pt``; on a better validation loss
    ``best.pt`` and the export."""
    detector, export_dir = nets.detector, args.export_dir or run_dir / "export"
    run_args = {k: str(v) for k, v in vars(args).items()}

    def after_epoch(metrics: dict[str, float], improved: bool) -> None:
        ckpt = {
            "model": detector.state_dict(),
            "optimiser": optimiser.state_dict(),
            "state": state,
            "widths": list(nets.widths),
            "head": nets.head,
            "trunk": nets.trunk,
            "args": run_args,
        }
        torch.save(ckpt, run_dir / "last.tmp.pt")
        (run_dir / "last.tmp.pt").replace(run_dir / "last.pt")
        if not improved:
            return
        record: dict[str, Any] = {"digest": data.digest, "counts": data.counts}
        record["abnormal_train"] = len(data.box_rows)
        best = {k: v for k, v in ckpt.items() if k != "optimiser"}
        best.update(data=record, metrics=metrics)
        write_best(best, run_dir, lambda: export(detector, export_dir, best, args.size), export_dir)

    return after_epoch


def _step(
    args: argparse.Namespace, nets: Networks, optimiser: torch.optim.Optimizer, data: BoxData
) -> Callable[[Rows, torch.Generator], float]:
    """One training step on the drawn rows: the head's, or with ``--joint`` both networks'."""
    detector = nets.detector

    def step(idx: Rows, g: torch.Generator) -> float:
        batch = batch_of(data.train, idx, data.boxes)
        if not args.joint:
            return train_step(detector, optimiser, batch, g)
        has_lung = has_lung_of(data.train, idx)
        return joint_step(
            detector,
            optimiser,
            batch,
            has_lung,
            g,
            args.box_loss_weight,
            teacher=nets.teacher,
            distill=nets.distill,
        )

    return step


def _validation(args: argparse.Namespace, nets: Networks, data: BoxData) -> dict[str, float]:
    detector, val, rows, boxes = nets.detector, data.val, data.val_rows, data.boxes
    if args.joint:
        return validate_joint(
            detector, val, rows, boxes, args.box_loss_weight, nets.teacher, nets.distill
        )
    return validate(detector, val, rows, boxes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = args.runs_dir / args.run
    if _exit_step(args, run_dir, args.export_dir or run_dir / "export"):
        return 0
    device = torch_device(args.device, args.threads, args.seed)
    data = box_data(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = resumed(args, run_dir / "last.pt")
    nets = networks(args, resume, run_dir / "last.pt")
    nets.detector.to(device)
    if nets.teacher is not None:
        nets.teacher.to(device)
    optimiser = optimiser_for(args, nets.detector)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "elapsed_s": 0.0, "best": math.inf}
    state["history"] = []
    if resume is not None:
        optimiser.load_state_dict(resume["optimiser"])
        state = resume["state"]
        print(f"resumed {run_dir / 'last.pt'} at epoch {state['epoch']}", flush=True)
    print(
        f"box head params {parameter_count(nets.detector.boxes)} on U-Net {nets.trunk} "
        f"{'joint, ' if args.joint else ''}train {len(data.train_rows)} "
        f"(abnormal {len(data.box_rows)}) abnormal val {len(data.val_rows)} device {device}",
        flush=True,
    )
    budget = args.minutes * 60
    sources = data.train["sources"]
    source_w = np.array([SOURCE_WEIGHT.get(str(sources[i]), 1.0) for i in data.train_rows])
    source_w /= source_w.sum()
    run_epochs(
        state,
        budget_s=budget,
        rows=data.train_rows,
        weights=source_w,
        batch=args.batch,
        seed=args.seed,
        optimiser=optimiser,
        lr=lambda st: (
            args.lr * min(1.0, (st["step"] + 1) / WARMUP_STEPS) * cosine(st["elapsed_s"], budget)
        ),
        step=_step(args, nets, optimiser, data),
        validate=lambda: _validation(args, nets, data),
        after_epoch=_after_epoch(args, run_dir, nets, optimiser, state, data),
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
