"""One rich Console for the whole program, logging setup and the progress-bar factory."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

console = Console(stderr=True)
out = Console()  # stdout: machine-readable output (JSON) and primary results

LOGGER_NAME = "sdtrain"


def setup_logging(verbosity: int = 0) -> None:
    """Install one RichHandler on the package logger. verbosity: -1 quiet, 0 info, >=1 debug."""
    from rich.logging import RichHandler

    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def progress(transient: bool = False) -> Progress:
    """A rich progress bar (rate, ETA) on stderr; only the final state is printed off a TTY."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )
