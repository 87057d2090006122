"""The VAE's posterior for a batch of pixels, with a channels-last input on the CPU.

Why: on the CPU, oneDNN runs an NCHW convolution by reordering its input into a blocked layout
and its output back, at every one of the encoder's convolutions; with a channels-last (NHWC)
input it keeps that layout from layer to layer. The SD VAE's encoder at 256 px (270 GFLOP per
image) took 2.46 s per image instead of 2.74 (medians of 8 interleaved runs, 2-vCPU AVX2 EPYC,
2026-12-07). The weights stay as they are (a saved VAE is written as loaded).

The posterior is rebuilt from its parameters made contiguous (NCHW), so what callers read (mean,
std, samples) has the values diffusers' own encode gives, to float rounding: the convolutions sum
in another order (about 5e-6 relative on the SD VAE's latents). Its layout is NCHW for every
batch size; diffusers' own encode hands back channels-last moments for batches of 2 or more (its
mid-block attention's output layout survives the last GroupNorm). sdtrain draws latent noise by
shape, so the layout changes no value. The choice depends on the device and on the opt-out
below, so a run and its resume on the same device encode the same. CUDA keeps NCHW (unmeasured
there). SDTRAIN_VAE_LAYOUT=nchw keeps NCHW on the CPU too (A/B). Neither the layout nor that
variable is part of the latent cache's key or of the resume check: latents cached before this
layout, or with the other one, are reused, and differ from a fresh encode by float rounding only.
"""

from __future__ import annotations

import os
from typing import Any

import torch

OPT_OUT = "SDTRAIN_VAE_LAYOUT"


def channels_last_input(pixels: torch.Tensor) -> bool:
    """Whether `pixels` go into the encoder channels-last: 4-D, on the CPU, not opted out."""
    opted_out = os.environ.get(OPT_OUT, "").strip().lower() == "nchw"
    return pixels.device.type == "cpu" and pixels.dim() == 4 and not opted_out


def encode_posterior(vae: Any, pixels: torch.Tensor) -> Any:
    """`vae.encode(pixels).latent_dist`, with the input channels-last on the CPU and the
    distribution's parameters contiguous (NCHW) either way."""
    if not channels_last_input(pixels):
        return vae.encode(pixels).latent_dist
    posterior = vae.encode(pixels.contiguous(memory_format=torch.channels_last)).latent_dist
    return type(posterior)(posterior.parameters.contiguous(), deterministic=posterior.deterministic)
