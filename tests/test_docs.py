"""The documentation names only what the code has.

README.md, docs/*.md and models/training/README.md are parsed for what a reader would type or
look up, and each name must exist in the code:

- configuration keys: ``[section] key``, ``[[section]]`` and ``section.key`` in backticks, and
  every table and key of a ```toml block, against the dataclasses of ``node.config.Config``
  (``[pipeline]`` is ``pipeline.config.PipelineConfig``), recursively; a dotted name that is
  not a key must then be an importable Python object (``node.config.Config``,
  ``pipeline.recognition.suppress_coinciding``), else it is reported;
- ``shadowspot <command>`` invocations, with their ``--options``, against
  ``node.cli.build_parser()``;
- metric names ``shadowspot_*``, against what ``/metrics`` exposes: ``node.metrics.REGISTRY``
  and the database collector (counters as ``<name>_total``);
- the log events of docs/admin-guide.md's event table, against the names node/ logs (``ast``:
  a literal event name, or an f-string's prefix plus a string literal of node/);
- (``training`` marker) the options of ``python -m models.training.<x>`` and of the lab's
  commands written in backticks in models/training/README.md, against each module's ``--help``.

Each test fails with the list of every missing name, file and line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import re
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.cli import build_parser
from node.config import Config
from node.metrics import REGISTRY, DatabaseCollector

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
LAB_README = REPO / "models" / "training" / "README.md"
PARSED = (*DOCS, LAB_README)
LAB_MODULES = ("train", "evaluate", "compare", "train_boxes", "ensemble")

_FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
_SPAN = re.compile(r"`([^`]+)`")  # a span may wrap onto the next line
_TABLE_KEY = re.compile(r"\[\[?([a-z_][a-z0-9_.]*)\]\]?(?:\s+([a-z_][a-z0-9_]*))?")
_DOTTED = re.compile(r"(?<![\w./\-<])([a-z_][a-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
_FILE_SUFFIXES = frozenset(
    {"py", "md", "toml", "json", "jsonl", "onnx", "pt", "db", "log", "dcm", "sh", "npz", "png"}
)
_COMMAND = re.compile(r"(?:^|(?<=[\s`(/]))shadowspot((?:\s+--[a-z][a-z-]*)*)\s+([a-z][a-z-]*)")
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])(?![\w*-])")  # not `--fit-*`
_METRIC = re.compile(r"\bshadowspot_[a-z0-9_]*[a-z0-9]")
_END_OF_COMMAND = re.compile(r"\s#\s|\s#$|\s\|\s|;|&&")


@dataclasses.dataclass(frozen=True)
class Code:
    """A piece of code in a document: an inline span or a fenced block's line."""

    file: Path
    line: int
    text: str
    lang: str | None  # None: inline span; else the fence's language ("" when none)

    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def _code(path: Path) -> Iterator[Code]:
    text = path.read_text(encoding="utf-8")
    prose = text
    for fence in _FENCE.finditer(text):
        first = text.count("\n", 0, fence.start(2)) + 1
        for i, line in enumerate(fence.group(2).splitlines()):
            yield Code(path, first + i, line, fence.group(1))
        blank = re.sub(r"[^\n]", " ", fence.group(0))
        prose = prose[: fence.start()] + blank + prose[fence.end() :]
    for span in _SPAN.finditer(prose):
        line = prose.count("\n", 0, span.start()) + 1
        yield Code(path, line, " ".join(span.group(1).split()), None)


def _all_code(paths: tuple[Path, ...] = PARSED) -> list[Code]:
    return [code for path in paths for code in _code(path)]


def _report(missing: list[str], what: str) -> None:
    assert not missing, f"{len(missing)} {what} named in the docs do not exist:\n" + "\n".join(
        f"  - {m}" for m in missing
    )


# Configuration keys --------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → X, ``tuple[X, ...]`` → X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    if origin is tuple:
        args = typing.get_args(annotation)
        return _unwrap(args[0]) if len(args) == 2 and args[1] is Ellipsis else annotation
    return annotation


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap(hints[f.name]) for f in dataclasses.fields(cls)}


