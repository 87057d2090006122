"""`cache_info`: image sizes kept in `<image_dir>/metadata_cache.json`, checked before use.

Same file and fields as the reference (`{"<path>": {"caption": str, "resolution": [w, h]}}`, with
`resolution` the stored, pre-EXIF size), so either tool can read the other's cache. sdtrain differs:
it adds `orientation`, `mtime_ns` and `bytes`, and trusts an entry only while the image file still
has that modification time and length (the reference trusted stale entries forever, §13.14).
Captions are always read from the caption files; the cached caption is written for the reference.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sdtrain.data.imageinfo import ImageInfo

log = logging.getLogger(__name__)

CACHE_NAME = "metadata_cache.json"


class InfoCache:
    """The size cache of one image folder."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / CACHE_NAME
        self.entries: dict[str, dict[str, Any]] = {}
        self.changed = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self.entries = {k: v for k, v in data.items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); it will be rewritten", self.path, exc)

    def get(self, path: Path) -> ImageInfo | None:
        """Cached info of `path`, or None when absent or the file changed since it was cached."""
        entry = self.entries.get(str(path))
        if entry is None or "mtime_ns" not in entry:
            return None
        try:
            stat = os.stat(path)
        except OSError:
            return None
        size = entry.get("resolution")
        orientation = entry.get("orientation", 1)
        if (
            stat.st_mtime_ns != entry["mtime_ns"]
            or stat.st_size != entry.get("bytes")
            or not isinstance(size, list)
            or len(size) != 2
            or not isinstance(orientation, int)
            or not 1 <= orientation <= 8
        ):
            return None
        stored = (int(size[0]), int(size[1]))
        upright = (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored
        return ImageInfo(
            size=upright,
            stored_size=stored,
            orientation=orientation,
            format=str(entry.get("format", "")),
        )

    def put(self, path: Path, info: ImageInfo, caption: str) -> None:
        """Record `info` for `path` (a no-op when the same facts are already cached)."""
        try:
            stat = os.stat(path)
        except OSError:
            return
        entry = {
            "caption": caption,
            "resolution": list(info.stored_size),
            "orientation": info.orientation,
            "format": info.format,
            "mtime_ns": stat.st_mtime_ns,
            "bytes": stat.st_size,
        }
        if self.entries.get(str(path)) != entry:
            self.entries[str(path)] = entry
            self.changed = True

    def save(self) -> None:
        """Write the cache atomically when something changed."""
        if not self.changed:
            return
        from sdtrain.atomic import write_text

        try:
            write_text(self.path, json.dumps(self.entries, indent=2, ensure_ascii=False))
        except OSError as exc:
            log.warning("cannot write %s (%s); sizes will be read again next time", self.path, exc)
        self.changed = False
