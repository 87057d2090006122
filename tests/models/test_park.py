"""Parking a module's weights on disk: empty in memory, the same bits back when resident."""

from __future__ import annotations

import pytest
import torch

from sdtrain.models.park import ParkedWeightsError, park_weights, resident


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_parked_vae_is_empty_and_comes_back_bit_identical(tiny_files, load_spec, tmp_path):
    bundle = load_spec(str(tiny_files["sd1"]["diffusers"]))
    vae = bundle.vae
    vae.register_buffer("half_buffer", torch.randn(3, 5).to(torch.bfloat16))
    before = _state(vae)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean
    assert park_weights(vae, tmp_path, "the VAE")
    assert all(t.numel() == 0 for t in [*vae.parameters(), *vae.buffers()])
    assert list(tmp_path.iterdir()) == []  # an anonymous file: nothing to clean up, ever
    with pytest.raises(ParkedWeightsError, match="the VAE"):
        vae.encode(pixels)
    with pytest.raises(ParkedWeightsError):
        vae(pixels)
    for _ in range(2):  # parked again after each block, back again in the next
        with resident(vae):
            after = _state(vae)
            assert after.keys() == before.keys()
            for key, value in before.items():
                assert after[key].dtype == value.dtype
                assert torch.equal(after[key], value), key
            with resident(vae):  # nested: still resident after the inner block
                pass
            assert vae.encoder.conv_in.weight.numel() > 0
            with torch.no_grad():
                assert torch.equal(vae.encode(pixels).latent_dist.mean, expected)
        assert vae.encoder.conv_in.weight.numel() == 0


def test_moves_made_while_parked_are_kept(tiny_files, load_spec, tmp_path):
    bundle = load_spec(str(tiny_files["sd1"]["diffusers"]))
    vae = bundle.vae
    before = vae.encoder.conv_in.weight.detach().clone()
    park_weights(vae, tmp_path, "the VAE")
    torch.nn.Module.to(vae, dtype=torch.bfloat16)  # what the engine's setup may do
    with resident(vae):
        assert vae.encoder.conv_in.weight.dtype == torch.bfloat16
        assert torch.equal(vae.encoder.conv_in.weight, before.to(torch.bfloat16))


def test_unwritable_folder_keeps_the_module(tiny_files, load_spec, tmp_path):
    bundle = load_spec(str(tiny_files["sd1"]["diffusers"]))
    vae = bundle.vae
    assert not park_weights(vae, tmp_path / "missing", "the VAE")
    assert vae.encoder.conv_in.weight.numel() > 0
    with resident(vae):  # not parked: a no-op
        assert vae.encoder.conv_in.weight.numel() > 0
