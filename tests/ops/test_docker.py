"""The container files: compose wiring, the mounted node config, the Dockerfile's entry point.

No Docker engine runs here, so each piece the image and compose file rely on is checked on
its own: the YAML's services, volumes and ports against the node config and the Orthanc
config; the node config through ``load_config``; the Dockerfile's CMD through the real CLI
parser; the entry point's health check against a real ``/health`` endpoint.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from node import metrics
from node.cli import build_parser
from node.config import Config, HttpConfig, NodeSection, load_config
from node.health import HealthServer

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
STORAGE_IN_IMAGE = "/var/lib/shadowspot"
CONFIG_IN_IMAGE = "/etc/shadowspot/shadowspot.toml"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _orthanc_json() -> dict[str, Any]:
    data = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _docker_config(tmp_path: Path) -> Config:
    """docker/shadowspot.toml as the node loads it, with the storage volume moved to tmp."""
    text = (DOCKER / "shadowspot.toml").read_text(encoding="utf-8")
    assert f'storage = "{STORAGE_IN_IMAGE}"' in text
    path = tmp_path / "shadowspot.toml"
    path.write_text(text.replace(STORAGE_IN_IMAGE, str(tmp_path / "var")), encoding="utf-8")
    return load_config(path)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target → source of a service's short-syntax volumes (":ro" dropped)."""
    found = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        found[target] = source
    return found


