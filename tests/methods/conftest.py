"""Fixtures of the method tests; the builders live in tiny_parts.py."""

from __future__ import annotations

import pytest
from tiny_parts import tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae


@pytest.fixture
def tiny_bundle(tmp_path):
    """A ModelBundle of tiny random SD1-shaped models."""
    from diffusers import DDPMScheduler

    from sdtrain.models.bundle import FamilyInfo, ModelBundle, ModelSource

    family = FamilyInfo(
        name="sd1", prediction_type="epsilon", resolution=64, latent_scale=1.0, text_width=32
    )
    folder = tmp_path / "tok"
    folder.mkdir()
    return ModelBundle(
        unet=tiny_unet(),
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(folder),
        noise_scheduler=DDPMScheduler(),
        family=family,
        source=ModelSource(spec="tiny", kind="builtin"),
    )
