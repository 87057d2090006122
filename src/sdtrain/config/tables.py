"""Validated dataset-blueprint tables and the origin (file:line or rule) of every written value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.config.blueprint import Kind


@dataclass(frozen=True)
class Origin:
    """Where an effective value came from: a table of a file, the command line, a folder name."""

    label: str  # "datasets[0].subsets[1]", "[general]", "run config", "<command line>", "default"
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.file is None:
            return self.label
        name = Path(self.file).name or self.file
        return f"{self.label} ({name}:{self.line})" if self.line else f"{self.label} ({name})"


DEFAULT = Origin("default")


@dataclass
class TableRef:
    """One written table: its explicitly set keys (validated, paths resolved) and their origins."""

    label: str
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, Origin] = field(default_factory=dict)
    origin: Origin = DEFAULT  # of the table itself (its header)


@dataclass
class DatasetTables:
    """A [[datasets]] table with its subsets, and the kind chosen for it."""

    index: int
    kind: Kind
    table: TableRef
    subsets: list[TableRef]


@dataclass
class Blueprint:
    """A validated dataset blueprint: from a file, inline in the run TOML, or legacy folders."""

    general: TableRef
    datasets: list[DatasetTables]
    source: str  # "blueprint <path>", "run config <path>", "legacy folders"
