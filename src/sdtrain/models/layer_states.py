"""Per-site cross-attention conditioning (XTI / "P+") through diffusers' attention processors.

Each cross-attention module (`attn2`) of the UNet gets a `LayerStatesProcessor` wrapping the
processor it already had (SDPA, memory-efficient SDPA, xformers, or a peft-wrapped one). The UNet
is called with `cross_attention_kwargs={"layer_states": [...]}`; the processor of site i uses
entry i as its encoder hidden states. Without `layer_states` the wrapped processor runs
unchanged. Self-attention modules get a pass-through wrapper that only accepts (and drops) the
keyword, so diffusers does not warn about an unexpected kwarg. UNet.forward is never patched.
"""

from __future__ import annotations

from typing import Any

import torch

_INSTALLED = "_sdtrain_layer_states_sites"


def cross_attention_sites(unet: torch.nn.Module) -> list[str]:
    """Processor names of the cross-attention modules in the reference order: down blocks,
    mid block, up blocks (16 for SD1/SD2: IN01..IN08 sites, MID, OUT03..OUT11)."""
    names = [n for n in unet.attn_processors if ".attn2." in n]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def key(name: str) -> tuple[int, int]:
        return order.get(name.split(".")[0], 3), names.index(name)

    return sorted(names, key=key)


class LayerStatesProcessor:
    """Runs `inner` with this site's entry of `layer_states` as encoder hidden states."""

    def __init__(self, inner: Any, index: int | None) -> None:
        self.inner = inner
        self.index = index  # None: a self-attention module (the keyword is accepted and dropped)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        layer_states: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if layer_states is not None and self.index is not None:
            encoder_hidden_states = layer_states[self.index]
        return self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            temb=temb,
            **kwargs,
        )


def install_layer_states(unet: Any) -> int:
    """Wrap every attention processor of `unet` once (idempotent); returns the site count.

    Call again after changing the attention backend (set_attn_processor replaces the wrappers;
    the check below notices and wraps the new processors)."""
    processors = unet.attn_processors
    if all(isinstance(p, LayerStatesProcessor) for p in processors.values()):
        return len(getattr(unet, _INSTALLED))
    sites = cross_attention_sites(unet)
    index = {name: i for i, name in enumerate(sites)}
    wrapped = {
        name: p if isinstance(p, LayerStatesProcessor) else LayerStatesProcessor(p, index.get(name))
        for name, p in processors.items()
    }
    unet.set_attn_processor(wrapped)
    setattr(unet, _INSTALLED, sites)
    return len(sites)
