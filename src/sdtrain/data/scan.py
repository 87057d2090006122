"""Find image files in folders (the reference's extensions, any letter case)."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files directly in `folder` (or below it when recursive), sorted, any extension case."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
