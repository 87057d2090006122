"""The kohya LoRA file format: write, read, load into a network, ranks from a file (§7.2, §7.7)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from sdtrain.methods.adapters.lora import LoraModule, LoraNetwork

log = logging.getLogger(__name__)

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
SAVE_DTYPES = {"float": "float32", "fp16": "float16", "bf16": "bfloat16"}
TORCH_SUFFIXES = (".pt", ".ckpt", ".pth", ".bin")


@dataclass
class LoadReport:
    """What a non-strict load matched: module names loaded, keys missing from / unknown to it."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def log(self, what: str) -> None:
        """One info line, plus warnings naming (up to 5 of) the missing and unexpected keys."""
        log.info("%s: %d LoRA modules loaded", what, len(self.loaded))
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                log.warning(
                    "%s: %d %s keys: %s%s", what, len(keys), label, ", ".join(keys[:5]), more
                )

    def mismatch(self, total: int) -> str | None:
        """None when the file matched every module exactly, else counts and a few keys."""
        if not (self.missing or self.unexpected):
            return None
        parts = [f"{len(self.loaded)} of {total} LoRA modules of this network found in the file"]
        for label, keys in (
            ("keys of this network are missing from the file", self.missing),
            ("keys in the file match no module here", self.unexpected),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        return "; ".join(parts)


def state_dict(network: LoraNetwork, save_precision: str | None = None) -> dict[str, torch.Tensor]:
    """Kohya tensors of every module (CPU, contiguous).

    `<name>.lora_down.weight` (r, in[, kh, kw]), `<name>.lora_up.weight` (out, r[, 1, 1]) in
    save_precision ("float"/"fp16"/"bf16"; None keeps the training dtype) and `<name>.alpha`, a 0-d
    float32 tensor. Unlike the reference, alpha is never int64 and never cast to fp16, so a reader
    gets the exact value back.
    """
    import torch

    dtype = getattr(torch, SAVE_DTYPES[save_precision]) if save_precision else None
    tensors: dict[str, torch.Tensor] = {}
    for m in network.modules:
        for suffix, param in ((DOWN, m.down.weight), (UP, m.up.weight)):
            value = param.detach().to("cpu", copy=True)
            tensors[f"{m.target.name}.{suffix}"] = value.to(dtype) if dtype else value
        tensors[f"{m.target.name}.{ALPHA}"] = torch.tensor(m.alpha, dtype=torch.float32)
    return tensors


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Atomic write: safetensors with metadata + sshs_* hashes, else torch.save (no metadata)."""
    from sdtrain.atomic import save_safetensors, save_torch
    from sdtrain.methods.adapters.metadata import with_hashes

    path = Path(path)
    if path.suffix == ".safetensors":
        save_safetensors(path, tensors, with_hashes(tensors, metadata or {}))
    else:
        save_torch(path, tensors)


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file; .pt/.ckpt through torch.load(weights_only=True)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"LoRA file not found: {path}", "check network_weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            return tensors, metadata
        if path.suffix not in TORCH_SUFFIXES:
            raise ModelLoadError(
                f"unknown LoRA file type: {path.name}", "use a .safetensors, .pt or .ckpt file"
            )
        from sdtrain.models.torch_file import load_weights_only

        loaded = load_weights_only(path, "LoRA file")
    except ModelLoadError:
        raise
    except Exception as error:  # corrupt file, pickle with code in it, ...
        raise ModelLoadError(
            f"cannot read LoRA file {path}: {error}",
            "re-save it as .safetensors, or check that it is complete",
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ModelLoadError(f"{path} holds no plain tensor dictionary", "is it a LoRA file?")
    return loaded, {}


def file_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """kohya name -> (rank, alpha): rank = lora_down's first dim, alpha = rank when absent."""
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix == ALPHA:
            alphas[name] = float(value.float().item())
        elif suffix == DOWN:
            dims[name] = int(value.shape[0])
    return {name: (dim, alphas.get(name) or float(dim)) for name, dim in dims.items()}


def fit(value: torch.Tensor, like: torch.Tensor, key: str, path: str | Path) -> torch.Tensor:
    """`value` reshaped to `like` (2-D <-> (.., 1, 1) for SD2 proj_in/out), else a clear error."""
    if value.shape == like.shape:
        return value
    if value.numel() == like.numel() and value.shape[:2] == like.shape[:2]:
        return value.reshape(like.shape)
    raise ModelLoadError(
        f"{path}: {key} has shape {tuple(value.shape)}, the network has {tuple(like.shape)}",
        "the file has other ranks than this network: set dim_from_weights = true, or match "
        "network_dim / conv_dim to the file",
    )


def load_into(
    network: LoraNetwork,
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    multiplier: float = 1.0,
    strict: bool = False,
) -> LoadReport:
    """Copy a kohya state dict into the live modules (in place: optimizer references stay valid).

    Non-strict by default (missing/unexpected keys reported, §7.7). The file's alpha sets the
    live scale too: the reference replaced the alpha buffer but kept the old scale ([quirk]
    §13.3, fixed here).
    """
    import torch

    report = LoadReport()
    used: set[str] = set()
    with torch.no_grad():
        for m in network.modules:
            name = m.target.name
            found = False
            for suffix, param in ((DOWN, m.down.weight), (UP, m.up.weight)):
                key = f"{name}.{suffix}"
                if key in tensors:
                    param.copy_(fit(tensors[key], param, key, path).to(param.dtype))
                    used.add(key)
                    found = True
                else:
                    report.missing.append(key)
            if f"{name}.{ALPHA}" in tensors:
                _set_alpha(m, tensors[f"{name}.{ALPHA}"], multiplier)
                used.add(f"{name}.{ALPHA}")
            else:
                m.set_alpha(m.alpha, multiplier)
            if found:
                report.loaded.append(name)
    report.unexpected = [k for k in tensors if k not in used]
    if strict and (report.missing or report.unexpected):
        from sdtrain.errors import TrainingError

        raise TrainingError(
            f"{path}: the LoRA state does not match this network "
            f"({len(report.missing)} missing, {len(report.unexpected)} unexpected keys)",
            "resume with the same [network] settings that wrote the state",
        )
    return report


def _set_alpha(module: LoraModule, value: torch.Tensor, multiplier: float) -> None:
    module.set_alpha(float(value.float().item()) or float(module.rank), multiplier)
