"""Read TOML/JSON config files and locate every key's line, so errors can point at `file:line`."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.errors import ConfigError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

KeyPath = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)
_TOML_POS = re.compile(r"line (\d+), column (\d+)")


@dataclass
class SourceDoc:
    """A parsed config file: its data plus the line of every key path seen in its text."""

    path: Path
    data: Any  # a dict, except a JSON file whose top level is a list
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, key: KeyPath) -> int | None:
        """Line of `key`, or of its nearest located ancestor (a table header) when not written."""
        probe = tuple(key)
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            probe = probe[:-1]
        return None


def _split_dotted(text: str) -> list[str]:
    parts: list[str] = []
    for raw in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', text):
        raw = raw.strip()
        if raw[:1] in "\"'":
            raw = raw[1:-1]
        if raw:
            parts.append(raw)
    return parts


def locate_keys(text: str) -> dict[KeyPath, int]:
    """Map each key path (array-of-table entries indexed) to its 1-based line number.

    A light line scanner, enough for config files: table headers, `[[arrays]]`, dotted keys and
    multi-line strings. Values spanning several lines are located at their first line.
    """
    lines: dict[KeyPath, int] = {}
    table: tuple[str | int, ...] = ()
    array_counts: dict[tuple[str | int, ...], int] = {}
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            names = _split_dotted(header.group(2))
            resolved: list[str | int] = []
            # Parent tables of an array-of-tables header refer to that array's latest entry.
            for name in names[:-1]:
                resolved.append(name)
                parent = tuple(resolved)
                if parent in array_counts:
                    resolved.append(array_counts[parent] - 1)
            resolved.append(names[-1])
            base = tuple(resolved)
            if header.group(1) == "[[":
                index = array_counts.get(base, 0)
                array_counts[base] = index + 1
                table = (*base, index)
                lines.setdefault(base, number)
            else:
                table = base
            lines[table] = number
            continue
        key = _KEY.match(line)
        if key:
            path = (*table, *_split_dotted(key.group(1)))
            lines[path] = number
            rest = line[key.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
    return lines


def read_config_file(path: Path) -> SourceDoc:
    """Parse a `.toml` or `.json` config file; syntax errors become a located ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            [Problem(key="", message=f"config file not found: {path}", file=str(path))],
            hint="check the path (relative paths are taken from the current folder)",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [Problem(key="", message=f"cannot read file: {exc}", file=str(path))]
        ) from exc
    doc = parse_config_text(path, text)
    if not isinstance(doc.data, dict):
        raise ConfigError(
            [Problem(key="", message="the top level must be an object", file=str(path))]
        )
    return doc


def parse_config_text(path: Path, text: str) -> SourceDoc:
    """Parse `.toml`/`.json` text (JSON may have any top level); located syntax errors."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            problem = Problem(
                key="",
                message=f"JSON syntax error: {exc.msg}",
                file=str(path),
                line=exc.lineno,
                column=exc.colno,
            )
            raise ConfigError([problem]) from exc
        return SourceDoc(path=path, data=data, lines={})
    if suffix != ".toml":
        raise ConfigError(
            [
                Problem(
                    key="", message=f"unsupported config file type '{path.suffix}'", file=str(path)
                )
            ],
            hint="use a .toml file (or .json for dataset blueprints)",
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        pos = _TOML_POS.search(msg)
        line = int(pos.group(1)) if pos else getattr(exc, "lineno", None)
        col = int(pos.group(2)) if pos else getattr(exc, "colno", None)
        clean = _TOML_POS.sub("", msg).replace("(at )", "").strip()
        problem = Problem(
            key="", message=f"TOML syntax error: {clean}", file=str(path), line=line, column=col
        )
        raise ConfigError([problem], hint="fix the TOML syntax at the position shown") from exc
    return SourceDoc(path=path, data=data, lines=locate_keys(text))
