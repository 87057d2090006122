"""Turn `--key value` command-line flags into config values, checked against the schema."""

from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from sdtrain.config.base import PATH_KEYWORDS
from sdtrain.config.schema_index import KeyInfo, suggest
from sdtrain.errors import Problem

CLI = "<command line>"
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass
class FlagValues:
    """Parsed flags: table -> key -> value, plus the problems found while parsing."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    positionals: list[str] = field(default_factory=list)

    def set(self, info: KeyInfo, value: Any) -> None:
        self.values.setdefault(info.table, {})[info.name] = value


def _wants_many(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    origins = {typing.get_origin(a) for a in (annotation, *args)}
    return list in origins or dict in origins


def _convert(info: KeyInfo, tokens: list[str]) -> Any:
    """Lax conversion of flag text to the key's type (flags are text; TOML values are typed)."""
    annotation = info.annotation
    args = typing.get_args(annotation)
    wants_dict = dict in {typing.get_origin(a) for a in (annotation, *args)}
    if wants_dict:
        # reference style: --optimizer_args weight_decay=0.01 betas=0.9,0.999 (kept as strings,
        # parsed by the consumer exactly like TOML-given key=value lists)
        return list(tokens)
    if len(tokens) == 1 and tokens[0].lower() in {"none", "null"} and type(None) in args:
        return None
    text = " ".join(tokens)
    if _wants_many(annotation):
        parts = [p for t in tokens for p in t.split(",") if p.strip()]
        for candidate in (parts, [_number(p) for p in parts]):
            try:
                return TypeAdapter(annotation).validate_python(
                    candidate
                    if len(candidate) != 1 or not _has_scalar(annotation)
                    else candidate[0],
                    strict=False,
                )
            except ValidationError:
                continue
    try:
        return TypeAdapter(annotation).validate_python(_number(text), strict=False)
    except ValidationError:
        return TypeAdapter(annotation).validate_python(text, strict=False)


def _has_scalar(annotation: Any) -> bool:
    """True when a union offers a plain scalar (`float | list[float]`); a bare `list[str]` does
    not (its element type is no alternative: one value must still become a one-item list)."""
    if typing.get_origin(annotation) in (list, tuple, set):
        return False
    return any(a in (int, float, str) for a in typing.get_args(annotation))


def _number(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def parse_flags(args: list[str], keys: dict[str, KeyInfo]) -> FlagValues:
    """Parse reference-style flags: `--key value`, `--key=value`, `--key-name`, `--no-key`.

    Path values given on the command line resolve against the current folder.
    """
    result = FlagValues()
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("--"):
            result.positionals.append(token)
            continue
        name, eq, inline = token[2:].partition("=")
        name = name.replace("-", "_")
        negated = False
        if (
            name not in keys
            and name.startswith("no_")
            and name[3:] in keys
            and keys[name[3:]].is_bool
        ):
            name, negated = name[3:], True
        info = keys.get(name)
        if info is None:
            from sdtrain.config.import_args import REFERENCE_FLAG_HINTS

            close = suggest(name, keys)
            reference = REFERENCE_FLAG_HINTS.get(name)
            result.problems.append(
                Problem(
                    key=name,
                    message=f"--{name} (a reference option) is not an sdtrain option"
                    if reference
                    else f"unknown option --{name}",
                    file=CLI,
                    hint=reference
                    or (
                        f"did you mean --{close}?"
                        if close
                        else "run with --help-config to list every key"
                    ),
                )
            )
            if (
                not eq
                and i < len(args)
                and not args[i].startswith("--")
                and not _looks_like_config(args[i])
            ):
                i += 1
            continue
        if info.is_bool:
            if eq:
                lowered = inline.lower()
                if lowered not in _TRUE | _FALSE:
                    result.problems.append(
                        Problem(
                            key=f"{info.table}.{name}",
                            file=CLI,
                            value=inline,
                            has_value=True,
                            message="expected true or false",
                        )
                    )
                    continue
                result.set(info, lowered in _TRUE)
            else:
                result.set(info, not negated)
            continue
        tokens = [inline] if eq else []
        if not eq:
            many = _wants_many(info.annotation)
            while i < len(args) and not args[i].startswith("--"):
                if tokens and many and _looks_like_config(args[i]):
                    break
                tokens.append(args[i])
                i += 1
                if not many:
                    break
        if not tokens:
            result.problems.append(
                Problem(key=f"{info.table}.{name}", file=CLI, message=f"--{name} needs a value")
            )
            continue
        try:
            value = _convert(info, tokens)
        except ValidationError as exc:
            detail = exc.errors()[0]["msg"]
            result.problems.append(
                Problem(
                    key=f"{info.table}.{name}",
                    file=CLI,
                    value=" ".join(tokens),
                    has_value=True,
                    message=detail,
                )
            )
            continue
        if (
            info.is_path
            and isinstance(value, str)
            and not _is_special(value)
            and value not in PATH_KEYWORDS
        ):
            value = os.path.abspath(value)
        result.set(info, value)
    return result


def _looks_like_config(token: str) -> bool:
    return token.lower().endswith((".toml", ".json")) and "=" not in token


def _is_special(value: str) -> bool:
    return ":" in value.split("/")[0] and not os.path.exists(
        value
    )  # builtin:..., hub ids with revision