def _is_key(parts: list[str]) -> bool:
    """Whether ``parts`` is a table or key path in ``Config``'s dataclass tree."""
    cls: Any = Config
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return False
        fields = _fields(cls)
        if part not in fields:
            return False
        cls = fields[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            return False
    return True


SECTIONS = frozenset(name for name, t in _fields(Config).items() if dataclasses.is_dataclass(t))


def _is_python(dotted: str) -> bool:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        try:
            for attr in parts[n:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _config_names(code: Code) -> Iterator[tuple[str, list[str]]]:
    """(the name as written, its key path) for every configuration name in ``code``."""
    if code.lang is None:
        for m in _TABLE_KEY.finditer(code.text):
            section = m.group(1).split(".")
            key = [m.group(2)] if m.group(2) else []
            yield m.group(0), section + key
        text = _TABLE_KEY.sub(" ", code.text)
        for m in _DOTTED.finditer(text):
            parts = m.group(1).split(".")
            if parts[0] in SECTIONS and parts[-1] not in _FILE_SUFFIXES:
                yield m.group(1), parts


def _toml_names(path: Path) -> Iterator[tuple[Code, str, list[str]]]:
    """Every table and key of the ```toml blocks of ``path``."""
    section: list[str] = []
    for code in _code(path):
        if code.lang != "toml":
            continue
        line = code.text.split("#", 1)[0].strip()
        if m := re.fullmatch(r"\[\[?([a-z_][a-z0-9_.]*)\]\]?", line):
            section = m.group(1).split(".")
            yield code, line, section
        elif m := re.match(r"([a-z_][a-z0-9_]*)\s*=", line):
            yield code, f"[{'.'.join(section)}] {m.group(1)}", [*section, m.group(1)]


def test_documented_config_keys_exist() -> None:
    missing = []
    for code in _all_code():
        for written, parts in _config_names(code):
            if _is_key(parts):
                continue
            if "[" not in written and _is_python(written):
                continue  # a module, class or function, not a key
            missing.append(f"{code.where()}: `{written}`")
    for path in PARSED:
        for code, written, parts in _toml_names(path):
            if not _is_key(parts):
                missing.append(f"{code.where()}: `{written}` (toml block)")
    _report(missing, "configuration keys or Python names")


def test_the_key_finder_sees_keys() -> None:
    """The parser itself: it finds the forms the docs use, and tells keys from code."""
    code = Code(REPO, 1, "[pipeline.candidates] peak_fraction", None)
    found = [parts for _, parts in _config_names(code)]
    assert found == [["pipeline", "candidates", "peak_fraction"]]
    assert _is_key(["pipeline", "candidates", "peak_fraction"])
    assert _is_key(["callers", "send_results_to"])
    assert _is_key(["pipeline", "grading", "rules"])
    assert not _is_key(["node", "no_such_key"])
    assert not _is_key(["node", "port", "deeper"])
    assert _is_python("node.config.Config")
    assert not _is_python("node.db.no_such_function")
    spans = [c.text for c in _code(REPO / "README.md") if c.lang is None]
    assert "[node] require_model = false" in spans


# Commands ------------------------------------------------------------------------------------


def _subcommands() -> tuple[set[str], dict[str, set[str]]]:
    parser = build_parser()
    common = {o for a in parser._actions for o in a.option_strings}
    commands: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = {o for a in sub._actions for o in a.option_strings}
    return common, commands


def _command_line(code: Code, start: int) -> str:
    rest = code.text[start:]
    end = _END_OF_COMMAND.search(rest)
    return rest[: end.start()] if end else rest


def test_documented_commands_exist() -> None:
    common, commands = _subcommands()
    missing = []
    for code in _all_code():
        for m in _COMMAND.finditer(code.text):
            command = m.group(2)
            if command not in commands:
                missing.append(f"{code.where()}: `shadowspot {command}` (no such command)")
                continue
            line = m.group(1) + _command_line(code, m.end())
            for option in _OPTION.findall(line):
                if option not in commands[command] | common:
                    missing.append(f"{code.where()}: `shadowspot {command} {option}`")
    _report(missing, "commands or options")


def test_readme_shows_every_command() -> None:
    """Every subcommand is somewhere in the README or the docs (none is undocumented)."""
    _, commands = _subcommands()
    written = {m.group(2) for code in _all_code(DOCS) for m in _COMMAND.finditer(code.text)}
    _report(sorted(set(commands) - written), "subcommands (undocumented)")


# Metrics -------------------------------------------------------------------------------------


def _exposed_metrics(tmp_path: Path) -> tuple[set[str], dict[str, str]]:
    """Names a scrape of /metrics can show, and counter family names → their series name."""
    names: set[str] = set()
    counters: dict[str, str] = {}
    families = [
        *REGISTRY.collect(),
        *DatabaseCollector(None, storage=tmp_path / "absent").collect(),
    ]
    for family in families:
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
            counters[family.name] = f"{family.name}_total"
        elif family.type in ("histogram", "summary"):
            suffixes = ("", "_bucket", "_sum", "_count", "_created")
            names |= {family.name + s for s in suffixes}
        else:
            names.add(family.name)
        names |= {s.name for s in family.samples}
    return names, counters


def test_documented_metrics_exist(tmp_path: Path) -> None:
    names, counters = _exposed_metrics(tmp_path)
    missing = []
    for path in PARSED:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for metric in _METRIC.findall(line):
                if metric in names:
                    continue
                hint = f" (a counter: exposed as {counters[metric]})" if metric in counters else ""
                missing.append(f"{path.relative_to(REPO)}:{n}: `{metric}`{hint}")
    _report(missing, "metrics")


# The model lab's commands ----------------------------------------------------------------------


def _lab_options(module: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", f"models.training.{module}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    usage = result.stdout.split("\n\n", 1)[0]  # the usage block lists every option
    return set(_OPTION.findall(usage))


@pytest.mark.training
@pytest.mark.slow
def test_lab_commands_use_real_options() -> None:
    options = {module: _lab_options(module) for module in LAB_MODULES}
    every = set().union(*options.values())
    missing = []
    lab = "|".join(LAB_MODULES)
    text = LAB_README.read_text(encoding="utf-8")
    joined = re.sub(r"\\\n\s*", " ", text)  # shell continuation lines as one line
    for m in re.finditer(rf"-m models\.training\.({lab})\b([^\n]*)", joined):
        line = _END_OF_COMMAND.split(m.group(2))[0]
        for option in _OPTION.findall(line):
            if option not in options[m.group(1)]:
                missing.append(f"{LAB_README.relative_to(REPO)}: `{m.group(1)} {option}`")
    for code in _code(LAB_README):
        if code.lang is not None:
            continue
        if m := re.match(rf"({lab}) (--.*)", code.text):
            for option in _OPTION.findall(m.group(2)):
                if option not in options[m.group(1)]:
                    missing.append(f"{code.where()}: `{m.group(1)} {option}`")
        else:
            for option in _OPTION.findall(code.text):
                if option not in every:
                    missing.append(f"{code.where()}: `{option}` (no lab command has it)")
    _report(missing, "model-lab options")


# Counts the docs state -----------------------------------------------------------------------

_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7}
_NUMBERS |= {"eight": 8, "nine": 9, "ten": 10}


def test_catch_alls_are_where_architecture_says() -> None:
    """docs/architecture.md names every file with an ``except Exception`` and their number."""
    text = " ".join((REPO / "docs" / "architecture.md").read_text(encoding="utf-8").split())
    m = re.search(r"`except Exception` stands where(.*?): (\w+) in all", text)
    assert m, "architecture.md no longer says where `except Exception` stands"
    found: dict[str, int] = {}
    for path in sorted([*(REPO / "node").rglob("*.py"), *(REPO / "pipeline").rglob("*.py")]):
        n = path.read_text(encoding="utf-8").count("except Exception")
        if n:
            found[str(path.relative_to(REPO))] = n
    assert _NUMBERS.get(m.group(2)) == sum(found.values()), (m.group(2), found)
    named = set(re.findall(r"`((?:node|pipeline)/[\w/]+\.py)`", m.group(1)))
    assert named == set(found), f"named {sorted(named)}, in the code {sorted(found)}"


_LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})


