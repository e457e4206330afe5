"""Real processes for the benchmark and the fault suite: ``shadowspot serve``, DCMTK
``storescp`` and ``storescu``, each on 127.0.0.1, started and stopped by the caller.

``NodeProcess`` writes a TOML configuration, runs ``shadowspot serve`` with port 0 and reads
the bound port back from its ``node_started`` log line; its stderr (JSON lines) is kept in a
file for later inspection. ``StoreSCP`` runs DCMTK's ``storescp`` writing every received
object to a folder.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.memory import peak_rss_bytes
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
SHADOWSPOT = Path(sys.executable).with_name("shadowspot")
NODE_AE = "SHADOWSPOT"


class ProcessError(RuntimeError):
    """A benchmark process did not start or answered unexpectedly."""


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise ProcessError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def toml(sections: dict[str, Any]) -> str:
    """A small TOML writer: ``{"node": {...}, "callers": [{...}, ...]}``."""
    lines: list[str] = []
    for name, body in sections.items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
            lines.append("")
    return "\n".join(lines)


@dataclass(kw_only=True)
class NodeProcess:
    """One ``shadowspot serve`` process on a private storage folder."""

    workdir: Path
    """Working directory of the process; storage is ``workdir/var`` unless configured."""
    node: dict[str, Any] = field(default_factory=dict)
    callers: Sequence[dict[str, Any]] = ()
    destinations: Sequence[dict[str, Any]] = ()
    export: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables of the process (e.g. its own ``TMPDIR``)."""
    address_space_limit: int | None = None
    """If set, RLIMIT_AS of the process in bytes (a safety net for tests of memory bombs)."""
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    _log_offset: int = 0

    @property
    def storage(self) -> Path:
        return Path(self.node.get("storage", self.workdir / "var"))

    @property
    def config_path(self) -> Path:
        return self.workdir / "shadowspot.toml"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "serve.stderr"

    def write_config(self) -> None:
        node = {
            "ae_title": NODE_AE,
            "host": "127.0.0.1",
            "port": 0,
            "storage": str(self.storage),
            "min_free_mb": 50.0,
            **self.node,
        }
        sections: dict[str, Any] = {
            "node": node,
            "http": {"enabled": False},
            "logging": {"format": "json", "level": "info", "file": False},
            "pipeline": {"model_dir": str(REPO / "models"), **self.pipeline},
        }
        if self.export:
            sections["export"] = self.export
        if self.callers:
            sections["callers"] = list(self.callers)
        if self.destinations:
            sections["destinations"] = list(self.destinations)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml(sections))

    def start(self, timeout: float = 60.0) -> int:
        """Start the node (writing the config the first time); returns its bound port."""
        if not self.config_path.exists():
            self.write_config()
        if self.proc is not None and self.proc.poll() is None:
            raise ProcessError("already running")
        self._log_offset = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [str(SHADOWSPOT), "serve", "--config", str(self.config_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                preexec_fn=self._limit if self.address_space_limit else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == "node_started":
                    self.port = int(event["port"])
                    return self.port
            if self.proc.poll() is not None:
                raise ProcessError(f"serve exited with {self.proc.returncode}: {self.tail()}")
            time.sleep(0.1)
        self.kill()
        raise ProcessError(f"serve did not start within {timeout} s: {self.tail()}")

    def _limit(self) -> None:
        assert self.address_space_limit is not None
        resource.setrlimit(resource.RLIMIT_AS, (self.address_space_limit,) * 2)

    def events(self, *, all_runs: bool = False) -> list[dict[str, Any]]:
        """The JSON log events of the current run (or of every run in this folder)."""
        if not self.stderr_path.exists():
            return []
        with self.stderr_path.open("rb") as f:
            f.seek(0 if all_runs else self._log_offset)
            raw = f.read().decode("utf-8", "replace")
        out: list[dict[str, Any]] = []
        for line in raw.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def tail(self, lines: int = 20) -> str:
        if not self.stderr_path.exists():
            return ""
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessError("not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def peak_rss(self) -> int | None:
        return None if self.proc is None else peak_rss_bytes(self.proc.pid)

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL if it does not end); returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def dcmtk(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ProcessError(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")
    return found


@dataclass(kw_only=True)
class StoreSCP:
    """DCMTK ``storescp`` writing what it receives to ``folder`` (one sub-folder per study)."""

    folder: Path
    ae_title: str = "PACS"
    sort_by_study: bool = True
    extra: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self, port: int | None = None) -> int:
        """Listen on ``port`` (default: a free one); returns the port."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(1 if port else 5):
            self.port = port or free_port()
            args = [dcmtk("storescp"), "+xa", "-aet", self.ae_title, "--output-directory"]
            args += [str(self.folder), *self.extra]
            if self.sort_by_study:
                args += ["--sort-on-study-uid", "st"]
            args.append(str(self.port))
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_listening(self.port, timeout=5.0)
                return self.port
            except ProcessError:
                self.stop()
        raise ProcessError("storescp did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def peak_rss(self) -> int | None:
        return None if self.proc is None else peak_rss_bytes(self.proc.pid)

    def study_files(self, study_instance_uid: str) -> list[Path]:
        folder = self.folder / f"st_{study_instance_uid}"
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def storescu(
    port: int,
    files: Iterable[Path],
    *,
    calling_ae: str = "MODALITY1",
    called_ae: str = NODE_AE,
    timeout: float = 300.0,
) -> float:
    """Send ``files`` over one association with DCMTK ``storescu``; returns the seconds it took.

    Raises ``ProcessError`` when storescu fails (any C-STORE not successful ends it non-zero).
    """
    args = [dcmtk("storescu"), "-xv", "-aet", calling_ae, "-aec", called_ae]
    args += ["127.0.0.1", str(port), *(str(f) for f in files)]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise ProcessError(f"storescu exited {done.returncode}: {done.stderr.decode()[-800:]}")
    return elapsed
