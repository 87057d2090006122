"""Shared pieces of config-driven commands: extra-args settings and the --help-config listing."""

from __future__ import annotations

from typing import Any

CONFIG_COMMAND: dict[str, Any] = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": ["--help", "-h"],
}


def print_help_config(command: str) -> None:
    """Print every key of `command`'s schema with table, type, default and description."""
    from rich.table import Table

    from sdtrain.config.run import COMMAND_SCHEMAS
    from sdtrain.config.schema_index import index_schema
    from sdtrain.log import out

    table = Table(title=f"configuration keys ({command})", show_lines=False)
    for column in ("key", "table", "type", "default", "description"):
        table.add_column(column, overflow="fold")
    for name, info in index_schema(COMMAND_SCHEMAS[command]).items():
        table.add_row(
            name,
            f"[{info.table}]",
            info.type_text(),
            info.default_text(),
            info.field.description or "",
        )
    out.print(table)
    out.print(
        "Every key can be set in the run TOML under its table, or as a flag: --key value "
        "(--key-name works too; booleans: --key / --no-key). Flags win over the file."
    )
