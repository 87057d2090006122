"""Which layers get LoRA modules on the full-size SD1.5 / SD2 architectures (built on `meta`)."""

from __future__ import annotations

import pytest

from sdtrain.config.methods import NetworkSection
from sdtrain.methods.adapters.lora import LoraNetwork
from sdtrain.methods.adapters.spec import LoraSpec
from sdtrain.methods.adapters.targets import find_targets, name_map


def full_unet(v2: bool):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=96 if v2 else 64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024 if v2 else 768,
            attention_head_dim=(5, 10, 20, 20) if v2 else 8,
            use_linear_projection=v2,
        )


def full_text_encoder(v2: bool):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    if v2:  # OpenCLIP ViT-H text tower as SD2 uses it (23 of 24 layers)
        config = CLIPTextConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=1024,
        )
    else:  # CLIP ViT-L/14 text
        config = CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
        )
    with torch.device("meta"):
        return CLIPTextModel(config)


@pytest.fixture(scope="module")
def sd1():
    return full_unet(False), full_text_encoder(False)


def test_sd1_counts_and_names(sd1):
    unet, text_encoder = sd1
    te = find_targets(text_encoder, "text_encoder")
    lierla = find_targets(unet, "unet")
    c3lier = find_targets(unet, "unet", with_conv=True)
    assert (len(te), len(lierla), len(c3lier)) == (72, 192, 278)
    names = {t.name for t in te + c3lier}
    for name in (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_11_mlp_fc2",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_up_blocks_3_attentions_2_proj_out",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ):
        assert name in names
    kinds = {t.kind for t in lierla}
    assert kinds == {"linear", "conv1x1"}  # SD1 proj_in/out are 1x1 convs
    extra = [t for t in c3lier if t not in lierla]
    assert sum(t.kind == "conv" for t in extra) == 22 * 2 + 3 + 3  # conv1/conv2 + samplers
    assert sum(t.kind == "conv1x1" for t in extra) == 14  # conv_shortcut
    assert sum(t.kind == "linear" for t in extra) == 22  # time_emb_proj
    assert len(name_map(unet, text_encoder)) == 72 + 278


def test_sd2_counts():
    unet, text_encoder = full_unet(True), full_text_encoder(True)
    assert len(find_targets(text_encoder, "text_encoder")) == 138
    lierla = find_targets(unet, "unet")
    assert len(lierla) == 192
    proj_in = next(t for t in lierla if t.name.endswith("down_blocks_0_attentions_0_proj_in"))
    assert proj_in.kind == "linear"  # diffusers SD2 uses linear projections


def test_injection_on_meta_gives_the_reference_modules(sd1):
    unet, text_encoder = sd1
    spec = LoraSpec.from_section(
        NetworkSection(network_dim=8, network_alpha=4.0, network_args={"conv_dim": 2})
    )
    network = LoraNetwork.create(unet, text_encoder, spec)
    assert len(network.of("text_encoder")) == 72 and len(network.of("unet")) == 278
    by_name = {m.target.name: m for m in network.modules}
    conv = by_name["lora_unet_up_blocks_0_upsamplers_0_conv"]
    assert (conv.rank, conv.alpha) == (2, 1.0)
    assert tuple(conv.down.weight.shape) == (2, 1280, 3, 3)
    assert tuple(conv.up.weight.shape) == (1280, 2, 1, 1)
    proj = by_name["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert (proj.rank, proj.alpha) == (8, 4.0)
    assert tuple(proj.down.weight.shape) == (8, 320, 1, 1)
    q = by_name["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert tuple(q.down.weight.shape) == (8, 768) and tuple(q.up.weight.shape) == (768, 8)
    # a second walk over the wrapped models finds the same layers, not peft's internals
    assert {t.name for t in find_targets(unet, "unet", with_conv=True)} == {
        m.target.name for m in network.of("unet")
    }


def test_unflattened_clip_gives_the_same_kohya_names():
    """Older transformers keep CLIPTextModel.text_model; the kohya names must not change."""
    import torch

    text_encoder = full_text_encoder(False)

    class Unflattened(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

    flat = find_targets(text_encoder, "text_encoder")
    nested = find_targets(Unflattened(text_encoder), "text_encoder")
    assert [t.name for t in nested] == [t.name for t in flat]
    assert nested[0].path == "text_model." + flat[0].path


def test_peft_init_is_the_reference_init():
    """kaiming-uniform(a=sqrt 5) down (bound 1/sqrt(fan_in)), zero up."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_parts import tiny_text_encoder, tiny_unet

    spec = LoraSpec.from_section(NetworkSection(network_dim=8, network_args={"conv_dim": 8}))
    network = LoraNetwork.create(tiny_unet(), tiny_text_encoder(), spec)
    for m in network.modules:
        down = m.down.weight
        fan_in = down[0].numel()
        assert not m.up.weight.any()
        assert down.abs().max() <= fan_in**-0.5
        assert down.abs().max() > 0.5 * fan_in**-0.5
