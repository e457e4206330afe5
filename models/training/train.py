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
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from models.training import augment
from models.training.dataset import FINDING_CHANNELS, packed, read_pack, write_pack
from models.training.export import FILE, export_onnx, write_manifest
from models.training.loop import run_epochs, torch_device, write_best
from models.training.net import WIDTHS, UNet, parameter_count
from models.training.shared_data import CXR_LESIONS

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = CXR_LESIONS
SOURCE_WEIGHT = {"covid-seg": 2.0}
SPOT_SHARE = 0.2  # 0.35 in the v3 run taught the spot channel to fire on normals
POS_WEIGHT = 2.0
LUNG_WEIGHT = 0.5
WARMUP_STEPS = 50
VERSION = "3.0.0"


def loss_terms(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, has_lung: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Weighted BCE + soft Dice per finding channel; masked BCE + Dice for the lung channel."""
    nf = len(FINDING_CHANNELS)
    terms: dict[str, torch.Tensor] = {}
    f, t = logits[:, :nf], target[:, :nf]
    w = weight * (1.0 + (POS_WEIGHT - 1.0) * t)
    terms["bce"] = F.binary_cross_entropy_with_logits(f, t, weight=w, reduction="sum") / w.sum()
    p = torch.sigmoid(f)
    for c, name in enumerate(FINDING_CHANNELS):
        wc, pc, tc = weight[:, c], p[:, c], t[:, c]
        inter = (wc * pc * tc).sum()
        terms[f"dice_{name}"] = 1 - (2 * inter + 1) / ((wc * pc).sum() + (wc * tc).sum() + 1)
    if bool(has_lung.any()):
        lz, lt = logits[has_lung, nf], target[has_lung, nf]
        lp = torch.sigmoid(lz)
        dice = 1 - (2 * (lp * lt).sum() + 1) / (lp.sum() + lt.sum() + 1)
        terms["lung"] = LUNG_WEIGHT * (F.binary_cross_entropy_with_logits(lz, lt) + dice)
    return terms


def train_step(
    net: UNet,
    optimiser: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    g: torch.Generator,
    augment_batch: bool = True,
    scale_range: tuple[float, float] = augment.SCALE,
) -> float:
    """One optimisation step on a uint8 batch (images N×H×W, targets, weights, has_lung),
    augmented with the isotropic scale drawn from ``scale_range``."""
    images = batch["images"]
    if augment_batch:
        images = torch.from_numpy(augment.jpeg(images.numpy(), g))
    image = images.float().unsqueeze(1) / 255.0
    target = batch["targets"].float() / 255.0
    weight = batch["weights"].float() / 255.0
    if augment_batch:
        image, target, weight = augment.geometry(image, target, weight, g, scale_range=scale_range)
        image = augment.intensity(image, g)
    device = next(net.parameters()).device
    image, target, weight = image.to(device), target.to(device), weight.to(device)
    net.train()
    logits = net(_normalise(image))
    loss = sum(loss_terms(logits, target, weight, batch["has_lung"].to(device)).values())
    assert isinstance(loss, torch.Tensor)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.item())


def _normalise(image: torch.Tensor) -> torch.Tensor:
    from models.training.net import normalise

    return normalise(image)


def _batch(arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    idx = np.sort(idx)
    return {
        "images": torch.from_numpy(arrays["images"][idx]),
        "targets": torch.from_numpy(arrays["targets"][idx]),
        "weights": torch.from_numpy(arrays["weights"][idx]),
        "has_lung": torch.from_numpy(arrays["has_lung"][idx]),
    }


@torch.no_grad()
def validate(net: UNet, arrays: dict[str, np.ndarray], batch_size: int) -> dict[str, float]:
    """Mean loss terms on the validation arrays (no augmentation) and image-level AUROC."""
    net.eval()
    device = next(net.parameters()).device
    sums: dict[str, float] = {}
    scores, labels = [], []
    n = len(arrays["images"])
    for start in range(0, n, batch_size):
        b = {
            k: v.to(device)
            for k, v in _batch(arrays, np.arange(start, min(n, start + batch_size))).items()
        }
        image = b["images"].float().unsqueeze(1) / 255.0
        logits = net(_normalise(image))
        terms = loss_terms(
            logits, b["targets"].float() / 255, b["weights"].float() / 255, b["has_lung"]
        )
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(image)
        probs = torch.sigmoid(logits[:, : len(FINDING_CHANNELS)])
        scores += probs.amax(dim=(1, 2, 3)).tolist()
        labels += (b["targets"][:, : len(FINDING_CHANNELS)].amax(dim=(1, 2, 3)) > 127).tolist()
    out = {k: v / n for k, v in sums.items()}
    out["loss"] = sum(v for k, v in out.items())
    out["auroc"] = auroc(np.array(scores), np.array(labels, dtype=bool))
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney), ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def sample_weights(
    sources: npt.NDArray[np.str_], has_spot: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float64]:
    """Draw probabilities per training image: by ``SOURCE_WEIGHT``; images with a spot scaled
    to ``SPOT_SHARE`` of the mass; JSRT's normals to the mass of JSRT's nodules (so that within
    JSRT the film's look says nothing)."""
    w = np.array([SOURCE_WEIGHT.get(str(s), 1.0) for s in sources], dtype=np.float64)
    if has_spot.any() and (~has_spot).any():
        spot, rest = w[has_spot].sum(), w[~has_spot].sum()
        w[has_spot] *= SPOT_SHARE / (1 - SPOT_SHARE) * rest / spot
    jsrt = np.array([str(s) == "jsrt" for s in sources])
    if (jsrt & has_spot).any() and (jsrt & ~has_spot).any():
        w[jsrt & ~has_spot] *= w[jsrt & has_spot].sum() / w[jsrt & ~has_spot].sum()
    return w / w.sum()


def _cosine(elapsed: float, budget: float) -> float:
    frac = min(1.0, elapsed / budget)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))


