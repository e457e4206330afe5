"""The node's one logging set-up: structlog in front, stdlib ``logging`` underneath.

Our own events and the stdlib records of pynetdicom and pydicom go through the same
``ProcessorFormatter``, so every line is JSON (default) or human console, with the context
bound by the code that emits it: calling AE and peer per association (bound in the
``EVT_ESTABLISHED`` handler, on the association's thread), study and instance UIDs per C-STORE
and per job. Tracebacks never show local variables (they would carry patient data), keys
that name patient data are dropped as a last safety net, and no line carries a patient's
value (``node.scrub``): the values of the instance being processed are removed from every
field, and quoted values from exception texts, free-text fields and third-party messages
(pydicom and highdicom quote the values they refuse). Python warnings (pydicom warns about
invalid values, quoting them) go through the same handlers instead of raw to stderr.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any, Literal

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from node.scrub import REDACTED, scrub, scrub_quoted, scrub_values

__all__ = ["REDACTED", "configure_logging", "get_logger", "scrub"]

LogFormat = Literal["json", "console"]
LOG_FILE_NAME = "shadowspot.log"
_OURS = "_shadowspot_handler"
_FORBIDDEN = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "birth_date",
        "accession_number",
        "other_patient_ids",
        "patientname",
        "patientid",
        "patientbirthdate",
        "accessionnumber",
    }
)


def _drop_patient_data(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Remove any key that names patient data (the code must never pass one; belt and braces)."""
    for key in [k for k in event_dict if k.lower() in _FORBIDDEN]:
        del event_dict[key]
    return event_dict


def _scrubbed(value: Any, *, quoted: bool) -> Any:
    if isinstance(value, str):
        text = scrub_values(value)
        return scrub_quoted(text) if quoted else text
    if isinstance(value, dict):
        return {k: _scrubbed(v, quoted=quoted) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v, quoted=quoted) for v in value]
    return value


_FREE_TEXT_KEYS = frozenset({"exception", "error", "reason", "exc_value", "detail"})
_STRUCTURAL_KEYS = frozenset({"timestamp", "level", "logger"})


def _scrub_patient_values(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Every field of every line loses the patient values ``node.scrub.protecting`` protects
    (the instance being processed); the rendered exception, the free-text fields and the
    whole message of a third-party logger (pydicom, highdicom, pynetdicom, Python warnings)
    also lose any quoted value, which their texts use for the values they refuse."""
    foreign = not str(event_dict.get("logger", "")).startswith(("node", "pipeline", "models"))
    for key in list(event_dict):
        if key in _STRUCTURAL_KEYS:
            continue
        quoted = key in _FREE_TEXT_KEYS or (foreign and key == "event")
        event_dict[key] = _scrubbed(event_dict[key], quoted=quoted)
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_patient_data,
    ]


def _formatter(fmt: LogFormat) -> logging.Formatter:
    renderer: Processor
    tail: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        tail.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        tail.append(_scrub_patient_values)
        renderer = structlog.processors.JSONRenderer()
    else:
        # The traceback is rendered to text here, before scrubbing, not by the renderer after it.
        tail += [structlog.processors.format_exc_info, _scrub_patient_values]
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(), processors=[*tail, renderer]
    )


def configure_logging(
    *, fmt: LogFormat = "json", level: str = "info", log_dir: Path | None = None
) -> Path | None:
    """Configure structlog and stdlib logging once for the process; returns the log file path.

    ``log_dir`` (normally ``<storage>/logs``) adds a rotating JSON-lines file beside the
    stream on stderr. Calling it again replaces the handlers it installed before.
    """
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
        handler.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(_formatter(fmt))
    handlers: list[logging.Handler] = [stream]
    log_file: Path | None = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / LOG_FILE_NAME
        rotating = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=20 * 2**20, backupCount=5, encoding="utf-8"
        )
        rotating.setFormatter(_formatter("json"))
        handlers.append(rotating)
    for handler in handlers:
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(numeric)
    # pynetdicom narrates every PDU at INFO/DEBUG; keep its warnings and errors unless debugging.
    third_party = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    # highdicom narrates each attribute module it copies at INFO; keep its warnings, too.
    for name in ("pynetdicom", "pydicom", "highdicom"):
        logging.getLogger(name).setLevel(third_party)
    # Warnings (pydicom's quote the invalid values) become log records, scrubbed like the rest.
    logging.captureWarnings(True)
    return log_file


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger.bind(**context) if context else logger
