"""The ensemble's ONNX graph: every member's nodes on the one input and the weighted sums of
their outputs (``build_graph``), its weight tensors (``weight_tensors``, ``set_weights``), its
check against the members run one by one (``parity``), and a member's own graph taken back
out of it (``member_model``). Needs ``onnx``, imported where it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.training.ensemble_spec import (
    BOXES,
    Member,
    box_keys,
    finding_names,
    per_channel_boxes,
)

if TYPE_CHECKING:
    import onnx


@dataclass(slots=True)
class _Merged:
    """The members' graphs side by side, their names prefixed ``m{k}/``, on one input."""

    template: onnx.ModelProto  # the first member's model: its input, outputs and IR version
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    value_info: list[onnx.ValueInfoProto] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)


def _merge(members: Sequence[Member], input_name: str) -> _Merged:
    import onnx
    from onnx import compose

    merged: _Merged | None = None
    for k, member in enumerate(members):
        model = onnx.load(str(member.folder / member.file))
        if merged is None:
            merged = _Merged(template=model)
        for op in model.opset_import:
            merged.opsets[op.domain] = max(merged.opsets.get(op.domain, 0), op.version)
        prefixed = compose.add_prefix(model, f"m{k}/")
        graph = prefixed.graph
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == f"m{k}/{input_name}":
                    node.input[i] = input_name
        merged.nodes.extend(graph.node)
        merged.initializers.extend(graph.initializer)
        merged.value_info.extend(graph.value_info)
    assert merged is not None
    return merged


def _mix(
    merged: _Merged,
    tensors: dict[str, npt.NDArray[np.float32]],
    members: int,
    key: str,
    output: str,
    source: str,
) -> None:
    """``output`` = Σ_k (weights ``ensemble/{key}/w{k}``) · member k's ``source``."""
    from onnx import helper, numpy_helper

    terms = []
    for k in range(members):
        wname = f"ensemble/{key}/w{k}"
        merged.initializers.append(numpy_helper.from_array(tensors[wname], wname))
        terms.append(f"ensemble/{key}/term{k}")
        merged.nodes.append(helper.make_node("Mul", [f"m{k}/{source}", wname], [terms[-1]]))
    merged.nodes.append(helper.make_node("Sum", terms, [output]))


def build_graph(members: Sequence[Member], weights: dict[str, list[float]]) -> onnx.ModelProto:
    """One graph: every member's nodes (names prefixed ``m{k}/``) on the shared input, and
    the weighted sums of their outputs under the members' output names."""
    import onnx
    from onnx import helper

    first = members[0].manifest
    prob_name = first["output"]["name"]
    box_name = first["box_output"]["name"]
    merged = _merge(members, first["input"]["name"])
    tensors = weight_tensors(weights, members[0].channels, len(members), first)
    _mix(merged, tensors, len(members), prob_name, prob_name, prob_name)
    outputs = {o.name: o for o in merged.template.graph.output}
    box_output = outputs[box_name]
    if per_channel_boxes(weights):
        parts = [f"{box_name}.{f}" for f in members[0].findings]
        for part in parts:
            _mix(merged, tensors, len(members), part, f"ensemble/{part}", box_name)
        merged.nodes.append(
            helper.make_node("Concat", [f"ensemble/{p}" for p in parts], [box_name], axis=1)
        )
        box_output = with_planes(box_output, 4 * len(parts))
    else:
        _mix(merged, tensors, len(members), box_name, box_name, box_name)
    graph = helper.make_graph(
        merged.nodes,
        "shadowspot-ensemble",
        [merged.template.graph.input[0]],
        [outputs[prob_name], box_output],
        initializer=merged.initializers,
        value_info=merged.value_info,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(merged.opsets.items())],
        producer_name="shadowspot models.training.ensemble",
    )
    model.ir_version = merged.template.ir_version
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

    def run(file: Path) -> list[npt.NDArray[np.float64]]:
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


def weight_tensors(
    weights: dict[str, list[float]], channels: Sequence[str], members: int, manifest: dict[str, Any]
) -> dict[str, npt.NDArray[np.float32]]:
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


def set_weights(file: Path, tensors: dict[str, npt.NDArray[np.float32]]) -> None:
    """Replace the weight tensors of the ensemble graph in ``file``, in place."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(file))
    for init in model.graph.initializer:
        if init.name in tensors:
            init.CopyFrom(numpy_helper.from_array(tensors[init.name], init.name))
    onnx.save(model, str(file))


def with_planes(value: onnx.ValueInfoProto, planes: int) -> onnx.ValueInfoProto:
    """A copy of the output ``value``'s type with ``planes`` channels (dimension 1)."""
    import onnx

    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    dim = copy.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = planes
    return copy


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    import onnx

    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy


def _member_nodes(graph: onnx.GraphProto, prefix: str) -> list[onnx.NodeProto]:
    """The nodes of the member whose names start with ``prefix``, under their own names."""
    from onnx import helper

    def own(name: str) -> str:
        return name[len(prefix) :] if name.startswith(prefix) else name

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
    return nodes


def member_model(file: Path, index: int, manifest: dict[str, Any]) -> onnx.ModelProto:
    """Member ``index`` of the ensemble graph in ``file`` (described by ``manifest``): its
    nodes and weights out of the one graph, under their own names, with both outputs."""
    import onnx
    from onnx import helper

    prefix = f"m{index}/"
    graph = onnx.load(str(file)).graph
    initializers = []
    for init in graph.initializer:
        if init.name.startswith(prefix):
            renamed = onnx.TensorProto()
            renamed.CopyFrom(init)
            renamed.name = init.name[len(prefix) :]
            initializers.append(renamed)
    outputs = {o.name: o for o in graph.output}
    member_graph = helper.make_graph(
        _member_nodes(graph, prefix),
        f"member-{index}",
        [i for i in graph.input if i.name == manifest["input"]["name"]],
        [
            outputs[manifest["output"]["name"]],
            with_planes(outputs[manifest["box_output"]["name"]], 4),
        ],
        initializer=initializers,
        value_info=[
            _renamed(v, v.name[len(prefix) :])
            for v in graph.value_info
            if v.name.startswith(prefix)
        ],
    )
    source = onnx.load(str(file), load_external_data=False)
    model = helper.make_model(member_graph, opset_imports=list(source.opset_import))
    model.ir_version = source.ir_version
    onnx.checker.check_model(model)
    return model
