"""The one place where SdtrainErrors become terminal output (and exit codes)."""

from __future__ import annotations

import os

from rich.markup import escape
from rich.panel import Panel
from rich.text import Text

from sdtrain.errors import ConfigError, SdtrainError
from sdtrain.log import console


def debug_enabled() -> bool:
    """True when tracebacks were asked for (--debug or SDTRAIN_DEBUG=1)."""
    return os.environ.get("SDTRAIN_DEBUG", "") not in ("", "0")


def _value_text(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def render_error(error: SdtrainError) -> None:
    """Print `error` as a red panel: what happened, where, and what to do next."""
    body = Text()
    if isinstance(error, ConfigError):
        body.append(error.message + ":\n", style="bold")
        for problem in error.problems:
            body.append("\n • ")
            where = problem.location()
            if where == "<command line>":
                where = "on the command line"
            if where and where != "<config>":
                body.append(where, style="cyan")
                body.append("  ")
            if problem.key:
                body.append(problem.key, style="bold")
                body.append(": ")
            body.append(problem.message)
            if problem.has_value:
                body.append(f" (got {_value_text(problem.value)})", style="dim")
            if problem.hint:
                body.append(f"\n   hint: {problem.hint}", style="yellow")
    else:
        body.append(error.message)
    if error.hint:
        body.append("\n\nnext: ", style="bold green")
        body.append(error.hint)
    title = type(error).__name__
    console.print(Panel(body, title=f"[bold red]{escape(title)}", border_style="red", expand=False))
    if debug_enabled():
        console.print_exception(show_locals=False)
