"""One micro-batch: latents -> noise -> UNet prediction -> recipe loss (pure compute)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sdtrain.data.batch import Batch
    from sdtrain.engine.loss import LossRecipe
    from sdtrain.engine.noise import NoiseRecipe
    from sdtrain.engine.precision import Precision
    from sdtrain.methods.base import Method, StepInfo
    from sdtrain.models.bundle import ModelBundle


@dataclass
class StepContext:
    """What a micro-step needs besides the batch; built once per run."""

    method: Method
    bundle: ModelBundle
    noise: NoiseRecipe
    loss: LossRecipe
    precision: Precision
    device: torch.device
    # peft layers whose redundant fp32 input cast is switched off inside the autocast forward
    uncast: list[Any] = field(init=False, default_factory=list)
    # frozen weights kept in the file's half precision, up-cast per layer (engine/halfweights.py)
    upcast: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        from sdtrain.engine.halfweights import has_frozen_half
        from sdtrain.engine.precision import redundant_input_casts

        modules = [self.bundle.unet, *self.bundle.family.text_encoders(self.bundle)]
        self.uncast = redundant_input_casts(modules, self.precision)
        self.upcast = not self.precision.autocast and has_frozen_half(modules)


def encode_latents(ctx: StepContext, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents (B, 4, H/8, W/8): from the cache, or VAE-encoded now (no gradients)."""
    import torch

    scale = ctx.bundle.family.latent_scale
    if batch.latents is not None:
        return batch.latents.to(ctx.device, dtype=torch.float32) * scale
    assert batch.pixels is not None, "a batch carries pixels or cached latents"
    vae = ctx.bundle.vae
    with torch.no_grad():
        pixels = batch.pixels.to(ctx.device, dtype=ctx.precision.vae)
        dist = vae.encode(pixels).latent_dist
        latents = dist.sample(generator=generator).float()
    latents = torch.nan_to_num(latents, nan=0.0)
    return latents * scale


def micro_step_loss(
    ctx: StepContext,
    batch: Batch,
    generator: torch.Generator,
    step: StepInfo,
    timestep: int | None = None,
) -> torch.Tensor:
    """The recipe loss of one micro-batch (a 0-d fp32 tensor with a graph to the trainables).

    `generator` drives the engine's draws (noise, timesteps, VAE sampling); `step` is what the
    method's hooks see (its own generator). `timestep` fixes every sample's timestep (the
    validation loss); None draws them."""
    import torch

    from sdtrain.engine.halfweights import upcast_half_weights
    from sdtrain.engine.precision import input_casts_off

    latents = encode_latents(ctx, batch, generator)
    noise = ctx.noise.sample_noise(latents, generator)
    if timestep is None:
        timesteps = ctx.noise.sample_timesteps(latents.shape[0], generator).to(ctx.device)
    else:
        timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=ctx.device)
    noisy = ctx.noise.noisy_latents(latents, noise, timesteps, generator)
    target = ctx.noise.target(latents, noise, timesteps)
    weights = ctx.method.loss_weights(batch)
    mask = batch.alpha_masks.to(ctx.device) if batch.alpha_masks is not None else None
    with (
        torch.autocast(ctx.device.type, dtype=ctx.precision.weight, enabled=ctx.precision.autocast),
        input_casts_off(ctx.uncast),
        upcast_half_weights(ctx.upcast),
    ):
        cond = ctx.method.condition(ctx.bundle, batch, step)
        pred = ctx.bundle.family.predict(
            ctx.bundle.unet,
            noisy.to(ctx.precision.weight if ctx.precision.autocast else torch.float32),
            timesteps,
            cond,
        )
    loss, _ = ctx.loss.compute(
        pred.float(),
        target.float(),
        timesteps,
        loss_weights=None if weights is None else weights.to(ctx.device),
        mask=mask,
    )
    return loss
