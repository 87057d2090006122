"""The diffusers/PEFT LoRA layout (`unet.*.lora_A.weight` + LoraConfig metadata, alpha kept)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.methods.adapters.kohya import SAVE_DTYPES
from sdtrain.methods.adapters.targets import text_model_prefix

if TYPE_CHECKING:
    import torch

    from sdtrain.methods.adapters.lora import LoraNetwork


def diffusers_state_dicts(
    network: LoraNetwork,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    save_precision: str | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "text_encoder": ...} of peft keys (`<path>.lora_A.weight`), per component.

    Text-encoder keys get `text_model.` back on a flattened CLIP model, so the file also loads
    into pipelines built with older transformers (diffusers maps it either way).
    """
    import torch
    from peft.utils import get_peft_model_state_dict

    dtype = getattr(torch, SAVE_DTYPES[save_precision]) if save_precision else None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for root, model in (("unet", unet), ("text_encoder", text_encoder)):
        if root not in network.configs:
            continue
        prefix = text_model_prefix(model) if root == "text_encoder" else ""
        state = get_peft_model_state_dict(model, adapter_name=network.adapter)
        out[root] = {
            prefix + key: (
                value.detach().to("cpu", copy=True).to(dtype)
                if dtype
                else value.detach().to("cpu", copy=True)
            )
            for key, value in state.items()
        }
    return out


def adapter_metadata(network: LoraNetwork) -> dict[str, dict[str, Any]]:
    """LoraConfig kwargs per component, exactly what diffusers' own savers store (keeps alpha)."""
    return {root: config.to_dict() for root, config in network.configs.items()}


def save_diffusers_lora(
    path: Path,
    network: LoraNetwork,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    save_precision: str | None = None,
) -> None:
    """Write `path` (.safetensors) atomically with diffusers' own writer.

    Loads with `pipe.load_lora_weights(path)`; rank/alpha patterns travel in the file's
    `lora_adapter_metadata`, so the scale is the trained alpha/rank (diffusers' plain
    `save_lora_weights` drops alpha unless this metadata is passed).
    """
    from diffusers import StableDiffusionPipeline

    from sdtrain.atomic import atomic_path

    states = diffusers_state_dicts(network, unet, text_encoder, save_precision)
    metadata = adapter_metadata(network)
    with atomic_path(Path(path)) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(tmp.parent),
            weight_name=tmp.name,
            unet_lora_layers=states.get("unet"),
            text_encoder_lora_layers=states.get("text_encoder"),
            unet_lora_adapter_metadata=metadata.get("unet"),
            text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
            safe_serialization=True,
        )
