"""The training loss recipe (§6.2): element loss, mask, per-sample weights, timestep weighting.

Order, as in the reference: element loss in float32 -> mask -> mean over C, H, W -> per-sample
`loss_weights` (methods put prior_loss_weight there) -> min-SNR -> scale-v -> v-pred-like ->
debiased estimation -> batch mean.

Deliberate differences from the reference:
* The SNR table is the one after `zero_terminal_snr` (see NoiseRecipe, §13.21).
* `huber_scale` multiplies c in every schedule, including `snr` (§13.22: the reference ignores it
  there). With the default huber_scale = 1.0 the result is identical.
* Divisions by SNR use max(SNR, 1e-3) (`SNR_FLOOR`). The smallest SNR of the standard SD
  schedule is 4.7e-3, so this changes nothing there; it only keeps debiased-ε and v-pred-like
  weights finite under zero terminal SNR, where SNR reaches 0. Min-SNR for ε uses
  where(SNR > γ, γ/SNR, 1), which equals min(SNR, γ)/SNR and is 1 (not 0/0) at SNR = 0.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sdtrain.engine.noise import timestep_range
from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    from sdtrain.config.sections import TrainingSection
    from sdtrain.engine.noise import NoiseRecipe

logger = logging.getLogger(__name__)

SNR_CAP = 1000.0  # the reference's cap on SNR in scale-v / v-pred-like / debiased weights
SNR_FLOOR = 1e-3  # our floor for divisions by SNR (see module docstring)
_HUBER_KEYS = ("huber_c", "huber_scale", "huber_schedule")


def check_recipe(
    section: TrainingSection, is_v: bool, num_train_timesteps: int = 1000
) -> list[str]:
    """Cross-option rules of §1.9 that need the prediction type; returns warnings.

    Raises ConfigError for scale_v_pred_loss_like_noise_pred without v-parameterization,
    v_pred_like_loss with v-parameterization, and a fixed timestep outside the schedule.
    """
    problems: list[Problem] = []
    warnings: list[str] = []
    if section.scale_v_pred_loss_like_noise_pred and not is_v:
        problems.append(
            Problem(
                key="training.scale_v_pred_loss_like_noise_pred",
                message="scale_v_pred_loss_like_noise_pred needs a v-prediction model",
                hint="remove it, or set [model] v_parameterization = true for a v model",
            )
        )
    if section.v_pred_like_loss and is_v:
        problems.append(
            Problem(
                key="training.v_pred_like_loss",
                message="v_pred_like_loss is for ε-prediction models; this model predicts v",
                hint="remove v_pred_like_loss (v models already train on the v loss)",
            )
        )
    try:
        min_t, max_t = timestep_range(section, num_train_timesteps)
    except ConfigError as err:
        problems.extend(err.problems)
    else:
        if min_t > max_t:
            warnings.append(
                f"min_timestep {min_t} > max_timestep {max_t}: every sample uses t = {max_t}"
            )
    if problems:
        raise ConfigError(problems)
    if section.zero_terminal_snr and not is_v:
        warnings.append(
            "zero_terminal_snr is meant for v-prediction; with an ε-prediction model the last "
            "timestep carries no signal and training may behave unexpectedly"
        )
    if section.loss_type in ("l1", "l2"):
        set_keys = [k for k in _HUBER_KEYS if k in section.model_fields_set]
        if set_keys:
            warnings.append(
                f"{', '.join(set_keys)} only apply to loss_type huber/smooth_l1 "
                f"(loss_type is {section.loss_type})"
            )
    return warnings


def element_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str, c: torch.Tensor | None = None
) -> torch.Tensor:
    """Element-wise loss (B, C, H, W) of d = pred − target; c (B,) for huber/smooth_l1.

    l2: d²; l1: |d|; huber: 2c(sqrt(d² + c²) − c); smooth_l1: 2(sqrt(d² + c²) − c).
    """
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if c is None:
        raise ValueError(f"loss_type {loss_type} needs a per-sample c")
    c = c.to(pred).reshape(-1, *([1] * (pred.ndim - 1)))
    # sqrt(d² + c²) − c, written as d² / (sqrt(d² + c²) + c): the same value without float32
    # cancellation when c is large (c > 0 always: huber_c > 0)
    d2 = (pred - target) ** 2
    root = d2 / (torch.sqrt(d2 + c**2) + c)
    if loss_type == "huber":
        return 2 * c * root
    if loss_type == "smooth_l1":
        return 2 * root
    raise ValueError(f"unknown loss_type {loss_type!r}")


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Loss mask (B, H, W) or (B, 1, H, W) in [0, 1] at pixel size -> (B, 1, h, w), area-resized.

    (The reference maps a conditioning image's R channel from [-1, 1] to [0, 1] first; callers
    pass masks already in [0, 1].)
    """
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return F.interpolate(mask.float(), size=size, mode="area")


