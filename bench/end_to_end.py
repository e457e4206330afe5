"""End to end: from the C-STORE of a study to the moment its SEG, SR and presentation state are
stored at a receiving DCMTK ``storescp``.

One ``shadowspot serve`` process with its real pipeline and exporter; callers ``MODALITY1..4``
send their results to a ``storescp`` destination that sorts what it receives by study. Each
study is one frontal chest image of the generated load (2048×2500, 12–16 bit, some JPEG 2000),
sent by DCMTK ``storescu`` on its own association, as a modality does.

A study's latency runs from just before ``storescu`` starts to the last modification time of
the last of its result files in the receiver's folder (storescp writes a file when its C-STORE
completes). Which files to wait for is read from the node's own ``deliveries`` table (SR
always; SEG and GSPS when there are findings). The node's ``study_quiet_seconds`` (the wait
that decides a study is complete) is part of the latency and reported with it.

- one modality: ``studies`` studies sent one at a time (the next once the previous results
  arrived);
- four modalities at once: each sends its share the same way, concurrently.

    python -m bench.end_to_end --studies 20 --quiet 0.5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import REPO, LoadFile, generate
from bench.procs import NodeProcess, StoreSCP, storescu

MODALITIES = ("MODALITY1", "MODALITY2", "MODALITY3", "MODALITY4")


class StudyFailed(RuntimeError):
    """The node did not produce or deliver a study's results in time."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyTiming:
    study_instance_uid: str
    modality: str
    sent_at: float
    stored_at: float
    objects: int

    @property
    def seconds(self) -> float:
        return self.stored_at - self.sent_at


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Watcher:
    """Reads the node's database (read-only) and the receiver's folder for one study."""

    def __init__(self, node: NodeProcess, receiver: StoreSCP) -> None:
        self._db_path = node.storage / "shadowspot.db"
        self._receiver = receiver

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self._db_path}?mode=ro", uri=True, timeout=5.0)
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
        finally:
            db.close()

    def instance_state(self, sop_instance_uid: str) -> str | None:
        rows = self._rows(
            "SELECT state FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        )
        return str(rows[0][0]) if rows else None

    def expected(self, study_instance_uid: str) -> list[str]:
        rows = self._rows(
            "SELECT sop_instance_uid FROM deliveries WHERE study_instance_uid = ?",
            (study_instance_uid,),
        )
        return [str(r[0]) for r in rows]

    def wait(self, load: LoadFile, timeout: float) -> tuple[float, int]:
        """Wait until every result object of ``load``'s study is at the receiver; returns the
        last file's modification time and the number of objects."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.instance_state(load.sop_instance_uid)
            if state in ("failed", "skipped"):
                raise StudyFailed(f"instance {state} by the node")
            expected = self.expected(load.study_instance_uid) if state == "analysed" else []
            if expected:
                by_uid = {
                    p.name.split(".", 1)[1]: p
                    for p in self._receiver.study_files(load.study_instance_uid)
                }
                if all(uid in by_uid for uid in expected):
                    stored = max(by_uid[uid].stat().st_mtime for uid in expected)
                    return stored, len(expected)
            time.sleep(0.01)
        raise StudyFailed(f"results not at the receiver after {timeout} s")


def _send_studies(
    node: NodeProcess,
    watcher: Watcher,
    modality: str,
    studies: Sequence[LoadFile],
    out: list[StudyTiming],
    errors: list[str],
    timeout: float,
) -> None:
    for load in studies:
        sent = time.time()
        try:
            storescu(node.port, [load.path], calling_ae=modality)
            stored, objects = watcher.wait(load, timeout)
        except Exception as exc:  # a benchmark records a failed study and goes on
            errors.append(f"{modality} {load.path.name}: {exc}")
            continue
        out.append(
            StudyTiming(
                study_instance_uid=load.study_instance_uid,
                modality=modality,
                sent_at=sent,
                stored_at=stored,
                objects=objects,
            )
        )


PHASES = (
    ("receive", None, "instance_spooled"),
    ("wait_quiet", "instance_spooled", "job_formed"),
    ("analyse_publish", "job_formed", "study_processed"),
    ("export", "study_processed", None),
)
"""Where a study's time goes, from the node's own log events: C-STORE until spooled (network,
fsync, queue), the quiet period until its job forms, analysis with encoding until the job is
done, and delivery until the receiver has stored the last object."""


def _phases(node: NodeProcess, timings: Sequence[StudyTiming]) -> dict[str, float]:
    """Median seconds of each phase over ``timings`` (from the node's event timestamps)."""
    at: dict[tuple[str, str], float] = {}
    for event in node.events():
        study, name = event.get("study_instance_uid"), event.get("event")
        if study and name and (study, name) not in at:
            stamp = dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
            at[(study, name)] = stamp.timestamp()
    out: dict[str, float] = {}
    for phase, start, end in PHASES:
        values = []
        for t in timings:
            begin = t.sent_at if start is None else at.get((t.study_instance_uid, start))
            finish = t.stored_at if end is None else at.get((t.study_instance_uid, end))
            if begin is not None and finish is not None:
                values.append(finish - begin)
        if values:
            out[phase] = round(statistics.median(values), 3)
    return out


def _scenario(
    node: NodeProcess,
    watcher: Watcher,
    groups: dict[str, Sequence[LoadFile]],
    timeout: float,
) -> dict[str, Any]:
    timings: list[StudyTiming] = []
    errors: list[str] = []
    started = time.time()
    threads = [
        threading.Thread(
            target=_send_studies, args=(node, watcher, m, files, timings, errors, timeout)
        )
        for m, files in groups.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - started
    seconds = [t.seconds for t in timings]
    summary: dict[str, Any] = {
        "modalities": len(groups),
        "studies": len(timings),
        "failed": errors,
        "wall_s": round(wall, 2),
        "studies_per_min": round(len(timings) / wall * 60, 1) if wall > 0 else None,
    }
    if seconds:
        summary |= {
            "median_s": round(statistics.median(seconds), 3),
            "p95_s": round(_percentile(seconds, 0.95), 3),
            "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3),
            "objects_per_study": round(statistics.mean(t.objects for t in timings), 2),
            "phases_median_s": _phases(node, timings),
        }
    return summary


def run(
    studies: int = 20,
    *,
    quiet_seconds: float = 0.5,
    workers: int = 1,
    timeout: float = 120.0,
    load_dir: Path | None = None,
) -> dict[str, Any]:
    """Both scenarios on one node; returns their summaries and the node's peak RSS."""
    per_modality = max(1, -(-studies // len(MODALITIES)))
    total = studies + per_modality * len(MODALITIES)
    files = generate(load_dir or REPO / "bench" / "work" / "load", total)
    single, multi = files[:studies], files[studies : studies + per_modality * len(MODALITIES)]
    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=REPO / "bench" / "work"))
    receiver = StoreSCP(folder=work / "pacs")
    receiver.start()
    node = NodeProcess(
        workdir=work / "node",
        node={"study_quiet_seconds": quiet_seconds, "analysis_workers": workers},
        callers=[{"ae_title": m, "send_results_to": "PACS"} for m in MODALITIES],
        destinations=[
            {
                "name": "PACS",
                "ae_title": receiver.ae_title,
                "host": "127.0.0.1",
                "port": receiver.port,
            }
        ],
        export={"retry_schedule_seconds": [1.0, 2.0, 5.0]},
    )
    try:
        node.start()
        started = next(e for e in node.events() if e.get("event") == "node_started")
        if not started.get("pipeline"):
            return {"error": "shadowspot serve runs without a pipeline (hooks not wired)"}
        watcher = Watcher(node, receiver)
        one = _scenario(node, watcher, {MODALITIES[0]: single}, timeout)
        groups = {m: multi[i :: len(MODALITIES)] for i, m in enumerate(MODALITIES)}
        four = _scenario(node, watcher, groups, timeout)
        return {
            "study_quiet_seconds": quiet_seconds,
            "analysis_workers": workers,
            "pipeline": started.get("pipeline"),
            "one_modality": one,
            "four_modalities": four,
            "peak_rss_bytes": {"shadowspot": node.peak_rss(), "storescp": receiver.peak_rss()},
        }
    finally:
        node.stop()
        receiver.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--quiet", type=float, default=0.5, help="study_quiet_seconds")
    parser.add_argument("--workers", type=int, default=1, help="analysis_workers")
    args = parser.parse_args()
    print(json.dumps(run(args.studies, quiet_seconds=args.quiet, workers=args.workers), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
