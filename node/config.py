"""The node's configuration: one TOML file → one frozen, typed, validated ``Config``.

Nothing else in ShadowSpot reads the TOML. ``load_config`` collects *every* problem it finds
(unknown key, wrong type, bad port, duplicate AE title, unreachable storage folder, ...) and
raises one ``ConfigError`` listing them all with file, key and reason, so that
``shadowspot check-config`` can show IT staff all their mistakes at once.

The section dataclasses below are the schema: field names are the TOML keys, annotations are
the accepted types, defaults are the embedded defaults (``shadowspot serve`` with no file runs
on them), and the docstring under each field is its documentation.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from node.errors import ConfigError, ConfigProblem
from pipeline.config import PipelineConfig
from pipeline.schema import Schema

DEFAULT_CONFIG_PATH = Path("config/shadowspot.toml")
# The typed validator the manifest uses too (pipeline/schema.py); ``source`` is the path of
# the file a Config was read from, set by load_config, never a key of the file.
_SCHEMA = Schema(table="a table", root_extras=frozenset({"source"}))
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def _check_ae_title(value: str, what: str) -> None:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{what} must be 1–16 printable characters without '\\', got {value!r}")


def _check_port(value: int, what: str, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ValueError(f"{what} must be between {low} and 65535, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSection:
    """``[node]``: who the node is on the network and where it keeps its data."""

    ae_title: str = "SHADOWSPOT"
    """The called AE title modalities must use."""
    host: str = "0.0.0.0"
    """Address to listen on (0.0.0.0 = every interface)."""
    port: int = 11112
    """TCP port of the Storage SCP (0 = any free port, for tests)."""
    storage: Path = Path("var")
    """Folder for spool, quarantine, queue database, results and logs (relative to the
    working directory unless absolute)."""
    study_quiet_seconds: float = 2.0
    """A study is complete when no instance of it arrived for this long."""
    min_free_mb: float = 500.0
    """Free-space floor of the storage volume: below it, C-STORE answers Out of Resources."""
    max_associations: int = 16
    """Concurrent associations accepted before new ones are rejected (transient)."""
    network_timeout_seconds: float = 60.0
    """ACSE, DIMSE and network timeouts of incoming associations."""
    max_pdu_bytes: int = 65536
    """Largest P-DATA PDU we accept (0 = unlimited)."""
    idle_timeout_seconds: float = 10.0
    """A TCP connection that has not completed its TLS handshake and sent its whole
    A-ASSOCIATE-RQ within this time is closed (like DICOM's ARTIM timer); until then it
    does not count against ``max_associations``."""
    max_associations_per_address: int = 8
    """Concurrent associations accepted from one IP address (the rest rejected, transient)."""
    max_pending_connections: int = 512
    """Connections waiting for their A-ASSOCIATE-RQ at once, over all addresses; past it, and
    past a quarter of it from one address, the longest-silent one is closed."""
    max_store_mb: float = 1024.0
    """Largest C-STORE dataset accepted; a larger one is aborted as it arrives and logged."""
    max_decoded_megapixels: float = 100.0
    """Pixel budget of one image (rows × columns × frames × samples, in millions): a larger
    declared size, in the header or in any compressed frame, is refused before decoding."""
    decode_memory_mb: float = 2048.0
    """Memory a compressed image's decoding may take: it runs in a separate process whose
    address space (RLIMIT_AS) is limited to its start-up size plus this; a decoder that needs
    more is stopped and the instance fails (``DecodeMemoryError``). The default covers a
    16-bit image of ``max_decoded_megapixels`` (JPEG 2000 takes up to about 16 bytes a pixel,
    its codestream included)."""
    analysis_workers: int = 1
    """Worker threads that run the pipeline on queued studies."""
    min_patient_age_years: float = 18.0
    """Images of younger patients (by Patient Age, or birth and study dates) are stored and not
    analysed: the model was trained on adults only."""
    require_model: bool = True
    """``serve`` refuses to start when the model cannot be loaded; false: it starts, receives,
    and queues every job as ``waiting_for_pipeline`` until a node with a model runs them."""

    def __post_init__(self) -> None:
        _check_ae_title(self.ae_title, "ae_title")
        _check_port(self.port, "port", allow_zero=True)
        if self.study_quiet_seconds <= 0:
            raise ValueError("study_quiet_seconds must be positive")
        if self.min_free_mb < 0:
            raise ValueError("min_free_mb must be 0 or more")
        if self.max_associations < 1 or self.analysis_workers < 1:
            raise ValueError("max_associations and analysis_workers must be at least 1")
        if self.network_timeout_seconds <= 0 or self.idle_timeout_seconds <= 0:
            raise ValueError("network_timeout_seconds and idle_timeout_seconds must be positive")
        if self.max_associations_per_address < 1 or self.max_pending_connections < 4:
            raise ValueError(
                "max_associations_per_address must be at least 1, max_pending_connections 4"
            )
        if min(self.max_store_mb, self.max_decoded_megapixels) <= 0:
            raise ValueError("max_store_mb and max_decoded_megapixels must be positive")
        if self.decode_memory_mb < 16:
            raise ValueError(f"decode_memory_mb must be at least 16, got {self.decode_memory_mb}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerConfig:
    """``[[callers]]``: a modality allowed to send. None listed = anyone may send."""

    ae_title: str
    """The caller's (calling) AE title."""
    host: str | None = None
    """Optional: the caller's IP address must also match."""
    send_results_to: str | None = None
    """Name of a ``[[destinations]]`` entry that receives this caller's results."""

    def __post_init__(self) -> None:
        _check_ae_title(self.ae_title, "ae_title")


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationConfig:
    """``[[destinations]]``: a Storage SCP (usually the PACS) that receives results."""

    name: str
    """Name that ``send_results_to`` refers to."""
    ae_title: str
    host: str
    port: int
    tls: bool = False
    """Use DICOM TLS (the ``[tls]`` section's certificate and CA) for this destination."""
    timeout_seconds: float = 30.0
    """Connection, ACSE and DIMSE timeout for deliveries."""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name must not be empty")
        _check_ae_title(self.ae_title, "ae_title")
        _check_port(self.port, "port")
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportConfig:
    """``[export]``: which result objects are built and how deliveries are retried."""

    retry_schedule_seconds: tuple[float, ...] = (10.0, 30.0, 120.0, 600.0, 1800.0)
    """Wait before each retry; after the last, a delivery is dead-lettered."""
    segmentation_type: Literal["binary", "fractional"] = "binary"
    """SEG type: binary masks, or fractional (probability) masks."""
    presentation_state: bool = True
    """Also send a Grayscale Softcopy Presentation State with coloured contours."""
    secondary_capture: bool = False
    """Also send a Secondary Capture with the coloured overlay burned in."""

    def __post_init__(self) -> None:
        if any(s < 0 for s in self.retry_schedule_seconds):
            raise ValueError("retry_schedule_seconds must not be negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertsConfig:
    """``[alerts]``: where S742 alerts go besides the log and the SR."""

    webhook_url: str | None = None
    """If set, each alert is POSTed here as JSON."""
    webhook_retries: int = 5
    webhook_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.webhook_url is not None and not re.match(r"^https?://", self.webhook_url):
            raise ValueError("webhook_url must start with http:// or https://")
        if self.webhook_retries < 0 or self.webhook_timeout_seconds <= 0:
            raise ValueError("webhook_retries must be ≥ 0 and webhook_timeout_seconds > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """``[tls]``: DICOM TLS on the SCP (and on destinations with ``tls = true``)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    """Trusted CA bundle for verifying peers."""
    require_client_certificate: bool = False

    def __post_init__(self) -> None:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("enabled TLS needs certificate and private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """``[http]``: the health and metrics endpoint."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8081

    def __post_init__(self) -> None:
        _check_port(self.port, "port", allow_zero=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionConfig:
    """``[retention]``: how long spooled instances and results are kept (0 = forever)."""

    spool_days: float = 30.0
    results_days: float = 30.0

    def __post_init__(self) -> None:
        if self.spool_days < 0 or self.results_days < 0:
            raise ValueError("retention days must be 0 or more")


_DATABASE_URL = re.compile(r"^(sqlite:///.+|postgresql(\+psycopg)?://.+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseConfig:
    """``[database]``: where the queue, results and deliveries are kept, and job leases."""

    url: str = ""
    """Empty: the SQLite file ``<storage>/shadowspot.db``. Else ``sqlite:///path`` (another
    SQLite file) or ``postgresql://user[:password]@host[:port]/database`` (PostgreSQL, shared
    by several nodes)."""
    lease_seconds: float = 60.0
    """A worker holds a running job for this long, renewed by its heartbeat (every third of
    it); a job whose lease expired (its worker died) goes back to the queue for another."""

    def __post_init__(self) -> None:
        if self.url and not _DATABASE_URL.match(self.url):
            raise ValueError(
                "url must be empty (SQLite under the storage folder), sqlite:///path or "
                "postgresql://user@host:port/database"
            )
        if self.lease_seconds < 3:
            raise ValueError(f"lease_seconds must be at least 3, got {self.lease_seconds}")

    @property
    def url_or_default(self) -> str | None:
        """The URL to open (None: the default SQLite file under the storage folder)."""
        return self.url or None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingConfig:
    """``[logging]``: structlog output."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: bool = True
    """Also write JSON lines to ``<storage>/logs/shadowspot.log``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole, validated configuration. Built only by ``load_config``/``default_config``."""

    node: NodeSection = field(default_factory=NodeSection)
    callers: tuple[CallerConfig, ...] = ()
    destinations: tuple[DestinationConfig, ...] = ()
    export: ExportConfig = field(default_factory=ExportConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    source: str = "<embedded defaults>"
    """Where this configuration came from (a path, or the embedded defaults)."""

    def destination(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    def caller(self, ae_title: str) -> CallerConfig | None:
        for c in self.callers:
            if c.ae_title == ae_title:
                return c
        return None


# --------------------------------------------------------------------------------------------
# Loading


def default_config() -> Config:
    """The embedded defaults (what ``shadowspot serve`` runs on without a file)."""
    return Config()


def load_config(path: Path | str | None) -> Config:
    """Read and validate ``path``; ``None`` means the embedded defaults.

    Raises ``ConfigError`` listing every problem found.
    """
    if path is None:
        config = default_config()
        _raise_if(_cross_checks(config, "<embedded defaults>"))
        return config
    path = Path(path)
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError([ConfigProblem(where, "-", "file not found")]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(where, "-", f"cannot read: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(where, "-", f"not valid TOML: {exc}")]) from exc
    problems: list[ConfigProblem] = []
    raw = {**raw, "source": where}
    config = _SCHEMA.build(Config, raw, where=where, problems=problems)
    if config is None:  # a top-level value failed its own checks: report against defaults
        config = Config(source=where)
    assert isinstance(config, Config)
    config = _relative_to(config, path.parent, raw)
    problems.extend(_cross_checks(config, where))
    _raise_if(problems)
    return config


def _relative_to(config: Config, folder: Path, raw: dict[str, Any]) -> Config:
    """A ``[pipeline] model_dir`` the file gives as a relative path is relative to the file's
    folder, not to the working directory (``serve`` and ``check-config`` find the same
    model wherever they are started from)."""
    given = (
        raw.get("pipeline", {}).get("model_dir") if isinstance(raw.get("pipeline"), dict) else None
    )
    if given is None or config.pipeline.model_dir.is_absolute():
        return config
    pipeline = dataclasses.replace(config.pipeline, model_dir=folder / config.pipeline.model_dir)
    return dataclasses.replace(config, pipeline=pipeline)


def _raise_if(problems: list[ConfigProblem]) -> None:
    if problems:
        raise ConfigError(problems)


def _cross_checks(config: Config, where: str) -> list[ConfigProblem]:
    """Checks that involve more than one field: names, references, the storage folder."""
    problems: list[ConfigProblem] = []

    def add(key: str, reason: str) -> None:
        problems.append(ConfigProblem(where, key, reason))

    seen_callers: set[str] = set()
    for i, caller in enumerate(config.callers):
        if caller.ae_title in seen_callers:
            add(f"callers[{i}].ae_title", f"duplicate AE title {caller.ae_title!r}")
        seen_callers.add(caller.ae_title)
        if caller.ae_title == config.node.ae_title:
            add(f"callers[{i}].ae_title", "a caller cannot use the node's own AE title")
        names = {d.name for d in config.destinations}
        if caller.send_results_to is not None and caller.send_results_to not in names:
            add(
                f"callers[{i}].send_results_to",
                f"no destination named {caller.send_results_to!r} (known: {sorted(names)})",
            )
    seen_names: set[str] = set()
    seen_aes: set[tuple[str, str, int]] = set()
    for i, dest in enumerate(config.destinations):
        if dest.name in seen_names:
            add(f"destinations[{i}].name", f"duplicate destination name {dest.name!r}")
        seen_names.add(dest.name)
        address = (dest.ae_title, dest.host, dest.port)
        if address in seen_aes:
            add(
                f"destinations[{i}].ae_title",
                f"duplicate destination {dest.ae_title}@{dest.host}:{dest.port}",
            )
        seen_aes.add(address)
        if dest.tls and not config.tls.enabled:
            add(f"destinations[{i}].tls", "needs [tls] enabled with a certificate and key")
    reason = _storage_problem(config.node.storage)
    if reason:
        add("node.storage", reason)
    for name in ("certificate", "private_key", "ca_certificates"):
        value = getattr(config.tls, name)
        if config.tls.enabled and value is not None and not Path(value).is_file():
            add(f"tls.{name}", f"file not found: {value}")
    if config.http.enabled and config.http.port == config.node.port and config.node.port != 0:
        add("http.port", "must differ from node.port")
    return problems


def _storage_problem(storage: Path) -> str | None:
    """Why the storage folder cannot be used, or None. It is created if missing."""
    existing = storage
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} exists and is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"folder {existing} is not writable"
    return None


# Generic dataclass-from-TOML builder -----------------------------------------------------------
