"""Sample images on disk: PNGs with an A1111 "parameters" chunk, file names, contact sheets."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.atomic import write_bytes

if TYPE_CHECKING:
    from PIL import Image

    from sdtrain.config.prompt_file import PromptSpec
    from sdtrain.models.sampling import GeneratedImage

PARAMETERS_KEY = "parameters"  # the tEXt keyword AUTOMATIC1111 and most viewers read
SHEET_COLUMNS = 8
_LABEL_CHARS = 48


def format_parameters(
    spec: PromptSpec,
    seed: int,
    model: str | None = None,
    clip_skip: int | None = None,
    extras: dict[str, str] | None = None,
) -> str:
    """A1111 "parameters" text: prompt, `Negative prompt: ...`, then `Steps: N, Sampler: ...`.

    The sampler is written under sdtrain's (the reference's) name, e.g. `euler_a`. `extras` are
    appended as further `Key: value` fields (values containing commas are quoted, as A1111 does).
    """
    lines = [spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    fields = [
        f"Steps: {spec.steps}",
        f"Sampler: {spec.sampler}",
        f"CFG scale: {spec.scale:g}",
        f"Seed: {seed}",
        f"Size: {spec.width}x{spec.height}",
    ]
    if model:
        fields.append(f"Model: {model}")
    if clip_skip and clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    for key, value in (extras or {}).items():
        fields.append(f"{key}: {_quote(value)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _quote(value: str) -> str:
    """A1111's infotext quoting: JSON-quote values holding `,`, `:` or a newline."""
    if any(char in value for char in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """Encode `image` as PNG with an optional "parameters" tEXt chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(path: Path, image: Image.Image, parameters: str | None = None) -> Path:
    """Write `image` atomically as a PNG carrying `parameters`; returns `path`."""
    write_bytes(Path(path), png_bytes(image, parameters))
    return Path(path)


def read_parameters(path: Path) -> str | None:
    """The "parameters" text of a PNG, or None when it has none."""
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get(PARAMETERS_KEY)


def sample_num(epoch: int | None = None, global_step: int | None = None) -> str:
    """The `<num>` part of a training sample name: `e000003` at epochs, `001000` at steps."""
    if epoch is not None:
        return f"e{epoch:06d}"
    if global_step is None:
        raise ValueError("sample_num needs an epoch or a global step")
    return f"{global_step:06d}"


def timestamp() -> str:
    """Local time as YYYYmmddHHMMSS (the reference's sample-name timestamp)."""
    return time.strftime("%Y%m%d%H%M%S")


def sample_path(
    output_dir: Path, output_name: str | None, num: str, index: int, stamp: str, seed: int | None
) -> Path:
    """`<output_dir>/sample/[<output_name>_]<num>_<idx:02d>_<stamp>[_<seed>].png` (§10.4).

    `seed` is given only for prompts with an explicit seed, as in the reference.
    """
    prefix = f"{output_name}_" if output_name else ""
    suffix = "" if seed is None else f"_{seed}"
    return Path(output_dir) / "sample" / f"{prefix}{num}_{index:02d}_{stamp}{suffix}.png"


def sheet_path(output_dir: Path, output_name: str | None, num: str, stamp: str) -> Path:
    """`<output_dir>/sample/[<output_name>_]<num>_sheet_<stamp>.png`: one per save point."""
    prefix = f"{output_name}_" if output_name else ""
    return Path(output_dir) / "sample" / f"{prefix}{num}_sheet_{stamp}.png"


@dataclass(frozen=True)
class SheetItem:
    """One labelled cell of a contact sheet."""

    image: Image.Image
    label: str


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
    import textwrap

    lines = textwrap.wrap(text, width=width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 3)] + "..."
    return lines


def contact_sheet(items: Sequence[SheetItem], title: str | None = None) -> Image.Image:
    """All images side by side (up to 8 per row) on white, each with its label underneath.

    Cells are as large as the largest image; smaller images are centred. The title, if any, is
    written across the top.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not items:
        raise ValueError("a contact sheet needs at least one image")
    font = ImageFont.load_default()
    line_height = 12
    cell_w = max(item.image.width for item in items)
    cell_h = max(item.image.height for item in items)
    chars = max(8, min(_LABEL_CHARS, cell_w // 6))
    labels = [_wrap(item.label, chars, 3) for item in items]
    label_h = line_height * max(len(lines) for lines in labels) + 6
    columns = min(SHEET_COLUMNS, len(items))
    rows = math.ceil(len(items) / columns)
    pad = 4
    top = line_height + 2 * pad if title else 0
    sheet = Image.new(
        "RGB",
        (columns * (cell_w + pad) + pad, top + rows * (cell_h + label_h + pad) + pad),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for i, (item, lines) in enumerate(zip(items, labels, strict=True)):
        x = pad + (i % columns) * (cell_w + pad)
        y = top + pad + (i // columns) * (cell_h + label_h + pad)
        image = item.image.convert("RGB")
        sheet.paste(image, (x + (cell_w - image.width) // 2, y + (cell_h - image.height) // 2))
        for k, line in enumerate(lines):
            draw.text((x, y + cell_h + 3 + k * line_height), line, fill="black", font=font)
    return sheet


@dataclass(frozen=True)
class SampleSet:
    """The files written for one save point: one PNG per prompt, plus the contact sheet."""

    images: list[Path]
    sheet: Path


def save_sample_set(
    results: Sequence[GeneratedImage],
    output_dir: Path,
    output_name: str | None,
    num: str,
    model: str | None = None,
    clip_skip: int | None = None,
    stamp: str | None = None,
) -> SampleSet:
    """Write training samples with the reference's names (§10.4) and a labelled contact sheet.

    `num` comes from `sample_num`. The seed is part of a file name only when the prompt gave one
    (as in the reference); the seed actually used is always in the PNG's parameters.
    """
    stamp = stamp or timestamp()
    paths, items = [], []
    for result in results:
        spec = result.spec
        path = sample_path(output_dir, output_name, num, spec.index, stamp, spec.seed)
        text = format_parameters(spec, result.seed, model, clip_skip)
        paths.append(save_png(path, result.image, text))
        items.append(
            SheetItem(result.image, f"{spec.index:02d} (seed {result.seed}): {spec.prompt}")
        )
    title = f"{output_name or 'samples'} {num}"
    sheet = save_png(sheet_path(output_dir, output_name, num, stamp), contact_sheet(items, title))
    return SampleSet(images=paths, sheet=sheet)