def _documented_events() -> set[str]:
    """The event names in the first column of the admin guide's log-event table."""
    text = (REPO / "docs" / "admin-guide.md").read_text(encoding="utf-8")
    table = text.split("| Event | Meaning |", 1)[1].split("\n\n", 1)[0]
    rows = table.splitlines()[2:]
    return {name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}


def _emitted_events() -> tuple[set[str], set[str], set[str]]:
    """Event names logged in node/ as literals; prefixes of those logged as f-strings
    (``f"instance_{receipt.outcome}"``); and every string literal in node/."""
    names: set[str] = set()
    prefixes: set[str] = set()
    strings: set[str] = set()
    for path in (REPO / "node").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LOG_METHODS
                and node.args
            ):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
            elif isinstance(first, ast.JoinedStr) and isinstance(first.values[0], ast.Constant):
                prefixes.add(str(first.values[0].value))
    return names, prefixes, strings


def test_every_documented_log_event_is_emitted_by_the_node() -> None:
    """Each event of the admin guide's table is logged somewhere in node/: as a literal event
    name, or as an f-string whose prefix and a string literal of node/ make it up."""
    names, prefixes, strings = _emitted_events()

    def emitted(event: str) -> bool:
        return event in names or any(
            event.startswith(p) and event[len(p) :] in strings for p in prefixes
        )

    documented = _documented_events()
    assert len(documented) > 20  # the table was found and read
    assert sorted(e for e in documented if not emitted(e)) == []
