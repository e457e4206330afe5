"""A realistic CR/DX load for the benchmark: chest radiographs as a modality sends them.

Each generated file is one frontal chest study of one image, 2048 columns × 2500 rows, with
12, 14, 15 or 16 bits stored, CR (MONOCHROME1, like the shared RG1 file) or DX For
Presentation (MONOCHROME2), and every ``j2k_every``-th file JPEG 2000 lossless compressed
(pydicom's encoder with pylibjpeg-openjpeg). Type 1 and Type 2 attributes of the patient,
study, series, equipment, image and CR/DX modules are filled with plausible values.

Pixel content comes from the real radiographs in ``../shared/data/cxr-lesions`` (NIH and
COVID images, upsampled and spread over the stored bit depth with detector noise), so the
pipeline does the work it does on real input; without that folder a synthetic chest phantom
(two lung fields, mediastinum, ribs, a few nodules) is used instead.

    python -m bench.load --count 8 --out bench/work/load
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, uid
from pydicom.dataset import FileMetaDataset

from models.training.shared_data import CXR_LESIONS

REPO = Path(__file__).resolve().parents[1]
SHARED_LESIONS = CXR_LESIONS
ROWS, COLUMNS = 2500, 2048
BITS_CYCLE = (12, 14, 15, 16)
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.77"  # pydicom's root, our suffix
VERSION = 1
"""Bumped when the generated content changes, so a cached load is regenerated."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadFile:
    """One generated instance and what the benchmark needs to know about it."""

    path: Path
    study_instance_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    bytes: int


def _source_images() -> list[Path]:
    """Real radiographs to build pixel content from (NIH first: adult chest, large field)."""
    images = SHARED_LESIONS / "images"
    if not images.is_dir():
        return []
    nih = sorted(images.glob("nih-*.png"))
    cov = sorted(images.glob("cov-*.png"))
    return nih[::7] + cov[::5]


def _phantom(rng: np.random.Generator) -> np.ndarray:
    """A synthetic chest: bright body, dark lungs, a mediastinum, ribs, a few round nodules."""
    y, x = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    cy, cx = ROWS * 0.48, COLUMNS * 0.5
    body = np.exp(-(((x - cx) / (COLUMNS * 0.46)) ** 8 + ((y - cy) / (ROWS * 0.55)) ** 8))
    img = 0.15 + 0.6 * body
    for side in (-1, 1):
        lx = cx + side * COLUMNS * 0.2
        lung = ((x - lx) / (COLUMNS * 0.16)) ** 2 + ((y - ROWS * 0.45) / (ROWS * 0.3)) ** 2 < 1
        img = np.where(lung, img - 0.35, img)
    img += 0.08 * (np.sin(y / 38.0 + 0.4 * np.sin(x / 300.0)) > 0.7)
    for _ in range(int(rng.integers(0, 4))):
        ny, nx = rng.uniform(0.3, 0.65) * ROWS, rng.uniform(0.25, 0.75) * COLUMNS
        r = rng.uniform(15, 60)
        img += 0.2 * np.exp(-(((x - nx) ** 2 + (y - ny) ** 2) / (2 * r * r)))
    return np.clip(img, 0, 1)


def _content(index: int, sources: list[Path], rng: np.random.Generator) -> np.ndarray:
    """Float image in [0, 1], ROWS × COLUMNS, brighter = more attenuation (MONOCHROME2)."""
    if not sources:
        return _phantom(rng)
    with Image.open(sources[index % len(sources)]) as png:
        grey = png.convert("L").resize((COLUMNS, ROWS), Image.Resampling.BICUBIC)
    return np.asarray(grey, dtype=np.float32) / 255.0


