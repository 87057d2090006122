"""Releasing a cached-away module's weights frees them and refuses later calls by name."""

from __future__ import annotations

import pytest
import torch

from sdtrain.models.release import ReleasedWeightsError, release_weights


def test_release_frees_and_refuses(tiny_files, load_spec):
    bundle = load_spec(str(tiny_files["sd1"]["diffusers"]))
    vae = bundle.vae
    size = sum(p.numel() * p.element_size() for p in vae.parameters())
    assert release_weights(vae, "the VAE", "latents cached") >= size
    assert all(p.numel() == 0 for p in vae.parameters())
    torch.nn.Module.to(vae, "cpu", dtype=torch.float32)  # the engine's moves still work
    vae.requires_grad_(False)
    with pytest.raises(ReleasedWeightsError, match="the VAE"):
        vae.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ReleasedWeightsError):
        vae(torch.zeros(1, 3, 64, 64))
