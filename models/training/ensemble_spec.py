"""What an ensemble combines and how: its members (model folders with box heads, read and
checked against each other) and its weights (one set per channel and for the boxes, or for the
boxes per finding channel), checked before any graph is built (``ensemble_graph``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOXES = "boxes"


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


def sha256_of(path: Path) -> str:
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
    if sha256_of(folder / file) != want:
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
