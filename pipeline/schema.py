"""One typed validator: nested dataclasses built from parsed TOML or JSON, every problem listed.

The node's configuration (``node.config``, from TOML) and the model's manifest
(``pipeline.manifest``, from JSON) are both described by frozen dataclasses: field names are
the keys, annotations the accepted types, defaults the values when a key is absent, and
``__post_init__`` the range checks (raising ``ValueError``). ``Schema.build`` walks the parsed
document against them and collects *every* problem it finds (unknown key, wrong type, value
out of range, missing required key) as a ``Problem`` with its key, so that a user sees all
their mistakes at once; a value that fails is left out and its default stands in, so that the
rest of the document is still checked.

Accepted annotations: bool, int, float (an int is accepted), str, ``Path``, an ``Enum``,
``Literal[...]``, ``X | None``, ``tuple[X, ...]`` (a list), ``dict[str, X]`` (a table/object)
and a nested dataclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake in a document: the file (or document) it is in, the key, and why."""

    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


class EntryError(ValueError):
    """Raised by a ``__post_init__`` check about one entry of a ``dict`` or ``tuple`` field:
    the problem is reported at ``<field>.<entry>``."""

    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(reason)
        self.entry = entry


_INVALID: Any = object()  # what ``_convert`` returns for a value it reported as wrong


@dataclass(frozen=True, slots=True, kw_only=True)
class Schema:
    """How one kind of document is read.

    ``table`` names a key-value table in the document's language ("a table" for TOML, "an
    object" for JSON); ``ignore_unknown`` accepts keys the dataclasses do not name (a
    manifest carries records for people beside what the pipeline reads); ``root_extras``
    are keys accepted at the top level only and passed through as they are.
    """

    table: str = "a table"
    ignore_unknown: bool = False
    root_extras: frozenset[str] = frozenset()

    def build(
        self, cls: type[Any], raw: object, *, where: str, problems: list[Problem], key: str = ""
    ) -> Any:
        """Build dataclass ``cls`` from ``raw``, appending every problem to ``problems``;
        None only when the table cannot be built at all."""
        if not isinstance(raw, dict):
            problems.append(Problem(where, key or "-", f"must be {self.table}, got {_kind(raw)}"))
            return None
        hints = typing.get_type_hints(cls)
        extras = self.root_extras if key == "" else frozenset()
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in extras}
        if not self.ignore_unknown:
            for name in raw:
                if name not in fields and name not in extras:
                    known = ", ".join(sorted(fields))
                    reason = f"unknown key (known keys: {known})"
                    problems.append(Problem(where, _join(key, name), reason))
        values: dict[str, Any] = {n: v for n, v in raw.items() if n in extras}
        complete = True
        for name, f in fields.items():
            if name not in raw:
                if _is_required(f):
                    problems.append(Problem(where, _join(key, name), "required key is missing"))
                    complete = False
                continue
            value = self._convert(hints[name], raw[name], _join(key, name), where, problems)
            if value is not _INVALID and value is not None:
                values[name] = value
            elif _is_required(f):
                complete = False
        if not complete:
            return None
        try:
            return cls(**values)
        except (ValueError, TypeError) as exc:
            return _build_blaming_fields(cls, values, exc, key, where, problems)

    def _convert(
        self, hint: Any, value: object, key: str, where: str, problems: list[Problem]
    ) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)

        def bad(expected: str) -> Any:
            problems.append(
                Problem(where, key, f"must be {expected}, got {_kind(value)} {value!r}")
            )
            return _INVALID

        if origin in (typing.Union, types.UnionType):
            non_none = [a for a in args if a is not type(None)]
            if len(non_none) != 1:
                raise TypeError(f"unsupported schema type {hint}")
            return (
                None if value is None else self._convert(non_none[0], value, key, where, problems)
            )
        if origin is Literal:
            return value if value in args else bad("one of " + ", ".join(map(repr, args)))
        if origin is tuple:
            if not isinstance(value, list):
                return bad("a list")
            items = [
                self._convert(args[0], v, f"{key}[{i}]", where, problems)
                for i, v in enumerate(value)
            ]
            return tuple(item for item in items if item is not None and item is not _INVALID)
        if origin is dict:
            if not isinstance(value, dict):
                return bad(self.table)
            entries = {
                k: self._convert(args[1], v, _join(key, k), where, problems)
                for k, v in value.items()
            }
            return {k: v for k, v in entries.items() if v is not None and v is not _INVALID}
        if dataclasses.is_dataclass(hint):
            return self.build(
                typing.cast(type[Any], hint), value, where=where, problems=problems, key=key
            )
        return _scalar(hint, value, key, bad)


def _scalar(hint: Any, value: object, key: str, bad: typing.Callable[[str], Any]) -> Any:
    if hint is bool:
        return value if isinstance(value, bool) else bad("true or false")
    if hint is int:
        return (
            value if isinstance(value, int) and not isinstance(value, bool) else bad("an integer")
        )
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return bad("a number")
        return float(value)
    if hint is str:
        return value if isinstance(value, str) else bad("a string")
    if hint is Path:
        return Path(value) if isinstance(value, str) and value else bad("a path (string)")
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            return bad("one of " + ", ".join(repr(m.value) for m in hint))
    raise TypeError(f"unsupported schema type {hint} at {key}")


def _build_blaming_fields(
    cls: type[Any],
    values: dict[str, Any],
    exc: Exception,
    key: str,
    where: str,
    problems: list[Problem],
) -> Any:
    """``cls(**values)`` failed its checks: find which keys fail on their own, report each
    against its own key, and build from the rest so later checks still run."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = {n: v for n, v in values.items() if n in fields and _is_required(fields[n])}
    good = dict(required)
    blamed = False
    for name, value in values.items():
        if name in required:
            continue
        try:
            cls(**{**required, name: value})
        except (ValueError, TypeError) as field_exc:
            at = _join(key, name)
            if isinstance(field_exc, EntryError):
                at = _join(at, field_exc.entry)
            problems.append(Problem(where, at, str(field_exc)))
            blamed = True
        else:
            good[name] = value
    try:
        return cls(**good)
    except (ValueError, TypeError) as rest_exc:
        problems.append(Problem(where, key or "-", str(rest_exc)))
        return None
    finally:
        if not blamed:  # only a combination of keys is wrong: report it for the table
            problems.append(Problem(where, key or "-", str(exc)))


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(value: object) -> str:
    return {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
