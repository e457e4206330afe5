"""Read ``cxr-lesions`` folders, split them by patient and pack training arrays.

Targets (working size H×W, one plane per output channel):

* ``spot`` (nodule, mass) and ``shadow`` (tuberculosis, consolidation, ground-glass), by
  ``labels.GROUP_OF_LABEL``: where the data has a lesion mask, the mask; where it only has a
  box, the ellipse inscribed in the box. Pixels inside a box but outside its ellipse get loss
  weight ``BOX_EDGE_WEIGHT`` (box noise: the lesion may or may not fill the corners). Normal
  studies are all-negative. The loose kinds (``labels.WEAK_SHADOW``: infiltration,
  pneumonia, lung opacity) are ignored by the shadow channel (weight 0 over their box); every
  other label (effusion, atelectasis, …) is ignored by both channels. An image whose
  ``unboxed`` labels say it may hold unmarked spots (or shadows) gives that channel weight 0
  outside its marked lesions: an unmarked lesion is not a negative.
* ``lung``: the lung-field mask, only for images that have one (``has_lung``); the loss of
  that channel is masked to those images.

Splits (``split_by_patient``), by patient and per source: the **locked test split** is the
20 % of each source's patients listed in ``test-patients.json`` (drawn once by
``draw_test_patients``, seeded, committed); it is never packed, never trained on, never used
for a fit or a choice. Of the other patients, 15 % per source are validation, the rest train.

The packed cache (``models/training/cache/<digest>-<size>.npz``) holds uint8 planes.
``write_pack`` folds both splits into one compressed file small enough to travel to a machine
that has no copy of the data (the GPU machine: 64 MiB per run); ``read_pack`` unfolds it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from models.training.labels import GROUP_OF_LABEL, GROUPS, WEAK_SHADOW, unboxed_groups
from models.training.preprocess import prepare

BOX_EDGE_WEIGHT = 0.25
VAL_SHARE = 0.15
SPLIT_SEED = 20261125
TEST_SHARE = 0.20
TEST_SEED = 20261202
TEST_PATIENTS = Path(__file__).with_name("test-patients.json")
TARGETS_VERSION = 3  # bump when targets() changes: the pack cache is keyed by it

# label -> channel name; labels absent here are ignored regions (see labels.py).
LABEL_CHANNEL = GROUP_OF_LABEL
FINDING_CHANNELS = GROUPS
CHANNELS = (*FINDING_CHANNELS, "lung")
Arrays = dict[str, npt.NDArray[np.generic]]
"""A split's packed arrays by name (``SPLIT_ARRAYS`` and ``images``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Lesion:
    label: str
    box: tuple[float, float, float, float]
    mask: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    id: str
    source: str
    patient: str
    width: int
    height: int
    lungs: str | None
    findings: tuple[Lesion, ...]
    unboxed: tuple[str, ...] = ()

    @property
    def normal(self) -> bool:
        return not self.findings


