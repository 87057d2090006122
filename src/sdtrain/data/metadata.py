"""Fine-tune metadata (`metadata_file` / `in_json`): read JSON or JSONL, find each entry's image
file, assemble its caption from `caption` and `tags` (reference §3.4).

Key -> image path, fixing the reference bug (§13.5): absolute keys are used as written; relative
keys with an image extension are joined to image_dir; keys without one (bare stems, as the
reference's merge scripts write without --full_path) are looked up in image_dir under every image
extension.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrain.data.captions import tag_frequency
from sdtrain.data.items import Size
from sdtrain.data.scan import IMAGE_EXTENSIONS
from sdtrain.errors import DataError

log = logging.getLogger(__name__)

# lookup order for bare stems: the reference's extension order, lower case first
_EXTENSION_ORDER = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class MetadataEntry:
    """One metadata record with its image path resolved (or the reason it could not be)."""

    key: str
    path: Path | None
    caption: str  # caption + tags as training stores it (before per-step processing)
    tags: str | None
    image_size: Size | None  # from the metadata, when written there
    problem: str | None = None


class FolderIndex:
    """Lists each folder once, so checking 100,000 keys costs no per-file system calls."""

    def __init__(self) -> None:
        self._names: dict[str, set[str]] = {}
        self._stems: dict[str, dict[str, list[str]]] = {}

    def names(self, folder: str) -> set[str]:
        """File names in `folder` (empty when it does not exist)."""
        found = self._names.get(folder)
        if found is None:
            try:
                with os.scandir(folder) as entries:
                    found = {e.name for e in entries if e.is_file()}
            except OSError:
                found = set()
            self._names[folder] = found
        return found

    def images_by_stem(self, folder: str) -> dict[str, list[str]]:
        """stem -> image file names in `folder`, ordered by the lookup extension order."""
        stems = self._stems.get(folder)
        if stems is None:
            stems = {}
            for name in self.names(folder):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    stems.setdefault(stem, []).append(name)
            for found in stems.values():
                found.sort(
                    key=lambda n: (
                        _EXTENSION_ORDER.index(os.path.splitext(n)[1].lower()),
                        not os.path.splitext(n)[1].islower(),
                        n,
                    )
                )
            self._stems[folder] = stems
        return stems


def resolve_key(
    key: str, image_dir: Path | None, index: FolderIndex
) -> tuple[Path | None, str | None]:
    """(image path, None) for a metadata key, or (best guess or None, reason) when not found.

    String operations only (pathlib costs more than the lookup itself at 100,000 keys).
    """
    raw = os.path.expanduser(key)
    if os.path.isabs(raw):
        full = os.path.normpath(raw)
    elif image_dir is None:
        return None, "relative key needs image_dir in the subset (or train_data_dir)"
    else:
        full = os.path.normpath(os.path.join(image_dir, raw))
    folder, name = os.path.split(full)
    present = name in index.names(folder)
    if present or os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        return Path(full), None if present else "file not found"
    found = index.images_by_stem(folder).get(name)
    if not found:
        return None, f"no image named {name}.* in {folder}"
    if len(found) > 1:
        log.warning("metadata key %r matches %s; using %s", key, ", ".join(found), found[0])
    return Path(folder, found[0]), None


def assemble_caption(
    caption: str | None, tags: str | None, separator: str, enable_wildcard: bool
) -> str:
    """The stored caption of a fine-tune entry: caption and tags joined by `separator`.

    Reference rules (the separator is inserted without a space, e.g. "a girl,1girl, solo"); with
    wildcards each non-blank caption line gets the tags. sdtrain differs: an entry with tags but an
    empty caption keeps its tags in wildcard mode (the reference dropped them, §13.7), and without
    wildcards the tags follow the first caption line, the only line training uses (the reference
    appended them to the last line, where they were never seen).
    """
    caption = caption or ""
    tags = tags or ""
    if enable_wildcard:
        tags = tags.replace("\n", separator)
        lines = [line for line in caption.split("\n") if line.strip()]
        if not lines:
            return tags
        return "\n".join(f"{line}{separator}{tags}" if tags else line for line in lines)
    first = caption.split("\n")[0] if caption else ""
    if first and tags:
        return first + separator + tags
    return first or tags


def read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """Raw records of a `.json` object (key -> record) or `.jsonl` file (one record per line with
    `image_path`). DataError for a missing file or invalid JSON, located by line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(
            f"metadata file not found: {path}",
            hint="check metadata_file / in_json (relative paths are taken from the "
            "file that names them)",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read metadata file {path}: {exc}", hint="metadata files are UTF-8 JSON"
        ) from exc
    if path.suffix.lower() == ".jsonl":
        records: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            record = _parse(line, path, number)
            if not isinstance(record, dict) or not isinstance(record.get("image_path"), str):
                raise DataError(
                    f'{path}:{number}: each line must be an object with an "image_path" string',
                    hint="fix or remove that line",
                )
            records[record["image_path"]] = record
        return records
    data = _parse(text, path, 0)
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: the top level must be an object keyed by image",
            hint='write {"image.png": {"caption": "..."}, ...}',
        )
    return data


def _parse(text: str, path: Path, line_offset: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = line_offset or exc.lineno
        raise DataError(
            f"{path}:{line}:{exc.colno}: invalid JSON ({exc.msg})",
            hint="fix the JSON syntax at that position",
        ) from exc


def _size(value: Any) -> Size | None:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def metadata_entries(
    path: Path,
    image_dir: Path | None,
    separator: str,
    enable_wildcard: bool,
    index: FolderIndex | None = None,
) -> list[MetadataEntry]:
    """Every record of a metadata file, its image path resolved and caption assembled, in key
    order (sorted, so plans do not depend on how the file was written)."""
    index = index or FolderIndex()
    entries = []
    for key, record in sorted(read_metadata(path).items()):
        if not isinstance(record, dict):
            entries.append(MetadataEntry(key, None, "", None, None, "record is not an object"))
            continue
        caption, tags = record.get("caption"), record.get("tags")
        bad = [
            n
            for n, v in (("caption", caption), ("tags", tags))
            if v is not None and not isinstance(v, str)
        ]
        image, problem = resolve_key(key, image_dir, index)
        if bad:
            problem = f"{' and '.join(bad)} must be text"
        size = _size(record.get("image_size"))
        text = "" if bad else assemble_caption(caption, tags, separator, enable_wildcard)
        entries.append(
            MetadataEntry(key, image, text, tags if isinstance(tags, str) else None, size, problem)
        )
    return entries


def metadata_tag_frequency(entries: list[MetadataEntry]) -> dict[str, int]:
    """Tag counts of a metadata file (from `tags` only, like the reference)."""
    return tag_frequency(e.tags for e in entries if e.tags)
