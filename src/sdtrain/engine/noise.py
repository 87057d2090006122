"""The training noise recipe (§6.1): ε (offset, pyramid), timesteps, x_t, targets, SNR table.

Every random draw takes an explicit `torch.Generator` (the engine owns and checkpoints it), in the
reference's order: ε, offset strength, offset, pyramid levels, timesteps, input-perturbation
strength, input-perturbation noise. Draws happen on the generator's device (use a CPU generator
for CPU/GPU-independent streams) and are then moved to the latents' device. Noise is built in
float32 and cast to the latents' dtype at the end (the reference draws directly in that dtype).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sdtrain.errors import ConfigError, Problem
from sdtrain.models.host_copy import to_device

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from sdtrain.config.sections import TrainingSection

logger = logging.getLogger(__name__)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas (T,) rescaled so that ᾱ_{T-1} = 0 and ᾱ_0 is unchanged (Lin et al. 2023, Alg. 1).

    Uses diffusers' implementation when the installed version has it.
    """
    try:
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as rescale
    except ImportError:  # pragma: no cover - every supported diffusers has it
        rescale = _rescale_zero_terminal_snr
    return rescale(betas.clone())


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    sqrt_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_bar[0].clone(), sqrt_bar[-1].clone()
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    bar = sqrt_bar**2
    alphas = torch.cat([bar[:1], bar[1:] / bar[:-1]])
    return 1.0 - alphas


def timestep_range(section: TrainingSection, num_train_timesteps: int) -> tuple[int, int]:
    """(min_t, max_t) of §6.1.5: `min_timestep or 0`, `max_timestep or T` (max exclusive).

    When min_t >= max_t every sample gets t = max_t, which must then be a valid index.
    """
    min_t = 0 if section.min_timestep is None else section.min_timestep
    max_t = num_train_timesteps if section.max_timestep is None else section.max_timestep
    if min_t >= max_t and max_t >= num_train_timesteps:
        raise ConfigError(
            [
                Problem(
                    key="training.min_timestep",
                    message=f"min_timestep {min_t} >= max_timestep {max_t}: every sample would "
                    f"use t = {max_t}, outside the {num_train_timesteps}-step schedule",
                    value=section.min_timestep,
                    has_value=True,
                    hint=f"set min_timestep < max_timestep (max_timestep is exclusive), or both "
                    f"to the same t <= {num_train_timesteps - 1} for a fixed timestep",
                )
            ]
        )
    return min_t, max_t


def _expand(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims in total."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def pyramid_noise(
    noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float
) -> torch.Tensor:
    """Multi-resolution noise (§6.1.4) added to `noise` (B, C, H, W); returns a new tensor.

    Level i (from 0) draws r ~ U(2, 4) and N(0, 1) noise at (max(1, ⌊H/r^i⌋), max(1, ⌊W/r^i⌋)),
    upsamples it bilinearly to (H, W) and adds it times discount^i; it stops after the level whose
    side reached 1. The sum is divided by its global standard deviation. Level 0 is a second
    full-resolution draw, as in the reference.
    """
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator, device=generator.device)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn(
            (b, c, hn, wn), generator=generator, device=generator.device, dtype=torch.float32
        )
        level = to_device(level, out.device)
        out += F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


@dataclass
class NoiseSample:
    """One step's diffusion inputs: ε (the target's noise), t, x_t and the training target."""

    noise: torch.Tensor  # (B, C, H, W)
    timesteps: torch.Tensor  # (B,) long
    noisy_latents: torch.Tensor  # (B, C, H, W)
    target: torch.Tensor  # (B, C, H, W): ε, or v with v-parameterization


