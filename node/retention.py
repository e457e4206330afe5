"""Clean-up of old spool, quarantine and result files by the ``[retention]`` setting.

- ``spool/`` and ``quarantine/``: files older than ``spool_days`` (by modification time) are
  removed, except spooled instances whose study is still waiting or queued: they are the
  input of work not done yet.
- ``results/<StudyInstanceUID>/``: a study folder whose newest file is older than
  ``results_days`` is removed, except while one of its objects still has a delivery pending
  or being sent (the exporter reads the file).

Days = 0 keeps files for ever. Database rows are kept (they are small, and they let the node
recognise a resent instance and ``shadowspot status`` show history). Run by
``shadowspot cleanup`` and, in ``shadowspot serve``, hourly by ``RetentionThread``.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from node import metrics
from node.config import Config
from node.errors import DatabaseError, NodeError
from node.store import reports

log = structlog.get_logger(__name__)

DAY = 86400.0


@dataclass(slots=True, kw_only=True)
class CleanupReport:
    """What one clean-up removed (or, with ``dry_run``, would remove)."""

    dry_run: bool
    spool_files: list[Path] = field(default_factory=list)
    quarantine_files: list[Path] = field(default_factory=list)
    result_folders: list[Path] = field(default_factory=list)
    kept_in_use: int = 0
    freed_bytes: int = 0


def cleanup(config: Config, *, now: float | None = None, dry_run: bool = False) -> CleanupReport:
    """Remove what ``[retention]`` says is old enough; see the module docstring."""
    now = time.time() if now is None else now
    storage = config.node.storage
    retention = config.retention
    report = CleanupReport(dry_run=dry_run)
    protected_inputs, protected_results = _in_use(config)
    if retention.spool_days > 0:
        cutoff = now - retention.spool_days * DAY
        for old in _old_files(storage / "spool", cutoff):
            if old.resolve() in protected_inputs:
                report.kept_in_use += 1
            else:
                report.freed_bytes += _remove_file(old, dry_run)
                report.spool_files.append(old)
        for old in _old_files(storage / "quarantine", cutoff):
            report.freed_bytes += _remove_file(old, dry_run)
            report.quarantine_files.append(old)
    if retention.results_days > 0:
        cutoff = now - retention.results_days * DAY
        for folder in _study_folders(storage / "results"):
            files = [p for p in folder.rglob("*") if p.is_file()]
            if files and max(p.stat().st_mtime for p in files) >= cutoff:
                continue
            if any(p.resolve() in protected_results for p in files):
                report.kept_in_use += 1
                continue
            report.freed_bytes += sum(p.stat().st_size for p in files)
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
            report.result_folders.append(folder)
    if not dry_run:
        _remove_empty_folders(storage / "spool")
    log.info(
        "cleanup_finished",
        dry_run=dry_run,
        spool_files=len(report.spool_files),
        quarantine_files=len(report.quarantine_files),
        result_folders=len(report.result_folders),
        kept_in_use=report.kept_in_use,
        freed_mb=round(report.freed_bytes / 1e6, 1),
    )
    return report


def _in_use(config: Config) -> tuple[set[Path], set[Path]]:
    """Spool files of unfinished instances, result files of unfinished deliveries; a
    database that cannot be read is an error (we cannot tell what is in use: remove nothing)."""
    url = config.database.url_or_default
    try:
        with reports.reading(url, storage=config.node.storage) as database:
            return (set(), set()) if database is None else reports.paths_in_use(database)
    except DatabaseError as exc:
        raise NodeError(f"cannot read what is in use from the queue database: {exc}") from exc


def _old_files(folder: Path, cutoff: float) -> Iterable[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and ".tmp" not in p.relative_to(folder).parts and p.stat().st_mtime < cutoff
    )


def _study_folders(results: Path) -> Iterable[Path]:
    if not results.is_dir():
        return []
    return sorted(p for p in results.iterdir() if p.is_dir())


def _remove_file(path: Path, dry_run: bool) -> int:
    size = path.stat().st_size
    if not dry_run:
        path.unlink(missing_ok=True)
    return size


def _remove_empty_folders(root: Path) -> None:
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if folder.name != ".tmp" and not any(folder.iterdir()):
            folder.rmdir()


class RetentionThread(threading.Thread):
    """Runs ``cleanup`` every ``interval_seconds`` in ``shadowspot serve`` until ``stop()``."""

    def __init__(self, config: Config, *, interval_seconds: float = 3600.0) -> None:
        super().__init__(name="shadowspot-retention", daemon=True)
        self._config = config
        self._interval = interval_seconds
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                cleanup(self._config)
            except (OSError, NodeError) as exc:  # unreadable file or database: try next time
                metrics.record_error("cleanup_failed")
                log.error("cleanup_failed", error=str(exc))

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)


def run(args: argparse.Namespace, config: Config) -> int:
    """``shadowspot cleanup [--dry-run]``."""
    report = cleanup(config, dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    print(
        f"{verb}: {len(report.spool_files)} spool file(s), "
        f"{len(report.quarantine_files)} quarantined file(s), "
        f"{len(report.result_folders)} result folder(s); "
        f"{report.freed_bytes / 1e6:.1f} MB; kept {report.kept_in_use} still in use"
    )
    if args.verbose:
        for path in [*report.spool_files, *report.quarantine_files, *report.result_folders]:
            print(f"  {path}")
    return 0
