"""peft's vanilla LoRA forward, summed into the base layer's output instead of beside it.

peft computes `result = result + lora_B(lora_A(dropout(x))) * scaling`: the base output, the
up-projection, its scaled copy and the sum are four output-sized tensors, of which only the sum
lives on. During a training forward the three short-lived ones are freed between activations
that stay, and the holes they leave are too small for the next layer's tensors. On the full SD1.5
architecture (fp32 LoRA, 256 px) the heap held 0.46 GiB of such holes at the end of the forward,
above 4.41 GiB in use.

Here the LoRA branch is added into the base output in place:
- a Linear up-projection (no bias, no hooks, one dtype, no autocast) is one GEMM into the base
  output, `result += scaling * (down @ B^T)` (`addmm_`): no temporary at all. The scaling is
  applied inside the GEMM, so the sum differs from peft's by float rounding (one or two ulps);
  the same inputs always give the same bits, so resume stays exact. The layer runs on its input
  flattened to tokens x features (torch's linear does the same GEMMs for N-D input, so the base
  output is the same) and reshapes the sum at the end: an in-place GEMM into a reshaped view
  would make autograd copy the whole output's gradient in backward (`CopySlices`: measured
  ~0.1 s per step on SD1.5);
- anything else (a Conv2d up-projection, autocast, mixed dtypes) scales the up-projection in
  place and adds it in place: one temporary, and bit-identical to peft's forward.
The up-projection's weight goes into that GEMM as a row-major copy of its transpose (rank x out
floats), so that autograd computes its gradient as `down^T @ grad` rather than as
`(grad^T @ down)^T`, its choice for a column-major operand: for the GEGLU projection's 2560
outputs at 1024 rows (SD1.5, 256 px) 6.5 instead of 12.8 ms forward + backward, over the LoRA
step's up-projections 176 instead of 266 ms (2-vCPU AVX2 EPYC, 2026-12-07). Its gradient then
differs from peft's by float rounding (~1e-6 relative); the same inputs still give the same bits.
No tensor autograd saves is overwritten: a linear or convolution's backward reads its input and
weight, never its output; a product with a number reads neither. The tests compare outputs and
gradients with peft's forward.

Layer states this does not cover (adapters disabled or merged, several active adapters, a LoRA
variant such as DoRA, extra forward arguments, a shape the in-place sum could not keep) take
peft's own forward unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import layer as peft_lora


def _gemm_up(up: torch.nn.Module, dtype: torch.dtype, device_type: str) -> bool:
    """Whether up-projection `up` can be summed by one in-place GEMM for inputs of `dtype`: a
    Linear without bias or hooks, weights of that dtype, no autocast."""
    return (
        type(up) is torch.nn.Linear
        and up.bias is None
        and not (up._forward_hooks or up._forward_pre_hooks)
        and up.weight.dtype == dtype
        and not _autocast_on(device_type)
    )


def _gemm_into(result: torch.Tensor, down: torch.Tensor, up: torch.nn.Module) -> bool:
    """Whether `result += scaling * down @ up.weight^T` can run as one in-place GEMM: 2-D
    operands of one dtype and an up-projection `_gemm_up` accepts."""
    return (
        result.dim() == 2
        and down.dim() == 2
        and result.is_contiguous()
        and result.dtype == down.dtype
        and result.shape[0] == down.shape[0]
        and result.shape[1] == up.out_features
        and _gemm_up(up, result.dtype, result.device.type)
    )


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): none there
        return False


def _flattens(self: Any, name: str, x: torch.Tensor) -> bool:
    """Whether this layer should run on `x` flattened to 2-D (tokens x features) for the GEMM
    path: a Linear base (torch's linear on contiguous N-D input runs the same GEMM as on the
    flattened input, so the base output keeps its bits) and an up-projection the GEMM can take.
    Not with hooks on the down-projection (the reference's rank dropout draws its mask per
    sample, from the N-D shape)."""
    down, up = self.lora_A[name], self.lora_B[name]
    return (
        x.dim() > 2
        and x.is_contiguous()
        and isinstance(self.base_layer, torch.nn.Linear)
        and not (down._forward_hooks or down._forward_pre_hooks)
        and x.dtype == down.weight.dtype
        and _gemm_up(up, x.dtype, x.device.type)
    )


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(active) != 1
        or active[0] in self.lora_variant
    ):
        return super(type(self), self).forward(x, *args, **kwargs)
    self._check_forward_args(x)
    name = active[0]
    shape = None
    if _flattens(self, name, x):  # so that the GEMM writes into the output, not into a view
        shape = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
    result = self.base_layer(x)
    lora_a, lora_b, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
    x = self._cast_input_dtype(x, lora_a.weight.dtype)
    down = lora_a(self.lora_dropout[name](x))
    if _gemm_into(result, down, lora_b):
        # B^T as a row-major copy (rank x out floats): for the transposed view, a column-major
        # operand, autograd computes B's gradient as (grad^T @ down)^T, which MKL runs 1.2-5x
        # slower than the down^T @ grad it computes for a row-major one (module doc)
        result.addmm_(down, lora_b.weight.t().contiguous(), alpha=scaling)
    else:
        update = lora_b(down)
        update.mul_(scaling)  # peft: `* scaling`
        if update.dtype == result.dtype and update.shape == result.shape:
            result.add_(update)
        else:  # a promotion or broadcast the in-place sum cannot express: peft's own sum
            result = (result + update).to(result.dtype)
    return result if shape is None else result.view(*shape, result.shape[-1])


class InplaceLinear(peft_lora.Linear):
    """peft's LoRA Linear with the in-place sum (module doc)."""

    forward = _forward


class InplaceConv2d(peft_lora.Conv2d):
    """peft's LoRA Conv2d with the in-place sum (module doc)."""

    forward = _forward


_REPLACEMENTS = {peft_lora.Linear: InplaceLinear, peft_lora.Conv2d: InplaceConv2d}


def use_inplace_sum(layers: list[Any]) -> int:
    """Give each peft LoRA Linear / Conv2d layer in `layers` the in-place forward (their class
    becomes a subclass that overrides only `forward`); returns how many changed."""
    changed = 0
    for layer in layers:
        replacement = _REPLACEMENTS.get(type(layer))
        if replacement is not None:
            layer.__class__ = replacement
            changed += 1
    return changed
