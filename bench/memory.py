"""Peak resident memory of the node's processes.

Linux keeps each process's high-water mark of resident memory (``VmHWM`` in
``/proc/<pid>/status``); reading it just before a process is stopped gives its peak over the
whole run, without sampling. ``shadowspot serve`` is one process (SCP, analysis workers and
exporters are threads), so its peak is also the bound for each of its workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGET_BYTES_PER_WORKER = 1_000_000_000


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set size (VmHWM) in bytes, or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def summarise(peaks: dict[str, dict[str, int | None]]) -> dict[str, Any]:
    """Per process, the largest peak seen in any part of the run (``part → process → bytes``)."""
    by_process: dict[str, dict[str, Any]] = {}
    for part, processes in peaks.items():
        for process, value in processes.items():
            if value is None:
                continue
            entry = by_process.setdefault(process, {"peak_mb": 0.0, "during": part})
            mb = round(value / 1e6, 1)
            if mb > entry["peak_mb"]:
                entry.update(peak_mb=mb, during=part)
    shadowspot = [v["peak_mb"] for k, v in by_process.items() if k.startswith("shadowspot")]
    return {
        "processes": by_process,
        "worker_target_mb": TARGET_BYTES_PER_WORKER / 1e6,
        "within_target": bool(shadowspot) and max(shadowspot) * 1e6 <= TARGET_BYTES_PER_WORKER,
    }
