"""Our diffusers -> LDM key layout at full size (meta device) vs real checkpoint facts."""

from __future__ import annotations

import pytest
import torch

from sdtrain.models.families import config_dir
from sdtrain.models.ldm_keys import (
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    components_to_ldm,
    unet_table,
)

# Facts of the real files (v1-5-pruned.safetensors, v2-1_768-ema-pruned.safetensors), written down
# from the published checkpoints: tensor counts per component and a sample of names and shapes.
REAL = {
    "sd1": {
        "config": "sd1",
        "counts": {"unet": 686, "vae": 248, "text": 196},
        "keys": {
            "model.diffusion_model.time_embed.0.weight": (1280, 320),
            "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
                320,
                768,
            ),
            "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
            "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
            "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
            "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
            "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
            "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
            "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
            "first_stage_model.decoder.norm_out.weight": (128,),
            "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
            "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (
                49408,
                768,
            ),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (
                77,
                768,
            ),
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (
                768,
                768,
            ),
            "cond_stage_model.transformer.text_model.final_layer_norm.bias": (768,),
        },
    },
    "sd2": {
        "config": "sd2-768-v",
        "counts": {"unet": 686, "vae": 248, "text": 294},
        "keys": {
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
                320,
                1024,
            ),
            "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280),
            "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320),
            "cond_stage_model.model.token_embedding.weight": (49408, 1024),
            "cond_stage_model.model.positional_embedding": (77, 1024),
            "cond_stage_model.model.ln_final.weight": (1024,),
            "cond_stage_model.model.text_projection": (1024, 1024),
            "cond_stage_model.model.logit_scale": (),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": (3072,),
            "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight": (1024, 1024),
            "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
            "cond_stage_model.model.transformer.resblocks.23.ln_2.bias": (1024,),
        },
        "proj_2d": 32,
    },
}


def _meta_components(config_name: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = config_dir(config_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    return unet, vae, text


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def full_size(request):
    family = request.param
    unet, vae, text = _meta_components(REAL[family]["config"])
    layout = components_to_ldm(family, unet, vae, text)
    assert all(t.is_meta for t in layout.values())  # nothing was allocated
    return family, (unet, vae, text), layout


def test_counts_and_names(full_size):
    family, _, layout = full_size
    facts = REAL[family]
    counts = {
        "unet": sum(k.startswith(UNET_PREFIX) for k in layout),
        "vae": sum(k.startswith(VAE_PREFIX) for k in layout),
        "text": sum(k.startswith("cond_stage_model.") for k in layout),
    }
    assert counts == facts["counts"]
    for key, shape in facts["keys"].items():
        assert key in layout, key
        assert tuple(layout[key].shape) == shape, key
    if family == "sd2":
        proj = [
            k
            for k in layout
            if k.startswith(UNET_PREFIX) and k.endswith(("proj_in.weight", "proj_out.weight"))
        ]
        assert len(proj) == facts["proj_2d"]
        assert all(layout[k].dim() == 2 for k in proj)


def test_diffusers_reads_our_layout_back(full_size):
    """diffusers' own LDM -> diffusers converters map our names back onto the same model."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    family, (unet, vae, text), layout = full_size
    pairs = [
        (convert_ldm_unet_checkpoint(layout, dict(unet.config)), unet.state_dict()),
        (convert_ldm_vae_checkpoint(layout, dict(vae.config)), vae.state_dict()),
    ]
    if family == "sd1":
        back = convert_ldm_clip_checkpoint(layout)
    else:
        back = convert_open_clip_checkpoint(text, layout, prefix=OPENCLIP_PREFIX)
        back.pop("text_projection.weight", None)
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    back = {k: v for k, v in back.items() if not k.startswith("encoder.layers.23.")}
    pairs.append((back, text.state_dict()))
    for converted, model_state in pairs:
        assert set(converted) == set(model_state)
        for key, value in model_state.items():
            assert tuple(converted[key].shape) == tuple(value.shape), key


def test_our_loader_accepts_the_full_size_layout(full_size):
    """The layout check that gates loading passes on our full-size names, without weights."""
    from sdtrain.models.single_file import choose_config

    family, _, layout = full_size

    class Shapes:
        path = "meta"

        def shapes(self):
            return {k: tuple(v.shape) for k, v in layout.items()}

    prediction = "epsilon" if family == "sd1" else "v_prediction"
    folder, expected = choose_config(Shapes(), family, prediction)
    assert folder.name == REAL[family]["config"]
    assert set(expected) <= set(layout)


def test_generic_table_for_other_block_counts():
    table = unet_table(
        {
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        }
    )
    assert (
        table.ldm_name("down_blocks.0.resnets.0.conv1.weight")
        == "input_blocks.1.0.in_layers.2.weight"
    )
    assert table.ldm_name("down_blocks.0.downsamplers.0.conv.bias") == "input_blocks.2.0.op.bias"
    assert (
        table.ldm_name("down_blocks.1.resnets.0.norm1.weight")
        == "input_blocks.3.0.in_layers.0.weight"
    )
    assert table.ldm_name("up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.1.1.conv.weight"
    assert (
        table.ldm_name("up_blocks.1.attentions.1.proj_in.weight")
        == "output_blocks.3.1.proj_in.weight"
    )
    with pytest.raises(KeyError):
        table.ldm_name("add_embedding.linear_1.weight")  # an SDXL-only module
