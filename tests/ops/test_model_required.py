"""The node's own health at start: check-config loads the model as serve would (a relative
model_dir is relative to the config file), and serve refuses to start without one unless
told to queue."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHADOWSPOT = [sys.executable, "-m", "node.cli"]


def _config(folder: Path, model_dir: str, *, require: bool = True) -> Path:
    path = folder / "conf" / "shadowspot.toml"
    path.parent.mkdir(parents=True)
    path.write_text(
        f'[node]\nport = 0\nhost = "127.0.0.1"\nstorage = "{folder / "var"}"\n'
        f"require_model = {'true' if require else 'false'}\n"
        f'[pipeline]\nmodel_dir = "{model_dir}"\n[http]\nenabled = false\n'
        "[logging]\nfile = false\n",
        encoding="utf-8",
    )
    return path


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHADOWSPOT, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_check_config_finds_a_relative_model_dir_from_the_config_folder(tmp_path: Path) -> None:
    shutil.copytree(
        REPO / "models", tmp_path / "conf-models", ignore=shutil.ignore_patterns("training")
    )
    config = _config(tmp_path, "../conf-models")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _run(["check-config", "--config", str(config)], cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"from {config.parent / '../conf-models'}" in done.stdout


def _without_model(tmp_path: Path, command: str) -> subprocess.CompletedProcess[str]:
    config = _config(tmp_path, "no-model")
    return _run([command, "--config", str(config)], cwd=tmp_path)


def test_check_config_fails_when_the_model_cannot_be_loaded(tmp_path: Path) -> None:
    done = _without_model(tmp_path, "check-config")
    assert done.returncode == 2
    assert "pipeline.model_dir" in done.stdout and "no model manifest" in done.stdout
    assert "OK" not in done.stdout


def test_serve_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    done = _without_model(tmp_path, "serve")
    assert done.returncode == 1
    assert "no usable model" in done.stderr and "require_model = false" in done.stderr
    assert "node_started" not in done.stderr


@pytest.mark.network
def test_serve_without_a_model_queues_when_told(tmp_path: Path) -> None:
    config = _config(tmp_path, "no-model", require=False)
    process = subprocess.Popen(
        [*SHADOWSPOT, "serve", "--config", str(config)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "node_started" in line:
                assert "waiting (model not loaded)" in line
                break
        else:
            pytest.fail("serve ended without node_started")
    finally:
        process.terminate()
        process.communicate(timeout=30)
