"""Join loaded UNet / VAE / text encoder with tokenizer, noise scheduler and family facts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdtrain.models.bundle import ModelBundle, ModelSource
from sdtrain.models.families import Prediction, make_family_info
from sdtrain.models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

# The SD 1.x/2.x training schedule (reference §12.1).
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
}


def make_noise_scheduler(prediction_type: Prediction) -> DDPMScheduler:
    """The training noise scheduler: DDPM, scaled-linear 0.00085 -> 0.012, 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type)


def vae_downscale(vae: AutoencoderKL) -> int:
    """Pixel size of one latent cell: 2 ** (number of VAE blocks - 1) = 8 for SD."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def assemble_bundle(
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    family: str,
    prediction_type: Prediction,
    source: ModelSource,
    tokenizer_cache_dir: str | None = None,
) -> ModelBundle:
    """A ModelBundle with the family's tokenizer, the training scheduler and FamilyInfo."""
    info = make_family_info(
        family,
        prediction_type,
        sample_size=int(unet.config.sample_size),
        vae_scale=vae_downscale(vae),
        latent_scale=float(vae.config.scaling_factor),
        text_width=int(text_encoder.config.hidden_size),
    )
    return ModelBundle(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(family, tokenizer_cache_dir),
        noise_scheduler=make_noise_scheduler(prediction_type),
        family=info,
        source=source,
    )
