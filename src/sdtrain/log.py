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
    quiet_third_party(verbosity > 0)


# Libraries whose notices (torchvision hints, deprecation FutureWarnings, optional-kernel
# messages) are not the user's business unless they ask with -v.
THIRD_PARTY_LOGGERS = (
    "transformers",
    "diffusers",
    "accelerate",
    "huggingface_hub",
    "bitsandbytes",
    "peft",
    "torch",
    "PIL",
)


def quiet_third_party(verbose: bool) -> None:
    """Hide third-party warnings (Python warnings and library loggers) unless `verbose`.

    transformers/diffusers reset their own logger level when first imported, so their
    *_VERBOSITY variables are set too (before any heavy import; an explicit value wins).
    """
    import os
    import warnings

    if verbose:
        warnings.resetwarnings()
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"sdtrain(\.|$)")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A rich progress bar (count, elapsed, ETA) on stderr; only the final state off a TTY.

    Fits 80 columns: the bar and the time columns have fixed widths and the free-text `info`
    field takes what is left (cut with "…" when the terminal is narrow), so the times always show.
    `disable`: draw nothing (processes other than the main one of a multi-process run).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TextColumn(
            "{task.fields[info]}",
            markup=False,
            table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=0),
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(compact=True),
        console=console,
        transient=transient,
        expand=True,
        disable=disable,
    )
