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
    """Print every key of `command`'s schema: table, type, default and description."""
    from sdtrain.cli.help_config import print_help_config_for

    print_help_config_for(command.model, command.name)
