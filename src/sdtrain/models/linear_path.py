"""Frozen Linear layers on the CPU: the weight as the GEMM's left operand for few rows, and wide
layers' forward in blocks.

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

Wide layers (2560 or more output features: the GEGLU projections, the text encoder's first MLP
layer) also compute their forward in blocks: 16-64 rows weight first over 2048 weight rows per
GEMM, 65-1024 rows as `x @ W^T` into 512 output columns per GEMM. Each output is the same dot
product over the same inputs, only fewer of them per call, and MKL ran the smaller calls faster
with the weight cold; the input gradient keeps the unblocked form (blocking it was slower).
Measured the same way (forward, ms, one GEMM -> blocks; `bench_linear_path.py --text-encoder`,
2026-12-08): 64 rows 1280->10240 29.1 -> 23.4, 16 rows 14.4 -> 11.0; 256 rows 640->5120 24.5 ->
18.8; 1024 rows 320->2560 17.2 -> 14.8; the text encoder's 77 rows 768->3072 5.8 -> 5.4; 77 ms
less per SD1.5 step at 256 px. Bit-identical at every shape measured, and an SD1.5 LoRA file
after 3 steps was identical with and without the blocks.

Which CPUs: only where torch's CPU capability is AVX2 (no AVX-512), the machines it was measured
faster on. On a 2-vCPU Intel Xeon with AVX-512 and AMX (2026-12-08, same script, weights cycled
through 600 MiB) MKL's own `x @ W^T` won almost everywhere: the routed shapes took 723 ms a step
against 634 stock (64 rows 1280->10240: forward 9.1 weight first, 10.0 in blocks, 9.0 stock;
input gradient 13.2 against 7.5), and whole SD1.5 LoRA steps took 2.56 s against 2.45 with
`SDTRAIN_LINEAR=stock` (3 alternating pairs, each pair the same way round). AVX-512 CPUs from
other vendors are unmeasured and keep torch's kernels too.

`use_weight_first_linears(module)` gives each Linear of the module a forward that takes these
paths for float32 CPU input when no gradient of the layer's weight or bias is computed (they
are frozen, or gradients are not recorded), outside autocast and torch.compile: weight first for
16-64 rows, column blocks for wide layers with 65-1024 rows. Everything else (weights being
trained, other dtypes, CUDA, frozen half weights, other row counts) is torch's `F.linear`.
Training applies it to the loaded U-Net and text encoders (models/training_kernels.py); an
adapter that later wraps a Linear calls it as its base layer. `generate` and the data tools
keep torch's kernels. SDTRAIN_LINEAR=stock turns it off, SDTRAIN_LINEAR=path on whatever the CPU
(A/B; the tests run with it, so the routed kernels are checked on every machine).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from sdtrain.models.kernel_choice import chosen, frozen_fp32

MIN_ROWS = 16
MAX_ROWS = 64
WIDE = 2560  # output features from which the forward runs in blocks
MAX_BLOCKED_ROWS = 1024
WEIGHT_ROWS_PER_GEMM = 2048  # weight-first blocks (16-64 rows)
COLUMNS_PER_GEMM = 512  # x @ W^T blocks (65-1024 rows)
OPT_OUT = "SDTRAIN_LINEAR"  # "stock": never route; "path": route on any CPU; else by CPU
ROUTED_CAPABILITIES = frozenset({"AVX2"})  # torch.backends.cpu.get_cpu_capability() values


def _blocks(features: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `size` features (one range when the layer is narrower than WIDE)."""
    if features < WIDE:
        return [(0, features)]
    return [(start, min(features, start + size)) for start in range(0, features, size)]


class _FrozenLinear(torch.autograd.Function):
    """`x @ W^T + b` for a frozen weight and bias, the way `_path` chose: weight first,
    `(W @ x^T)^T` in blocks of weight rows, input gradient `(W^T @ g^T)^T`; or `x @ W^T` in
    blocks of output columns, input gradient `g @ W` as torch's own linear computes it. Only
    the weight is kept for backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, first: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.weight_first = first
        flat = x.reshape(-1, x.shape[-1])
        features = weight.shape[0]
        if first:
            product = flat.new_empty(features, flat.shape[0])
            for start, end in _blocks(features, WEIGHT_ROWS_PER_GEMM):
                column = None if bias is None else bias[start:end, None]
                _gemm(product[start:end], weight[start:end], flat.t(), column)
            return _row_major(product, x.shape[:-1])
        out = flat.new_empty(*x.shape[:-1], features)  # returned as is: not a view
        columns = out.view(-1, features)
        for start, end in _blocks(features, COLUMNS_PER_GEMM):
            row = None if bias is None else bias[start:end]
            _gemm(columns[:, start:end], flat, weight[start:end].t(), row)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward fails loudly
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.weight_first:
            grad_x = _row_major(torch.mm(weight.t(), flat.t()), grad.shape[:-1])
        else:
            grad_x = torch.mm(flat, weight).view(*grad.shape[:-1], weight.shape[1])
        return grad_x, None, None, None


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    """`out = a @ b (+ bias)`, written into `out` (a block of the result)."""
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _row_major(product: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """A [features, rows] product as a new contiguous [*lead, features] tensor: not a view, so
    that an adapter may add into the output in place (methods/adapters/inplace.py)."""
    out = product.new_empty(*lead, product.shape[0])
    out.view(-1, product.shape[0]).copy_(product.t())
    return out


def _path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Which path: weight first for MIN_ROWS..MAX_ROWS rows, column blocks for a WIDE layer with
    up to MAX_BLOCKED_ROWS rows, given float32 CPU input, a contiguous 2-D float32 weight and a
    bias with no gradient to compute, no autocast, not compiling; else None (torch's linear)."""
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 2
        and frozen_fp32(weight)
        and frozen_fp32(bias)
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        return None
    rows = x.numel() // max(x.shape[-1], 1)
    if MIN_ROWS <= rows <= MAX_ROWS:
        return "weight_first"
    if MAX_ROWS < rows <= MAX_BLOCKED_ROWS and weight.shape[0] >= WIDE:
        return "columns"
    return None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on the path `_path` picks (see the module doc)."""
    path = _path(x, weight, bias)
    if path is None:
        return torch.nn.functional.linear(x, weight, bias)
    return _FrozenLinear.apply(x, weight, bias, path == "weight_first")


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Linear.forward through `frozen_linear`."""
    return frozen_linear(x, self.weight, self.bias)


def routes_here(capability: str | None = None) -> bool:
    """Whether training routes frozen Linear layers on this machine: SDTRAIN_LINEAR=stock never,
    =path always, otherwise where torch's CPU capability (`capability`, default this machine's)
    is one the path was measured faster on (ROUTED_CAPABILITIES)."""
    return chosen(OPT_OUT, "stock", "path", ROUTED_CAPABILITIES, capability)


def use_weight_first_linears(module: torch.nn.Module) -> int:
    """Give every plain Linear of `module` the forward for frozen weights (weight first for few
    rows, column blocks for wide layers; see the module doc); returns how many Linear layers got
    it (0 where `routes_here()` is false)."""
    if not routes_here():
        return 0
    count = 0
    for linear in module.modules():
        if type(linear) is torch.nn.Linear and "forward" not in vars(linear):
            linear.forward = types.MethodType(_forward, linear)  # type: ignore[method-assign]
            count += 1
    return count
