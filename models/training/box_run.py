"""How a ``train_boxes`` run starts: its data (the packed splits, every record's boxes, the
rows it draws from and validates on), its networks (a fresh or resumed detector with the
records of its U-Net and head, and a distilling joint run's teacher) and its optimiser.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.training.box_training import Rows, record_boxes
from models.training.boxhead import Detector
from models.training.dataset import Arrays, packed
from models.training.distill import TEACHER_TERMS
from models.training.net import UNet
from models.training.trunk import (
    freeze,
    head_shape,
    load_head,
    load_trunk,
    recorded_path,
    starting_unet,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxData:
    """The packed splits, every record's boxes, and the rows the run draws and validates."""

    train: Arrays
    val: Arrays
    boxes: dict[str, torch.Tensor]
    box_rows: Rows  # the abnormal training images
    val_rows: Rows  # the abnormal validation images
    train_rows: Rows  # what an epoch draws from: every training image (--joint) or box_rows
    digest: str
    counts: dict[str, int]


def box_data(args: argparse.Namespace) -> BoxData:
    """The packed splits at ``--size``, every record's boxes, the rows; too few abnormal
    images for a batch and a validation refuse the run."""
    paths, digest, counts = packed(args.data.resolve(), args.size, args.cache_dir)
    train = dict(np.load(paths["train"]))
    val = dict(np.load(paths["val"]))
    boxes = record_boxes(args.data.resolve(), args.size)
    box_rows = np.array([i for i, x in enumerate(train["ids"]) if len(boxes[str(x)])])
    val_rows = np.array([i for i, x in enumerate(val["ids"]) if len(boxes[str(x)])])
    train_rows = np.arange(len(train["ids"])) if args.joint else box_rows
    if len(box_rows) < args.batch or len(val_rows) == 0:
        raise SystemExit(
            f"{args.data}: {len(box_rows)} abnormal training and {len(val_rows)} validation "
            f"images; the box head needs at least --batch ({args.batch}) and 1"
        )
    return BoxData(
        train=train,
        val=val,
        boxes=boxes,
        box_rows=box_rows,
        val_rows=val_rows,
        train_rows=train_rows,
        digest=digest,
        counts=counts,
    )


def resumed(args: argparse.Namespace, last: Path) -> dict[str, Any] | None:
    """The run's ``last.pt``, where it has one, if the command may resume it."""
    resume = torch.load(last, weights_only=False, map_location="cpu") if last.exists() else None
    if resume is not None and (resume["args"].get("joint") == "True") != args.joint:
        raise SystemExit(
            f"{last}: a {'joint' if args.joint else 'head-only'} command cannot resume this "
            f"run; give --joint exactly as it was given, or another --run"
        )
    return resume


def _new_head(
    args: argparse.Namespace, trunk: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new run's head record and trunk record (a joint run's U-Net learns on: the record
    says from what, and how)."""
    dilations = [int(d) for d in args.head_dilations.split(",")]
    head_record = {"width": args.head_width, "dilations": dilations}
    head_record["init"] = recorded_path(args.init_head)
    if args.joint:
        trunk = {"init": trunk, "trained_with_head": True, "trunk_lr": args.trunk_lr}
        for _, key in TEACHER_TERMS.values():  # --distill-spot, --distill-peaks
            if getattr(args, key) > 0:
                trunk[key] = getattr(args, key)
    return head_record, trunk


@dataclass(frozen=True, slots=True, kw_only=True)
class Networks:
    """A run's detector, the records of its U-Net and head, and a joint run's teacher."""

    detector: Detector
    widths: tuple[int, ...]
    head: dict[str, Any]
    trunk: dict[str, Any]
    teacher: UNet | None
    distill: dict[str, float]


def networks(args: argparse.Namespace, resume: dict[str, Any] | None, last: Path) -> Networks:
    """The detector of a fresh or resumed run (the head's shape and origin are the run's,
    whatever the flags), and the starting U-Net a distilling joint run is held near."""
    net, widths, trunk = load_trunk(args.trunk if resume is None else last)
    if resume is not None:
        head_record = resume.get("head") or {**head_shape(resume), "init": None}
    else:
        head_record, trunk = _new_head(args, trunk)
    detector = Detector(net, widths, **head_shape({"head": head_record}))
    if resume is not None:
        detector.load_state_dict(resume["model"])
        trunk = resume["trunk"]
    elif args.init_head is not None:
        load_head(detector, args.init_head)
    distill = {
        name: float(trunk[key])
        for name, (_, key) in TEACHER_TERMS.items()
        if args.joint and trunk.get(key, 0.0) > 0
    }
    teacher = starting_unet(net, trunk, args.trunk, resume is not None) if distill else None
    return Networks(
        detector=detector,
        widths=widths,
        head=head_record,
        trunk=trunk,
        teacher=teacher,
        distill=distill,
    )


def optimiser_for(args: argparse.Namespace, detector: Detector) -> torch.optim.Optimizer:
    """The head at ``--lr``; with ``--joint`` the U-Net too, at ``--trunk-lr`` (else frozen)."""
    if args.joint:
        groups = [
            {"params": detector.net.parameters(), "scale": args.trunk_lr / args.lr},
            {"params": detector.boxes.parameters(), "scale": 1.0},
        ]
    else:
        freeze(detector.net)
        groups = [{"params": detector.boxes.parameters(), "scale": 1.0}]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-4)
