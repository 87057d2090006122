"""LoRA layouts for `generate`: kohya vs diffusers detection, diffusers -> kohya conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtrain.errors import ModelLoadError
from sdtrain.tools.lora_files import detect_layout, diffusers_to_kohya, kohya_file_for

A = torch.ones(4, 8)
B = torch.ones(16, 4)
UNET = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE_FLAT = "text_encoder.encoder.layers.0.self_attn.q_proj"
K_UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_detect_layout() -> None:
    assert detect_layout(Path("x"), [f"{K_UNET}.lora_down.weight"]) == "kohya"
    assert detect_layout(Path("x"), [f"{UNET}.lora_A.weight"]) == "diffusers"
    with pytest.raises(ModelLoadError, match="unrecognised"):
        detect_layout(Path("x"), ["lora_te1_text_model_x.lora_down.weight"])


def test_peft_keys_with_metadata_alpha_and_patterns() -> None:
    meta = {
        "lora_adapter_metadata": json.dumps(
            {
                "unet.r": 4,
                "unet.lora_alpha": 2.0,
                "unet.alpha_pattern": {"attn1.to_q": 3.0},
                "text_encoder.r": 4,
                "text_encoder.lora_alpha": 1.0,
            }
        )
    }
    tensors = {
        f"{UNET}.lora_A.weight": A,
        f"{UNET}.lora_B.weight": B,
        f"{TE_FLAT}.lora_A.weight": A,
        f"{TE_FLAT}.lora_B.weight": B,
    }
    out = diffusers_to_kohya(Path("x"), tensors, meta)
    assert set(out) == {
        f"{n}.{s}" for n in (K_UNET, K_TE) for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert out[f"{K_UNET}.alpha"].item() == 3.0  # alpha_pattern wins
    assert out[f"{K_TE}.alpha"].item() == 1.0
    assert out[f"{K_TE}.alpha"].dtype == torch.float32 and out[f"{K_TE}.alpha"].ndim == 0


def test_without_metadata_alpha_is_rank_and_old_layout_alphas_are_read() -> None:
    old = {
        f"{UNET}.lora.down.weight": A,
        f"{UNET}.lora.up.weight": B,
        f"{UNET}.alpha": torch.tensor(1.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": A,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": B,
    }
    out = diffusers_to_kohya(Path("x"), old, {})
    assert out[f"{K_UNET}.alpha"].item() == 1.0
    assert out[f"{K_TE}.alpha"].item() == 4.0


def test_unsupported_or_incomplete_files() -> None:
    with pytest.raises(ModelLoadError, match="unsupported LoRA tensor"):
        diffusers_to_kohya(Path("x"), {f"{UNET}.lora_magnitude_vector": A}, {})
    with pytest.raises(ModelLoadError, match="lacks its down or up"):
        diffusers_to_kohya(Path("x"), {f"{UNET}.lora_A.weight": A}, {})


def test_kohya_file_for(tmp_path: Path) -> None:
    kohya = tmp_path / "k.safetensors"
    save_file({f"{K_UNET}.lora_down.weight": A, f"{K_UNET}.lora_up.weight": B}, str(kohya))
    assert kohya_file_for(kohya, tmp_path / "work") == kohya
    diffusers = tmp_path / "d.safetensors"
    save_file({f"{UNET}.lora_A.weight": A, f"{UNET}.lora_B.weight": B}, str(diffusers))
    work = tmp_path / "work"
    work.mkdir()
    converted = kohya_file_for(diffusers, work)
    assert converted.parent == work and converted.is_file()
