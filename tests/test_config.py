"""The configuration file: one validated object, every mistake reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Config, load_config
from node.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shadowspot.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_is_valid() -> None:
    """The config file we ship loads without problems and matches the embedded defaults."""
    config = load_config(REPO / "config" / "shadowspot.toml")
    assert config.node == Config().node


def test_issue_schema_example_loads(tmp_path: Path) -> None:
    """The schema from the node issue, verbatim, builds the typed object."""
    path = _write(
        tmp_path,
        f"""
[node]
ae_title = "SHADOWSPOT"
host = "0.0.0.0"
port = 11112
storage = "{tmp_path / "var"}"
study_quiet_seconds = 2.0
[[callers]]
ae_title = "MODALITY1"
host = "127.0.0.1"
send_results_to = "PACS"
[[destinations]]
name = "PACS"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
""",
    )
    config = load_config(path)
    assert config.callers[0].send_results_to == "PACS"
    assert config.destination("PACS").port == 4242
    assert config.node.study_quiet_seconds == 2.0


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Unknown keys, bad port, duplicate AE title, dangling destination: all in one error."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = _write(
        tmp_path,
        f"""
[node]
port = 99999
ae_titel = "TYPO"
storage = "{blocker / "var"}"
[[callers]]
ae_title = "A"
send_results_to = "NOWHERE"
[[callers]]
ae_title = "A"
[surprise]
x = 1
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    keys = {p.key for p in info.value.problems}
    assert {
        "node.port",
        "node.ae_titel",
        "node.storage",
        "callers[0].send_results_to",
        "callers[1].ae_title",
        "surprise",
    } <= keys
    assert all(p.file == str(path) for p in info.value.problems)


def test_wrong_types_name_the_key(tmp_path: Path) -> None:
    """A string where a number belongs is reported against that key, with the bad value."""
    path = _write(tmp_path, '[node]\nstudy_quiet_seconds = "soon"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.key == "node.study_quiet_seconds"
    assert "'soon'" in problem.reason


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    """Unreadable files are configuration errors, not tracebacks."""
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[node\n"))


def test_database_section_is_validated(tmp_path: Path) -> None:
    """``[database]``: empty url means SQLite under the storage folder, lease 60 s; a URL of
    another scheme, a lease under 3 s and an unknown key are each reported by key."""
    assert (Config().database.url_or_default, Config().database.lease_seconds) == (None, 60.0)
    good = load_config(
        _write(
            tmp_path,
            f'[node]\nstorage = "{tmp_path / "var"}"\n'
            '[database]\nurl = "postgresql://shadowspot@db:5432/shadowspot"\n'
            "lease_seconds = 30\n",
        )
    )
    assert good.database.url_or_default == "postgresql://shadowspot@db:5432/shadowspot"
    assert good.database.lease_seconds == 30.0
    path = _write(
        tmp_path,
        f'[node]\nstorage = "{tmp_path / "var"}"\n'
        '[database]\nurl = "mysql://db/x"\nlease_seconds = 1\nleases = 3\n',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    keys = {p.key for p in caught.value.problems}
    assert keys == {"database.url", "database.lease_seconds", "database.leases"}
