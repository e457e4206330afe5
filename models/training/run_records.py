"""What a training run keeps and records, for ``train`` and ``train_boxes``: where runs and
packed arrays live, the compact checkpoint (float16 weights and the run state: small enough
to commit), the widths a checkpoint was trained with, and the manifest's account of the data
and the run that reached a best checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from models.training import augment
from models.training.net import WIDTHS

REPO = Path(__file__).resolve().parents[2]
RUNS_DIR = REPO / "models" / "training" / "runs"
CACHE_DIR = REPO / "models" / "training" / "cache"


def write_compact_checkpoint(last: Path, out: Path) -> Path:
    """Weights of a checkpoint (``last.pt``, or a box run's ``best.pt``) in float16 plus the
    run state (no optimiser moments): small enough to commit; ``--init`` (``train``) or
    ``--trunk`` (``train_boxes``) starts a run from it. A box run's record of where its
    U-Net came from (``trunk``) and of its head's shape (``head``) is kept."""
    ckpt = torch.load(last, weights_only=False, map_location="cpu")
    weights = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    compact = {
        "model": weights,
        "state": ckpt["state"],
        "widths": ckpt.get("widths", list(WIDTHS)),
        "args": ckpt.get("args", {}),
    }
    for key in ("trunk", "head"):
        if key in ckpt:
            compact[key] = ckpt[key]
    torch.save(compact, out)
    return out


def parse_scale_range(text: str) -> tuple[float, float]:
    """``LO,HI`` (also as a checkpoint records it, ``(LO, HI)``), 0 < LO <= HI."""
    try:
        lo, hi = (float(v) for v in text.strip("() ").split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"scale range must be LO,HI: {text}") from exc
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"scale range must have 0 < LO <= HI: {text}")
    return lo, hi


def checkpoint_widths(ckpt: dict[str, Any] | None) -> tuple[int, ...] | None:
    """The widths a checkpoint was trained with (those before --widths existed: WIDTHS)."""
    if ckpt is None:
        return None
    return tuple(int(w) for w in ckpt.get("widths", WIDTHS))


def data_record(best: dict[str, Any]) -> dict[str, Any]:
    """The manifest's account of the data a best checkpoint trained on."""
    return {
        "data_digest": best["data"]["digest"],
        "images": best["data"]["counts"]["train"],
        "val_images": best["data"]["counts"]["val"],
    }


def run_record(best: dict[str, Any]) -> dict[str, Any]:
    """The manifest's account of the run that reached a best checkpoint."""
    state, run_args = best["state"], best["args"]
    return {
        "epochs": state["epoch"],
        "steps": state["step"],
        "minutes": round(state["elapsed_s"] / 60, 1),
        "seed": int(run_args["seed"]),
        "batch": int(run_args["batch"]),
        "lr": float(run_args["lr"]),
        "scale_range": list(parse_scale_range(run_args.get("scale_range", str(augment.SCALE)))),
    }
