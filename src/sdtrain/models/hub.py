"""Hugging Face hub ids: use the local HF cache; download only when online and allowed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sdtrain.errors import ModelLoadError

log = logging.getLogger(__name__)

# Only what a bundle needs: configs and the safetensors weights of the three models.
PIPELINE_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
]
VAE_PATTERNS = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / DIFFUSERS_OFFLINE) is set."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in names)


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name` with no path of that name on disk."""
    parts = spec.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "~"))
        and not Path(spec).expanduser().exists()
    )


def resolve_hub(repo_id: str, *, vae_only: bool = False) -> Path:
    """Local folder of `repo_id` from the HF cache; downloaded only when not offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = VAE_PATTERNS if vae_only else PIPELINE_PATTERNS
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        pass
    except Exception as error:  # malformed ids, broken caches
        raise ModelLoadError(f"hub id {repo_id!r} cannot be resolved: {error}") from error
    if hub_offline():
        raise ModelLoadError(
            f"{repo_id} is not in the local Hugging Face cache and offline mode is on",
            hint="download it once while online (unset HF_HUB_OFFLINE), or point "
            "pretrained_model_name_or_path at a local file or folder",
        )
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:
        raise ModelLoadError(
            f"could not download {repo_id}: {error}",
            hint="check the id and your network, or use a local file or folder",
        ) from error
