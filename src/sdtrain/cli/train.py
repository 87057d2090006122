"""`sdtrain train <method>`: the training commands (thin: parse, plan, run, render)."""

from __future__ import annotations

import shlex
from collections.abc import Callable

import typer

from sdtrain.cli.options import CONFIG_COMMAND
from sdtrain.methods.registry import METHODS, MethodEntry

app = typer.Typer(
    no_args_is_help=True,
    help="Train a model (" + ", ".join(METHODS) + "): one engine, one command per method.",
)


def _run(ctx: typer.Context, command: str, dry_run: bool, help_config: bool) -> None:
    if help_config:
        from sdtrain.cli.options import print_help_config

        print_help_config(METHODS[command].command)
        raise typer.Exit()
    from sdtrain.cli.plan_view import render_plan
    from sdtrain.config.loader import load_run_config
    from sdtrain.launch import is_main_process
    from sdtrain.log import console, out
    from sdtrain.run.train import execute, prepare

    main = is_main_process()
    if not main:  # the other processes of a launched run: warnings and errors only
        import logging

        logging.getLogger("sdtrain").setLevel(logging.WARNING)
    loaded = load_run_config(list(ctx.args), METHODS[command].command, require_file=True)
    # size caches (cache_info) are files: only the main process writes them
    prepared = prepare(loaded, command, write_caches=not dry_run and main)
    if dry_run:
        render_plan(console, prepared.plan)
    elif main:
        from sdtrain.cli.summary import print_summary

        print_summary(console, prepared.plan, str(loaded.config.training.output_dir))
    if dry_run:
        from sdtrain.config.resolved import resolved_toml

        console.print("[bold]resolved config[/bold] (every effective value):")
        # plain and unwrapped: the TOML can be copied as is (a narrow terminal cut long lines)
        out.print(resolved_toml(loaded.config), markup=False, highlight=False, soft_wrap=True)
        console.print("[green]dry run: configuration and data are valid; nothing was trained.")
        return
    # from the parsed command, not sys.argv (which is the host's when invoked in-process)
    hint = " ".join(shlex.quote(a) for a in ["sdtrain", "train", command, *ctx.args])
    result = execute(prepared, resume_hint=_without_resume(hint))
    if not main:
        return
    console.print(f"[green]done:[/green] {result.global_step} optimizer steps")
    for path in result.outputs:
        console.print(f"  wrote {path}", markup=False, highlight=False, soft_wrap=True)


def _without_resume(command: str) -> str:
    parts = shlex.split(command)
    kept, skip = [], False
    for part in parts:
        if skip:
            skip = False
            continue
        if part in ("--resume",):
            skip = True
            continue
        if part.startswith("--resume="):
            continue
        kept.append(part)
    return " ".join(shlex.quote(p) for p in kept)


def _command(entry: MethodEntry) -> Callable[..., None]:
    def train(
        ctx: typer.Context,
        dry_run: bool = typer.Option(
            False,
            "--dry-run",
            "--dry_run",
            help="Validate, print the plan and resolved config; load no weights.",
        ),
        help_config: bool = typer.Option(
            False, "--help-config", "--help_config", help="List every configuration key and exit."
        ),
    ) -> None:
        _run(ctx, entry.name, dry_run, help_config)

    train.__doc__ = entry.summary
    return train


for _entry in METHODS.values():
    app.command(
        _entry.name,
        context_settings=CONFIG_COMMAND,
        # "\b": click prints the block as written (its line breaks are the layout)
        epilog="\b\n" + _entry.usage.strip("\n") if _entry.usage else None,
        short_help=_entry.summary.split(":")[0],  # the command list never cuts it
    )(_command(_entry))
