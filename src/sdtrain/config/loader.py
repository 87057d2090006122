"""Load a run config: TOML file + flags -> validated sections, with the origin of every value."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sdtrain.config.base import PATH_KEYWORDS
from sdtrain.config.flags import CLI, parse_flags
from sdtrain.config.methods import METHOD_TABLES, train_command_exists
from sdtrain.config.problems import problems_from_validation
from sdtrain.config.run import CommandSchema, RunConfig
from sdtrain.config.schema_index import index_schema, suggest, table_names
from sdtrain.config.toml_source import SourceDoc, read_config_file
from sdtrain.errors import ConfigError, Problem


@dataclass
class LoadedConfig:
    """A validated run config and where each explicitly set value came from."""

    config: RunConfig
    source: SourceDoc | None
    cli_keys: set[str] = field(default_factory=set)  # "table.key" set on the command line
    command: CommandSchema | None = None  # what it was validated against (None: built by hand)

    def origin(self, table: str, key: str) -> str:
        """'<file>:<line>', '<command line>' or 'default' for one key."""
        if f"{table}.{key}" in self.cli_keys:
            return CLI
        if self.source is not None:
            line = self.source.lines.get((table, key))
            if line is not None or key in self.source.data.get(table, {}):
                return f"{self.source.path.name}:{line}" if line else str(self.source.path.name)
        return "default"

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths of this config resolve against."""
        return self.source.path.parent if self.source else Path.cwd()


def _resolve_paths(raw: dict[str, Any], schema: type[BaseModel], base: Path) -> None:
    keys = index_schema(schema)
    for table, values in raw.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            info = keys.get(key)
            if (
                info is not None
                and info.table == table
                and info.is_path
                and isinstance(value, str)
                and value not in PATH_KEYWORDS
            ):
                path = Path(value).expanduser()
                values[key] = str(path if path.is_absolute() else (base / path).resolve())


def _top_level_problems(
    raw: dict[str, Any], schema: type[BaseModel], title: str, doc: SourceDoc | None
) -> list[Problem]:
    problems = []
    tables = table_names(schema)
    keys = index_schema(schema)
    file = str(doc.path) if doc else None
    for name in list(raw):
        if name in tables:
            continue
        line = doc.lines.get((name,)) if doc else None
        if name in METHOD_TABLES:
            owner = METHOD_TABLES[name]
            problems.append(
                Problem(
                    key=name,
                    file=file,
                    line=line,
                    message=f"the [{name}] table belongs to `sdtrain train {owner}`, "
                    f"not to `{title}`",
                    hint=f"remove the table, or run `sdtrain train {owner}`"
                    if train_command_exists(owner)
                    else f"remove the table (`sdtrain train {owner}` is not available yet)",
                )
            )
        elif name in keys:
            problems.append(
                Problem(
                    key=name,
                    file=file,
                    line=line,
                    value=raw[name],
                    has_value=True,
                    message=f"`{name}` must be inside a table",
                    hint=f"move it under [{keys[name].table}]",
                )
            )
        else:
            close = suggest(name, tables)
            problems.append(
                Problem(
                    key=name,
                    file=file,
                    line=line,
                    message=f"unknown table `{name}`",
                    hint=f"did you mean [{close}]?"
                    if close
                    else f"known tables: {', '.join(tables)}",
                )
            )
        del raw[name]
    return problems


def load_run_config(
    args: list[str], command: CommandSchema, require_file: bool = False
) -> LoadedConfig:
    """Validate `[CONFIG.toml] [--key value ...]` against the schema of `command` (from
    sdtrain.methods.registry.command_schema, or config.run.PLAN_COMMAND).

    Raises ConfigError listing every problem at once (flags, file and cross-field rules together).
    """
    from sdtrain.config.import_args import load_argument_toml, split_config_file

    schema = command.model
    args, config_file, problems = split_config_file(args)
    parsed = parse_flags(args, index_schema(schema))
    problems.extend(parsed.problems)
    if len(parsed.positionals) > 1:
        extra = " ".join(parsed.positionals[1:])
        problems.append(
            Problem(
                key="",
                file=CLI,
                message=f"unexpected extra argument(s): {extra}",
                hint="give one config file; options are written --key value",
            )
        )
    if require_file and not (parsed.positionals or parsed.values or config_file or problems):
        raise ConfigError(
            [Problem(key="", file=CLI, message="no config file and no options given")],
            hint=f"usage: {command.title} RUN.toml [--key value ...], or flags alone "
            "(--train_data_dir DIR --resolution 512 ...), or --config_file ARGS.toml",
        )
    path = Path(parsed.positionals[0]) if parsed.positionals else None
    if config_file is not None:
        doc = load_argument_toml(config_file, schema, parsed.positionals)
        path = doc.path
    else:
        doc = read_config_file(path) if path is not None else None
    raw: dict[str, Any] = copy.deepcopy(doc.data) if doc else {}
    problems.extend(_top_level_problems(raw, schema, command.title, doc))
    if doc and config_file is None:  # argument TOMLs resolve their paths when imported
        _resolve_paths(raw, schema, doc.path.parent)
    cli_keys: set[str] = set()
    for table, values in parsed.values.items():
        target = raw.setdefault(table, {})
        if isinstance(target, dict):
            target.update(values)
            cli_keys.update(f"{table}.{k}" for k in values)

    def locate(loc: tuple[str | int, ...]) -> tuple[str | None, int | None]:
        if ".".join(str(p) for p in loc[:2]) in cli_keys:
            return CLI, None
        if doc is None:
            return None, None
        return str(doc.path), doc.line_of(loc)

    def allowed(loc: tuple[str | int, ...]) -> list[str]:
        if not loc:
            return table_names(schema)
        info = schema.model_fields.get(str(loc[0]))
        if info is None:
            return []
        model = next(
            (
                t
                for t in (info.annotation, *getattr(info.annotation, "__args__", ()))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
        return list(model.model_fields) if model else []

    config = None
    try:
        config = schema.model_validate(raw)
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, locate, allowed_keys=allowed, schema=schema))
    if problems:
        raise ConfigError(problems, hint=_hint(path, problems))
    assert config is not None
    return LoadedConfig(config=config, source=doc, cli_keys=cli_keys, command=command)


def _hint(path: Path | None, problems: list[Problem]) -> str:
    in_file = path is not None and any(p.file != CLI for p in problems)
    on_line = any(p.file == CLI for p in problems)
    where = [f"in {path}"] if in_file else []
    where += ["on the command line"] if on_line else []
    return (
        f"fix the keys above {' and '.join(where)}".rstrip() + "; `--help-config` lists every key"
    )
