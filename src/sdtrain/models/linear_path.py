"""Frozen Linear layers with few rows on the CPU: the GEMM with the weight as its left operand.

torch computes `F.linear(x, W)` as `x @ W^T`. With few rows (tokens) and a large weight, as at the
SD U-Net's 8x8 and 4x4 levels, that GEMM is bound by reading the weight, and in training every
weight arrives cold from memory (the step reads gigabytes of them between two uses of one). Over
such a cold weight MKL is much faster computing the same products the other way round,
`(W @ x^T)^T`, and the input gradient as `(W^T @ g^T)^T` instead of `g @ W`. Measured on a
2-core AMD EPYC (Zen 3, AVX2; torch 2.13's MKL 2024.2) with benchmarks/bench_linear_path.py
(each weight cold: a pool of copies larger than the L3 cache), forward / input gradient in ms,
stock -> this path:

    64 rows:  1280->10240 (GEGLU projection) 32.2 -> 21.3 / 24.0 -> 16.8;
              5120->1280 10.4 -> 7.6 / 15.7 -> 10.8; 1280->1280 3.2 -> 2.2 / 3.4 -> 2.4
    16 rows:  1280->10240 13.6 -> 9.3 / 9.9 -> 7.2; 1280->1280 1.4 -> 0.9 / 1.5 -> 1.0

The SD1.5 U-Net's routed Linear layers at 256 px, batch 1, take 444 instead of 615 ms per step
(forward and input gradient). An earlier measurement with each weight warm in the cache found
less (17-25 % on the GEGLU projection, 1280->1280 at 16 rows 15 % slower) and did not keep it;
a training step reads them cold. At 1024 rows this path is up to 70 % slower, at 77 and 256
rows it is even or slower, and below 16 rows its input gradient is several times slower, so only
16-64 rows take it. Over those rows the
results were bit-identical to torch's on that machine (both directions, with and without bias;
an SD1.5 LoRA run's file after 3 steps too); another CPU's kernels may round differently
(~1e-7 relative), and the choice depends on shapes only, so a run and its resume compute the same.

`use_weight_first_linears(module)` gives each Linear of the module a forward that takes this path
for float32 CPU input of 16-64 rows when no gradient of the layer's weight or bias is computed
(they are frozen, or gradients are not recorded), outside autocast and torch.compile. Everything
else (weights being trained, other dtypes, CUDA, frozen half weights, more or fewer rows) is
torch's `F.linear`. Training applies it to the loaded U-Net (run/train.py); an adapter that
later wraps a Linear calls it as its base layer. `generate` and the data tools keep torch's
kernels. SDTRAIN_LINEAR=stock turns it off (A/B).
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch

MIN_ROWS = 16
MAX_ROWS = 64
OPT_OUT = "SDTRAIN_LINEAR"


class _WeightFirst(torch.autograd.Function):
    """`x @ W^T + b` computed as `(W @ x^T)^T`, input gradient as `(W^T @ g^T)^T`; the weight
    and bias are frozen, so only the weight is kept for backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        rows = x.reshape(-1, x.shape[-1]).t()
        out = torch.mm(weight, rows) if bias is None else torch.addmm(bias[:, None], weight, rows)
        return _row_major(out, x.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward fails loudly
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).t()
        return _row_major(torch.mm(weight.t(), rows), grad.shape[:-1]), None, None


def _row_major(product: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """A [features, rows] product as a new contiguous [*lead, features] tensor: not a view, so
    that an adapter may add into the output in place (methods/adapters/inplace.py)."""
    out = product.new_empty(*lead, product.shape[0])
    out.view(-1, product.shape[0]).copy_(product.t())
    return out


def _frozen_fp32(tensor: torch.Tensor | None) -> bool:
    """None, or float32 without a gradient to compute (frozen, or gradients not recorded)."""
    return tensor is None or (
        tensor.dtype == torch.float32 and not (tensor.requires_grad and torch.is_grad_enabled())
    )


def _takes_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """float32 CPU input of MIN_ROWS..MAX_ROWS rows, a contiguous 2-D float32 weight and a bias
    with no gradient to compute, no autocast, not compiling."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 2
        and MIN_ROWS <= x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
        and _frozen_fp32(weight)
        and _frozen_fp32(bias)
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Linear.forward, through `_WeightFirst` where `_takes_path` says so."""
    if _takes_path(x, self.weight, self.bias):
        return _WeightFirst.apply(x, self.weight, self.bias)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def use_weight_first_linears(module: torch.nn.Module) -> int:
    """Give every plain Linear of `module` the weight-first forward for frozen weights and few
    rows (see the module doc); returns how many Linear layers got it (0 when opted out)."""
    if os.environ.get(OPT_OUT, "").strip().lower() == "stock":
        return 0
    count = 0
    for linear in module.modules():
        if type(linear) is torch.nn.Linear and "forward" not in vars(linear):
            linear.forward = types.MethodType(_forward, linear)  # type: ignore[method-assign]
            count += 1
    return count
