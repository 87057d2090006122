"""Fine-tune metadata JSON: merge caption/tag files into it, clean it, write it safely (pure).

Key convention written here (reference §3.4): with `full_path` the absolute image path; otherwise
the image path relative to the folder **with its extension**, POSIX separators (`img001.png`,
`sub/img002.jpg`). **[fix]** The reference writes bare stems (`img001`) that its own loader cannot
turn back into files; the dataset layer resolves absolute keys, relative keys and such bare stems,
and a merge into a reference-written file moves an unambiguous bare-stem entry to the new key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.atomic import write_bytes, write_text
from sdtrain.data.scan import find_images
from sdtrain.errors import DataError, UsageError
from sdtrain.tools.cleaning import clean_caption, clean_tags, count_ratings

LOGGER = logging.getLogger(__name__)

Metadata = dict[str, dict[str, Any]]

CAPTION_EXTENSION = ".caption"
TAG_EXTENSION = ".txt"


def load_metadata(path: Path) -> Metadata:
    """Read a metadata JSON object `{image key: {field: value}}` (DataError when it is not one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DataError(f"metadata file not found: {path}", hint="check the path") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"cannot read metadata {path}: {error}", hint="is it a JSON file?"
        ) from error
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(
            f"{path} is not fine-tune metadata",
            hint='expected a JSON object {"<image key>": {"caption": ..., "tags": ...}}',
        )
    return data


def dump_metadata(metadata: Mapping[str, Any]) -> str:
    """The JSON text written for metadata: indent 2 (as the reference), UTF-8, final newline."""
    return json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"


def backup_path(path: Path) -> Path:
    """Where the previous content of `path` is kept before it is replaced: `<name>.bak`."""
    return path.with_name(path.name + ".bak")


def choose_output(
    in_json: Path | None, out_json: Path | None, *, in_place: bool, overwrite: bool
) -> Path:
    """The file a metadata command may write, after checking the user asked for any replacement.

    Rewriting the input needs `in_place`; replacing another existing file needs `overwrite`
    (or `in_place` when no input was named, the reference's "update out_json" mode). Both keep a
    `.bak` copy of the old file.
    """
    if out_json is None:
        if in_json is None or not in_place:
            raise UsageError(
                "no output file given", hint="name an output file, or add --in-place (keeps .bak)"
            )
        return in_json
    if not out_json.exists():
        return out_json
    same = in_json is not None and in_json.resolve() == out_json.resolve()
    if same and not in_place:
        raise UsageError(
            f"{out_json} is also the input",
            hint="add --in-place to rewrite it (a .bak copy is kept), or name another output",
        )
    if not same and not (overwrite or (in_place and in_json is None)):
        raise UsageError(
            f"{out_json} already exists",
            hint="add --overwrite to replace it (a .bak copy is kept), or --in-place to update "
            "it, or name another output",
        )
    return out_json


def save_metadata(path: Path, metadata: Mapping[str, Any]) -> Path | None:
    """Write `metadata` atomically; an existing file is first copied to `.bak` (returned)."""
    backup = None
    if path.exists():
        backup = backup_path(path)
        write_bytes(backup, path.read_bytes())
    write_text(path, dump_metadata(metadata))
    return backup


def image_key(image: Path, folder: Path, full_path: bool) -> str:
    """The metadata key of `image` found under `folder` (see the module docstring)."""
    if full_path:
        return str(image.resolve())
    return image.relative_to(folder).as_posix()


@dataclass
class MergeReport:
    """What a merge did: entries added/updated/kept, missing and unreadable text files."""

    images: int = 0
    added: int = 0
    updated: int = 0
    untouched: int = 0
    migrated: list[tuple[str, str]] = field(default_factory=list)
    missing: dict[str, list[Path]] = field(default_factory=dict)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def log(self, logger: logging.Logger = LOGGER, examples: int = 5) -> None:
        """Log the counts; list up to `examples` paths per kind of missing file."""
        logger.info(
            "%d images: %d entries added, %d updated, %d other entries kept as they were",
            self.images,
            self.added,
            self.updated,
            self.untouched,
        )
        if self.migrated:
            logger.info(
                "%d bare-stem keys (reference format) renamed to file keys, e.g. %s -> %s",
                len(self.migrated),
                *self.migrated[0],
            )
        for name, paths in self.missing.items():
            if paths:
                shown = ", ".join(str(p) for p in paths[:examples])
                more = f" and {len(paths) - examples} more" if len(paths) > examples else ""
                logger.warning("%d images have no %s file: %s%s", len(paths), name, shown, more)
        for path, reason in self.unreadable:
            logger.warning("cannot read %s: %s", path, reason)


def _read_text(path: Path, report: MergeReport, name: str, image: Path) -> str | None:
    if not path.is_file():
        report.missing.setdefault(name, []).append(image)
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        report.unreadable.append((path, str(error)))
        return None


