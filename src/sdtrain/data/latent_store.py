"""Content-addressed latent cache (memory or disk). A key covers everything that shapes a latent.

The key hashes the image bytes, the resize/crop/flip parameters, the bucket, the VAE's identity
(a hash of its weights) and the dtype, so a changed image or VAE can never hit a stale entry.
`sdtrain latents cache` and training read and write the same store.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.atomic import save_safetensors

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """$SDTRAIN_CACHE_DIR/latents, else ~/.cache/sdtrain/latents (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("SDTRAIN_CACHE_DIR")
    if root:
        return Path(root) / "latents"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sdtrain" / "latents"


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes (hex)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LatentRecipe:
    """Everything besides the image bytes and the VAE that determines one cached latent."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_offsets: tuple[int, int]
    interpolation: str
    flip: bool
    alpha_mask: bool
    exif_transpose: bool
    face_crop: bool = False


def latent_key(image_digest: str, recipe: LatentRecipe, vae_id: str, dtype: str) -> str:
    """The content address of one latent."""
    payload = json.dumps({"image": image_digest, "recipe": asdict(recipe), "vae": vae_id,
                          "dtype": dtype, "format": 1}, sort_keys=True)
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=20).hexdigest()


class LatentStore:
    """Latents by key, kept in memory and optionally mirrored to a disk folder."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        if key in self._memory:
            return True
        return self.folder is not None and self._path(key).is_file()

    def put(self, key: str, latents: torch.Tensor, alpha_mask: torch.Tensor | None = None) -> None:
        """Store latents (4, h, w) (and the (H, W) mask); written atomically when on disk."""
        entry = {"latents": latents.detach().to("cpu").contiguous()}
        if alpha_mask is not None:
            entry["alpha_mask"] = alpha_mask.detach().to("cpu").contiguous()
        self._memory[key] = entry
        if self.folder is not None:
            save_safetensors(self._path(key), entry, metadata={"format": "sdtrain-latent-1"})

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The entry for `key` (KeyError if absent, ValueError if the disk file is unreadable)."""
        entry = self._memory.get(key)
        if entry is not None:
            return entry
        if self.folder is None:
            raise KeyError(key)
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        from safetensors.torch import load_file

        try:
            entry = load_file(str(path))
        except Exception as exc:  # a damaged file behaves like a miss after removal
            raise ValueError(f"unreadable latent cache file {path}: {exc}") from exc
        if "latents" not in entry:
            raise ValueError(f"latent cache file {path} has no 'latents' tensor")
        self._memory[key] = entry
        return entry

    def check(self, key: str, expected_hw: tuple[int, int]) -> bool:
        """Cheap validity check: present, readable, latent shape (4, h, w) as expected."""
        try:
            entry = self.get(key)
        except (KeyError, ValueError):
            return False
        shape = tuple(entry["latents"].shape)
        return len(shape) == 3 and shape[1:] == expected_hw

    def discard(self, key: str) -> None:
        """Forget `key` in memory and remove its file, if any."""
        self._memory.pop(key, None)
        if self.folder is not None:
            self._path(key).unlink(missing_ok=True)

    def drop_memory(self) -> None:
        """Release the in-memory copies (disk entries stay)."""
        self._memory.clear()
