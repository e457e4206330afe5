"""Two or more exported models as one ONNX graph whose outputs are their weighted means.

Every member is a model folder (``manifest.json`` + its ONNX files, as ``train`` and
``train_boxes`` export them) with the same input and channels. The ensemble runs each
member's network that has both outputs (``box_output.file``, else ``file``) on the one
input and gives, per channel, ``probabilities = Σ w_k · p_k`` and ``boxes = Σ v_k · b_k``,
each channel's weights and the box weights summing to 1, so that the result is again a
model of the same contract: one file computes both outputs, and the pipeline runs it as it
runs any model (each S300 view then costs one run of every member).

The box weights are one set for every channel (``--weight boxes=…``), or one set per finding
channel (``--weight boxes.spot=… --weight boxes.shadow=…``): the output then holds four
distance planes per finding channel, in the manifest's order (``box_output.channels``), and
each group's findings read their own, so that one group can keep a member's boxes while
another averages them.

    python -m models.training.ensemble --member models --member models/training/runs/joint/export \\
        --weight spot=1,0 --weight shadow=0.5,0.5 --weight lung=1,0 --weight boxes=0.5,0.5 \\
        --out models/training/runs/ensemble --version 1.6.0

The folder written holds the graph (``ENSEMBLE_FILE``) and a manifest: the first member's,
with the file, its digest, the box output in the same file, and an ``ensemble`` section
naming each member (name, version, digest of the file used, training record, operating point
and metrics) and the weights. Before it is
written, the graph is checked against the members run one by one on a random batch.
The operating point is the first member's; fit and choose it again for the ensemble
(``evaluate``). A member comes back out of the one file as a model folder of its own:

    python -m models.training.ensemble --extract 1 --model-dir models --out /tmp/member-1

Needs ``onnx`` (test and train extras), not torch. This module writes the folders and is the
command line; the members and weights are read and checked in ``ensemble_spec``, the graph
is built in ``ensemble_graph``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.training.ensemble_graph import (
    build_graph,
    member_model,
    parity,
    set_weights,
    weight_tensors,
)
from models.training.ensemble_spec import (
    BOXES,
    EnsembleError,
    Member,
    box_keys,
    check_compatible,
    checked_weights,
    finding_names,
    parse_weights,
    per_channel_boxes,
    read_member,
    sha256_of,
)

ENSEMBLE_FILE = "shadowspot-lesion-ensemble.onnx"
PARITY_TOLERANCE = 1e-4  # probabilities; boxes are compared relative to their size
PER_CHANNEL_LAYOUT = (
    "; here four such planes per finding channel, in the order of 'channels': (N, 4·K, H, W)"
)


def _member_record(m: Member) -> dict[str, Any]:
    """What the ensemble's manifest keeps of a member."""
    return {
        "name": m.manifest["name"],
        "version": m.manifest["version"],
        "file": m.file,
        "sha256": sha256_of(m.folder / m.file),
        "training": m.manifest.get("training", {}),
        "operating_point": m.manifest.get("operating_point", {}),
        "metrics": m.manifest.get("metrics", {}),
    }


def _ensemble_manifest(
    members: Sequence[Member],
    weights: dict[str, list[float]],
    path: Path,
    version: str,
    diffs: dict[str, float],
) -> dict[str, Any]:
    """The first member's manifest, for the ensemble's file at ``path``."""
    first = members[0].manifest
    manifest = {k: v for k, v in first.items() if k not in ("metrics",)}
    box = {k: v for k, v in first["box_output"].items() if k not in ("file", "sha256")}
    if per_channel_boxes(weights):
        box.update(
            channels=members[0].findings,
            layout=box.get("layout", "four distance planes") + PER_CHANNEL_LAYOUT,
        )
    manifest.update(
        version=version,
        file=ENSEMBLE_FILE,
        sha256=sha256_of(path),
        box_output=box,
        ensemble={
            "members": [_member_record(m) for m in members],
            "weights": weights,
            "parity": diffs,
            "rule": "per channel, probabilities = sum_k w_k p_k; boxes = sum_k v_k b_k",
            "operating_point": "the first member's, its fits' rules naming the figures they "
            "were fitted on, until a fit is run again on the ensemble; choose the thresholds "
            "again (evaluate --choose-operating-point)",
        },
        metrics={},
    )
    manifest["training"] = shared_training(members)
    return manifest


def write_ensemble(
    members: Sequence[Member], weights: dict[str, list[float]], out: Path, version: str
) -> Path:
    """Write the ensemble's graph and manifest to ``out``; return the manifest's path."""
    import onnx

    check_compatible(members)
    model = build_graph(members, weights)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ENSEMBLE_FILE
    tmp = path.with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    first = members[0].manifest
    diffs = parity(tmp, members, weights, (first["input"]["height"], first["input"]["width"]))
    if diffs[first["output"]["name"]] > PARITY_TOLERANCE or diffs[BOXES] > PARITY_TOLERANCE:
        tmp.unlink()
        raise EnsembleError(f"the ensemble differs from its members: {diffs}")
    tmp.replace(path)
    manifest = _ensemble_manifest(members, weights, path, version, diffs)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out / "manifest.json"


