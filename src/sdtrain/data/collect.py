"""Collect one subset's images: sizes from headers (or metadata), captions, invalid files (§3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.data.captions import read_caption_file, tag_frequency
from sdtrain.data.imageinfo import ImageInfo, UnreadableImage, read_image_info
from sdtrain.data.info_cache import InfoCache
from sdtrain.data.items import ImageEntry, InvalidImage
from sdtrain.data.metadata import FolderIndex, metadata_entries, metadata_tag_frequency
from sdtrain.data.pixels import pixel_problem, should_verify
from sdtrain.data.scan import find_images
from sdtrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Collected:
    """A subset's usable images (sizes set, buckets not yet), unusable files, caption facts."""

    images: list[ImageEntry] = field(default_factory=list)
    invalid: list[InvalidImage] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)  # caption files with no text
    missing_captions: list[Path] = field(default_factory=list)
    tag_frequency_key: str = ""
    tag_frequency: dict[str, int] = field(default_factory=dict)


class SubsetSkipped(Exception):
    """A subset that contributes nothing (missing folder, no images); the reason is a warning."""


def _entry(
    path: Path,
    caption: str,
    values: dict[str, Any],
    info: ImageInfo | None,
    size: tuple[int, int] | None,
    has_caption: bool,
) -> ImageEntry:
    original = info.size if info is not None else size
    assert original is not None
    return ImageEntry(
        path=path,
        caption=caption,
        is_reg=bool(values.get("is_reg")),
        num_repeats=int(values["num_repeats"]),
        original_size=original,
        has_caption_file=has_caption,
        exif_transpose=bool(info is not None and info.transposed),
    )


def collect_dreambooth(values: dict[str, Any], write_cache: bool = False) -> Collected:
    """Images of a DreamBooth subset (image_dir), with captions from caption files, falling back
    to class_tokens (or "" with a warning). Raises SubsetSkipped when the folder is missing or
    holds no images."""
    image_dir = Path(values["image_dir"])
    if not image_dir.is_dir():
        raise SubsetSkipped(f"image_dir {image_dir} does not exist")
    paths = find_images(image_dir)
    if not paths:
        raise SubsetSkipped(f"no images (.png .jpg .jpeg .webp .bmp) in {image_dir}")
    cache = InfoCache(image_dir) if values.get("cache_info") else None
    out = Collected(tag_frequency_key=image_dir.name)
    captions = []
    for path in paths:
        try:
            info = cache.get(path) if cache else None
            if info is None:
                info = read_image_info(path)
            caption = read_caption_file(
                path, values["caption_extension"], bool(values["enable_wildcard"])
            )
        except UnreadableImage as exc:
            out.invalid.append(InvalidImage(path, exc.reason))
            continue
        except DataError as exc:  # a non-UTF-8 or unreadable caption file
            out.invalid.append(InvalidImage(path, exc.message))
            continue
        if should_verify() and (problem := pixel_problem(path)):
            out.invalid.append(InvalidImage(path, problem))
            continue
        has_caption = caption is not None
        if caption == "":
            out.empty_captions.append(path)
        if caption is None:
            out.missing_captions.append(path)
            caption = values.get("class_tokens") or ""
        if cache is not None:
            cache.put(path, info, caption)
        captions.append(caption)
        out.images.append(_entry(path, caption, values, info, None, has_caption))
    if cache is not None and write_cache:
        cache.save()
    out.tag_frequency = tag_frequency(captions)
    return out


def collect_finetune(values: dict[str, Any], index: FolderIndex) -> Collected:
    """Images of a fine-tune subset (metadata_file). A metadata `image_size` is trusted as the
    upright size (no file is opened, like the reference); other images get their size from headers.
    Raises DataError for a missing metadata file, SubsetSkipped for an empty one."""
    metadata = Path(values["metadata_file"])
    image_dir = Path(values["image_dir"]) if values.get("image_dir") else None
    entries = metadata_entries(
        metadata, image_dir, values["caption_separator"], bool(values["enable_wildcard"]), index
    )
    if not entries:
        raise SubsetSkipped(f"metadata file {metadata} has no entries")
    out = Collected(tag_frequency_key=metadata.name, tag_frequency=metadata_tag_frequency(entries))
    for entry in entries:
        where = entry.path or Path(entry.key)
        if entry.problem:
            out.invalid.append(InvalidImage(where, f"{entry.problem} (metadata key {entry.key!r})"))
            continue
        assert entry.path is not None
        info = None
        if entry.image_size is None:
            try:
                info = read_image_info(entry.path)
            except UnreadableImage as exc:
                out.invalid.append(InvalidImage(entry.path, exc.reason))
                continue
        if should_verify() and (problem := pixel_problem(entry.path)):
            out.invalid.append(InvalidImage(entry.path, problem))
            continue
        if not entry.caption:
            out.missing_captions.append(entry.path)
        out.images.append(
            _entry(entry.path, entry.caption, values, info, entry.image_size, bool(entry.caption))
        )
    return out
