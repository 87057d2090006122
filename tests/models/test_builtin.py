"""builtin:tiny-sd1 / tiny-sd2 (random weights) and the shipped toy models."""

from __future__ import annotations

import time

import pytest
import torch

from sdtrain.errors import ConfigError, ModelLoadError
from sdtrain.models.builtin import (
    BUILTINS,
    asset_folder,
    available_builtins,
    build_random_components,
    load_builtin,
)


def test_tiny_sd1_bundle():
    bundle = load_builtin("builtin:tiny-sd1")
    assert bundle.family.name == "sd1"
    assert bundle.family.prediction_type == "epsilon"
    assert bundle.family.resolution == 64 and bundle.family.text_width == 32
    assert bundle.family.latent_scale == pytest.approx(0.18215)
    assert bundle.tokenizer.pad_token_id == 49407
    assert bundle.unet.config.block_out_channels == (32, 64) or list(
        bundle.unet.config.block_out_channels
    ) == [32, 64]
    assert bundle.unet.config.cross_attention_dim == 32
    assert bundle.text_encoder.config.num_hidden_layers == 2
    assert bundle.text_encoder.config.vocab_size == 49408
    assert bundle.vae.config.latent_channels == 4
    sched = bundle.noise_scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert sched.num_train_timesteps == 1000 and sched.clip_sample is False
    assert bundle.source.kind == "builtin"


def test_tiny_sd2_is_openclip_shaped_v_model():
    bundle = load_builtin("builtin:tiny-sd2")
    assert bundle.family.name == "sd2" and bundle.family.is_v
    assert bundle.family.base_model_version == "sd_v2_v"
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction"
    assert bundle.tokenizer.pad_token == "!"
    assert bundle.text_encoder.config.hidden_act == "gelu"
    assert bundle.unet.config.use_linear_projection is True


def test_tiny_model_runs_end_to_end():
    bundle = load_builtin("builtin:tiny-sd1")
    latents = torch.randn(2, 4, 8, 8)
    ids = bundle.tokenizer(["a", "b"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        cond = bundle.text_encoder(ids.input_ids).last_hidden_state
        out = bundle.unet(latents, torch.tensor([10, 500]), cond).sample
        image = bundle.vae.decode(latents).sample
    assert out.shape == latents.shape and image.shape == (2, 3, 64, 64)


def test_seeded_and_fast():
    build_random_components("tiny-sd2")  # warm imports
    start = time.perf_counter()
    a = build_random_components("tiny-sd1")
    elapsed = time.perf_counter() - start
    b = build_random_components("tiny-sd1")
    for left, right in zip(a, b, strict=True):
        for (name, x), (_, y) in zip(
            left.state_dict().items(), right.state_dict().items(), strict=True
        ):
            assert torch.equal(x, y), name
    assert elapsed < 2.0  # ~0.05 s when the machine is idle; generous for shared CI
    # the global RNG is untouched
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_random_components("tiny-sd1")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        load_builtin("builtin:huge")
    message = info.value.problems[0].message
    assert "builtin:tiny-sd1" in message and "builtin:tiny-sd2" in message


def test_toy_models_load_or_fail_clearly():
    for name in ("toy-sd1", "toy-sd2v"):
        installed = (asset_folder(BUILTINS[name].folder) / "unet").is_dir()
        assert (name in available_builtins()) == installed
        if installed:
            bundle = load_builtin(f"builtin:{name}")
            assert bundle.family.name == BUILTINS[name].family
        else:
            with pytest.raises(ModelLoadError, match="not installed"):
                load_builtin(f"builtin:{name}")
