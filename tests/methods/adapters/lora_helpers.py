"""Shared helpers of the LoRA adapter tests: tiny models with a non-zero LoRA on them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/methods (tiny models)

from tiny_parts import tiny_text_encoder, tiny_unet  # noqa: E402

from sdtrain.config.methods import NetworkSection  # noqa: E402
from sdtrain.methods.adapters.lora import LoraNetwork  # noqa: E402
from sdtrain.methods.adapters.spec import LoraSpec  # noqa: E402


def spec(**network) -> LoraSpec:
    return LoraSpec.from_section(NetworkSection(**network))


def trained_network(seed: int = 1, **network):
    """(unet, text_encoder, network) with random up weights, so the LoRA changes outputs."""
    import torch

    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    net = LoraNetwork.create(unet, text_encoder, spec(**network))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules:
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=generator) * 0.1)
    net.train(False)
    return unet, text_encoder, net


def inputs(seed: int = 0):
    """U-Net (x (2,4,8,8), t (2,), context (2,77,32)) and text ids (2, 77)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 77, 32, generator=generator)
    ids = torch.randint(0, 500, (2, 77), generator=generator)
    return x, t, context, ids


def outputs(unet, text_encoder, seed: int = 0):
    """(unet eps (2,4,8,8), text hidden states (2,77,32)) without gradients."""
    import torch

    x, t, context, ids = inputs(seed)
    with torch.no_grad():
        return unet(x, t, context).sample, text_encoder(ids).last_hidden_state
