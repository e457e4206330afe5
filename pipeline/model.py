"""The lesion model (S300's "trained fully convolutional encoder–decoder") and its manifest.

``load_model`` reads ``<model_dir>/manifest.json`` (contract in docs/architecture.md), checks
the ONNX file's sha256 and the graph's input/output names and shapes against it, opens one
onnxruntime session with the configured intra-op threads and runs it once on a blank image
to prove the output shape. Anything missing or mismatched is a ``ModelError`` at start-up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pipeline.errors import ModelError
from pipeline.manifest import (
    MANIFEST,
    Manifest,
    parse_manifest,
)

FloatArray = npt.NDArray[np.float32]


class LesionModel:
    """A loaded, verified model: ``predict`` maps (N, H, W) [0, 1] images to (N, C, H, W)."""

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        box_session: ort.InferenceSession | None = None,
    ) -> None:
        self.manifest = manifest
        self._session = session
        self._box_session = box_session
        batch = session.get_inputs()[0].shape[0]
        self._max_batch = batch if isinstance(batch, int) else None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def predict(self, images: FloatArray) -> FloatArray:
        """Run the model on a batch of working-size images (N, H, W) in [0, 1]: the
        probabilities (N, C, H, W)."""
        return self.predict_with_boxes(images, boxes=False)[0]

    def predict_with_boxes(
        self, images: FloatArray, *, boxes: bool = True
    ) -> tuple[FloatArray, FloatArray | None]:
        """The probabilities (N, C, H, W) and, when the model has a box head and ``boxes`` is
        set, its box distances (N, 4·K, H, W: ``Manifest.box_planes``); else None."""
        if images.ndim != 3 or images.shape[1:] != self.manifest.working_shape:
            raise ModelError(
                f"model input must be (N, {self.manifest.height}, {self.manifest.width}), "
                f"got {images.shape}"
            )
        names = [self.manifest.output_name]
        session = self._session
        if boxes and self.manifest.box_output_name is not None:
            names.append(self.manifest.box_output_name)
            session = self._box_session or self._session
        step = self._max_batch or images.shape[0]
        parts = [
            self._run(session, images[i : i + step], names) for i in range(0, images.shape[0], step)
        ]
        outs = [np.concatenate([p[k] for p in parts], axis=0) for k in range(len(names))]
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def _run(
        self, session: ort.InferenceSession, batch: FloatArray, names: list[str]
    ) -> list[FloatArray]:
        feed = {self.manifest.input_name: np.ascontiguousarray(batch[:, None], dtype=np.float32)}
        return [np.asarray(o, dtype=np.float32) for o in session.run(names, feed)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_dims(what: str, dims: list[Any], expected: list[int | None]) -> None:
    if len(dims) != len(expected):
        raise ModelError(f"model {what} has rank {len(dims)}, expected {len(expected)}")
    for got, want in zip(dims, expected, strict=True):
        if want is not None and isinstance(got, int) and got != want:
            raise ModelError(f"model {what} shape {dims} does not match the manifest {expected}")


def _open_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped exception classes
        raise ModelError(f"cannot load {path}: {exc}") from exc


def _verified_session(
    model_dir: Path, file: str, sha256: str, threads: int
) -> ort.InferenceSession:
    path = model_dir / file
    if not path.is_file():
        raise ModelError(f"the model file {path} named by the manifest does not exist")
    if _sha256(path) != sha256:
        raise ModelError(f"{path} does not match the manifest's sha256")
    return _open_session(path, threads)


def _check_io(session: ort.InferenceSession, manifest: Manifest, outputs: list[str]) -> None:
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [manifest.input_name]:
        raise ModelError(f"model inputs {[i.name for i in inputs]} ≠ [{manifest.input_name!r}]")
    for name in outputs:
        if name not in [o.name for o in session.get_outputs()]:
            raise ModelError(f"model has no output named {name!r}")
    _check_dims("input", list(inputs[0].shape), [None, 1, manifest.height, manifest.width])


def load_model(model_dir: Path, *, threads: int = 2) -> LesionModel:
    """Load and verify the model described by ``<model_dir>/manifest.json``."""
    manifest_path = model_dir / MANIFEST
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"no model manifest at {manifest_path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{manifest_path} must hold a JSON object")
    manifest = parse_manifest(raw)
    session = _verified_session(model_dir, manifest.file, manifest.sha256, threads)
    wanted = [manifest.output_name]
    box_session = None
    if manifest.box_output_name is not None:
        if manifest.box_file is None:
            wanted.append(manifest.box_output_name)
        else:
            assert manifest.box_sha256 is not None
            box_session = _verified_session(
                model_dir, manifest.box_file, manifest.box_sha256, threads
            )
            _check_io(box_session, manifest, [manifest.output_name, manifest.box_output_name])
    _check_io(session, manifest, wanted)
    model = LesionModel(manifest, session, box_session)
    blank = np.zeros((1, *manifest.working_shape), dtype=np.float32)
    expected = (1, len(manifest.channels), manifest.height, manifest.width)
    probes = [model.predict(blank)]
    with_boxes, box_probe = model.predict_with_boxes(blank)
    probes.append(with_boxes)
    for probe in probes:
        if probe.shape != expected:
            raise ModelError(f"model output shape {probe.shape} ≠ {expected} from the manifest")
    box_expected = (1, manifest.box_planes, manifest.height, manifest.width)
    if box_probe is not None and box_probe.shape != box_expected:
        raise ModelError(f"model box output shape {box_probe.shape} ≠ {box_expected}")
    return model
