"""Convert pydantic validation errors into located, user-worded Problems."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from sdtrain.config.schema_index import index_schema, suggest
from sdtrain.errors import Problem

Locator = Callable[[tuple[str | int, ...]], tuple[str | None, int | None]]

_MESSAGES = {
    "bool_type": "expected true or false (without quotes)",
    "int_type": "expected a whole number (without quotes)",
    "float_type": "expected a number (without quotes)",
    "string_type": "expected a string (in quotes)",
    "list_type": "expected an array [ ... ]",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "missing": "this key is required",
}


def dotted(loc: Iterable[str | int]) -> str:
    """('datasets', 0, 'subsets', 1, 'image_dir') -> 'datasets[0].subsets[1].image_dir'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _clean_loc(loc: tuple[Any, ...]) -> tuple[str | int, ...]:
    # pydantic adds union-member tags such as 'int' or 'list[int]' into loc; drop them
    return tuple(
        p
        for p in loc
        if isinstance(p, int)
        or not any(c in str(p) for c in "[]()|")
        and str(p) not in {"int", "float", "str", "bool", "function-after", "function-before"}
    )


def _hint_for_extra(
    schema: type[BaseModel] | None, loc: tuple[str | int, ...], sibling_keys: Iterable[str]
) -> str | None:
    name = str(loc[-1])
    close = suggest(name, sibling_keys)
    if close:
        return f"did you mean `{close}`?"
    if schema is not None:
        keys = index_schema(schema)
        if name in keys and len(loc) == 2:
            return f"`{name}` belongs in the [{keys[name].table}] table"
    return "run with --help-config to list every key"


def problems_from_validation(
    exc: ValidationError,
    locate: Locator,
    prefix: tuple[str | int, ...] = (),
    allowed_keys: Callable[[tuple[str | int, ...]], Iterable[str]] | None = None,
    schema: type[BaseModel] | None = None,
) -> list[Problem]:
    """One Problem per pydantic error: file:line, dotted key, the value as written, a hint."""
    problems: list[Problem] = []
    seen: set[tuple[tuple[str | int, ...], str]] = set()
    for err in exc.errors():
        loc = (*prefix, *_clean_loc(tuple(err["loc"])))
        kind = err["type"]
        message = _MESSAGES.get(kind, err["msg"])
        if kind == "value_error":
            message = err["msg"].removeprefix("Value error, ")
        elif kind in ("literal_error", "enum"):
            expected = err.get("ctx", {}).get("expected", "")
            message = f"expected one of {expected}"
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            message = err["msg"].replace("Input should be", "must be")
        hint = None
        if kind == "extra_forbidden":
            siblings = allowed_keys(loc[:-1]) if allowed_keys else []
            hint = _hint_for_extra(schema, loc, siblings)
            message = f"unknown key `{loc[-1]}`"
        if (loc, message) in seen:
            continue
        seen.add((loc, message))
        file, line = locate(loc)
        has_value = (
            kind not in ("missing",) and "input" in err and not isinstance(err["input"], dict)
        )
        problems.append(
            Problem(
                key=dotted(loc),
                message=message,
                file=file,
                line=line,
                value=err.get("input"),
                has_value=has_value,
                hint=hint,
            )
        )
    return problems