def _stem_key(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key


def merge_text_files(
    metadata: Mapping[str, Mapping[str, Any]],
    folder: Path,
    sources: Mapping[str, str],
    *,
    full_path: bool = False,
    recursive: bool = False,
) -> tuple[Metadata, MergeReport]:
    """Merge the text files beside each image of `folder` into a copy of `metadata`.

    sources: metadata field -> file extension, e.g. {"caption": ".caption", "tags": ".txt"}.
    Each file is read as UTF-8 and stripped (inner newlines kept); its field replaces the old
    value, other fields and all entries of other images are kept. An image without a file for a
    field is counted in `report.missing[field]` (the reference crashes); an image with none of the
    files gets no new entry. Recursive merges work with relative keys too (they hold sub-folders).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}", hint="check the path")
    images = find_images(folder, recursive=recursive)
    result: Metadata = {key: dict(value) for key, value in metadata.items()}
    report = MergeReport(images=len(images), missing={name: [] for name in sources})
    keys = [image_key(image, folder, full_path) for image in images]
    if not full_path:
        _migrate_stem_keys(result, keys, report)
    touched: set[str] = set()
    for image, key in zip(images, keys, strict=True):
        values = {}
        for name, extension in sources.items():
            text = _read_text(image.with_name(image.stem + extension), report, name, image)
            if text is not None:
                values[name] = text
        if not values:
            continue
        if key in result:
            report.updated += 1
        else:
            report.added += 1
            result[key] = {}
        result[key].update(values)
        touched.add(key)
    report.untouched = len(result) - len(touched)
    return result, report


def _migrate_stem_keys(result: Metadata, keys: list[str], report: MergeReport) -> None:
    """Rename reference-style bare-stem entries to the new keys, where the stem is unambiguous."""
    by_stem: dict[str, list[str]] = {}
    for key in keys:
        by_stem.setdefault(_stem_key(key), []).append(key)
    renames = {
        stem: found[0]
        for stem, found in by_stem.items()
        if len(found) == 1 and stem in result and found[0] not in result
    }
    if not renames:
        return
    renamed = {renames.get(key, key): value for key, value in result.items()}
    result.clear()
    result.update(renamed)
    report.migrated.extend(renames.items())


@dataclass(frozen=True)
class Change:
    """One field of one entry that cleaning changed."""

    key: str
    field: str
    before: str
    after: str


@dataclass
class CleanReport:
    """What cleaning changed, and which entries lack tags or a caption."""

    entries: int = 0
    changes: list[Change] = field(default_factory=list)
    missing_tags: list[str] = field(default_factory=list)
    missing_captions: list[str] = field(default_factory=list)
    multiple_ratings: list[str] = field(default_factory=list)

    def log(self, logger: logging.Logger = LOGGER) -> None:
        """Log the counts of changed and incomplete entries."""
        changed = {c.key for c in self.changes}
        fields = {f: sum(1 for c in self.changes if c.field == f) for f in ("tags", "caption")}
        logger.info(
            "%d entries: %d changed (%d tags, %d captions)",
            self.entries,
            len(changed),
            fields["tags"],
            fields["caption"],
        )
        if self.missing_tags:
            logger.info("%d entries have no tags", len(self.missing_tags))
        if self.missing_captions:
            logger.info("%d entries have no caption", len(self.missing_captions))
        for key in self.multiple_ratings:
            logger.warning("several rating tags in %s (all removed from the first on)", key)


def clean_metadata(metadata: Mapping[str, Mapping[str, Any]]) -> tuple[Metadata, CleanReport]:
    """Apply `clean_tags` / `clean_caption` to every entry of a copy of `metadata`."""
    result: Metadata = {key: dict(value) for key, value in metadata.items()}
    report = CleanReport(entries=len(result))
    for key, entry in result.items():
        for name, cleaner, missing in (
            ("tags", clean_tags, report.missing_tags),
            ("caption", clean_caption, report.missing_captions),
        ):
            value = entry.get(name)
            if not isinstance(value, str):
                missing.append(key)
                continue
            if name == "tags" and count_ratings(value) > 1:
                report.multiple_ratings.append(key)
            cleaned = cleaner(value)
            if cleaned != value:
                entry[name] = cleaned
                report.changes.append(Change(key, name, value, cleaned))
    return result, report


def format_changes(changes: list[Change]) -> list[str]:
    """A diff-like listing of changes: `@@ key [field]`, then `- before` and `+ after`."""
    lines: list[str] = []
    for change in changes:
        lines.append(f"@@ {change.key} [{change.field}]")
        lines.extend(f"- {line}" for line in change.before.splitlines() or [""])
        lines.extend(f"+ {line}" for line in change.after.splitlines() or [""])
    return lines
