"""One micro-batch: latents -> noise -> UNet prediction -> recipe loss (pure compute).

Each sample draws from its own generator (one per sample, keyed by its position in the global
batch), so a sample's latents sample, noise, timestep and perturbations do not depend on which
process runs it or on how many samples share its micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdtrain.models.host_copy import to_device

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
    # the trained forward (engine.forward.TrainForward) as accelerate prepared it; None: built
    # here, unwrapped
    forward: Any = None
    # engine.compile.Compiled when the U-Net is compiled (starts each CUDA-graph step)
    compiled: Any = None
    # peft layers whose redundant fp32 input cast is switched off inside the autocast forward
    uncast: list[Any] = field(init=False, default_factory=list)
    # frozen weights kept in the file's half precision, up-cast per layer (engine/halfweights.py)
    upcast: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        from sdtrain.engine.forward import TrainForward
        from sdtrain.engine.halfweights import has_frozen_half
        from sdtrain.engine.precision import redundant_input_casts

        modules = [self.bundle.unet, *self.bundle.family.text_encoders(self.bundle)]
        self.uncast = redundant_input_casts(modules, self.precision)
        self.upcast = not self.precision.autocast and has_frozen_half(modules)
        if self.forward is None:
            self.forward = TrainForward(self.method, self.bundle)


def encode_latents(
    ctx: StepContext, batch: Batch, generators: Sequence[torch.Generator] | torch.Generator
) -> torch.Tensor:
    """Scaled latents (B, 4, H/8, W/8): from the cache, or VAE-encoded now (no gradients; each
    sample's latent-distribution draw from its own generator, or one generator for all)."""
    import torch

    from sdtrain.models.vae_encode import encode_posterior

    scale = ctx.bundle.family.latent_scale
    if batch.latents is not None:
        return to_device(batch.latents, ctx.device, torch.float32) * scale
    assert batch.pixels is not None, "a batch carries pixels or cached latents"
    vae = ctx.bundle.vae
    with torch.no_grad():
        pixels = to_device(batch.pixels, ctx.device, ctx.precision.vae)
        dist = encode_posterior(vae, pixels)  # channels-last on the CPU (models/vae_encode.py)
        if isinstance(generators, torch.Generator):
            latents = dist.sample(generator=generators).float()
        else:
            mean, std = dist.mean, dist.std
            latents = torch.cat(
                [
                    mean[i : i + 1] + std[i : i + 1] * _randn_like(mean[i : i + 1], g)
                    for i, g in enumerate(generators)
                ]
            ).float()
    latents = torch.nan_to_num(latents, nan=0.0)
    return latents * scale


def _randn_like(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """diffusers' DiagonalGaussianDistribution.sample draw: N(0, 1) in `like`'s dtype, drawn on
    the generator's device."""
    import torch

    draw = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return to_device(draw, like.device)


def sample_generators(seed: int, step: int, slots: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, step, position in the global batch)."""
    import torch

    from sdtrain.seeds import derive_seed

    return [
        torch.Generator(device="cpu").manual_seed(derive_seed(seed, "noise", step, slot))
        for slot in slots
    ]


def micro_step_loss(
    ctx: StepContext,
    batch: Batch,
    generators: Sequence[torch.Generator] | torch.Generator,
    step: StepInfo,
    timestep: int | None = None,
) -> torch.Tensor:
    """The recipe loss of one micro-batch (a 0-d fp32 tensor with a graph to the trainables).

    `generators` (one per sample, sample_generators) drive the engine's draws (VAE sampling,
    noise, timesteps); one generator instead draws for the whole batch (the validation loss).
    `step` is what the method's hooks see (its own generator). `timestep` fixes every sample's
    timestep (the validation loss); None draws them."""
    import torch

    from sdtrain.engine.forward import Opaque
    from sdtrain.engine.halfweights import upcast_half_weights
    from sdtrain.engine.precision import input_casts_off

    latents = encode_latents(ctx, batch, generators)
    streams = generators if isinstance(generators, torch.Generator) else None
    parts = []
    for i, generator in enumerate([streams] if streams is not None else generators):
        one = latents if streams is not None else latents[i : i + 1]
        noise = ctx.noise.sample_noise(one, generator)
        if timestep is None:
            timesteps = ctx.noise.sample_timesteps(one.shape[0], generator, ctx.device)
        else:
            timesteps = torch.full((one.shape[0],), timestep, dtype=torch.long, device=ctx.device)
        noisy = ctx.noise.noisy_latents(one, noise, timesteps, generator)
        parts.append((noise, timesteps, noisy, ctx.noise.target(one, noise, timesteps)))
    noise, timesteps, noisy, target = (
        torch.cat(list(column)) for column in zip(*parts, strict=True)
    )
    weights = ctx.method.loss_weights(batch)
    mask = to_device(batch.alpha_masks, ctx.device) if batch.alpha_masks is not None else None
    with (
        torch.autocast(ctx.device.type, dtype=ctx.precision.weight, enabled=ctx.precision.autocast),
        input_casts_off(ctx.uncast),
        upcast_half_weights(ctx.upcast),
    ):
        if ctx.compiled is not None:
            ctx.compiled.mark_step()
        pred = ctx.forward(
            noisy.to(ctx.precision.weight if ctx.precision.autocast else torch.float32),
            timesteps,
            Opaque((batch, step)),
        )
    loss, _ = ctx.loss.compute(
        pred.float(),
        target.float(),
        timesteps,
        loss_weights=None if weights is None else to_device(weights, ctx.device),
        mask=mask,
    )
    return loss
