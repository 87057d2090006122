"""encode_posterior: channels-last into the encoder on the CPU, an NCHW posterior out, the same
values as diffusers' own encode to float rounding, and NCHW on request."""

from __future__ import annotations

import pytest
import torch

from sdtrain.models.vae_encode import OPT_OUT, channels_last_input, encode_posterior


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    from sdtrain.models.families import config_dir

    torch.manual_seed(0)
    model = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir("tiny-sd1") / "vae"))
    return model.eval().requires_grad_(False)


@pytest.fixture
def pixels():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _first_conv_layouts(vae, pixels) -> tuple[list[bool], object]:
    seen: list[bool] = []
    hook = vae.encoder.conv_in.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    try:
        posterior = encode_posterior(vae, pixels)
    finally:
        hook.remove()
    return seen, posterior


def test_the_encoder_gets_channels_last_and_the_posterior_is_nchw(vae, pixels, monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    seen, posterior = _first_conv_layouts(vae, pixels)
    assert seen == [True]
    reference = vae.encode(pixels).latent_dist
    # diffusers' own encode hands back channels-last moments for a batch of 2 (its mid-block
    # attention's output layout survives the last GroupNorm); the rebuilt posterior is NCHW
    assert posterior.parameters.is_contiguous()
    for name in ("parameters", "mean", "std", "var", "logvar"):
        got, want = getattr(posterior, name), getattr(reference, name)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert posterior.deterministic is reference.deterministic is False


def test_samples_draw_the_same_noise_as_an_nchw_encode(vae, pixels, monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    posterior = encode_posterior(vae, pixels)
    reference = vae.encode(pixels).latent_dist
    got = posterior.sample(generator=torch.Generator().manual_seed(5))
    want = reference.sample(generator=torch.Generator().manual_seed(5))
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_opting_out_is_diffusers_own_encode_bit_for_bit(vae, pixels, monkeypatch):
    monkeypatch.setenv(OPT_OUT, "nchw")
    seen, posterior = _first_conv_layouts(vae, pixels)
    assert seen == [False]
    assert torch.equal(posterior.parameters, vae.encode(pixels).latent_dist.parameters)


def test_only_four_dimensional_cpu_batches_take_it(monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    assert channels_last_input(torch.zeros(1, 3, 8, 8))
    assert not channels_last_input(torch.zeros(3, 8, 8))
    assert not channels_last_input(torch.zeros(1, 3, 8, 8, device="meta"))
