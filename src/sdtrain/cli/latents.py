"""`sdtrain latents cache`: pre-encode training latents to the disk cache (parse, run, show)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from sdtrain.cli.options import CONFIG_COMMAND

if TYPE_CHECKING:
    from sdtrain.run.latents import LatentsOutcome

app = typer.Typer(no_args_is_help=True, help="Pre-encode training latents (VAE) to disk.")

_LISTED = 20  # entries listed per kind by --verify


@app.command("cache", context_settings=CONFIG_COMMAND)
def cache(
    ctx: typer.Context,
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Only report missing and stale entries; write nothing. Exit code 1 if any.",
    ),
    help_config: bool = typer.Option(
        False, "--help-config", "--help_config", help="List every configuration key and exit."
    ),
) -> None:
    """Encode every training image (and its flip with flip_aug) into the latent cache.

    Usage: sdtrain latents cache RUN_OR_BLUEPRINT.toml [--pretrained_model_name_or_path M
    --mixed_precision bf16 --vae_batch_size 8 --latent_cache_dir DIR ...] [--verify]

    Latents are encoded at the bucket and crop `sdtrain dataset plan` shows, with the VAE of
    [model] in the dtype training would use, into [training] latent_cache_dir (default
    ~/.cache/sdtrain/latents). A later run with cache_latents_to_disk = true and the same folder
    then does no VAE work for these images. Entries already cached are skipped after a cheap
    check; interrupted runs resume where they stopped. Any run key can be given as --key value.
    """
    if help_config:
        from sdtrain.cli.options import print_help_config
        from sdtrain.config.run import PLAN_COMMAND

        print_help_config(PLAN_COMMAND)
        raise typer.Exit()
    from sdtrain.config.loader import load_run_config
    from sdtrain.config.run import PLAN_COMMAND
    from sdtrain.run.latents import cache_latents

    loaded = load_run_config(list(ctx.args), PLAN_COMMAND, require_file=True)
    outcome = cache_latents(loaded, verify_only=verify)
    _render(outcome)
    report = outcome.report
    if verify and (report.missing or report.stale):
        raise typer.Exit(1)


def _render(outcome: LatentsOutcome) -> None:
    from rich.markup import escape

    from sdtrain.log import console, out

    report = outcome.report
    out.print(f"latent cache: {escape(str(outcome.folder))} ({outcome.dtype}, {outcome.device})")
    if outcome.verify_only:
        out.print(
            f"{report.total} latents needed: {report.reused} cached, "
            f"{len(report.missing)} missing, {len(report.stale)} stale"
        )
        for title, entries in (("missing", report.missing), ("stale", report.stale)):
            for entry in entries[:_LISTED]:
                out.print(f"  {title}: {escape(entry)}")
            if len(entries) > _LISTED:
                out.print(f"  ... and {len(entries) - _LISTED} more {title}")
        if report.missing or report.stale:
            console.print("run `sdtrain latents cache` without --verify to fill the cache")
        return
    replaced = f" ({len(report.stale)} stale entries replaced)" if report.stale else ""
    out.print(
        f"{report.total} latents needed: {report.encoded} encoded, "
        f"{report.reused} already cached{replaced}"
    )
    if report.encoded:
        out.print(
            f"{report.images_per_second:.1f} images/s, "
            f"{100 * report.outside_vae_share:.0f}% of the time outside the VAE"
        )
    if not outcome.training_reads_it:
        console.print(
            "note: training uses this cache with cache_latents_to_disk = true in [training] "
            "(and the same latent_cache_dir)",
            markup=False,
        )
