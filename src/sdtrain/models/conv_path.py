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

Input gradient of frozen fp32 weights at 8x8 and below, on AVX-512 CPUs: torch's GEMM path
computes it per sample as `W^T @ g` (the weight as the transposed left operand), then col2im.
Where the weight and bias are frozen fp32, the output map has at most MAX_ROWS_POSITIONS
positions, and torch's CPU capability is AVX512, the routed convolution instead computes all
samples' columns in one GEMM with the weight as the right operand, `g_rows @ W` (rows: sample x
position), then the same col2im (`F.fold`). Measured on a 2-vCPU Xeon with AVX-512 and AMX
(2026-12-08), forward + input gradient, each call on a cold weight (`benchmarks/bench_conv_path.py
--cold`), ms, torch's GEMM path -> this:

    1280->1280 3x3 at 4x4: 13.4 -> 9.6; 2560->1280 3x3 at 4x4: 27.4 -> 18.8; 1280->1280 3x3 at
    8x8: 22.4 -> 20.8; 1280->1280 stride 2 to 4x4: 13.6 -> 9.6; all routed SD1.5 shapes at 256
    px: 896 -> 790 ms a step; whole LoRA steps 2.33-2.35 s against 2.47-2.49 s. The input
    gradient alone at batch 4, 4x4: 21.3 -> 10.3; at 16x16 it was slower (640->640: 8.0 ->
    10.9), so those keep torch's.

The sums run over the same output channels in another order inside MKL: results differ from
torch's by float rounding (~2e-6 absolute at these sizes), the same on every call, so a run and
its resume compute the same. AVX2 CPUs (unmeasured with this form; their MKL read a cold weight
faster as the left operand, models/linear_path.py) and everything else (trained weights, bf16,
frozen half weights, torch.compile) keep torch's backward. SDTRAIN_CONV_GRAD=stock turns it off,
SDTRAIN_CONV_GRAD=rows on whatever the CPU (read when the model is routed; A/B; the tests run
with it).
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any

import torch

from sdtrain.models.frozen_half import is_frozen_half
from sdtrain.models.kernel_choice import chosen, frozen_fp32

MAX_POSITIONS = 256  # 16x16: the GEMM path was faster at every SD shape up to here
OPT_OUT = "SDTRAIN_CONV"
MAX_ROWS_POSITIONS = 64  # 8x8: the one-GEMM input gradient with the weight on the right
GRAD_OPT = "SDTRAIN_CONV_GRAD"  # "stock": torch's backward; "rows": that form on any CPU
ROWS_GRAD_CAPABILITIES = frozenset({"AVX512"})  # torch.backends.cpu.get_cpu_capability()


def rows_gradient_here(capability: str | None = None) -> bool:
    """Whether frozen fp32 convolutions at MAX_ROWS_POSITIONS or fewer positions take the
    one-GEMM input gradient: SDTRAIN_CONV_GRAD=stock never, =rows always, otherwise where torch's
    CPU capability (`capability`, default this machine's) is in ROWS_GRAD_CAPABILITIES."""
    return chosen(GRAD_OPT, "stock", "rows", ROWS_GRAD_CAPABILITIES, capability)


class _FrozenConv(torch.autograd.Function):
    """`thnn_conv2d` forward for a frozen fp32 weight and bias; input gradient as one GEMM over
    every sample's positions with the weight on the right, then col2im. Keeps only the weight."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[-2:]), kernel, stride, padding)
        return torch._C._nn.thnn_conv2d(x, weight, kernel, bias, stride, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward fails loudly
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        (weight,) = ctx.saved_tensors
        size, kernel, stride, padding = ctx.geometry
        batch, channels = grad.shape[:2]
        rows = grad.permute(0, 2, 3, 1).reshape(-1, channels)  # (sample, position) x channel
        columns = torch.mm(rows, weight.reshape(channels, -1)).view(batch, -1, weight[0].numel())
        grad_x = torch.nn.functional.fold(
            columns.transpose(1, 2), size, kernel, padding=padding, stride=stride
        )
        return grad_x, None, None, None, None, None


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
    self: torch.nn.Conv2d,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    rows_gradient: bool = False,
) -> torch.Tensor:
    """Conv2d._conv_forward through the GEMM path where it applies; `rows_gradient`: frozen fp32
    weights at MAX_ROWS_POSITIONS or fewer positions take `_FrozenConv`'s input gradient."""
    dtype = _compute_dtype(x, weight) if x.device.type == "cpu" else None
    positions = _output_positions(self, x.shape[-2], x.shape[-1]) if x.dim() == 4 else 0
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
        and positions <= MAX_POSITIONS
    ):
        # a frozen half weight (and bias) of an fp32 run goes in as it is: the up-cast is
        # engine/halfweights.py's, which saves the half tensor for backward
        keep = dtype == torch.float32
        if (
            rows_gradient
            and keep
            and torch.is_grad_enabled()
            and frozen_fp32(weight)
            and frozen_fp32(bias)
            and positions <= MAX_ROWS_POSITIONS
            and not torch.compiler.is_compiling()
        ):
            return _FrozenConv.apply(x, weight, bias, self.kernel_size, self.stride, self.padding)
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
    the module doc), with the one-GEMM input gradient where `rows_gradient_here()` says so at
    this call; returns how many Conv2d layers can take that path (0 when opted out)."""
    if os.environ.get(OPT_OUT, "").strip().lower() == "onednn":
        return 0
    forward = functools.partial(_gemm_conv_forward, rows_gradient=rows_gradient_here())
    count = 0
    for conv in module.modules():
        if _suited(conv):
            conv._conv_forward = types.MethodType(forward, conv)  # type: ignore[method-assign]
            count += 1
    return count
