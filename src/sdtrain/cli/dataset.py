"""`sdtrain dataset plan`: show what training would see, without importing torch."""

from __future__ import annotations

from pathlib import Path

import typer

from sdtrain.cli.options import CONFIG_COMMAND

app = typer.Typer(no_args_is_help=True, help="Inspect datasets before training.")


@app.command("plan", context_settings=CONFIG_COMMAND)
def plan(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
    preview: Path | None = typer.Option(
        None, "--preview", help="Write per-bucket contact sheets + index.html into this folder."
    ),
    help_config: bool = typer.Option(
        False, "--help-config", "--help_config", help="List every configuration key and exit."
    ),
) -> None:
    """Plan the datasets of RUN.toml, of a bare blueprint .toml, or of flags alone.

    \b
    sdtrain dataset plan RUN_OR_BLUEPRINT.toml [--key value ...] [--json]
    sdtrain dataset plan --train_data_dir DIR [--reg_data_dir DIR]
        --resolution 512 [--enable_bucket --train_batch_size 2 ...]
    sdtrain dataset plan --config_file ARGS.toml   (the reference's argument TOML)

    A run file's method table ([network] for lora, ...) makes the plan check the dataset
    kinds that method trains. Shows images, repeats, captions found/missing, regularization
    balance, the validation split, buckets, invalid images, where each effective value came
    from, and the epoch/step totals. Any run key can be given as --key value.
    """
    from sdtrain.log import out

    if help_config:
        from sdtrain.cli.options import print_help_config
        from sdtrain.config.run import PLAN_COMMAND

        print_help_config(PLAN_COMMAND)
        raise typer.Exit()
    from sdtrain.config.loader import load_run_config
    from sdtrain.config.run import PLAN_COMMAND
    from sdtrain.data.plan import plan_for_run

    loaded = load_run_config(list(ctx.args), PLAN_COMMAND, require_file=True)
    from sdtrain.methods.registry import plan_support

    # the run file's method picks the dataset kinds (its table: [network] -> lora, ...)
    result = plan_for_run(loaded, support=plan_support(loaded.config))
    if as_json:
        import json

        typer.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        import logging

        from sdtrain.cli.plan_view import render_plan

        verbose = logging.getLogger("sdtrain").getEffectiveLevel() <= logging.DEBUG
        render_plan(out, result, verbose=verbose)
    if preview is not None:
        from sdtrain.data.preview import write_preview

        seed = loaded.config.training.seed or 0
        page = write_preview(result, preview, seed)
        typer.echo(f"preview written: {page}", err=as_json)
