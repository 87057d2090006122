"""Convolution kernels on the CPU: im2col + GEMM for the U-Net's small feature maps.

torch runs an fp32 CPU convolution through oneDNN, which copies the weight into its blocked
layout on every call (forward, and again for the input gradient). At the U-Net's low-resolution
levels the weights are large (1280 channels: up to 112 MiB) and the feature maps small, so that
copy and the kernel choice behind it dominate. Measured on a 2-core Xeon (AVX-512, AMX),
forward + input gradient, oneDNN vs torch's own im2col + GEMM convolution (`thnn_conv2d`, the
differentiable op torch uses when oneDNN is off):

    2560->1280 3x3 at 8x8: 146 vs 61 ms; at 4x4: 139 vs 22 ms; 1920->640 at 16x16: 105 vs 71 ms
    (with the weight gradient too: 245 vs 131 ms at 8x8); 1280->1280 stride 2 to 4x4: 62 vs 11
    ms; at 32x32 the two are within ~10 % either way, oneDNN mostly ahead.

The GEMM path also allocates no weight-sized buffer per call, so the heap churns less.

`use_gemm_convolutions(unet)` makes each Conv2d of the module whose output map has at most
MAX_POSITIONS positions take the GEMM path on the CPU in float32, and in bf16 (under CPU bf16
autocast the input, weight and bias are cast to bf16 first, as autocast's conv2d does). No
groups, no dilation, zero padding: all of SD's. bf16, measured the same way: 2560->1280 at 8x8
100 vs 24 ms, at 4x4 91 vs 14 ms; at 16x16 about even; at 32x32 oneDNN is ahead (not routed).
Frozen float16/bf16 weights an fp32 run keeps half (engine/halfweights.py) take the same
path: the kernel receives the half weight and that mode up-casts it per call (before 2026-12-06
such convolutions fell back to oneDNN). Everything else (fp16 compute, CUDA, larger maps, inputs
or weights not in the plain contiguous layout) keeps torch's own choice. Results differ from
oneDNN's by float rounding (~5e-7 relative per fp32 convolution). The choice depends on shapes
only, so a run and its resume compute the same. Training applies it to the loaded U-Net, before
any adapter layer exists (models/training_kernels.py; adapters' own small convolutions keep
torch's choice); `generate` and the data tools keep torch's kernels.
SDTRAIN_CONV=onednn turns it off (A/B).
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch

from sdtrain.models.frozen_half import is_frozen_half

MAX_POSITIONS = 256  # 16x16: the GEMM path was faster at every SD shape up to here
OPT_OUT = "SDTRAIN_CONV"


def _output_positions(conv: torch.nn.Conv2d, height: int, width: int) -> int:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return ((height + 2 * ph - kh) // sh + 1) * ((width + 2 * pw - kw) // sw + 1)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """bf16 under CPU bf16 autocast (what autocast's conv2d computes in), else the inputs' own
    float32 or bf16; None for anything else (fp16, mixed dtypes without autocast)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    if x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16):
        return x.dtype
    if x.dtype == torch.float32 and is_frozen_half(weight):
        return torch.float32  # passed as it is: engine/halfweights.py's mode up-casts it per call
    return None


def _gemm_conv_forward(
    self: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    dtype = _compute_dtype(x, weight) if x.device.type == "cpu" else None
    if (
        dtype is not None
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16)
        and (weight.dtype in (torch.float32, torch.bfloat16) or is_frozen_half(weight))
        # the GEMM path's weight gradient would take an input's channels-last layout (a 1x1 map
        # is contiguous both ways), and torch then refuses the contiguous weight gradient
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)
        and weight.is_contiguous()
        and _output_positions(self, x.shape[-2], x.shape[-1]) <= MAX_POSITIONS
    ):
        # a frozen half weight (and bias) of an fp32 run goes in as it is: the up-cast is
        # engine/halfweights.py's, which saves the half tensor for backward
        keep = dtype == torch.float32
        cast_weight = weight if keep and is_frozen_half(weight) else weight.to(dtype)
        cast = None if bias is None else bias if keep and is_frozen_half(bias) else bias.to(dtype)
        return torch._C._nn.thnn_conv2d(
            x.to(dtype), cast_weight, self.kernel_size, cast, self.stride, self.padding
        )
    return torch.nn.Conv2d._conv_forward(self, x, weight, bias)


def _suited(conv: Any) -> bool:
    return (
        type(conv) is torch.nn.Conv2d
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and tuple(conv.dilation) == (1, 1)
    )


def use_gemm_convolutions(module: torch.nn.Module) -> int:
    """Route the small-map fp32 / bf16 CPU convolutions of `module` through im2col + GEMM (see
    the module doc); returns how many Conv2d layers can take that path (0 when opted out)."""
    if os.environ.get(OPT_OUT, "").strip().lower() == "onednn":
        return 0
    count = 0
    for conv in module.modules():
        if _suited(conv):
            conv._conv_forward = types.MethodType(_gemm_conv_forward, conv)  # type: ignore[method-assign]
            count += 1
    return count
