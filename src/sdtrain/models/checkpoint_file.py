"""Read original single files lazily: .safetensors, or .ckpt/.pt through weights-only torch.load."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sdtrain.errors import ModelLoadError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_PICKLE_HINT = (
    "sdtrain never runs pickled code from model files; use a .safetensors release of the model, "
    "or convert this file with a tool you trust"
)


def _damaged(path: Path, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{path} cannot be read; it looks truncated or damaged ({error})",
        hint="download or copy the file again (compare its SHA-256 with the published one)",
    )


class CheckpointFile:
    """Keys, shapes, metadata and tensors of one single-file checkpoint.

    safetensors files are memory-mapped and tensors read per prefix on demand, so the three
    components can be loaded one after another without holding the whole file twice. `.ckpt`
    files are read with `torch.load(weights_only=True)` (memory-mapped when the file allows it);
    one that needs arbitrary pickled objects is refused with a ModelLoadError naming it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.extras: dict[str, Any] = {}  # non-tensor entries of a .ckpt (epoch, global_step)
        self._safe: Any = None
        self._tensors: dict[str, torch.Tensor] = {}
        self.renames: dict[str, str] = {}
        if not self.path.is_file():
            raise ModelLoadError(
                f"model file {self.path} does not exist",
                hint="check the path in pretrained_model_name_or_path / vae",
            )
        if self.path.suffix.lower() in SAFETENSORS_SUFFIXES or self._looks_like_safetensors():
            self._open_safetensors()
        else:
            self._open_torch()
        self.renames = _legacy_clip_renames(self.keys())

    def _looks_like_safetensors(self) -> bool:
        with open(self.path, "rb") as handle:
            head = handle.read(9)
        return len(head) == 9 and head[8:9] == b"{"

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._safe = safe_open(str(self.path), framework="pt", device="cpu")
            self.metadata = dict(self._safe.metadata() or {})
            names = list(self._safe.keys())  # noqa: SIM118 (safe_open is not a dict)
            self._shapes = {key: tuple(self._safe.get_slice(key).get_shape()) for key in names}
        except Exception as error:  # SafetensorError is not importable as a class everywhere
            raise _damaged(self.path, error) from error

    def _open_torch(self) -> None:
        from sdtrain.models.torch_file import load_weights_only

        loaded = load_weights_only(self.path, "model file", mmap=True)
        if not isinstance(loaded, dict):
            raise ModelLoadError(
                f"{self.path} does not hold a state dict (found {type(loaded).__name__})",
                hint="pass an SD 1.x/2.x checkpoint (.safetensors or .ckpt)",
            )
        state = loaded.get("state_dict", loaded)
        if not isinstance(state, dict):
            raise ModelLoadError(f"{self.path}: 'state_dict' is not a dict", hint=_PICKLE_HINT)
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.extras = {
            k: v for k, v in loaded.items() if k != "state_dict" and not isinstance(v, dict)
        }
        self._shapes = {key: tuple(value.shape) for key, value in self._tensors.items()}

    def keys(self) -> list[str]:
        """Every tensor key (after the legacy `text_model.` fix-up)."""
        return [self.renames.get(key, key) for key in self._shapes]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """key -> shape for every tensor, without reading tensor data."""
        return {self.renames.get(key, key): shape for key, shape in self._shapes.items()}

    @property
    def _inverse(self) -> dict[str, str]:
        return {new: old for old, new in self.renames.items()}

    def tensors(self, prefixes: str | Iterable[str]) -> dict[str, torch.Tensor]:
        """Tensors whose (fixed-up) key starts with one of `prefixes`."""
        wanted = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        keys = [key for key in self.keys() if key.startswith(wanted)]
        return self.get(keys)

    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Tensors for the given (fixed-up) keys."""
        inverse = self._inverse
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            raw = inverse.get(key, key)
            if self._safe is None:
                out[key] = self._tensors[raw]
                continue
            try:
                out[key] = self._safe.get_tensor(raw)
            except Exception as error:  # a damaged data section
                raise _damaged(self.path, error) from error
        return out

    def dtype_counts(self) -> dict[str, int]:
        """How many tensors of each dtype the file holds (reads headers only for safetensors)."""
        counts: dict[str, int] = {}
        if self._safe is not None:
            for key in self._safe.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = str(self._safe.get_slice(key).get_dtype())
                counts[name] = counts.get(name, 0) + 1
        else:
            for value in self._tensors.values():
                name = str(value.dtype).removeprefix("torch.")
                counts[name] = counts.get(name, 0) + 1
        return counts

    def close(self) -> None:
        """Release the file (mapped tensors already handed out stay valid)."""
        self._safe = None
        self._tensors = {}


def _legacy_clip_renames(keys: Iterable[str]) -> dict[str, str]:
    """Old SD1 files store `cond_stage_model.transformer.<x>` without `text_model.`: fix names."""
    prefix = "cond_stage_model.transformer."
    renames = {}
    for key in keys:
        if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
            renames[key] = prefix + "text_model." + key[len(prefix) :]
    return renames
