"""What decoding in the memory-limited decoder process costs per image, against decoding here.

    .venv/bin/python -m bench.decode_overhead [--repeat 30] [FILE ...]

Default input: the shared JPEG 2000 radiograph (../shared/data/dicom/RG1_J2KI.dcm, 1955×1841,
15 bit) and a 64×64 baseline JPEG built in memory (where the fixed cost of a round trip shows).
Each repetition reads the file twice and decodes one copy through a ``DecoderPool`` (its
process already started) and the other in this process, checking that the arrays are equal.
Printed per file: the median wall time of each, and the mean CPU time (this process plus the
decoder process). This is a measurement, not a test; on a loaded machine the wall times
scatter by more than the difference.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from models.training.shared_data import DICOM
from node.decode import DecoderPool, decode


def _small_jpeg() -> bytes:
    """A 64×64 baseline JPEG CR image as a DICOM file."""
    grey = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    frame = io.BytesIO()
    Image.fromarray(grey).save(frame, "JPEG", quality=90)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame.getvalue()])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, data: bytes, repeat: int) -> str:
    """One line: wall medians and CPU means, through the pool and here."""
    with DecoderPool() as pool:
        decode(pydicom.dcmread(io.BytesIO(data)), pool=pool)  # start its process
        (pid,) = pool.pids
        walls: dict[str, list[float]] = {"pool": [], "here": []}
        cpus: dict[str, list[float]] = {"pool": [], "here": []}
        for _ in range(repeat):
            there, here = (pydicom.dcmread(io.BytesIO(data)) for _ in range(2))
            child, cpu, wall = _cpu_seconds(pid), time.process_time(), time.perf_counter()
            a = decode(there, pool=pool).pixels
            walls["pool"].append(time.perf_counter() - wall)
            cpus["pool"].append(time.process_time() - cpu + _cpu_seconds(pid) - child)
            cpu, wall = time.process_time(), time.perf_counter()
            b = decode(here).pixels
            walls["here"].append(time.perf_counter() - wall)
            cpus["here"].append(time.process_time() - cpu)
            assert a.dtype == b.dtype and np.array_equal(a, b)
    wall_ms = {k: statistics.median(v) * 1000 for k, v in walls.items()}
    cpu_ms = {k: statistics.fmean(v) * 1000 for k, v in cpus.items()}
    return (
        f"{name} {a.shape} {a.dtype}, {repeat}×: wall median {wall_ms['pool']:.1f} ms in the "
        f"decoder process / {wall_ms['here']:.1f} ms here; CPU mean {cpu_ms['pool']:.1f} / "
        f"{cpu_ms['here']:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="DICOM files (default: see above)")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    inputs = {p.name: p.read_bytes() for p in args.files}
    if not inputs:
        inputs = {
            "RG1_J2KI.dcm": (DICOM / "RG1_J2KI.dcm").read_bytes(),
            "64×64 JPEG": _small_jpeg(),
        }
    for name, data in inputs.items():
        print(measure(name, data, args.repeat))


if __name__ == "__main__":
    main()
