"""The resolved config (every effective value) as a plain dict and as TOML text."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def resolved_dict(config: BaseModel) -> dict[str, Any]:
    """Every table with every effective key (None values left out: TOML has no null)."""
    return _drop_none(config.model_dump(mode="json"))


def resolved_toml(config: BaseModel) -> str:
    """The resolved config as TOML; loading it back gives the same config."""
    import tomli_w

    return tomli_w.dumps(resolved_dict(config))
