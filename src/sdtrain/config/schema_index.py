"""Flat index of a run schema: every key -> its table, type and description (for flags and help)."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sdtrain.config.base import Section, is_path_field


@dataclass(frozen=True)
class KeyInfo:
    """One configurable key of a run schema."""

    table: str
    name: str
    field: FieldInfo
    model: type[BaseModel]

    @property
    def annotation(self) -> Any:
        return self.field.annotation

    @property
    def is_bool(self) -> bool:
        args = set(typing.get_args(self.annotation)) - {type(None)}
        return self.annotation is bool or args == {bool}

    @property
    def is_path(self) -> bool:
        return is_path_field(self.model, self.name)

    def type_text(self) -> str:
        text = str(self.annotation).replace("typing.", "").replace("NoneType", "None")
        return text.replace("<class '", "").replace("'>", "")

    def default_text(self) -> str:
        if self.field.default_factory is not None:
            return repr(self.field.default_factory())  # type: ignore[call-arg]
        return repr(self.field.default)


def _section_type(annotation: Any) -> type[Section] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for cand in candidates:
        if isinstance(cand, type) and issubclass(cand, Section):
            return cand
    return None


def index_schema(schema: type[BaseModel]) -> dict[str, KeyInfo]:
    """Map each key name to where it lives. Key names are unique across a command's tables."""
    keys: dict[str, KeyInfo] = {}
    for table, info in schema.model_fields.items():
        section = _section_type(info.annotation)
        if section is None:
            continue
        for name, field in section.model_fields.items():
            if name in keys:
                raise RuntimeError(f"key {name} defined in [{keys[name].table}] and [{table}]")
            keys[name] = KeyInfo(table=table, name=name, field=field, model=section)
    return keys


def table_names(schema: type[BaseModel]) -> list[str]:
    """Top-level table names of a schema."""
    return list(schema.model_fields)


def suggest(word: str, choices: typing.Iterable[str]) -> str | None:
    """The closest choice to `word`, if any is close enough to be a likely typo."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None
