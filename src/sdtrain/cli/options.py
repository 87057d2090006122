"""Shared pieces of config-driven commands: extra-args settings and the --help-config listing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdtrain.config.run import CommandSchema

CONFIG_COMMAND: dict[str, Any] = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": ["--help", "-h"],
}


def print_help_config(command: CommandSchema) -> None:
    """Print every key of `command`'s schema with table, type, default and description."""
    from rich.markup import escape
    from rich.table import Table

    from sdtrain.config.schema_index import index_schema
    from sdtrain.log import out

    table = Table(title=f"configuration keys ({command.name})", show_lines=False)
    for column in ("key", "table", "type", "default", "description"):
        table.add_column(column, overflow="fold")
    for name, info in index_schema(command.model).items():
        table.add_row(
            name,
            escape(f"[{info.table}]"),  # not rich markup
            info.type_text(),
            info.default_text(),
            info.field.description or "",
        )
    out.print(table)
    out.print(
        "Every key can be set in the run TOML under its table, or as a flag: --key value "
        "(--key-name works too; booleans: --key / --no-key). Flags win over the file."
    )
