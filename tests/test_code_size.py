"""Modules and functions stay small enough to read (STYLE.md, "Modules and functions").

The model lab (``models/training``) is held to it: no module over ``MAX_MODULE_LINES``
lines, no function over ``MAX_FUNCTION_LINES`` (from its ``def`` line to its last, nested
functions counted in their own right too). For ``node/`` and ``pipeline/`` the same figures
are printed, not enforced, for whoever steers the code toward them.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
ENFORCED = ("models/training",)
REPORTED = ("node", "pipeline")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Size:
    """One module's length and its functions over the limit."""

    path: str
    lines: int
    long_functions: tuple[tuple[str, int, int], ...]  # (name, first line, length)


def measure(path: Path, root: Path = REPO) -> Size:
    """The module's line count and every function longer than ``MAX_FUNCTION_LINES``."""
    text = path.read_text(encoding="utf-8")
    long = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append((node.name, node.lineno, length))
    return Size(
        path=str(path.relative_to(root)),
        lines=len(text.splitlines()),
        long_functions=tuple(sorted(long, key=lambda f: f[1])),
    )


def sizes(folder: str) -> list[Size]:
    return [measure(p) for p in sorted((REPO / folder).rglob("*.py"))]


def readable_sizes(folder: str) -> tuple[list[Size], list[str]]:
    """``sizes``, leaving out (and naming) a file that does not parse: one being edited."""
    found, unread = [], []
    for p in sorted((REPO / folder).rglob("*.py")):
        try:
            found.append(measure(p))
        except SyntaxError:
            unread.append(str(p.relative_to(REPO)))
    return found, unread


def offences(found: list[Size]) -> list[str]:
    """Each module over the line limit and each function over the function limit."""
    out = []
    for s in found:
        if s.lines > MAX_MODULE_LINES:
            out.append(f"{s.path}: {s.lines} lines (limit {MAX_MODULE_LINES})")
        for name, line, length in s.long_functions:
            out.append(f"{s.path}:{line}: {name}() {length} lines (limit {MAX_FUNCTION_LINES})")
    return out


def test_the_model_lab_keeps_modules_and_functions_short() -> None:
    """No module of models/training over 400 lines, no function in it over 60."""
    found = [s for folder in ENFORCED for s in sizes(folder)]
    assert found, "no modules found under models/training"
    over = offences(found)
    assert not over, f"{len(over)} over the limits:\n" + "\n".join(f"  - {o}" for o in over)


def test_node_and_pipeline_sizes_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """The same figures for node/ and pipeline/, printed (not enforced)."""
    lines = []
    for folder in REPORTED:
        found, unread = readable_sizes(folder)
        over = offences(found) + [f"{u}: does not parse (left out)" for u in unread]
        longest = max(found, key=lambda s: s.lines)
        lines.append(
            f"{folder}/: {len(found)} modules, longest {longest.path} ({longest.lines} lines); "
            f"{len(over)} over {MAX_MODULE_LINES} lines a module / {MAX_FUNCTION_LINES} a function"
        )
        lines += [f"  - {o}" for o in over]
    with capsys.disabled():
        print("\ncode size (STYLE.md; enforced for models/training only):\n" + "\n".join(lines))


def test_the_measure_counts_functions_from_def_to_end(tmp_path: Path) -> None:
    """A function of exactly the limit passes, one line more is reported, nested ones too."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    inner = "\n".join(f"        y{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = f"def fits():\n{body}\n\n\ndef outer():\n    def inner():\n{inner}\n    return 1\n"
    path = tmp_path / "m.py"
    path.write_text(source)
    size = measure(path, tmp_path)
    assert size.lines == len(source.splitlines())
    names = {name: length for name, _, length in size.long_functions}
    assert names == {"outer": MAX_FUNCTION_LINES + 3, "inner": MAX_FUNCTION_LINES + 1}
    assert offences([dataclasses.replace(size, lines=MAX_MODULE_LINES + 1)])[0].endswith(
        f"{MAX_MODULE_LINES + 1} lines (limit {MAX_MODULE_LINES})"
    )


@pytest.mark.parametrize(("document", "limit"), [("README.md", 250), ("models/MODEL_CARD.md", 250)])
def test_the_readme_and_the_card_stay_short(document: str, limit: int) -> None:
    """The README serves users and the card describes the shipped model; the lab's history
    lives in models/training/EXPERIMENTS.md (issue 25)."""
    lines = len((REPO / document).read_text(encoding="utf-8").splitlines())
    assert lines <= limit, f"{document}: {lines} lines, at most {limit}"


def test_committed_evaluation_json_stays_a_summary_per_release() -> None:
    """At most 3,000 lines of evaluation JSON in the tree: one summary per shipped release;
    the commands produce the rest."""
    files = sorted((REPO / "models" / "training" / "eval").glob("*.json"))
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)
    assert lines <= 3000, f"{lines} lines of evaluation JSON in models/training/eval"
