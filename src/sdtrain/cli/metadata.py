"""`sdtrain metadata merge|clean`: build and clean fine-tune metadata JSON (thin CLI layer)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Build and clean fine-tune metadata JSON.")

IN_PLACE = typer.Option(
    False, "--in-place", "--in_place", help="Rewrite the existing file (a .bak copy is kept)."
)
OVERWRITE = typer.Option(
    False, "--overwrite", help="Replace an existing output file (a .bak copy is kept)."
)


@app.command("merge")
def merge(
    folder: Path = typer.Argument(..., help="Image folder whose caption/tag files are merged."),
    out_json: Path = typer.Argument(..., help="Metadata JSON to write."),
    in_json: Path | None = typer.Option(
        None, "--in_json", "--in-json", help="Metadata to start from (its other entries are kept)."
    ),
    full_path: bool = typer.Option(
        False,
        "--full_path",
        "--full-path",
        help="Key entries by absolute image path (default: path relative to FOLDER).",
    ),
    captions: bool = typer.Option(True, "--captions/--no-captions", help="Merge caption files."),
    tags: bool = typer.Option(True, "--tags/--no-tags", help="Merge tag files."),
    caption_extension: str = typer.Option(
        ".caption",
        "--caption_extension",
        "--caption-extension",
        "--caption_extention",
        help="Suffix of caption files.",
    ),
    tag_extension: str = typer.Option(
        ".txt", "--tag_extension", "--tag-extension", help="Suffix of tag files."
    ),
    recursive: bool = typer.Option(False, "--recursive", help="Include images in sub-folders."),
    in_place: bool = IN_PLACE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Collect captions (.caption) and tags (.txt) beside the images into a metadata JSON.

    Without --in_json the output starts empty; with --in-place an existing OUT_JSON is read and
    updated (the reference's behaviour when --in_json is omitted).
    """
    from sdtrain.errors import UsageError
    from sdtrain.tools.metadata import choose_output, load_metadata, merge_text_files, save_metadata

    sources = {}
    if captions:
        sources["caption"] = caption_extension
    if tags:
        sources["tags"] = tag_extension
    if not sources:
        raise UsageError("nothing to merge", hint="drop --no-captions or --no-tags")
    target = choose_output(in_json, out_json, in_place=in_place, overwrite=overwrite)
    if in_json is not None:
        base = load_metadata(in_json)
    elif in_place and target.exists():
        base = load_metadata(target)
    else:
        base = {}
    merged, report = merge_text_files(
        base, folder, sources, full_path=full_path, recursive=recursive
    )
    report.log()
    _saved(target, save_metadata(target, merged), len(merged))


@app.command("clean")
def clean(
    in_json: Path = typer.Argument(..., help="Metadata JSON to clean."),
    out_json: Path | None = typer.Argument(None, help="Where to write the cleaned metadata."),
    dry_run: bool = typer.Option(
        False, "--dry-run", "--dry_run", help="Only show what would change; write nothing."
    ),
    in_place: bool = IN_PLACE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Clean tags and captions with the reference's rules (clean_captions_and_tags.py)."""
    from sdtrain.log import out
    from sdtrain.tools.metadata import (
        choose_output,
        clean_metadata,
        format_changes,
        load_metadata,
        save_metadata,
    )

    target = None
    if not dry_run:
        target = choose_output(in_json, out_json, in_place=in_place, overwrite=overwrite)
    cleaned, report = clean_metadata(load_metadata(in_json))
    if dry_run:
        for line in format_changes(report.changes):
            out.print(line, markup=False, highlight=False, soft_wrap=True)
    report.log()
    if target is not None:
        _saved(target, save_metadata(target, cleaned), len(cleaned))


def _saved(target: Path, backup: Path | None, entries: int) -> None:
    import logging

    logger = logging.getLogger(__name__)
    logger.info("wrote %s (%d entries)", target, entries)
    if backup is not None:
        logger.info("previous version kept as %s", backup)