def read_records(data_dir: Path) -> list[Record]:
    """Parse ``annotations.jsonl`` of one ``cxr-lesions`` folder."""
    records = []
    for line in (data_dir / "annotations.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        raw = json.loads(line)
        lesions = tuple(
            Lesion(label=f["label"], box=tuple(f["box"]), mask=f.get("mask"))
            for f in raw["findings"]
        )
        records.append(
            Record(
                id=raw["id"],
                source=raw["source"],
                patient=raw["patient"],
                width=int(raw["width"]),
                height=int(raw["height"]),
                lungs=raw.get("lungs"),
                findings=lesions,
                unboxed=tuple(raw.get("unboxed", ())),
            )
        )
    return records


def draw_test_patients(
    records: list[Record], seed: int = TEST_SEED, share: float = TEST_SHARE
) -> dict[str, list[str]]:
    """``share`` of each source's patients (at least one), seeded: the locked test split as
    ``test-patients.json`` holds it. A patient seen in several sources is drawn (or not) in
    the first of them by name, and belongs to the same split in every source."""
    drawn: dict[str, list[str]] = {}
    seen: set[str] = set()
    for source in sorted({r.source for r in records}):
        patients = sorted({r.patient for r in records if r.source == source} - seen)
        seen.update(patients)
        random.Random(f"{seed}:{source}").shuffle(patients)
        drawn[source] = sorted(patients[: max(1, round(len(patients) * share))])
    return drawn


def locked_test_patients(records: list[Record], path: Path = TEST_PATIENTS) -> set[str]:
    """The test patients: ``path``'s list for every source it names; a source it does not
    name (a synthetic folder in the tests) is drawn by ``draw_test_patients``."""
    listed: dict[str, list[str]] = json.loads(path.read_text())["patients"] if path.exists() else {}
    drawn = draw_test_patients([r for r in records if r.source not in listed])
    return {p for patients in (*listed.values(), *drawn.values()) for p in patients}


def split_by_patient(records: list[Record], seed: int = SPLIT_SEED) -> dict[str, list[Record]]:
    """train/val/test by patient: test = the locked test patients; of the others,
    ~``VAL_SHARE`` of each source's patients in val (at least one), the rest train."""
    test = locked_test_patients(records)
    val: set[str] = set()
    for source in sorted({r.source for r in records}):
        patients = sorted({r.patient for r in records if r.source == source} - test - val)
        random.Random(f"{seed}:{source}").shuffle(patients)
        val.update(patients[: max(1, round(len(patients) * VAL_SHARE))] if patients else [])
    return {
        "train": [r for r in records if r.patient not in test and r.patient not in val],
        "val": [r for r in records if r.patient in val],
        "test": [r for r in records if r.patient in test],
    }


def data_digest(data_dir: Path, records: Iterable[Record]) -> str:
    """sha256 over the annotations and every image file, in id order."""
    h = hashlib.sha256((data_dir / "annotations.jsonl").read_bytes())
    for r in sorted(records, key=lambda r: r.id):
        h.update((data_dir / "images" / f"{r.id}.png").read_bytes())
    return "sha256:" + h.hexdigest()


def load_grey(path: Path) -> npt.NDArray[np.uint8]:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def _mask_plane(path: Path, height: int, width: int) -> npt.NDArray[np.float32]:
    with Image.open(path) as im:
        m = im.convert("L").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(m, dtype=np.float32) / 255.0


def _ellipse(
    box: tuple[float, float, float, float], sx: float, sy: float, height: int, width: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Ellipse inscribed in the scaled box (1 inside) and the box itself (bool)."""
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) / 2, 0.75), max((y1 - y0) / 2, 0.75)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    d = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2
    inside = (d <= 1.0).astype(np.float32)
    inside[min(int(cy), height - 1), min(int(cx), width - 1)] = 1.0
    in_box = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return inside, in_box


def targets(
    record: Record, data_dir: Path, height: int, width: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(target (3,H,W) for spot/shadow/lung, weight (2,H,W) for spot/shadow)."""
    tgt = np.zeros((len(CHANNELS), height, width), dtype=np.float32)
    wgt = np.ones((len(FINDING_CHANNELS), height, width), dtype=np.float32)
    for group in unboxed_groups(record.unboxed):
        wgt[FINDING_CHANNELS.index(group)] = 0.0
    sx, sy = width / record.width, height / record.height
    for lesion in record.findings:
        channel = LABEL_CHANNEL.get(lesion.label)
        if lesion.mask is not None:
            plane = _mask_plane(data_dir / lesion.mask, height, width)
            region = plane > 0.0
        else:
            plane, region = _ellipse(lesion.box, sx, sy, height, width)
            region = region | (plane > 0.0)
        if channel is None:
            ignored = [FINDING_CHANNELS.index("shadow")] if lesion.label in WEAK_SHADOW else None
            for c in ignored if ignored is not None else range(len(FINDING_CHANNELS)):
                wgt[c][region] = 0.0
            continue
        c = FINDING_CHANNELS.index(channel)
        tgt[c] = np.maximum(tgt[c], plane)
        if lesion.mask is None:
            wgt[c][region] = np.minimum(wgt[c][region], BOX_EDGE_WEIGHT)
    for c in range(len(FINDING_CHANNELS)):
        wgt[c][tgt[c] > 0.5] = 1.0
    if record.lungs is not None:
        tgt[-1] = _mask_plane(data_dir / record.lungs, height, width)
    return tgt, wgt


def pack(data_dir: Path, records: list[Record], size: int, out: Path) -> Path:
    """Write one .npz with images, targets, weights and flags for ``records``."""
    n = len(records)
    images = np.zeros((n, size, size), dtype=np.uint8)
    tgts = np.zeros((n, len(CHANNELS), size, size), dtype=np.uint8)
    wgts = np.zeros((n, len(FINDING_CHANNELS), size, size), dtype=np.uint8)
    for i, r in enumerate(records):
        grey = load_grey(data_dir / "images" / f"{r.id}.png")
        images[i] = np.round(prepare(grey, size, size) * 255.0)
        t, w = targets(r, data_dir, size, size)
        tgts[i] = np.round(t * 255.0)
        wgts[i] = np.round(w * 255.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        images=images,
        targets=tgts,
        weights=wgts,
        has_lung=np.array([r.lungs is not None for r in records]),
        sources=np.array([r.source for r in records]),
        ids=np.array([r.id for r in records]),
    )
    return out


def packed(
    data_dir: Path, size: int, cache_dir: Path
) -> tuple[dict[str, Path], str, dict[str, int]]:
    """Pack train and val (once per data digest, targets version and size; the test split
    is never packed); return paths, digest, counts."""
    records = read_records(data_dir)
    digest = data_digest(data_dir, records)
    splits = {k: v for k, v in split_by_patient(records).items() if k != "test"}
    paths = {}
    for name, recs in splits.items():
        path = cache_dir / f"{digest[7:23]}-t{TARGETS_VERSION}-{size}-{name}.npz"
        if not path.exists():
            tmp = path.with_suffix(".tmp.npz")
            pack(data_dir, recs, size, tmp)
            tmp.replace(path)
        paths[name] = path
    counts = {name: len(recs) for name, recs in splits.items()}
    return paths, digest, counts


PACK_JPEG_QUALITY = 95
SPLIT_ARRAYS = ("targets", "weights", "has_lung", "sources", "ids")


def _jpeg(image: npt.NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=PACK_JPEG_QUALITY)
    return buffer.getvalue()


def write_pack(data_dir: Path, size: int, cache_dir: Path, out: Path) -> Path:
    """Both splits at the working size in one compressed ``.npz`` with the data digest:
    images JPEG-coded at quality ``PACK_JPEG_QUALITY`` (about 40 KB each at 384², where
    lossless PNG would not fit in 64 MiB), targets, weights and flags deflated. Training from
    it (``train --pack``) sees the images with JPEG's small losses, nothing else changes."""
    paths, digest, _ = packed(data_dir, size, cache_dir)
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "digest": np.array(digest),
        "size": np.array(size),
    }
    for split, path in paths.items():
        with np.load(path) as cache:
            blobs = [_jpeg(image) for image in cache["images"]]
            arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
            arrays[f"{split}_offsets"] = np.cumsum([0, *map(len, blobs)], dtype=np.int64)
            for key in SPLIT_ARRAYS:
                arrays[f"{split}_{key}"] = cache[key]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, allow_pickle=True, **arrays)
    tmp.replace(out)
    return out


def read_pack(path: Path) -> tuple[dict[str, Arrays], str, int, dict[str, int]]:
    """The splits of a ``write_pack`` file as cache arrays, its digest, size and counts."""
    splits: dict[str, Arrays] = {}
    with np.load(path) as pack_file:
        digest, size = str(pack_file["digest"]), int(pack_file["size"])
        for split in ("train", "val"):
            data, offsets = pack_file[f"{split}_jpeg"], pack_file[f"{split}_offsets"]
            images = np.zeros((len(offsets) - 1, size, size), dtype=np.uint8)
            for i, (a, b) in enumerate(itertools.pairwise(offsets)):
                images[i] = np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())))
            splits[split] = {"images": images}
            for key in SPLIT_ARRAYS:
                splits[split][key] = pack_file[f"{split}_{key}"]
    counts = {split: len(arrays["images"]) for split, arrays in splits.items()}
    return splits, digest, size, counts
