"""The ``shadowspot`` command as users run it: a real ``serve`` process killed with -9 and
restarted, stopped with SIGTERM, ``check-config`` and ``echo``."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import uid

from node.cli import main
from node.dimse import Status
from tests.node.conftest import NODE_AE, StartNode, make_image, needs_dcmtk, scu, shared_file

pytestmark = [pytest.mark.network, pytest.mark.slow]
SHADOWSPOT = Path(sys.executable).parent / "shadowspot"
TERMINAL = {"waiting_for_pipeline", "done", "failed"}


def _write_config(folder: Path, *, quiet: float, model_dir: Path | None = None) -> Path:
    """A config on ``folder``; without ``model_dir`` it names an empty folder (no pipeline)."""
    require = "true" if model_dir else "false"
    model_dir = model_dir or folder / "no-model"
    path = folder / "shadowspot.toml"
    path.write_text(
        f"""
[node]
host = "127.0.0.1"
port = 0
storage = "{folder / "var"}"
study_quiet_seconds = {quiet}
min_free_mb = 1
require_model = {require}
[http]
enabled = false
[logging]
format = "json"
[pipeline]
model_dir = "{model_dir}"
""",
        encoding="utf-8",
    )
    return path


class Server:
    """A ``shadowspot serve`` subprocess; its JSON log lines go to a file we read."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self._offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as sink:
            self.process = subprocess.Popen(
                [str(SHADOWSPOT), "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        self.port = int(self.wait_for("node_started")["port"])

    def events(self) -> list[dict[str, object]]:
        text = self.log.read_bytes()[self._offset :].decode()
        complete = text[: text.rfind("\n") + 1]  # a line being written is read next time
        return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.events():
                if entry["event"] == event:
                    return entry
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}: {self.events()}")
            time.sleep(0.05)
        raise AssertionError(f"no {event} within {timeout} s: {self.events()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.kill()


def _rows(db: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as connection:
        return connection.execute(query).fetchall()


def _refused_within(port: int, *, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # accepted as the listener closed: try again
            pass
        time.sleep(0.05)
    return False


def _send(port: int, *datasets: object) -> list[int]:
    assoc = scu(uid.ComputedRadiographyImageStorage).associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(d).Status) for d in datasets]
    finally:
        assoc.release()


def test_kill_9_and_restart_loses_nothing_and_repeats_nothing(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Instances acknowledged before kill -9 are all on disk and in the queue after restart,
    their studies become exactly one job each, and a second kill/restart re-runs nothing."""
    config, log = _write_config(tmp_path, quiet=2.0), tmp_path / "serve.log"
    db = tmp_path / "var" / "shadowspot.db"
    study_a, study_b = uid.generate_uid(), uid.generate_uid()
    datasets = [make_image(study_uid=s) for s in (study_a, study_a, study_b)]
    servers.append(Server(config, log))
    assert _send(servers[-1].port, *datasets) == [Status.SUCCESS] * 3
    servers[-1].kill()  # within the quiet period: no job formed yet
    assert _rows(db, "SELECT COUNT(*) FROM jobs") == [(0,)]
    received = {str(d.SOPInstanceUID) for d in datasets}
    assert {r[0] for r in _rows(db, "SELECT sop_instance_uid FROM instances")} == received
    spooled = {p.stem for p in (tmp_path / "var" / "spool").glob("*/*.dcm")}
    assert spooled == received

    servers.append(Server(config, log))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        states = [r[0] for r in _rows(db, "SELECT state FROM jobs")]
        if len(states) == 2 and set(states) <= TERMINAL:
            break
        time.sleep(0.1)
    jobs = _rows(db, "SELECT id, study_instance_uid, state, attempts FROM jobs ORDER BY id")
    assert sorted(j[1] for j in jobs) == sorted([study_a, study_b])
    assert all(j[2] in TERMINAL and j[3] == 1 for j in jobs), jobs
    per_job = _rows(db, "SELECT job_id, COUNT(*) FROM instances GROUP BY job_id ORDER BY job_id")
    assert sorted(n for _, n in per_job) == [1, 2] and None not in {j for j, _ in per_job}

    servers[-1].kill()
    servers.append(Server(config, log))
    recovered = servers[-1].wait_for("queue_recovered")
    assert recovered["requeued_jobs"] == 0 and recovered["adopted_instances"] == 0
    time.sleep(1.0)  # several worker polls
    assert _rows(db, "SELECT id, study_instance_uid, state, attempts FROM jobs ORDER BY id") == jobs
    assert servers[-1].terminate() == 0


def test_sigterm_finishes_open_associations_then_exits(
    tmp_path: Path, servers: list[Server]
) -> None:
    """After SIGTERM no new association is accepted, a C-STORE on an open one still completes
    durably, and the process exits 0 once it is released."""
    config, log = _write_config(tmp_path, quiet=0.2), tmp_path / "serve.log"
    servers.append(Server(config, log))
    server = servers[-1]
    assoc = scu(uid.ComputedRadiographyImageStorage).associate(
        "127.0.0.1", server.port, ae_title=NODE_AE
    )
    assert assoc.is_established
    server.process.send_signal(signal.SIGTERM)
    server.wait_for("shutdown_requested")
    assert _refused_within(server.port, seconds=10)  # the listening socket closes
    ds = make_image()
    assert assoc.send_c_store(ds).Status == Status.SUCCESS
    assoc.release()
    assert server.process.wait(timeout=20) == 0
    server.wait_for("node_stopped")
    rows = _rows(tmp_path / "var" / "shadowspot.db", "SELECT sop_instance_uid FROM instances")
    assert rows == [(ds.SOPInstanceUID,)]
    assert (tmp_path / "var" / "logs" / "shadowspot.log").is_file()


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    """check-config exits 2 and names file, key and reason of each mistake; 0 for a good file."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[node]\nport = 70000\nae_titel = "X"\n[[callers]]\nae_title = "A"\n'
        '[[callers]]\nae_title = "A"\n',
        encoding="utf-8",
    )
    done = subprocess.run(
        [str(SHADOWSPOT), "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    for expected in ("node.port", "node.ae_titel", "unknown key", "callers[1].ae_title", str(bad)):
        assert expected in done.stderr
    good = _write_config(tmp_path, quiet=1.0, model_dir=Path(__file__).parents[2] / "models")
    done = subprocess.run(
        [str(SHADOWSPOT), "check-config", "--config", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "OK" in done.stdout


def test_echo_command(start_node: StartNode, capsys: pytest.CaptureFixture[str]) -> None:
    """shadowspot echo: 0 and the status on success, 1 when rejected, 2 without a target."""
    node = start_node()
    args = ["echo", "--host", "127.0.0.1", "--port", str(node.port)]
    assert main([*args, "--ae", NODE_AE]) == 0
    assert "SUCCESS (0x0000)" in capsys.readouterr().out
    assert main([*args, "--ae", "NOTUS"]) == 1
    assert "Called AE title not recognised" in capsys.readouterr().out
    assert main(["echo", "--host", "127.0.0.1"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["echo", "--destination", "NOWHERE"]) == 2


def test_received_radiograph_is_analysed_and_published(
    tmp_path: Path, servers: list[Server]
) -> None:
    """End to end with the real model: the CR chest sent by storescu becomes a done job and its
    SEG, SR and presentation state are written under <storage>/results/<study>/."""
    models = Path(__file__).resolve().parents[2] / "models"
    if not (models / "manifest.json").is_file():
        pytest.skip(f"no trained model in {models} (models/manifest.json is absent)")
    source = shared_file("RG1_UNCI.dcm")
    storescu = needs_dcmtk("storescu")
    config = _write_config(tmp_path, quiet=0.2, model_dir=models)
    servers.append(Server(config, tmp_path / "serve.log"))
    assert servers[-1].wait_for("node_started")["pipeline"] == "ready"
    done = subprocess.run(
        [storescu, "-aec", NODE_AE, "127.0.0.1", str(servers[-1].port), str(source)],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    processed = servers[-1].wait_for("study_processed", timeout=120)
    assert processed["analysed"] == 1
    db = tmp_path / "var" / "shadowspot.db"
    assert _rows(db, "SELECT state FROM jobs") == [("done",)]
    assert _rows(db, "SELECT state FROM instances") == [("analysed",)]
    study = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    written = sorted((tmp_path / "var" / "results" / study).glob("*.dcm"))
    modalities = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in written}
    assert {"SEG", "SR", "PR"} <= modalities
    assert servers[-1].terminate() == 0
