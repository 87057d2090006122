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


def _base_names(value: Any) -> Any:
    """Absolute paths -> their base names, recursively (other values unchanged)."""
    import os

    if isinstance(value, dict):
        return {k: _base_names(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_base_names(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(value.rstrip("/\\")) or value
    return value


def shareable_toml(config: BaseModel, full_paths: bool = False) -> str:
    """The resolved config for metadata of files others read: absolute local paths become base
    names (as the reference stores folder and model names) unless `full_paths`."""
    import tomli_w

    data = resolved_dict(config)
    return tomli_w.dumps(data if full_paths else _base_names(data))
