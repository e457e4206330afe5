"""Intake: the same images sent with DCMTK ``storescu`` to ``shadowspot serve`` and to DCMTK's
own ``storescp`` writing to disk, alternately, over one association per run.

Our node answers each C-STORE only after the file is written, fsynced and renamed (and the
folder fsynced) and the instance is committed to the SQLite queue. Whether ``storescp``
fsyncs is not assumed: ``storescp_fsyncs()`` looks for fsync/fdatasync among the dynamic
symbols of the binary and of the DCMTK libraries it links. Analysis is kept out of the
measurement (``study_quiet_seconds`` is set beyond the run, so no job forms while it lasts).

    python -m bench.intake --count 50 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.load import REPO, LoadFile, generate
from bench.procs import NodeProcess, StoreSCP, dcmtk, storescu

_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


def storescp_fsyncs() -> bool:
    """Whether DCMTK's storescp (or a DCMTK library it loads) can call fsync/fdatasync."""
    binary = dcmtk("storescp")
    libs = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    objects = [binary, *re.findall(r"=> (\S*(?:dcm|ofstd|oflog)\S*)", libs)]
    for obj in objects:
        symbols = subprocess.run(["nm", "-D", obj], capture_output=True, text=True, check=False)
        if re.search(r"\b(fsync|fdatasync|sync_file_range)\b", symbols.stdout):
            return True
    return False


def _warm(files: list[LoadFile]) -> None:
    """Read every file once so both receivers get the sender from the page cache."""
    for f in files:
        f.path.read_bytes()


def _ours(files: list[LoadFile], work: Path) -> tuple[float, int | None]:
    node = NodeProcess(workdir=work, node={"study_quiet_seconds": 3600.0})
    port = node.start()
    try:
        seconds = storescu(port, [f.path for f in files])
        spooled = sum(1 for e in node.events() if e.get("event") == "instance_spooled")
        if spooled != len(files):
            raise RuntimeError(f"node spooled {spooled} of {len(files)} instances")
        return seconds, node.peak_rss()
    finally:
        node.stop()


def _dcmtk(files: list[LoadFile], work: Path) -> tuple[float, int | None]:
    scp = StoreSCP(folder=work / "received", sort_by_study=False)
    port = scp.start()
    try:
        seconds = storescu(port, [f.path for f in files], called_ae=scp.ae_title)
        rss = scp.peak_rss()
    finally:
        scp.stop()
    received = sum(1 for p in (work / "received").iterdir() if p.is_file())
    if received != len(files):
        raise RuntimeError(f"storescp wrote {received} of {len(files)} files")
    return seconds, rss


def run(count: int = 50, repeats: int = 3, *, load_dir: Path | None = None) -> dict[str, Any]:
    """Measure both receivers ``repeats`` times (alternating) and report the medians."""
    files = generate(load_dir or REPO / "bench" / "work" / "load", count)
    megabytes = sum(f.bytes for f in files) / 1e6
    _warm(files)
    ours: list[float] = []
    theirs: list[float] = []
    rss: dict[str, int] = {}
    for i in range(repeats):
        for name, fn, out in (("shadowspot", _ours, ours), ("storescp", _dcmtk, theirs)):
            work = Path(tempfile.mkdtemp(prefix=f"intake-{name}-{i}-", dir=REPO / "bench" / "work"))
            try:
                seconds, peak = fn(files, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            out.append(seconds)
            if peak is not None:
                rss[name] = max(rss.get(name, 0), peak)
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    return {
        "images": len(files),
        "megabytes": round(megabytes, 1),
        "jpeg2000_images": sum(1 for f in files if f.transfer_syntax_uid in _J2K),
        "repeats": repeats,
        "shadowspot": {
            "seconds": [round(s, 3) for s in ours],
            "images_per_s": round(len(files) / ours_s, 2),
            "mb_per_s": round(megabytes / ours_s, 1),
            "fsync": True,
        },
        "storescp": {
            "seconds": [round(s, 3) for s in theirs],
            "images_per_s": round(len(files) / theirs_s, 2),
            "mb_per_s": round(megabytes / theirs_s, 1),
            "fsync": storescp_fsyncs(),
        },
        "ratio_ours_to_dcmtk": round(theirs_s / ours_s, 2),
        "peak_rss_bytes": rss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.count, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