class NoiseRecipe:
    """Noise/timestep/target recipe of one run, with the ᾱ and SNR tables it trains against.

    With `zero_terminal_snr` the betas are rescaled (ᾱ_{T-1} = 0) and — unlike the reference
    (§13.21) — the SNR table used for loss weighting is computed *after* the rescale, so min-SNR,
    debiased and scale-v weighting see the schedule that is actually trained. The scheduler object
    is not modified: use `add_noise` / `target` (or `alphas_cumprod`) of this recipe. SNR_{T-1} is
    then exactly 0; the loss recipe guards the divisions by it.
    """

    def __init__(self, section: TrainingSection, scheduler: DDPMScheduler, is_v: bool) -> None:
        self.section = section
        self.is_v = is_v
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.min_timestep, self.max_timestep = timestep_range(section, self.num_train_timesteps)
        if section.zero_terminal_snr and not scheduler.config.get("rescale_betas_zero_snr", False):
            logger.info("zero_terminal_snr: rescaling betas (https://arxiv.org/abs/2305.08891)")
            betas = rescale_zero_terminal_snr(scheduler.betas.detach().float().cpu())
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        else:
            alphas_cumprod = scheduler.alphas_cumprod.detach().float().cpu().clone()
        self.alphas_cumprod = alphas_cumprod  # (T,) float32, CPU
        alpha, sigma = alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()
        self.snr = (alpha / sigma) ** 2  # (T,) float32; 0 at T-1 under zero_terminal_snr
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- tables -------------------------------------------------------------------------------

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, torch.device(device))
        if key not in self._tables:
            self._tables[key] = to_device(getattr(self, name), device)
        return self._tables[key]

    def snr_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR_t = ᾱ_t / (1 − ᾱ_t) for timesteps (B,), float32 on the timesteps' device."""
        return self._table("snr", timesteps.device)[timesteps]

    def alphas_cumprod_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for timesteps (B,), float32 on the timesteps' device."""
        return self._table("alphas_cumprod", timesteps.device)[timesteps]

    # -- random draws -------------------------------------------------------------------------

    @staticmethod
    def _randn(
        shape: tuple[int, ...], generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        draw = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return to_device(draw, device)

    @staticmethod
    def _rand1(generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return to_device(torch.rand(1, generator=generator, device=generator.device), device)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ε for latents (B, C, H, W): N(0, I) + noise offset + pyramid noise (§6.1.2-4).

        Offset: o = noise_offset, or U(0,1)·noise_offset (one scalar per batch) with random
        strength; with adaptive_noise_scale k, o_bc = max(0, o + k·|mean_HW(latents_bc)|); then
        ε += o · N(0,1)[B, C, 1, 1]. Pyramid noise follows, then the global std normalisation.
        """
        s = self.section
        b, c = latents.shape[:2]
        noise = self._randn(tuple(latents.shape), generator, latents.device)
        if s.noise_offset:
            offset: float | torch.Tensor = s.noise_offset
            if s.noise_offset_random_strength:
                offset = self._rand1(generator, latents.device) * s.noise_offset
            if s.adaptive_noise_scale is not None:
                mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
                offset = torch.clamp(offset + s.adaptive_noise_scale * mean, min=0.0)
            noise = noise + offset * self._randn((b, c, 1, 1), generator, latents.device)
        if s.multires_noise_iterations:
            noise = pyramid_noise(
                noise, generator, s.multires_noise_iterations, s.multires_noise_discount
            )
        return noise.to(latents.dtype)

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """t (B,) long: uniform in [min_t, max_t), or all max_t when min_t >= max_t (§6.1.5)."""
        if self.min_timestep < self.max_timestep:
            t = torch.randint(
                self.min_timestep,
                self.max_timestep,
                (batch_size,),
                generator=generator,
                device=generator.device,
            )
        else:
            t = torch.full((batch_size,), self.max_timestep, dtype=torch.long)
        return to_device(t, device if device is not None else generator.device)

    # -- forward diffusion --------------------------------------------------------------------

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, computed like diffusers' `add_noise`."""
        table = self._table("alphas_cumprod", latents.device).to(latents.dtype)
        a = table[timesteps.to(latents.device)]
        return (
            _expand(a**0.5, latents.ndim) * latents + _expand((1 - a) ** 0.5, latents.ndim) * noise
        )

    def noisy_latents(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """x_t (B, C, H, W); with ip_noise_gamma γ the input uses ε + γ·N(0, I) (§6.1.6).

        γ is U(0,1)·ip_noise_gamma (one scalar per batch) with random strength. Only x_t is
        perturbed: `target` keeps the unperturbed ε.
        """
        s = self.section
        eps = noise
        if s.ip_noise_gamma:
            gamma: float | torch.Tensor = s.ip_noise_gamma
            if s.ip_noise_gamma_random_strength:
                gamma = self._rand1(generator, latents.device) * s.ip_noise_gamma
            extra = self._randn(tuple(latents.shape), generator, latents.device)
            eps = noise + (gamma * extra).to(noise.dtype)
        return self.add_noise(latents, eps, timesteps)

    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """ε, or v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0 with v-parameterization (§6.1.7)."""
        if not self.is_v:
            return noise
        table = self._table("alphas_cumprod", latents.device).to(latents.dtype)
        a = table[timesteps.to(latents.device)]
        return _expand(a**0.5, noise.ndim) * noise - _expand((1 - a) ** 0.5, noise.ndim) * latents

    def sample(self, latents: torch.Tensor, generator: torch.Generator) -> NoiseSample:
        """All of one step's draws in the reference order: ε, t, x_t; plus the target."""
        noise = self.sample_noise(latents, generator)
        timesteps = self.sample_timesteps(latents.shape[0], generator, latents.device)
        noisy = self.noisy_latents(latents, noise, timesteps, generator)
        return NoiseSample(noise, timesteps, noisy, self.target(latents, noise, timesteps))
