"""Attention backend of UNet and VAE: torch SDPA (default), xformers or memory-efficient SDPA."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdtrain.errors import ConfigError, MissingExtraError, Problem

ATTENTION_MODES = ("sdpa", "xformers", "mem_eff_attn")


class MemoryEfficientSDPAProcessor(AttnProcessor2_0):
    """diffusers' AttnProcessor2_0 with SDPA limited to its memory-efficient kernels.

    The reference's `--mem_eff_attn` was a hand-written tiled attention; here SDPA may use only
    the memory-efficient and flash kernels (never the math path that materialises the full
    attention matrix). CUDA uses the memory-efficient kernel (any dtype); the CPU uses flash.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )


def _xformers_ready(device: torch.device) -> None:
    if importlib.util.find_spec("xformers") is None:
        raise MissingExtraError('attention = "xformers"', "xformers", "xformers")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            [
                Problem(
                    key="model.attention",
                    message="xformers attention needs a CUDA GPU",
                    hint='use attention = "sdpa" (the default) on this machine',
                )
            ]
        )


def apply_attention(modules: list[torch.nn.Module], mode: str, device: torch.device | str) -> None:
    """Set the attention processor of every diffusers module in `modules` (UNet, VAE)."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(
            [
                Problem(
                    key="model.attention",
                    message=f"unknown attention {mode!r}; valid: {', '.join(ATTENTION_MODES)}",
                )
            ]
        )
    device = torch.device(device)
    if mode == "xformers":
        _xformers_ready(device)
        for module in modules:
            module.enable_xformers_memory_efficient_attention()
        return
    for module in modules:
        processor = MemoryEfficientSDPAProcessor() if mode == "mem_eff_attn" else AttnProcessor2_0()
        module.set_attn_processor(processor)
