"""Train the lesion U-Net on a ``cxr-lesions`` folder; time-budgeted, resumable, seeded.

    python -m models.training.train --minutes 80

Each epoch draws ``len(train)`` samples with replacement from a generator seeded by (seed,
epoch), weighted (``sample_weights``) so that images with a spot make ``SPOT_SHARE`` of the
draws and JSRT's normals are drawn as often as its nodules (spots are few: without this a
batch of 8 rarely holds one); augmentation re-encodes half the images as JPEG;
the learning rate follows a cosine over the time budget. After every epoch the run validates,
writes ``runs/<run>/last.pt`` and, when the validation loss improved, ``best.pt`` and the
ONNX model + manifest in ``--model-dir`` (default ``runs/<run>/export``: a run never replaces
the shipped ``models/`` unless told to). Running the same command again resumes from
``last.pt``; a larger ``--minutes`` extends the budget. SIGTERM/SIGINT stop after the step.

On a GPU machine without the data (the device machine), the same command trains there:
``--write-pack FILE`` folds the packed data into one file small enough to travel (git-ignored
``models/training/pack/``), ``--pack FILE`` trains from it, and ``--device auto`` (the
default) uses CUDA where torch finds it. Augmentation stays on the CPU; the network, loss
and optimiser run on the device.

This module is the command line: how a run starts (fresh, resumed, initialised), what it
writes after each epoch, and its export. The loss, step, validation, draw weights and
schedule are in ``unet_training``, the checkpoints and records in ``run_records``, the epoch
loop in ``loop``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.training import augment
from models.training.dataset import FINDING_CHANNELS, Arrays, packed, read_pack, write_pack
from models.training.export import FILE, export_onnx, write_manifest
from models.training.loop import run_epochs, torch_device, write_best
from models.training.net import WIDTHS, UNet, parameter_count
from models.training.run_records import (
    CACHE_DIR,
    RUNS_DIR,
    checkpoint_widths,
    data_record,
    parse_scale_range,
    run_record,
    write_compact_checkpoint,
)
from models.training.shared_data import CXR_LESIONS
from models.training.unet_training import (
    batch_of,
    cosine,
    learning_rate,
    sample_weights,
    train_step,
    validate,
)

DEFAULT_DATA = CXR_LESIONS
VERSION = "3.0.0"


def export_model(net: UNet, model_dir: Path, best: dict[str, Any]) -> Path:
    """ONNX + manifest in ``model_dir`` for a best checkpoint (weights, run state, the data
    it trained on, the run's arguments and validation metrics)."""
    state, run_args, metrics = best["state"], best["args"], best["metrics"]
    diff = export_onnx(net, model_dir / FILE, int(run_args["size"]))
    training = {
        **data_record(best),
        **run_record(best),
        "widths": list(best["widths"]),
        "params": parameter_count(net),
        "device": run_args.get("device", "auto"),
        "split_seed_and_share": "by patient, per source: the locked test split "
        "(models/training/test-patients.json, 20 %), then 15 % of the rest val (seed 20261125)",
    }
    if "init" in state:
        training["initialised_from"] = state["init"]
    return write_manifest(
        model_dir,
        size=int(run_args["size"]),
        version=VERSION,
        training=training,
        metrics={
            "val_loss": round(metrics["loss"], 4),
            "val_image_auroc_quick": round(metrics["auroc"], 4),
            "onnx_parity_max_abs_diff": diff,
        },
    )


def _widths(text: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in text.split(","))
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be two or more positive ints: {text}")
    return widths


def _add_schedule_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=80.0)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA where torch finds it, else CPU), cpu, cuda or cuda:N",
    )


def _add_place_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pack",
        type=Path,
        default=None,
        help="train from a --write-pack file instead of --data (a machine without the data)",
    )
    parser.add_argument("--run", default="main")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where the best model's ONNX file + manifest go (default: runs/<run>/export; "
        "the shipped models/ only when asked for)",
    )