class LossRecipe:
    """Loss of one run. `compute` turns (pred, target, t) into the scalar to backpropagate."""

    def __init__(self, section: TrainingSection, noise: NoiseRecipe) -> None:
        """Checks the recipe (ConfigError on errors) and logs its warnings once."""
        for warning in check_recipe(section, noise.is_v, noise.num_train_timesteps):
            logger.warning(warning)
        self.section = section
        self.noise = noise
        self.is_v = noise.is_v

    def huber_c(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample c (B,) float32 of huber/smooth_l1 for timesteps (B,).

        constant: huber_c·scale; exponential: exp(−α·t)·scale with α = −ln(huber_c)/T;
        snr: ((1 − huber_c)/(1 + σ_t)² + huber_c)·scale with σ_t = sqrt((1 − ᾱ_t)/ᾱ_t).
        """
        s = self.section
        if s.huber_schedule == "constant":
            return torch.full(timesteps.shape, s.huber_c * s.huber_scale, device=timesteps.device)
        if s.huber_schedule == "exponential":
            alpha = -math.log(s.huber_c) / self.noise.num_train_timesteps
            return torch.exp(-alpha * timesteps.float()) * s.huber_scale
        a = self.noise.alphas_cumprod_at(timesteps)
        sigma = ((1.0 - a) / a) ** 0.5
        return ((1 - s.huber_c) / (1 + sigma) ** 2 + s.huber_c) * s.huber_scale

    def timestep_weights(self, timesteps: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Applies min-SNR, scale-v, v-pred-like and debiased weighting to a (B,) loss."""
        s = self.section
        if not (
            s.min_snr_gamma
            or s.scale_v_pred_loss_like_noise_pred
            or s.v_pred_like_loss
            or s.debiased_estimation_loss
        ):
            return loss
        snr = self.noise.snr_at(timesteps.to(loss.device))
        capped = torch.clamp(snr, max=SNR_CAP)
        floored = torch.clamp(capped, min=SNR_FLOOR)
        if s.min_snr_gamma:
            gamma = s.min_snr_gamma
            if self.is_v:
                w = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
            else:
                w = torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))
            loss = loss * w
        if s.scale_v_pred_loss_like_noise_pred:
            loss = loss * (capped / (capped + 1))
        if s.v_pred_like_loss:
            loss = loss + loss / (floored / (floored + 1)) * s.v_pred_like_loss
        if s.debiased_estimation_loss:
            loss = loss * (1 / (capped + 1) if self.is_v else 1 / torch.sqrt(floored))
        return loss

    def compute(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        loss_weights: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, per-sample loss (B,)) in float32.

        pred, target: (B, C, h, w); timesteps: (B,); loss_weights: (B,) multipliers (None = 1);
        mask: (B, H, W) or (B, 1, H, W) in [0, 1] at any size (usually pixels), area-resized to
        (h, w). As in the reference, the masked loss is averaged over all elements, not over
        the mask's area (§13.23 kept: it preserves the loss scale users tuned LRs against).
        """
        pred, target = pred.float(), target.float()
        c = None
        if self.section.loss_type in ("huber", "smooth_l1"):
            c = self.huber_c(timesteps.to(pred.device))
        loss = element_loss(pred, target, self.section.loss_type, c)
        if mask is not None:
            loss = loss * latent_mask(mask.to(loss.device), tuple(loss.shape[-2:]))
        per_sample = loss.mean(dim=tuple(range(1, loss.ndim)))
        if loss_weights is not None:
            per_sample = per_sample * loss_weights.to(per_sample)
        per_sample = self.timestep_weights(timesteps, per_sample)
        return per_sample.mean(), per_sample
