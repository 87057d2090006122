"""`sdtrain train <method>`: the training commands (thin: parse, plan, run, render)."""

from __future__ import annotations

import shlex

import typer

from sdtrain.cli.options import CONFIG_COMMAND

app = typer.Typer(no_args_is_help=True, help="Train LoRA (more methods follow on the same engine).")

_EVERYDAY = """
Everyday options (any key of the run schema works as --key value; see --help-config):
  --pretrained_model_name_or_path PATH   --output_dir DIR   --output_name NAME
  --max_train_steps N   --max_train_epochs N   --train_batch_size N   --learning_rate LR
  --network_dim N   --network_alpha A   --mixed_precision no|bf16|fp16   --seed N
  --cache_latents   --save_every_n_epochs N   --save_state   --resume PATH|auto
"""


def _run(ctx: typer.Context, command: str, dry_run: bool, help_config: bool) -> None:
    if help_config:
        from sdtrain.cli.options import print_help_config

        print_help_config(command)
        raise typer.Exit()
    from sdtrain.cli.plan_view import render_plan
    from sdtrain.config.loader import load_run_config
    from sdtrain.log import console, out
    from sdtrain.run.train import execute, prepare

    loaded = load_run_config(list(ctx.args), command, require_file=True)
    prepared = prepare(loaded, command, write_caches=not dry_run)
    render_plan(console, prepared.plan)
    if dry_run:
        from rich.syntax import Syntax

        from sdtrain.config.resolved import resolved_toml

        console.print("[bold]resolved config[/bold] (every effective value):")
        out.print(Syntax(resolved_toml(loaded.config), "toml", theme="ansi_dark"))
        console.print("[green]dry run: configuration and data are valid; nothing was trained.")
        return
    # from the parsed command, not sys.argv (which is the host's when invoked in-process)
    hint = " ".join(shlex.quote(a) for a in ["sdtrain", "train", command, *ctx.args])
    result = execute(prepared, resume_hint=_without_resume(hint))
    console.print(f"[green]done:[/green] {result.global_step} optimizer steps")
    for path in result.outputs:
        console.print(f"  wrote {path}")


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


@app.command("lora", context_settings=CONFIG_COMMAND, epilog=_EVERYDAY)
def lora(
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
    """Train a kohya-compatible LoRA: sdtrain train lora RUN.toml [--key value ...]"""
    _run(ctx, "lora", dry_run, help_config)
