"""The log events the admin guide documents are the ones the node emits (a renamed event
must not leave the guide naming one that no longer exists)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})


def _documented_events() -> set[str]:
    """The event names in the first column of the admin guide's log-event table."""
    text = (ROOT / "docs" / "admin-guide.md").read_text(encoding="utf-8")
    table = text.split("| Event | Meaning |", 1)[1].split("\n\n", 1)[0]
    rows = table.splitlines()[2:]
    return {name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}


def _emitted_events() -> tuple[set[str], set[str], set[str]]:
    """Event names logged in node/ as literals; prefixes of those logged as f-strings
    (``f"instance_{receipt.outcome}"``); and every string literal in node/."""
    names: set[str] = set()
    prefixes: set[str] = set()
    strings: set[str] = set()
    for path in (ROOT / "node").rglob("*.py"):
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