def shared_training(members: Sequence[Member]) -> dict[str, Any]:
    """The ensemble's training record: the entries every member's record has alike (the
    data digest, the split, when they were trained on the same data), and where the rest is."""
    records = [m.manifest.get("training", {}) for m in members]
    shared = {k: v for k, v in records[0].items() if all(r.get(k) == v for r in records[1:])}
    return {**shared, "members": "each member's own record: ensemble.members[].training"}


def reweight(model_dir: Path, changes: dict[str, Sequence[float]]) -> None:
    """Give the ensemble in ``model_dir`` other weights, in place: ``changes`` maps channel
    names and the boxes' names to their new weights (one per member, summing to 1); the
    others keep theirs. The graph's weight tensors, its digest and the manifest's record
    change; its layout does not: in an ensemble with boxes per finding channel, ``boxes``
    sets every channel's box weights alike; one with shared boxes refuses weights per channel."""
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if "ensemble" not in manifest:
        raise EnsembleError(f"{model_dir}: not an ensemble (no 'ensemble' in its manifest)")
    members = len(manifest["ensemble"]["members"])
    channels = [c["name"] for c in manifest["channels"]]
    findings = finding_names(manifest)
    current = manifest["ensemble"]["weights"]
    if per_channel_boxes(current) and BOXES in changes:
        shared = changes[BOXES]
        changes = {k: v for k, v in changes.items() if k != BOXES}
        changes.update({k: shared for k in box_keys(findings)})
    elif not per_channel_boxes(current) and any(k in changes for k in box_keys(findings)):
        raise EnsembleError(
            f"{model_dir}: its boxes are one set for every channel; build the ensemble again "
            "to weigh them per channel"
        )
    weights = checked_weights({**current, **changes}, channels, findings, members)
    file = model_dir / manifest["file"]
    set_weights(file, weight_tensors(weights, channels, members, manifest))
    manifest["sha256"] = sha256_of(file)
    manifest["ensemble"]["weights"] = weights
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def _member_manifest(manifest: dict[str, Any], index: int, out: Path, file: str) -> dict[str, Any]:
    """The ensemble's manifest with member ``index``'s record, for its file ``out / file``."""
    record = manifest["ensemble"]["members"][index]
    member = {k: v for k, v in manifest.items() if k not in ("ensemble", "metrics")}
    box = {k: v for k, v in manifest["box_output"].items() if k != "channels"}
    if "layout" in box:
        box["layout"] = box["layout"].removesuffix(PER_CHANNEL_LAYOUT)
    member.update(
        box_output=box,
        name=record["name"],
        version=record["version"],
        file=file,
        sha256=sha256_of(out / file),
        training={**record.get("training", {}), "extracted_from": manifest["sha256"]},
        operating_point=record.get("operating_point") or manifest["operating_point"],
        metrics=record.get("metrics", {}),
    )
    return member


def extract(model_dir: Path, index: int, out: Path) -> Path:
    """Member ``index`` of the ensemble in ``model_dir``, back as a model folder in ``out``:
    its nodes and weights out of the one graph, under their own names, in one file with both
    outputs, and a manifest that is the ensemble's with the member's name, version, training
    record, operating point and metrics as they were when the ensemble was built (an
    ensemble built without them gives its own operating point: choose it again for the
    member alone). Returns the manifest's path."""
    import onnx

    manifest = json.loads((model_dir / "manifest.json").read_text())
    members = manifest.get("ensemble", {}).get("members")
    if not members:
        raise EnsembleError(f"{model_dir}: not an ensemble (no 'ensemble' in its manifest)")
    if not 0 <= index < len(members):
        raise EnsembleError(f"{model_dir}: no member {index} (it has {len(members)})")
    model = member_model(model_dir / manifest["file"], index, manifest)
    out.mkdir(parents=True, exist_ok=True)
    file = f"member-{index}.onnx"
    onnx.save(model, str(out / file))
    path = out / "manifest.json"
    path.write_text(json.dumps(_member_manifest(manifest, index, out, file), indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.training.ensemble", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--member", type=Path, action="append", default=[])
    parser.add_argument("--weight", action="append", default=[], metavar="NAME=W1,W2,...")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--version", help="the ensemble's version (required to build one)")
    parser.add_argument(
        "--extract",
        type=int,
        metavar="K",
        help="instead: write member K of the ensemble in --model-dir back to --out as a model",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    return parser


def _build(args: argparse.Namespace) -> Path:
    """The ensemble the command asks for, written; its manifest's path."""
    if args.version is None:
        raise EnsembleError("--version is required to build an ensemble")
    if len(args.member) < 2:
        raise EnsembleError("an ensemble needs at least two --member folders")
    members = [read_member(f) for f in args.member]
    check_compatible(members)
    weights = parse_weights(args.weight, members[0].channels, members[0].findings, len(members))
    return write_ensemble(members, weights, args.out, args.version)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.extract is not None:
            path = extract(args.model_dir, args.extract, args.out)
            print(f"wrote {path.parent / json.loads(path.read_text())['file']} and {path}")
            return 0
        path = _build(args)
    except EnsembleError as exc:
        print(f"ensemble: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads(path.read_text())
    size = (args.out / ENSEMBLE_FILE).stat().st_size / 1e6
    print(
        f"wrote {args.out / ENSEMBLE_FILE} ({size:.1f} MB), parity {manifest['ensemble']['parity']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