def _published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port → (host address, host port) of a service's published ports."""
    found = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        address = parts[0] if len(parts) == 3 else "0.0.0.0"
        found[int(parts[-1])] = (address, int(parts[-2]))
    return found


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_mounted_node_config_loads(tmp_path: Path) -> None:
    """The config compose mounts passes load_config and sends results to the Orthanc service."""
    config = _docker_config(tmp_path)
    assert config.node.port == 11112 and config.node.host == "0.0.0.0"
    pacs = config.destination("PACS")
    orthanc = _orthanc_json()
    assert (pacs.ae_title, pacs.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    assert pacs.host in _compose()["services"]
    assert config.caller(orthanc["DicomAet"]) is not None  # Orthanc forwards images to us
    assert str(config.pipeline.model_dir) == "/opt/shadowspot/models"


def test_compose_wires_node_volumes_and_ports(tmp_path: Path) -> None:
    """The node service mounts its config and storage where the image reads them, and
    publishes the DICOM port to the network but the HTTP endpoint on loopback only."""
    compose = _compose()
    config = _docker_config(tmp_path)
    node = compose["services"]["shadowspot"]
    mounts = _mounts(node)
    assert mounts[CONFIG_IN_IMAGE] == "./shadowspot.toml"
    assert mounts[STORAGE_IN_IMAGE] in compose["volumes"]
    ports = _published(node)
    assert ports[config.node.port] == ("0.0.0.0", config.node.port)
    assert ports[config.http.port][0] == "127.0.0.1"
    assert node["command"][-1] == CONFIG_IN_IMAGE
    assert node["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / node["build"]["context"] / node["build"]["dockerfile"]).is_file()


def test_compose_mount_sources_exist_and_volumes_are_declared() -> None:
    """Every bind mount names a file in docker/, every named volume is declared."""
    compose = _compose()
    for name, service in compose["services"].items():
        for target, source in _mounts(service).items():
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: {source} → {target} missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in compose["services"]


def test_orthanc_registers_the_node_and_viewer_reads_its_dicomweb(tmp_path: Path) -> None:
    """Orthanc knows the node as a modality at its service name and port, mounts its config
    where the image reads it, and the OHIF gateway proxies Orthanc's DICOMweb root."""
    compose = _compose()
    config = _docker_config(tmp_path)
    orthanc = _orthanc_json()
    node = orthanc["DicomModalities"]["shadowspot"]
    assert (node["AET"], node["Host"], node["Port"]) == (
        config.node.ae_title,
        "shadowspot",
        config.node.port,
    )
    mounts = _mounts(compose["services"]["orthanc"])
    assert mounts["/etc/orthanc/orthanc.json"] == "./orthanc/orthanc.json"
    assert mounts[orthanc["LuaScripts"][0]] == "./orthanc/forward.lua"
    assert mounts[orthanc["StorageDirectory"]] in compose["volumes"]
    assert compose["services"]["orthanc"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    root = orthanc["DicomWeb"]["Root"].rstrip("/")
    gateway = (DOCKER / "ohif" / "nginx.conf").read_text(encoding="utf-8")
    http_port = orthanc["HttpPort"]
    assert f"location {root}/ {{\n    proxy_pass http://orthanc:{http_port}{root}/;" in gateway
    assert "proxy_pass http://ohif:80/;" in gateway
    app_config = (DOCKER / "ohif" / "app-config.js").read_text(encoding="utf-8")
    assert f"qidoRoot: '{root}'" in app_config and f"wadoRoot: '{root}'" in app_config
    ohif_mounts = _mounts(compose["services"]["ohif"])
    assert ohif_mounts["/usr/share/nginx/html/app-config.js"] == "./ohif/app-config.js"
    assert _mounts(compose["services"]["viewer"])["/etc/nginx/conf.d/default.conf"] == (
        "./ohif/nginx.conf"
    )


def test_dockerfile_cmd_is_a_valid_shadowspot_invocation() -> None:
    """The image's CMD parses with the real CLI as `serve` on the config the image ships."""
    final = _final_stage()
    cmd = json.loads(next(rest for word, rest in final if word == "CMD"))
    assert cmd[0] == "shadowspot"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "serve"
    assert str(args.config) == CONFIG_IN_IMAGE
    copies = [rest.split() for word, rest in final if word == "COPY"]
    assert ["docker/shadowspot.toml", CONFIG_IN_IMAGE] in copies
    entrypoint = json.loads(next(rest for word, rest in final if word == "ENTRYPOINT"))
    assert ["--chmod=0755", "docker/entrypoint.sh", entrypoint[0]] in copies


def test_dockerfile_runs_as_non_root_with_volumes_healthcheck_and_model() -> None:
    """Non-root user, storage and config as volumes, a HEALTHCHECK, the model inside."""
    final = _final_stage()
    words = dict(final)
    assert words["FROM"].startswith("python:3.11-slim")
    user = words["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert set(json.loads(words["VOLUME"])) == {STORAGE_IN_IMAGE, "/etc/shadowspot"}
    assert "healthcheck" in words["HEALTHCHECK"]
    model_copy = next(rest for word, rest in final if word == "COPY" and "models/" in rest)
    sources = model_copy.split()[:-1]
    assert sources == ["models/manifest.json", "models/*.onnx"]
    manifest_path = REPO / "models" / "manifest.json"
    if manifest_path.is_file():  # the model ships in the repository once trained
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        assert manifest["file"].endswith(".onnx")
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            for source in (s for s in rest.split()[:-1] if not s.startswith("--")):
                assert f"!{source}" in ignore or f"!{source}/**" in ignore, source


def _run_healthcheck(config_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SHADOWSPOT_CONFIG": str(config_path),
    }
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), "healthcheck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.network
def test_entrypoint_healthcheck_follows_health_endpoint(tmp_path: Path) -> None:
    """The HEALTHCHECK command exits 0 while /health is 200 and 1 once it is 503."""
    server = HealthServer(
        Config(
            node=NodeSection(port=0, storage=tmp_path, min_free_mb=0.0),
            http=HttpConfig(host="127.0.0.1", port=0),
        )
    ).start()
    config_path = tmp_path / "shadowspot.toml"
    config_path.write_text(
        f'[node]\nstorage = "{tmp_path}"\nport = 11112\n'
        f'[http]\nhost = "0.0.0.0"\nport = {server.address[1]}\n',
        encoding="utf-8",
    )
    try:
        metrics.set_model_loaded("shadowspot-lesion-unet", "1.0.0")
        healthy = _run_healthcheck(config_path)
        metrics.STATUS.set_model(None)
        metrics.MODEL_LOADED.set(0)
        unhealthy = _run_healthcheck(config_path)
    finally:
        metrics.STATUS.set_model(None)
        metrics.MODEL_LOADED.set(0)
        server.shutdown()
    assert healthy.returncode == 0, healthy.stderr
    assert unhealthy.returncode == 1
    assert re.search(r"unhealthy: HTTP Error 503", unhealthy.stderr)
