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
from typing import TYPE_CHECKING, Literal

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
    payload = json.dumps(
        {
            "image": image_digest,
            "recipe": asdict(recipe),
            "vae": vae_id,
            "dtype": dtype,
            "format": 1,
        },
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=20).hexdigest()


EntryState = Literal["ok", "missing", "stale"]

_FORMAT = "sdtrain-latent-1"
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_MAX_HEADER = 1 << 20  # a latent file's JSON header is a few hundred bytes


def _header_problem(
    path: Path, expected_hw: tuple[int, int], mask_hw: tuple[int, int] | None
) -> str | None:
    """Why the safetensors file at `path` is not a usable latent entry (None = it is).

    Reads only the 8-byte length and the JSON header, and compares the data size the header
    declares with the file size: a truncated or foreign file is caught without loading tensors.
    """
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= _MAX_HEADER:
                return "not a safetensors file"
            header = json.loads(handle.read(length))
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    if not isinstance(header, dict):
        return "not a safetensors file"
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != _FORMAT:
        return "not an sdtrain latent file"
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
        shapes = {name: tuple(info["shape"]) for name, info in header.items()}
        dtypes = {name: info["dtype"] for name, info in header.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        return "damaged header"
    if size != 8 + length + end:
        return f"truncated ({size} bytes, the header declares {8 + length + end})"
    latents = shapes.get("latents")
    if latents is None or dtypes["latents"] not in _FLOAT_DTYPES:
        return "no latents tensor"
    if len(latents) != 3 or latents[1:] != tuple(expected_hw):
        return f"latents of shape {list(latents)}, expected (C, {expected_hw[0]}, {expected_hw[1]})"
    mask = shapes.get("alpha_mask")
    if mask_hw is None and mask is not None:
        return "unexpected alpha_mask"
    if mask_hw is not None and mask != tuple(mask_hw):
        return f"alpha_mask of shape {mask}, expected {list(mask_hw)}"
    return None


class LatentStore:
    """Latents by key, kept in memory and/or mirrored to a disk folder.

    keep_in_memory=False (disk only) bounds memory when filling a large cache: entries are
    written and forgotten, and `get` reads the file each time.
    """

    def __init__(self, folder: Path | None, keep_in_memory: bool = True) -> None:
        if folder is None and not keep_in_memory:
            raise ValueError("a latent store needs memory, a folder, or both")
        self.folder = Path(folder) if folder is not None else None
        self.keep_in_memory = keep_in_memory
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def path(self, key: str) -> Path:
        """The file of `key` in the disk folder (two-character fan-out by key prefix)."""
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        if key in self._memory:
            return True
        return self.folder is not None and self.path(key).is_file()

    def put(self, key: str, latents: torch.Tensor, alpha_mask: torch.Tensor | None = None) -> None:
        """Store latents (C, h, w) (and the (H, W) mask); written atomically when on disk.

        Safe to call from a writer thread (one call per key)."""
        entry = {"latents": latents.detach().to("cpu").contiguous()}
        if alpha_mask is not None:
            entry["alpha_mask"] = alpha_mask.detach().to("cpu").contiguous()
        if self.keep_in_memory:
            self._memory[key] = entry
        if self.folder is not None:
            save_safetensors(self.path(key), entry, metadata={"format": _FORMAT})

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The entry for `key` (KeyError if absent, ValueError if the disk file is unreadable)."""
        entry = self._memory.get(key)
        if entry is not None:
            return entry
        if self.folder is None:
            raise KeyError(key)
        path = self.path(key)
        if not path.is_file():
            raise KeyError(key)
        from safetensors.torch import load_file

        try:
            entry = load_file(str(path))
        except Exception as exc:  # a damaged file behaves like a miss after removal
            raise ValueError(f"unreadable latent cache file {path}: {exc}") from exc
        if "latents" not in entry:
            raise ValueError(f"latent cache file {path} has no 'latents' tensor")
        if self.keep_in_memory:
            self._memory[key] = entry
        return entry

    def status(
        self, key: str, expected_hw: tuple[int, int], mask_hw: tuple[int, int] | None = None
    ) -> tuple[EntryState, str]:
        """("ok" | "missing" | "stale", why) for `key`: the cheap validity check.

        On disk only the header is read: the file must be a complete sdtrain latent file whose
        latents are (C, h, w) = expected_hw and which holds an (H, W) = mask_hw alpha mask
        exactly when one is expected. Stale = present but unreadable, truncated or mis-shaped.
        """
        entry = self._memory.get(key)
        if entry is not None:
            shape = tuple(entry["latents"].shape)
            mask = entry.get("alpha_mask")
            good = len(shape) == 3 and shape[1:] == tuple(expected_hw)
            good = good and (mask is None) == (mask_hw is None)
            good = good and (mask is None or tuple(mask.shape) == tuple(mask_hw or ()))
            return ("ok", "") if good else ("stale", "in-memory entry of another shape")
        if self.folder is None:
            return "missing", ""
        path = self.path(key)
        if not path.is_file():
            return "missing", ""
        problem = _header_problem(path, expected_hw, mask_hw)
        return ("stale", problem) if problem else ("ok", "")

    def check(
        self, key: str, expected_hw: tuple[int, int], mask_hw: tuple[int, int] | None = None
    ) -> bool:
        """Cheap validity check: present, complete, latent shape (C, h, w) as expected."""
        return self.status(key, expected_hw, mask_hw)[0] == "ok"

    def discard(self, key: str) -> None:
        """Forget `key` in memory and remove its file, if any."""
        self._memory.pop(key, None)
        if self.folder is not None:
            self.path(key).unlink(missing_ok=True)

    def drop_memory(self) -> None:
        """Release the in-memory copies (disk entries stay)."""
        self._memory.clear()
