"""`sdtrain caption blip|wd14`: caption or tag image folders (thin layer over tools/caption)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(no_args_is_help=True, help="Caption or tag images (BLIP, WD14).")

FOLDERS = typer.Argument(..., help="Image folders.", show_default=False)
RECURSIVE = typer.Option(False, "--recursive", help="Include images in sub-folders.")
OVERWRITE = typer.Option(
    False,
    "--overwrite",
    help="Replace existing output files (default: keep them, count as skipped).",
)
WORKERS = typer.Option(
    None,
    "--max_data_loader_n_workers",
    "--max-data-loader-n-workers",
    "--workers",
    min=0,
    metavar="<int>",
    help="Background image-decoding threads (0: decode in the main thread). Default: up to 4.",
)


def _workers(value: int | None) -> int:
    from sdtrain.tools.caption.common import default_workers

    return default_workers() if value is None else value


@app.command("blip")
def blip(
    folders: list[Path] = FOLDERS,
    model: str = typer.Option(
        "Salesforce/blip-image-captioning-large",
        "--model",
        help="BLIP captioning model: a local folder or a Hugging Face hub id (cached offline).",
    ),
    batch_size: int = typer.Option(
        1, "--batch_size", "--batch-size", min=1, help="Images per batch."
    ),
    beam_search: bool = typer.Option(
        False, "--beam_search", "--beam-search", help="Beam search instead of nucleus sampling."
    ),
    num_beams: int = typer.Option(
        1, "--num_beams", "--num-beams", min=1, help="Beams (beam search)."
    ),
    top_p: float = typer.Option(0.9, "--top_p", "--top-p", help="Nucleus sampling p."),
    max_length: int = typer.Option(
        75,
        "--max_length",
        "--max-length",
        min=1,
        help="Maximum caption length in BLIP tokens (prompt included).",
    ),
    min_length: int = typer.Option(
        5,
        "--min_length",
        "--min-length",
        min=0,
        help="Minimum caption length in BLIP tokens (prompt included).",
    ),
    seed: int = typer.Option(42, "--seed", help="Random seed of the sampling."),
    prompt: str = typer.Option(
        "a picture of ", "--prompt", help="Text the decoder starts from; removed from the captions."
    ),
    caption_extension: str = typer.Option(
        ".caption",
        "--caption_extension",
        "--caption-extension",
        "--caption_extention",
        help="Suffix of the caption files written beside the images.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    recursive: bool = RECURSIVE,
    overwrite: bool = OVERWRITE,
    workers: int | None = WORKERS,
) -> None:
    """Write a BLIP caption file (`<image stem>.caption`) beside each image."""
    from sdtrain.tools.caption.blip import BlipOptions, caption_folders

    options = BlipOptions(
        batch_size=batch_size,
        beam_search=beam_search,
        num_beams=num_beams,
        top_p=top_p,
        max_length=max_length,
        min_length=min_length,
        seed=seed,
        prompt=prompt,
        caption_extension=caption_extension,
        recursive=recursive,
        overwrite=overwrite,
        workers=_workers(workers),
        device=device,
    )
    summary = caption_folders(folders, model, options)
    summary.report()
    _exit_if_failed(summary)


@app.command("wd14")
def wd14(
    folders: list[Path] = FOLDERS,
    model: str = typer.Option(
        "SmilingWolf/wd-v1-4-convnext-tagger-v2",
        "--model",
        "--repo_id",
        "--repo-id",
        help="Folder with model.onnx + selected_tags.csv, or a hub repo id (v3 taggers work).",
    ),
    thresh: float = typer.Option(0.35, "--thresh", help="Confidence needed to add a tag."),
    general_threshold: float | None = typer.Option(
        None,
        "--general_threshold",
        "--general-threshold",
        help="For general tags (default: --thresh).",
    ),
    character_threshold: float | None = typer.Option(
        None,
        "--character_threshold",
        "--character-threshold",
        help="For character tags (default: --thresh).",
    ),
    batch_size: int = typer.Option(
        1,
        "--batch_size",
        "--batch-size",
        min=1,
        help="Images per batch (a fixed batch size in the model wins).",
    ),
    caption_extension: str = typer.Option(
        ".txt",
        "--caption_extension",
        "--caption-extension",
        "--caption_extention",
        help="Suffix of the tag files written beside the images.",
    ),
    caption_separator: str = typer.Option(
        ", ", "--caption_separator", "--caption-separator", help="Text between tags."
    ),
    remove_underscore: bool = typer.Option(
        False,
        "--remove_underscore",
        "--remove-underscore",
        help="Underscores to spaces (tags longer than 3 characters).",
    ),
    character_tag_expand: bool = typer.Option(
        False,
        "--character_tag_expand",
        "--character-tag-expand",
        help="Split `name_(series)` character tags into `name, series`.",
    ),
    undesired_tags: str = typer.Option(
        "",
        "--undesired_tags",
        "--undesired-tags",
        help="Tags never written (separated like the output; use the final spelling).",
    ),
    tag_replacement: str | None = typer.Option(
        None,
        "--tag_replacement",
        "--tag-replacement",
        help="Rename tags: `src,dst;src2,dst2` (escape , and ; with a backslash).",
    ),
    character_tags_first: bool = typer.Option(
        False,
        "--character_tags_first",
        "--character-tags-first",
        help="Character tags before general tags.",
    ),
    always_first_tags: str | None = typer.Option(
        None,
        "--always_first_tags",
        "--always-first-tags",
        help="Tags moved to the front when present, in the order listed (e.g. `1girl,1boy`).",
    ),
    use_rating_tags: bool = typer.Option(
        False, "--use_rating_tags", "--use-rating-tags", help="Add the rating tag first."
    ),
    use_rating_tags_as_last_tag: bool = typer.Option(
        False,
        "--use_rating_tags_as_last_tag",
        "--use-rating-tags-as-last-tag",
        help="Add the rating tag last.",
    ),
    append_tags: bool = typer.Option(
        False,
        "--append_tags",
        "--append-tags",
        help="Add new tags to existing tag files (existing tags stay first).",
    ),
    frequency_tags: bool = typer.Option(
        False, "--frequency_tags", "--frequency-tags", help="Print how often each tag was given."
    ),
    recursive: bool = RECURSIVE,
    overwrite: bool = OVERWRITE,
    workers: int | None = WORKERS,
) -> None:
    """Write WD14 tags (`<image stem>.txt`) beside each image, with onnxruntime."""
    from sdtrain.tools.caption.wd14 import Wd14Options, tag_folders

    options = Wd14Options(
        thresh=thresh,
        general_threshold=general_threshold,
        character_threshold=character_threshold,
        batch_size=batch_size,
        workers=_workers(workers),
        caption_extension=caption_extension,
        caption_separator=caption_separator,
        remove_underscore=remove_underscore,
        character_tag_expand=character_tag_expand,
        undesired_tags=undesired_tags,
        tag_replacement=tag_replacement,
        character_tags_first=character_tags_first,
        always_first_tags=always_first_tags,
        use_rating_tags=use_rating_tags,
        use_rating_tags_as_last_tag=use_rating_tags_as_last_tag,
        append_tags=append_tags,
        recursive=recursive,
        overwrite=overwrite,
    )
    result = tag_folders(folders, model, options)
    result.summary.report()
    if frequency_tags:
        _print_frequency(result.frequency)
    _exit_if_failed(result.summary)


def _exit_if_failed(summary: Any) -> None:
    """Exit 1 after the summary when any image failed: a partial run is not a success."""
    if summary.failed:
        import logging

        total = len(summary.written) + len(summary.skipped) + len(summary.failed)
        logging.getLogger(__name__).error(
            "%d of %d image(s) failed (listed above); exit code 1. Fix or remove them and run "
            "the same command again (images that already have an output are skipped)",
            len(summary.failed),
            total,
        )
        raise typer.Exit(1)


def _print_frequency(frequency: dict[str, int]) -> None:
    from rich.table import Table

    from sdtrain.log import out

    table = Table(title="tag frequency")
    table.add_column("tag")
    table.add_column("images", justify="right")
    for tag, count in sorted(frequency.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(tag, str(count))
    out.print(table)
