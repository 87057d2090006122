"""Optimizer/scheduler constructor kwargs: a TOML table or the reference's key=value strings."""

from __future__ import annotations

import ast
from typing import Any

from sdtrain.errors import ConfigError, Problem


def parse_value(text: str) -> Any:
    """A Python literal (`0.9,0.999` -> tuple, `True`, `1e-3`, `"x"`), else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_kwargs(raw: dict[str, Any] | list[str] | None, key: str) -> dict[str, Any]:
    """Kwargs from a TOML table (used as written) or `["key=value", ...]` strings.

    Each string is split at its first `=`; the value is read with `ast.literal_eval` as the
    reference does (`betas=0.9,0.999` gives a tuple) and kept as a plain string when it is not a
    literal (the reference raises there). `key` names the config key in error messages.
    """
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return dict(raw)
    kwargs: dict[str, Any] = {}
    problems: list[Problem] = []
    for index, item in enumerate(raw):
        name, sep, value = str(item).partition("=")
        name = name.strip()
        if not sep or not name or not name.isidentifier():
            problems.append(
                Problem(
                    key=f"{key}[{index}]",
                    message=f"expected key=value, got {item!r}",
                    value=item,
                    has_value=True,
                    hint='write e.g. "weight_decay=0.01", or use a table: {weight_decay = 0.01}',
                )
            )
            continue
        kwargs[name] = parse_value(value.strip())
    if problems:
        raise ConfigError(problems)
    return kwargs


def format_kwargs(kwargs: dict[str, Any]) -> str:
    """`k=v,k=v` exactly like the reference's `ss_optimizer` argument string."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items())
