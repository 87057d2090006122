"""Shared pydantic base for every config section: strict types, no unknown keys, path markers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every config table. Strict: "true" is not a bool, "3e-4" is not a number."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


def path_field(default: Any = None, description: str = "") -> Any:
    """A filesystem-path field; relative values resolve against the defining file's folder."""
    return Field(default, description=description, json_schema_extra={"path": True})


# values of path fields that name a mode, not a file ("auto" resume)
PATH_KEYWORDS = frozenset({"auto"})


def is_path_field(model: type[BaseModel], name: str) -> bool:
    """True when `name` of `model` was declared with path_field()."""
    info = model.model_fields.get(name)
    extra = info.json_schema_extra if info else None
    return isinstance(extra, dict) and bool(extra.get("path"))
