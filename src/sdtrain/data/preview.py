"""Contact sheets of a plan: per bucket, sample images exactly as training feeds them (resized,
cropped, flipped, colour-jittered by the training transforms) with one processed caption each."""

from __future__ import annotations

import dataclasses
import html
import io
import random
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from sdtrain.data.captions import CaptionRecipe, process_caption, token_warmup_steps
from sdtrain.data.items import DatasetPlan, ImageEntry, Size, SubsetPlan
from sdtrain.errors import DataError, UsageError
from sdtrain.seeds import derive_seed

if TYPE_CHECKING:
    from sdtrain.data.plan import Plan

MARKER = "<!-- sdtrain dataset preview -->"
_RECIPE_KEYS = {f.name for f in dataclasses.fields(CaptionRecipe)} - {"replacements"}


def caption_recipe(subset: SubsetPlan, max_train_steps: int) -> CaptionRecipe:
    """The subset's caption settings, with a fractional token warm-up resolved to steps."""
    values = {k: v for k, v in subset.params.items() if k in _RECIPE_KEYS and v is not None}
    recipe = CaptionRecipe(**values)
    return dataclasses.replace(
        recipe, token_warmup_step=token_warmup_steps(recipe, max_train_steps)
    )


def _sample_image(
    subset: SubsetPlan, entry: ImageEntry, rng: random.Random
) -> tuple[Image.Image, bool]:
    """Pixels of one sample through the training transforms, back to an 8-bit image."""
    from sdtrain.data.transforms import TransformSpec, prepare_pixels

    params = subset.params
    flip = bool(params.get("flip_aug")) and rng.random() < 0.5
    face = params.get("face_crop_aug_range")
    spec = TransformSpec(
        bucket=entry.bucket,
        resized=entry.resized_size,
        interpolation=params.get("resize_interpolation"),  # type: ignore[arg-type]
        random_crop=bool(params.get("random_crop")),
        flip=flip,
        color_aug=bool(params.get("color_aug")),
        alpha_mask=bool(params.get("alpha_mask")),
        face_crop_range=tuple(face) if face else None,
    )  # type: ignore[arg-type]
    pixels = prepare_pixels(entry.path, spec, rng).pixels  # (3, H, W) in [-1, 1]
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB"), flip


def _pick(
    entries: list[tuple[SubsetPlan, ImageEntry]], count: int
) -> list[tuple[SubsetPlan, ImageEntry]]:
    """`count` entries spread evenly over the bucket (deterministic)."""
    if len(entries) <= count:
        return entries
    return [entries[i * len(entries) // count] for i in range(count)]


def _sheet(tiles: list[Image.Image], bucket: Size, tile: int) -> Image.Image:
    scale = min(tile / bucket[0], tile / bucket[1])
    cell = (max(1, int(bucket[0] * scale)), max(1, int(bucket[1] * scale)))
    columns = min(4, len(tiles))
    rows = (len(tiles) + columns - 1) // columns
    pad = 4
    sheet = Image.new(
        "RGB", (columns * (cell[0] + pad) + pad, rows * (cell[1] + pad) + pad), (32, 32, 32)
    )
    for n, image in enumerate(tiles):
        x = pad + (n % columns) * (cell[0] + pad)
        y = pad + (n // columns) * (cell[1] + pad)
        sheet.paste(image.resize(cell, Image.Resampling.BOX), (x, y))
    return sheet


def _bucket_section(
    plan: Plan,
    dataset: DatasetPlan,
    bucket_index: int,
    folder: Path,
    seed: int,
    per_bucket: int,
    tile: int,
) -> str:
    from sdtrain.atomic import write_bytes

    stat = dataset.buckets[bucket_index]
    members = [
        (s, i)
        for s in dataset.subsets
        for i in s.images
        if i.bucket == stat.resolution and i.num_repeats > 0
    ]
    recipes = {id(s): caption_recipe(s, plan.facts.max_train_steps) for s in dataset.subsets}
    tiles, items = [], []
    for n, (subset, entry) in enumerate(_pick(members, per_bucket)):
        rng = random.Random(derive_seed(seed, "preview", dataset.index, bucket_index, n))
        try:
            image, flipped = _sample_image(subset, entry, rng)
        except DataError as exc:
            image, flipped = Image.new("RGB", stat.resolution, (160, 0, 0)), False
            items.append(
                f"<li class=bad>{html.escape(entry.path.name)}: {html.escape(exc.message)}</li>"
            )
            tiles.append(image)
            continue
        caption = process_caption(entry.caption, recipes[id(subset)], rng, 1, 0)
        tiles.append(image)
        items.append(
            f"<li><b>{html.escape(entry.path.name)}</b>"
            f"{' (flipped)' if flipped else ''}{' [reg]' if entry.is_reg else ''}: "
            f"{html.escape(caption)}</li>"
        )
    width, height = stat.resolution
    name = f"dataset{dataset.index}_{width}x{height}.png"
    buffer = io.BytesIO()
    _sheet(tiles, stat.resolution, tile).save(buffer, "PNG")
    write_bytes(folder / name, buffer.getvalue())
    return (
        f"<h3>bucket {width}x{height}: {stat.samples} samples, {stat.batches} batches "
        f'(showing {len(tiles)} images)</h3>\n<img src="{name}" alt="{name}">\n'
        f"<ol>{''.join(items)}</ol>"
    )


def write_preview(
    plan: Plan, folder: Path, seed: int, per_bucket: int = 16, tile: int = 192
) -> Path:
    """Write one PNG contact sheet per used bucket and an index.html; returns the page's path.

    Refuses (UsageError) to write into a folder whose index.html was not made by this command.
    """
    from sdtrain.atomic import write_text

    folder = Path(folder)
    page = folder / "index.html"
    if page.exists() and MARKER not in page.read_text(encoding="utf-8", errors="replace"):
        raise UsageError(
            f"{page} exists and is not an sdtrain preview",
            hint="choose an empty or new folder for --preview",
        )
    folder.mkdir(parents=True, exist_ok=True)
    parts = [
        f"<!doctype html>\n{MARKER}\n<html><head><meta charset=utf-8>"
        "<title>sdtrain dataset preview</title><style>body{font-family:sans-serif}"
        "img{max-width:100%}.bad{color:#a00}</style></head><body>",
        f"<h1>Dataset preview</h1><p>{html.escape(plan.source)}: "
        f"{plan.batches_per_epoch} batches per epoch. Images as training sees them "
        "(epoch 1 augmentations, one caption sample each).</p>",
    ]
    for dataset in plan.datasets:
        parts.append(f"<h2>datasets[{dataset.index}] ({dataset.kind})</h2>")
        for bucket_index in range(len(dataset.buckets)):
            parts.append(
                _bucket_section(plan, dataset, bucket_index, folder, seed, per_bucket, tile)
            )
    parts.append("</body></html>\n")
    write_text(page, "\n".join(parts))
    return page