def _pixels(content: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    top = (1 << bits) - 1
    noisy = content * 0.92 * top + 0.03 * top + rng.normal(0, top * 0.004, content.shape)
    return np.clip(noisy, 0, top).astype(np.uint16)


def _now(index: int) -> dt.datetime:
    return dt.datetime(2026, 3, 2, 8, 0, 0) + dt.timedelta(minutes=7 * index)


def make_dataset(index: int, *, j2k: bool, sources: list[Path], seed: int = 0) -> Dataset:
    """The ``index``-th instance of the load (deterministic for a seed)."""
    rng = np.random.default_rng(seed * 100_003 + index)
    dx = index % 2 == 1
    bits = BITS_CYCLE[index % len(BITS_CYCLE)]
    content = _content(index, sources, rng)
    stored = _pixels(1.0 - content if not dx else content, bits, rng)  # CR: MONOCHROME1
    when = _now(index)
    date, time_ = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")[:10]
    sop_class = (
        uid.DigitalXRayImageStorageForPresentation if dx else uid.ComputedRadiographyImageStorage
    )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time_
    # Patient (Type 2 all present) — invented people.
    ds.PatientName = f"Benchmark^Patient{index:03d}"
    ds.PatientID = f"BENCH{seed:02d}{index:05d}"
    ds.PatientBirthDate = f"19{40 + index % 50:02d}0{1 + index % 9}15"
    ds.PatientSex = "MF"[index % 2]
    # General study.
    ds.StudyInstanceUID = uid.generate_uid()
    ds.StudyDate, ds.StudyTime = date, time_
    ds.AccessionNumber = f"ACC{seed:02d}{index:06d}"
    ds.ReferringPhysicianName = "Referrer^Ruth"
    ds.StudyID = f"{index + 1}"
    ds.StudyDescription = "XR CHEST PA"
    # General series, equipment.
    ds.Modality = "DX" if dx else "CR"
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDate, ds.SeriesTime = date, time_
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientPosition = ""
    ds.Manufacturer = "ShadowSpot Bench Detector Co."
    ds.ManufacturerModelName = "FlatPanel 2500" if dx else "CR Reader 35"
    ds.InstitutionName = "Benchmark General Hospital"
    ds.StationName = f"XR{index % 4 + 1}"
    ds.DeviceSerialNumber = f"SN{index % 4 + 1:04d}"
    ds.SoftwareVersions = "4.2.1"
    # General image, acquisition.
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["P", "L"]
    ds.ContentDate, ds.ContentTime = date, time_
    ds.AcquisitionDate, ds.AcquisitionTime = date, time_
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.KVP = 120 + index % 5
    ds.ExposureTime = 8 + index % 3
    ds.XRayTubeCurrent = 320
    ds.Exposure = 3
    ds.DistanceSourceToDetector = 1800
    ds.DistanceSourceToPatient = 1650
    ds.ImagerPixelSpacing = [0.139, 0.139] if dx else [0.15, 0.15]
    # Image pixel.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2" if dx else "MONOCHROME1"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.RescaleType = "US"
    ds.WindowCenter = (1 << bits) // 2
    ds.WindowWidth = (1 << bits) - 1
    if dx:
        ds.AcquisitionContextSequence = []
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "IDENTITY"
        ds.ImageLaterality = "B"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelSpacing = ds.ImagerPixelSpacing
        ds.PositionerType = "NONE"
        ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
        ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
    ds.PixelData = stored.tobytes()
    if j2k:
        ds.compress(uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.LossyImageCompression = "00"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def generate(out_dir: Path, count: int, *, j2k_every: int = 4, seed: int = 0) -> list[LoadFile]:
    """Write ``count`` instances to ``out_dir`` (reusing the files of an earlier, larger or
    equal, run with the same settings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index_file = out_dir / "index.json"
    key = {"version": VERSION, "j2k_every": j2k_every, "seed": seed}
    if index_file.is_file():
        cached = json.loads(index_file.read_text())
        listed = cached["files"][:count]
        if (
            cached.get("key") == key
            and len(listed) == count
            and all(Path(f["path"]).is_file() for f in listed)
        ):
            return [LoadFile(**{**f, "path": Path(f["path"])}) for f in listed]
    sources = _source_images()
    files: list[LoadFile] = []
    for index in range(count):
        j2k = j2k_every > 0 and index % j2k_every == j2k_every - 1
        ds = make_dataset(index, j2k=j2k, sources=sources, seed=seed)
        path = out_dir / f"img{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(
            LoadFile(
                path=path.resolve(),
                study_instance_uid=str(ds.StudyInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                bytes=path.stat().st_size,
            )
        )
    index_file.write_text(
        json.dumps({"key": key, "files": [{**asdict(f), "path": str(f.path)} for f in files]})
    )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--j2k-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "work" / "load")
    args = parser.parse_args()
    files = generate(args.out, args.count, j2k_every=args.j2k_every, seed=args.seed)
    total = sum(f.bytes for f in files)
    print(f"{len(files)} files, {total / 1e6:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
