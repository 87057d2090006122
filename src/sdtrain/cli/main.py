"""Root Typer app: global options, command groups, and the single error boundary."""

from __future__ import annotations

import logging
import os
import signal
import sys

import typer

from sdtrain import __version__

app = typer.Typer(
    name="sdtrain",
    help="Train Stable Diffusion 1.x/2.x models and prepare their data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: see sdtrain.cli.groups.PLAIN_HELP
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdtrain {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More output (-vv for debug)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (or set SDTRAIN_DEBUG=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train Stable Diffusion 1.x/2.x models (LoRA, DreamBooth, fine-tune, TI) and prepare data."""
    from sdtrain.log import setup_logging

    if debug:
        os.environ["SDTRAIN_DEBUG"] = "1"
    setup_logging(-1 if quiet else verbose)
    from sdtrain.cli.allocator import describe

    allocator = describe(dict(os.environ))
    if allocator:
        logging.getLogger("sdtrain").debug(allocator)


_registered: set[str] = set()


def _register_groups() -> None:
    """Attach every command group listed in cli/groups.py (safe to call more than once)."""
    from sdtrain.cli import groups

    for name, module_path, help_text in groups.GROUPS:
        if name not in _registered:
            app.add_typer(groups.lazy(module_path), name=name, help=help_text)
            _registered.add(name)


def _on_sigint(signum: int, frame: object) -> None:
    from sdtrain.errors import Interrupted

    raise Interrupted("interrupted by the user", hint="run the same command again to start over")


def run() -> None:
    """Console-script entry: run the app, render SdtrainErrors once, map exit codes.

    `train` commands first re-execute the process once with a faster memory allocator
    (tcmalloc or glibc tunables; opt out with SDTRAIN_NO_REEXEC=1): see sdtrain.cli.allocator.
    A command that loaded torch ends without the interpreter's teardown: see sdtrain.cli.fast_exit.
    """
    from sdtrain.cli.allocator import maybe_reexec
    from sdtrain.cli.fast_exit import leave
    from sdtrain.errors import SdtrainError

    maybe_reexec(sys.argv[1:])
    signal.signal(signal.SIGINT, _on_sigint)
    _register_groups()
    try:
        app()
    except SdtrainError as error:
        from sdtrain.cli.render import render_error
        from sdtrain.errors import Interrupted
        from sdtrain.launch import is_main_process

        # a stop is agreed by every process of a launched run: the main process shows it once;
        # any other error may be one process's alone (a file missing on one machine), so each
        # process shows its own
        if is_main_process() or not isinstance(error, Interrupted):
            render_error(error)
        leave(error.exit_code)
    except SystemExit as done:
        leave(done.code)
    leave(0)
