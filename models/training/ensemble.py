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

Needs ``onnx`` (test and train extras), not torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ENSEMBLE_FILE = "shadowspot-lesion-ensemble.onnx"
BOXES = "boxes"
PARITY_TOLERANCE = 1e-4  # probabilities; boxes are compared relative to their size
PER_CHANNEL_LAYOUT = (
    "; here four such planes per finding channel, in the order of 'channels': (N, 4·K, H, W)"
)


class EnsembleError(ValueError):
    """The members cannot be combined as asked."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One model folder as the ensemble reads it."""

    folder: Path
    manifest: dict[str, Any]
    file: str  # the member's ONNX file with both outputs

    @property
    def channels(self) -> list[str]:
        return [c["name"] for c in self.manifest["channels"]]

    @property
    def findings(self) -> list[str]:
        return finding_names(self.manifest)


def finding_names(manifest: dict[str, Any]) -> list[str]:
    """The names of a manifest's finding channels, in its order."""
    return [c["name"] for c in manifest["channels"] if c.get("kind") == "finding"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_member(folder: Path) -> Member:
    """A model folder as a member: it has a box head and its file matches its digest."""
    if not (folder / "manifest.json").is_file():
        raise EnsembleError(f"{folder}: no manifest.json (not a model folder)")
    manifest = json.loads((folder / "manifest.json").read_text())
    box = manifest.get("box_output")
    if box is None:
        raise EnsembleError(f"{folder}: the model has no box head (box_output)")
    file = box.get("file", manifest["file"])
    want = box.get("sha256", manifest["sha256"]) if "file" in box else manifest["sha256"]
    if _sha256(folder / file) != want:
        raise EnsembleError(f"{folder / file}: sha256 does not match its manifest")
    return Member(folder=folder, manifest=manifest, file=file)


def check_compatible(members: Sequence[Member]) -> None:
    """Same input (name, size, window), channels and output names, else ``EnsembleError``."""
    first = members[0].manifest
    for m in members[1:]:
        for key in ("input", "output", "channels"):
            if m.manifest[key] != first[key]:
                raise EnsembleError(f"{m.folder}: '{key}' differs from {members[0].folder}'s")
        if m.manifest["box_output"]["name"] != first["box_output"]["name"]:
            raise EnsembleError(f"{m.folder}: the box output's name differs")


def parse_weights(
    specs: Sequence[str], names: Sequence[str], findings: Sequence[str], members: int
) -> dict[str, list[float]]:
    """``name=w1,w2,...`` for every channel name and the boxes (``checked_weights``)."""
    weights: dict[str, list[float]] = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        try:
            weights[name] = [float(v) for v in values.split(",")]
        except ValueError as exc:
            raise EnsembleError(f"--weight {spec}: not a list of numbers") from exc
    return checked_weights(weights, names, findings, members)


def box_keys(findings: Sequence[str]) -> list[str]:
    """The weight names of boxes per finding channel: ``boxes.<channel>``."""
    return [f"{BOXES}.{f}" for f in findings]


def per_channel_boxes(weights: Mapping[str, Any]) -> bool:
    """Whether ``weights`` mix the boxes per finding channel (else one set for all)."""
    return BOXES not in weights


def checked_weights(
    weights: Mapping[str, Sequence[float]],
    names: Sequence[str],
    findings: Sequence[str],
    members: int,
) -> dict[str, list[float]]:
    """The weights of every channel name and of the boxes (``boxes``, or ``boxes.<finding>``
    for every finding channel: not both), one per member, none negative, each set summing
    to 1; else ``EnsembleError``."""
    per_channel = box_keys(findings)
    for name, ws in weights.items():
        if name not in (*names, BOXES, *per_channel):
            raise EnsembleError(f"weights for an unknown output '{name}'")
        if len(ws) != members or any(w < 0 for w in ws) or abs(sum(ws) - 1.0) > 1e-6:
            raise EnsembleError(
                f"weights of {name} {list(ws)}: needs {members} weights, none negative, "
                f"summing to 1"
            )
    given = [k for k in per_channel if k in weights]
    if BOXES in weights and given:
        raise EnsembleError(
            f"weights for {BOXES} and for {', '.join(given)}: give one or the other"
        )
    boxes = [BOXES] if BOXES in weights or not given else per_channel
    missing = [n for n in (*names, *boxes) if n not in weights]
    if missing:
        raise EnsembleError(f"no weights for {', '.join(missing)}")
    return {n: [float(w) for w in weights[n]] for n in (*names, *boxes)}


def build_graph(
    members: Sequence[Member], weights: dict[str, list[float]]
) -> Any:  # onnx.ModelProto
    """One graph: every member's nodes (names prefixed ``m{k}/``) on the shared input, and
    the weighted sums of their outputs under the members' output names."""
    import onnx
    from onnx import compose, helper, numpy_helper

    first = members[0].manifest
    input_name = first["input"]["name"]
    prob_name = first["output"]["name"]
    box_name = first["box_output"]["name"]
    channels = members[0].channels
    nodes: list[Any] = []
    initializers: list[Any] = []
    value_info: list[Any] = []
    opsets: dict[str, int] = {}
    template = None  # the first member's model: its input, outputs and IR version
    for k, member in enumerate(members):
        model = onnx.load(str(member.folder / member.file))
        for op in model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        prefixed = compose.add_prefix(model, f"m{k}/")
        graph = prefixed.graph
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == f"m{k}/{input_name}":
                    node.input[i] = input_name
        nodes.extend(graph.node)
        initializers.extend(graph.initializer)
        value_info.extend(graph.value_info)
        if template is None:
            template = model
    assert template is not None

    tensors = _weight_tensors(weights, channels, len(members), first)

    def mix(key: str, output: str, source: str) -> None:
        """``output`` = Σ_k (weights ``ensemble/{key}/w{k}``) · member k's ``source``."""
        terms = []
        for k in range(len(members)):
            wname = f"ensemble/{key}/w{k}"
            initializers.append(numpy_helper.from_array(tensors[wname], wname))
            terms.append(f"ensemble/{key}/term{k}")
            nodes.append(helper.make_node("Mul", [f"m{k}/{source}", wname], [terms[-1]]))
        nodes.append(helper.make_node("Sum", terms, [output]))

    mix(prob_name, prob_name, prob_name)
    outputs = {o.name: o for o in template.graph.output}
    box_output = outputs[box_name]
    if per_channel_boxes(weights):
        parts = [f"{box_name}.{f}" for f in members[0].findings]
        for part in parts:
            mix(part, f"ensemble/{part}", box_name)
        nodes.append(
            helper.make_node("Concat", [f"ensemble/{p}" for p in parts], [box_name], axis=1)
        )
        box_output = _with_planes(box_output, 4 * len(parts))
    else:
        mix(box_name, box_name, box_name)
    graph = helper.make_graph(
        nodes,
        "shadowspot-ensemble",
        [template.graph.input[0]],
        [outputs[prob_name], box_output],
        initializer=initializers,
        value_info=value_info,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        producer_name="shadowspot models.training.ensemble",
    )
    model.ir_version = template.ir_version
    onnx.checker.check_model(model)
    return model


def parity(
    path: Path, members: Sequence[Member], weights: dict[str, list[float]], size: tuple[int, int]
) -> dict[str, float]:
    """The ensemble file against its members run one by one on a random batch of two: the
    max absolute difference of the probabilities and the max relative one of the boxes."""
    first = members[0].manifest
    names = [first["output"]["name"], first["box_output"]["name"]]
    x = np.random.default_rng(0).random((2, 1, *size), dtype=np.float32)
    feed = {first["input"]["name"]: x}

    def run(file: Path) -> list[np.ndarray]:
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return [np.asarray(o, np.float64) for o in session.run(names, feed)]

    got = run(path)
    parts = [run(m.folder / m.file) for m in members]
    w = np.asarray([[weights[c][k] for c in members[0].channels] for k in range(len(members))])
    probs = sum(w[k].reshape(1, -1, 1, 1) * parts[k][0] for k in range(len(members)))
    keys = box_keys(members[0].findings) if per_channel_boxes(weights) else [BOXES]
    boxes = np.concatenate(
        [sum(weights[key][k] * parts[k][1] for k in range(len(members))) for key in keys], axis=1
    )
    return {
        names[0]: float(np.max(np.abs(got[0] - probs))),
        names[1]: float(np.max(np.abs(got[1] - boxes) / np.maximum(np.abs(boxes), 1.0))),
    }


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
        sha256=_sha256(path),
        box_output=box,
        ensemble={
            "members": [
                {
                    "name": m.manifest["name"],
                    "version": m.manifest["version"],
                    "file": m.file,
                    "sha256": _sha256(m.folder / m.file),
                    "training": m.manifest.get("training", {}),
                    "operating_point": m.manifest.get("operating_point", {}),
                    "metrics": m.manifest.get("metrics", {}),
                }
                for m in members
            ],
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
    import onnx
    from onnx import numpy_helper

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
    model = onnx.load(str(file))
    tensors = _weight_tensors(weights, channels, members, manifest)
    for init in model.graph.initializer:
        if init.name in tensors:
            init.CopyFrom(numpy_helper.from_array(tensors[init.name], init.name))
    onnx.save(model, str(file))
    manifest["sha256"] = _sha256(file)
    manifest["ensemble"]["weights"] = weights
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def _weight_tensors(
    weights: dict[str, list[float]], channels: Sequence[str], members: int, manifest: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The graph's weight tensors by initializer name (``build_graph``'s layout)."""
    prob, box = manifest["output"]["name"], manifest["box_output"]["name"]
    findings = finding_names(manifest)
    out = {}
    for k in range(members):
        per_channel = np.asarray([weights[c][k] for c in channels], np.float32)
        out[f"ensemble/{prob}/w{k}"] = per_channel.reshape(1, -1, 1, 1)
        if per_channel_boxes(weights):
            for f, key in zip(findings, box_keys(findings), strict=True):
                out[f"ensemble/{box}.{f}/w{k}"] = np.asarray(weights[key][k], np.float32)
        else:
            out[f"ensemble/{box}/w{k}"] = np.asarray(weights[BOXES][k], np.float32)
    return out


def _with_planes(value: Any, planes: int) -> Any:
    """A copy of the output ``value``'s type with ``planes`` channels (dimension 1)."""
    import onnx

    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    dim = copy.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = planes
    return copy


def extract(model_dir: Path, index: int, out: Path) -> Path:
    """Member ``index`` of the ensemble in ``model_dir``, back as a model folder in ``out``:
    its nodes and weights out of the one graph, under their own names, in one file with both
    outputs, and a manifest that is the ensemble's with the member's name, version, training
    record, operating point and metrics as they were when the ensemble was built (an
    ensemble built without them gives its own operating point: choose it again for the
    member alone). Returns the manifest's path."""
    import onnx
    from onnx import helper

    manifest = json.loads((model_dir / "manifest.json").read_text())
    members = manifest.get("ensemble", {}).get("members")
    if not members:
        raise EnsembleError(f"{model_dir}: not an ensemble (no 'ensemble' in its manifest)")
    if not 0 <= index < len(members):
        raise EnsembleError(f"{model_dir}: no member {index} (it has {len(members)})")
    prefix = f"m{index}/"
    input_name = manifest["input"]["name"]

    def own(name: str) -> str:
        return name[len(prefix) :] if name.startswith(prefix) else name

    graph = onnx.load(str(model_dir / manifest["file"])).graph
    nodes = []
    for node in graph.node:
        if node.output and all(o.startswith(prefix) for o in node.output):
            copy = helper.make_node(
                node.op_type,
                [own(i) for i in node.input],
                [own(o) for o in node.output],
                name=own(node.name),
                domain=node.domain,
            )
            copy.attribute.extend(node.attribute)
            nodes.append(copy)
    initializers = []
    for init in graph.initializer:
        if init.name.startswith(prefix):
            renamed = onnx.TensorProto()
            renamed.CopyFrom(init)
            renamed.name = own(init.name)
            initializers.append(renamed)
    outputs = {o.name: o for o in graph.output}
    member_graph = helper.make_graph(
        nodes,
        f"member-{index}",
        [i for i in graph.input if i.name == input_name],
        [
            outputs[manifest["output"]["name"]],
            _with_planes(outputs[manifest["box_output"]["name"]], 4),
        ],
        initializer=initializers,
        value_info=[
            _renamed(v, own(v.name)) for v in graph.value_info if v.name.startswith(prefix)
        ],
    )
    source = onnx.load(str(model_dir / manifest["file"]), load_external_data=False)
    model = helper.make_model(member_graph, opset_imports=list(source.opset_import))
    model.ir_version = source.ir_version
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    file = f"member-{index}.onnx"
    onnx.save(model, str(out / file))
    record = members[index]
    member = {k: v for k, v in manifest.items() if k not in ("ensemble", "metrics")}
    box = {k: v for k, v in manifest["box_output"].items() if k != "channels"}
    if "layout" in box:
        box["layout"] = box["layout"].removesuffix(PER_CHANNEL_LAYOUT)
    member.update(
        box_output=box,
        name=record["name"],
        version=record["version"],
        file=file,
        sha256=_sha256(out / file),
        training={**record.get("training", {}), "extracted_from": manifest["sha256"]},
        operating_point=record.get("operating_point") or manifest["operating_point"],
        metrics=record.get("metrics", {}),
    )
    path = out / "manifest.json"
    path.write_text(json.dumps(member, indent=2) + "\n")
    return path


def _renamed(value: Any, name: str) -> Any:
    import onnx

    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.training.ensemble", description=__doc__.split("\n\n")[0]
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
    args = parser.parse_args(argv)
    try:
        if args.extract is not None:
            path = extract(args.model_dir, args.extract, args.out)
            print(f"wrote {path.parent / json.loads(path.read_text())['file']} and {path}")
            return 0
        if args.version is None:
            raise EnsembleError("--version is required to build an ensemble")
        if len(args.member) < 2:
            raise EnsembleError("an ensemble needs at least two --member folders")
        members = [read_member(f) for f in args.member]
        check_compatible(members)
        weights = parse_weights(args.weight, members[0].channels, members[0].findings, len(members))
        path = write_ensemble(members, weights, args.out, args.version)
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