def _add_start_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from a compact checkpoint (fresh optimiser) when the run "
        "has no last.pt, e.g. models/training/checkpoint.pt",
    )
    parser.add_argument(
        "--fresh-schedule",
        action="store_true",
        help="with --init: take the weights only and start a new run (epoch 0, a new "
        "schedule over --minutes, a new best)",
    )
    parser.add_argument(
        "--widths",
        type=_widths,
        default=None,
        help="U-Net channel widths per level, e.g. 24,48,96,160,256 (default "
        f"{','.join(map(str, WIDTHS))}; a resumed or --init run keeps its checkpoint's)",
    )
    parser.add_argument(
        "--scale-range",
        type=parse_scale_range,
        default=augment.SCALE,
        metavar="LO,HI",
        help="the augmentation's isotropic scale range (default 0.85,1.2; a resumed run "
        "takes the command's)",
    )


def _add_exit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--export-best",
        action="store_true",
        help="export the run's best.pt to --model-dir (ONNX + manifest), exit",
    )
    parser.add_argument(
        "--write-checkpoint",
        type=Path,
        default=None,
        help="write the run's last.pt as a compact checkpoint to this path, exit",
    )
    parser.add_argument(
        "--write-pack",
        type=Path,
        default=None,
        help="write --data at --size as one compressed file for --pack, exit",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    _add_schedule_options(parser)
    _add_place_options(parser)
    _add_start_options(parser)
    _add_exit_options(parser)
    return parser


def _exit_step(args: argparse.Namespace, run_dir: Path) -> bool:
    """``--write-checkpoint``, ``--export-best`` or ``--write-pack``, where one is given."""
    if args.write_checkpoint is not None:
        write_compact_checkpoint(run_dir / "last.pt", args.write_checkpoint)
        return True
    if args.export_best:
        best = torch.load(run_dir / "best.pt", weights_only=False, map_location="cpu")
        net = UNet(widths=tuple(best["widths"]))
        net.load_state_dict(best["model"])
        export_model(net, args.model_dir, best)
        print(f"exported epoch {best['state']['epoch']} to {args.model_dir}", flush=True)
        return True
    if args.write_pack is not None:
        out = write_pack(args.data.resolve(), args.size, args.cache_dir, args.write_pack)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)
        return True
    return False


def _splits(args: argparse.Namespace) -> tuple[Arrays, Arrays, str, dict[str, int]]:
    """The training and validation arrays (from ``--pack`` or ``--data``), digest, counts."""
    if args.pack is not None:
        splits, digest, size, counts = read_pack(args.pack)
        if size != args.size:
            raise SystemExit(f"{args.pack} holds {size}² images, not --size {args.size}")
        return splits["train"], splits["val"], digest, counts
    paths, digest, counts = packed(args.data.resolve(), args.size, args.cache_dir)
    return dict(np.load(paths["train"])), dict(np.load(paths["val"])), digest, counts


def _resume(state: dict[str, Any], resume: dict[str, Any], last: Path, minutes: float) -> None:
    """A resumed run's state: a larger budget ramps from where the old schedule stood."""
    previous_budget = float(state.get("budget_s", float(resume["args"]["minutes"]) * 60))
    if minutes * 60 != previous_budget and state["elapsed_s"] < minutes * 60:
        state["lr_ramp"] = {
            "step": state["step"],
            "factor": cosine(state["elapsed_s"], previous_budget),
        }
    print(
        f"resumed {last} at epoch {state['epoch']}, {state['elapsed_s'] / 60:.1f} min"
        f" (budget {previous_budget / 60:.0f} -> {minutes:.0f} min)",
        flush=True,
    )


