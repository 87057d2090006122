"""Sampling from a live bundle: sampler table, conditioning, determinism, RNG/mode hygiene."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from sdtrain.config.prompt_file import SAMPLER_NAMES, PromptSpec
from sdtrain.errors import ConfigError
from sdtrain.models.sampling import SAMPLERS, encode_prompts, generate_images, make_scheduler

# The reference's table (§10.3), written out independently of the code under test.
EXPECTED = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
    "ddpm": "DDPMScheduler",
}

SPEC = PromptSpec(
    prompt="a red square",
    negative_prompt="blurry",
    width=64,
    height=64,
    steps=2,
    scale=7.5,
    seed=1234,
)


@pytest.fixture(scope="module")
def bundle():
    from sdtrain.models.builtin import load_builtin

    return load_builtin("builtin:tiny-sd1")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_every_config_sampler_name_has_a_scheduler() -> None:
    assert set(SAMPLERS) == set(SAMPLER_NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scheduler_mapping(name: str, bundle) -> None:
    scheduler = make_scheduler(name, bundle.family)
    config = scheduler.config
    assert type(scheduler).__name__ == EXPECTED[name]
    assert config.num_train_timesteps == 1000
    assert (config.beta_start, config.beta_end) == (0.00085, 0.012)
    assert config.beta_schedule == "scaled_linear"
    assert config.prediction_type == "epsilon"
    if "clip_sample" in config:
        assert config.clip_sample is True
    if name.startswith("dpmsolver"):
        assert config.algorithm_type == name


def test_heun_gets_clip_sample_forced_on(bundle) -> None:
    # HeunDiscreteScheduler defaults to clip_sample=False; the reference forces it on
    assert make_scheduler("heun", bundle.family).config.clip_sample is True


def test_v_models_get_v_prediction_schedulers(bundle) -> None:
    v_family = replace(bundle.family, prediction_type="v_prediction")
    assert all(
        make_scheduler(n, v_family).config.prediction_type == "v_prediction" for n in SAMPLERS
    )


def test_unknown_sampler_is_a_config_error(bundle) -> None:
    with pytest.raises(ConfigError) as info:
        make_scheduler("dpm++_2m_karras", bundle.family)
    assert "euler_a" in info.value.problems[0].message
    assert make_scheduler("Euler_A", bundle.family).__class__.__name__ == EXPECTED["euler_a"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_sampler_makes_an_image(name: str, bundle) -> None:
    spec = replace(SPEC, sampler=name, steps=4 if name == "pndm" else 2, width=64, height=72)
    (result,) = generate_images(bundle, [spec])
    assert result.image.mode == "RGB" and result.image.size == (64, 72)
    assert result.seed == 1234 and result.spec == spec
    assert pixels(result.image).std() > 0


def test_same_seed_same_image_other_seed_other_image(bundle) -> None:
    first, second, other = generate_images(
        bundle, [SPEC, replace(SPEC, index=1), replace(SPEC, seed=99)]
    )
    assert np.array_equal(pixels(first.image), pixels(second.image))
    assert not np.array_equal(pixels(first.image), pixels(other.image))


def test_batched_images_match_single_images(bundle) -> None:
    specs = [replace(SPEC, seed=s, sampler="euler_a") for s in (5, 6, 7)]
    batched = generate_images(bundle, specs, batch_size=2)
    single = generate_images(bundle, specs, batch_size=1)
    assert [r.seed for r in batched] == [5, 6, 7]
    for a, b in zip(batched, single, strict=True):
        assert np.abs(pixels(a.image) - pixels(b.image)).max() <= 1


def test_unseeded_prompts_get_a_recorded_random_seed(bundle) -> None:
    a, b = generate_images(bundle, [replace(SPEC, seed=None)] * 2)
    assert a.spec.seed is None and isinstance(a.seed, int) and a.seed != b.seed
    (again,) = generate_images(bundle, [replace(SPEC, seed=a.seed)])
    assert np.array_equal(pixels(a.image), pixels(again.image))


def test_global_rng_states_are_untouched(bundle) -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    generate_images(bundle, [replace(SPEC, seed=None, sampler="euler_a"), SPEC])
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_modes_and_grads_are_restored(bundle) -> None:
    bundle.unet.train()
    bundle.text_encoder.eval()
    bundle.unet.conv_in.eval()  # a submodule whose mode differs from its parent
    before = {name: m.training for name, m in bundle.unet.named_modules()}
    generate_images(bundle, [SPEC])
    assert {name: m.training for name, m in bundle.unet.named_modules()} == before
    assert not bundle.text_encoder.training and bundle.unet.training
    assert all(p.grad is None for p in bundle.unet.parameters())
    bundle.unet.eval()


def test_conditioning_matches_the_text_encoding_of_training(bundle) -> None:
    from sdtrain.models.text import encode_tokens, tokenize

    for clip_skip, length in ((None, None), (2, 150)):
        ids = tokenize(bundle.tokenizer, ["a red square"], length)
        plain = encode_tokens(
            bundle.text_encoder, ids, clip_skip, eos_token_id=bundle.tokenizer.eos_token_id
        )
        with torch.no_grad():
            ours = encode_prompts(bundle, ["a red square"], clip_skip, length)
        assert ours.shape == plain.shape == (1, 77 if length is None else 152, 32)
        torch.testing.assert_close(ours, plain)


def test_prompt_weights_are_applied_and_mean_preserving() -> None:
    from sdtrain.models.builtin import load_builtin

    fresh = load_builtin("builtin:tiny-sd1")
    with torch.no_grad():  # a trained final LayerNorm has a bias, so the states' mean is not ~0
        fresh.text_encoder.final_layer_norm.bias.fill_(0.25)
        plain, weighted = encode_prompts(fresh, ["a red square", "a (red:1.5) square"], None, 225)
    assert plain.shape == weighted.shape == (227, 32)
    assert not torch.allclose(plain, weighted)
    torch.testing.assert_close(weighted.mean(), plain.mean(), rtol=1e-5, atol=1e-6)
    # only the weighted token's state changes direction; the rescale is one factor per prompt
    ratio = weighted / plain
    assert ratio[0].allclose(ratio[1]) and not ratio[2].allclose(ratio[1])


def test_v_prediction_model_samples(bundle) -> None:
    from sdtrain.models.builtin import load_builtin

    v_bundle = load_builtin("builtin:tiny-sd2")
    assert v_bundle.family.is_v
    (result,) = generate_images(v_bundle, [replace(SPEC, sampler="euler")], clip_skip=2)
    assert result.image.size == (64, 64) and pixels(result.image).std() > 0


def test_mixed_precision_autocast_samples(bundle) -> None:
    (result,) = generate_images(bundle, [SPEC], dtype=torch.bfloat16)
    assert result.image.size == (64, 64) and pixels(result.image).std() > 0
    assert all(p.dtype == torch.float32 for p in bundle.unet.parameters())