def _lr(
    base: float, step: int, elapsed: float, budget: float, ramp: dict[str, float] | None = None
) -> float:
    """Warmup, then a cosine over the whole budget (floor 2 % of ``base``). When a resumed
    run extends the budget, ``ramp`` (``step``, ``factor``: where the old schedule stood)
    eases the factor linearly over ``WARMUP_STEPS`` from where it was to the cosine of the
    extended budget, so the rest of the run follows the schedule it would have had had the
    larger budget been set from the start, without a jump in the learning rate."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    target = _cosine(elapsed, budget)
    if ramp is not None and step - ramp["step"] < WARMUP_STEPS:
        t = max(0.0, (step - ramp["step"] + 1) / WARMUP_STEPS)
        target = ramp["factor"] + (target - ramp["factor"]) * t
    return base * warm * target


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


def _widths(text: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in text.split(","))
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be two or more positive ints: {text}")
    return widths


def _scale_range(text: str) -> tuple[float, float]:
    """``LO,HI`` (also as a checkpoint records it, ``(LO, HI)``), 0 < LO <= HI."""
    try:
        lo, hi = (float(v) for v in text.strip("() ").split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"scale range must be LO,HI: {text}") from exc
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"scale range must have 0 < LO <= HI: {text}")
    return lo, hi


def _checkpoint_widths(ckpt: dict[str, Any] | None) -> tuple[int, ...] | None:
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
        "scale_range": list(_scale_range(run_args.get("scale_range", str(augment.SCALE)))),
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    parser.add_argument(
        "--pack",
        type=Path,
        default=None,
        help="train from a --write-pack file instead of --data (a machine without the data)",
    )
    parser.add_argument("--run", default="main")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "models" / "training" / "runs")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "models" / "training" / "cache")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where the best model's ONNX file + manifest go (default: runs/<run>/export; "
        "the shipped models/ only when asked for)",
    )
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
        type=_scale_range,
        default=augment.SCALE,
        metavar="LO,HI",
        help="the augmentation's isotropic scale range (default 0.85,1.2; a resumed run "
        "takes the command's)",
    )
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
    args = parser.parse_args(argv)
    run_dir = args.runs_dir / args.run
    if args.model_dir is None:
        args.model_dir = run_dir / "export"
    if args.write_checkpoint is not None:
        write_compact_checkpoint(run_dir / "last.pt", args.write_checkpoint)
        return 0
    if args.export_best:
        best = torch.load(run_dir / "best.pt", weights_only=False, map_location="cpu")
        net = UNet(widths=tuple(best["widths"]))
        net.load_state_dict(best["model"])
        export_model(net, args.model_dir, best)
        print(f"exported epoch {best['state']['epoch']} to {args.model_dir}", flush=True)
        return 0
    if args.write_pack is not None:
        out = write_pack(args.data.resolve(), args.size, args.cache_dir, args.write_pack)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)
        return 0

    device = torch_device(args.device, args.threads, args.seed)
    if args.pack is not None:
        splits, digest, size, counts = read_pack(args.pack)
        if size != args.size:
            raise SystemExit(f"{args.pack} holds {size}² images, not --size {args.size}")
        train, val = splits["train"], splits["val"]
    else:
        paths, digest, counts = packed(args.data.resolve(), args.size, args.cache_dir)
        train = dict(np.load(paths["train"]))
        val = dict(np.load(paths["val"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "last.pt"
    resume = torch.load(last, weights_only=False, map_location=device) if last.exists() else None
    init = None
    if resume is None and args.init is not None:
        init = torch.load(args.init, weights_only=False, map_location=device)
    widths = _checkpoint_widths(resume or init) or args.widths or WIDTHS

    net = UNet(widths=widths).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "elapsed_s": 0.0,
        "best": math.inf,
        "history": [],
    }
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimiser.load_state_dict(resume["optimiser"])
        state = resume["state"]
        previous_budget = float(state.get("budget_s", float(resume["args"]["minutes"]) * 60))
        if args.minutes * 60 != previous_budget and state["elapsed_s"] < args.minutes * 60:
            state["lr_ramp"] = {
                "step": state["step"],
                "factor": _cosine(state["elapsed_s"], previous_budget),
            }
        print(
            f"resumed {last} at epoch {state['epoch']}, {state['elapsed_s'] / 60:.1f} min"
            f" (budget {previous_budget / 60:.0f} -> {args.minutes:.0f} min)",
            flush=True,
        )
    elif init is not None:
        net.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in init["model"].items()}
        )
        if args.fresh_schedule:
            state["init"] = {"from": str(args.init), "epoch": init["state"]["epoch"]}
            print(f"initialised weights from {args.init}, new schedule", flush=True)
        else:
            state = init["state"]
            # A fresh optimiser has no moment estimates: warm the learning rate up again.
            state["lr_ramp"] = {"step": state["step"], "factor": 0.0}
            print(
                f"initialised from {args.init} at epoch {state['epoch']}, "
                f"{state['elapsed_s'] / 60:.1f} min (fresh optimiser)",
                flush=True,
            )
    print(
        f"params {parameter_count(net)} size {args.size} train {counts['train']} "
        f"val {counts['val']} digest {digest} device {device}",
        flush=True,
    )

    budget = args.minutes * 60
    state["budget_s"] = budget
    spot = FINDING_CHANNELS.index("spot")
    source_w = sample_weights(train["sources"], train["targets"][:, spot].max(axis=(1, 2)) > 127)

    def after_epoch(metrics: dict[str, float], improved: bool) -> None:
        ckpt = {
            "model": net.state_dict(),
            "optimiser": optimiser.state_dict(),
            "state": state,
            "widths": list(widths),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        torch.save(ckpt, run_dir / "last.tmp.pt")
        (run_dir / "last.tmp.pt").replace(last)
        if not improved:
            return
        best = {
            "model": net.state_dict(),
            "state": state,
            "widths": list(widths),
            "data": {"digest": digest, "counts": counts},
            "args": ckpt["args"],
            "metrics": metrics,
        }
        write_best(best, run_dir, lambda: export_model(net, args.model_dir, best), args.model_dir)

    run_epochs(
        state,
        budget_s=budget,
        rows=np.arange(len(train["images"])),
        weights=source_w,
        batch=args.batch,
        seed=args.seed,
        optimiser=optimiser,
        lr=lambda st: _lr(args.lr, st["step"], st["elapsed_s"], budget, st.get("lr_ramp")),
        step=lambda idx, g: train_step(
            net, optimiser, _batch(train, idx), g, scale_range=args.scale_range
        ),
        validate=lambda: validate(net, val, args.batch),
        after_epoch=after_epoch,
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