def _initialise(
    net: UNet, init: dict[str, Any], args: argparse.Namespace, state: dict[str, Any]
) -> dict[str, Any]:
    """``--init``'s weights in ``net``; the run's state: a new one (``--fresh-schedule``) or
    the checkpoint's, its learning rate warming up again."""
    net.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in init["model"].items()}
    )
    if args.fresh_schedule:
        state["init"] = {"from": str(args.init), "epoch": init["state"]["epoch"]}
        print(f"initialised weights from {args.init}, new schedule", flush=True)
        return state
    state = init["state"]
    # A fresh optimiser has no moment estimates: warm the learning rate up again.
    state["lr_ramp"] = {"step": state["step"], "factor": 0.0}
    print(
        f"initialised from {args.init} at epoch {state['epoch']}, "
        f"{state['elapsed_s'] / 60:.1f} min (fresh optimiser)",
        flush=True,
    )
    return state


def _start(
    args: argparse.Namespace, last: Path, device: torch.device
) -> tuple[UNet, torch.optim.Optimizer, dict[str, Any]]:
    """The network (its widths: the checkpoint's, else ``--widths``), optimiser and state of
    a fresh, resumed or initialised run."""
    resume = torch.load(last, weights_only=False, map_location=device) if last.exists() else None
    init = None
    if resume is None and args.init is not None:
        init = torch.load(args.init, weights_only=False, map_location=device)
    widths = checkpoint_widths(resume or init) or args.widths or WIDTHS
    net = UNet(widths=widths).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "elapsed_s": 0.0, "best": math.inf}
    state["history"] = []
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimiser.load_state_dict(resume["optimiser"])
        state = resume["state"]
        _resume(state, resume, last, args.minutes)
    elif init is not None:
        state = _initialise(net, init, args, state)
    return net, optimiser, state


def _after_epoch(
    args: argparse.Namespace,
    run_dir: Path,
    net: UNet,
    optimiser: torch.optim.Optimizer,
    state: dict[str, Any],
    data: dict[str, Any],
) -> Callable[[dict[str, float], bool], None]:
    """What the run writes after each epoch: ``last.pt``; on a better validation loss
    ``best.pt`` and the export."""
    widths = list(net.widths)

    def after_epoch(metrics: dict[str, float], improved: bool) -> None:
        ckpt = {
            "model": net.state_dict(),
            "optimiser": optimiser.state_dict(),
            "state": state,
            "widths": widths,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        torch.save(ckpt, run_dir / "last.tmp.pt")
        (run_dir / "last.tmp.pt").replace(run_dir / "last.pt")
        if not improved:
            return
        best = {
            "model": net.state_dict(),
            "state": state,
            "widths": widths,
            "data": data,
            "args": ckpt["args"],
            "metrics": metrics,
        }
        write_best(best, run_dir, lambda: export_model(net, args.model_dir, best), args.model_dir)

    return after_epoch


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = args.runs_dir / args.run
    if args.model_dir is None:
        args.model_dir = run_dir / "export"
    if _exit_step(args, run_dir):
        return 0
    device = torch_device(args.device, args.threads, args.seed)
    train, val, digest, counts = _splits(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    net, optimiser, state = _start(args, run_dir / "last.pt", device)
    print(
        f"params {parameter_count(net)} size {args.size} train {counts['train']} "
        f"val {counts['val']} digest {digest} device {device}",
        flush=True,
    )
    budget = args.minutes * 60
    state["budget_s"] = budget
    spot = FINDING_CHANNELS.index("spot")
    has_spot = np.asarray(train["targets"][:, spot].max(axis=(1, 2)) > 127)
    run_epochs(
        state,
        budget_s=budget,
        rows=np.arange(len(train["images"])),
        weights=sample_weights(train["sources"], has_spot),
        batch=args.batch,
        seed=args.seed,
        optimiser=optimiser,
        lr=lambda st: learning_rate(
            args.lr, st["step"], st["elapsed_s"], budget, st.get("lr_ramp")
        ),
        step=lambda idx, g: train_step(
            net, optimiser, batch_of(train, idx), g, scale_range=args.scale_range
        ),
        validate=lambda: validate(net, val, args.batch),
        after_epoch=_after_epoch(
            args, run_dir, net, optimiser, state, {"digest": digest, "counts": counts}
        ),
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
