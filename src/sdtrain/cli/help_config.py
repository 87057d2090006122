"""`--help-config`: every key of a command's schema as plain text, one key per block.

Plain text on purpose (no rich table, no markup): names and defaults are never cut or wrapped
mid-word at 80 columns, `[table]` names print literally, and the output is greppable
(`sdtrain train lora --help-config | grep -A1 learning_rate`).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator

from pydantic import BaseModel


def _type_text(text: str) -> str:
    """`Optional[Literal[75, 150]]` -> `75 | 150 | None`: the words a user types."""
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional[") : -1] + " | None"
    while "Literal[" in text:
        start = text.index("Literal[")
        end = text.index("]", start)
        inner = text[start + len("Literal[") : end].replace(", ", " | ")
        text = text[:start] + inner + text[end + 1 :]
    return text


def help_config_lines(schema: type[BaseModel], command: str, width: int = 80) -> Iterator[str]:
    """The listing: a heading per table, then `key  [table]  type = default` and the meaning."""
    from sdtrain.config.schema_index import index_schema

    yield f"configuration keys ({command}): in the run TOML, or as --key value flags"
    table = None
    for name, info in index_schema(schema).items():
        if info.table != table:
            table = info.table
            yield ""
            yield f"[{table}]"
        kind = _type_text(info.type_text())
        head = f"  {name}  [{table}]  {kind} = {info.default_text()}"
        if len(head) <= width:
            yield head
        else:  # long choice lists go on their own wrapped lines, after the default
            yield f"  {name}  [{table}]  default {info.default_text()}"
            yield from textwrap.wrap(
                kind, width=width, initial_indent="      one of: ", subsequent_indent="        "
            )
        description = info.field.description or ""
        for line in textwrap.wrap(description, width=max(40, width - 6)):
            yield f"      {line}"
    yield ""
    yield from textwrap.wrap(
        "Every key can be set in the run TOML under its table, or as a flag: --key value "
        "(--key-name works too; booleans: --key / --no-key). Flags win over the file.",
        width=width,
    )


def print_help_config_for(schema: type[BaseModel], command: str) -> None:
    """Write the listing to stdout (plain text, the terminal's width, at most 100 columns)."""
    from sdtrain.log import out

    width = min(100, shutil.get_terminal_size((80, 24)).columns)
    for line in help_config_lines(schema, command, width):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
