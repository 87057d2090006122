"""What sdtrain writes loads in diffusers' `load_lora_weights` and gives the trained outputs."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import outputs, tiny_text_encoder, tiny_unet, trained_network

from sdtrain.methods.adapters import kohya
from sdtrain.methods.adapters.diffusers_format import save_diffusers_lora


def fresh_pipeline():
    """A StableDiffusionPipeline of untouched tiny models (same seeds as the trained base)."""
    import sys
    from pathlib import Path

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_parts import tiny_vae

    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=None,
        unet=tiny_unet(),
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module", params=["lierla", "c3lier"])
def trained(request):
    """(trained outputs, base outputs, network, unet, text encoder) with alphas != ranks."""
    args = {"conv_dim": 2, "conv_alpha": 3} if request.param == "c3lier" else {}
    unet, text_encoder, net = trained_network(network_dim=4, network_alpha=1.0, network_args=args)
    return (
        outputs(unet, text_encoder),
        outputs(tiny_unet(), tiny_text_encoder()),
        net,
        unet,
        text_encoder,
    )


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_load_lora_weights_reproduces_training_outputs(tmp_path, trained, layout):
    want, base, net, unet, text_encoder = trained
    path = tmp_path / "lora.safetensors"
    if layout == "kohya":
        kohya.save(path, kohya.state_dict(net), {"ss_network_dim": "4"})
    else:
        save_diffusers_lora(path, net, unet, text_encoder)
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(path))
    got = outputs(pipe.unet, pipe.text_encoder)
    for got_part, want_part, base_part in zip(got, want, base, strict=True):
        assert (want_part - base_part).abs().max() > 1e-2  # the LoRA does change the model
        torch.testing.assert_close(got_part, want_part, rtol=0, atol=1e-5)
