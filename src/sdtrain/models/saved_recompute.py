"""Activations kept for backward as what they are computed from, and computed again there.

A feed-forward `fc2(act(fc1(x)))` keeps, until backward, `fc1`'s output (the activation's
gradient reads it), whatever the activation keeps of its own, and the activation's output (the
input of `fc2`, whose LoRA or trained weight reads it for its gradient). Only the first is needed:
the others are one elementwise function of it away.

- `Recomputed.apply(h, act)` is `act(h)` keeping only `h`; its backward runs `act` on `h` again
  under autograd and takes the gradient through it, so the gradient is autograd's own, bit for bit.
- `kept_as(product, source, recompute)` is a context: a tensor saved for backward inside it that
  lies on `product`'s memory (the tensor itself, or a view such as a LoRA layer's flattened
  input) is kept as `source` and rebuilt as `recompute(source)` (with the saved view's shape,
  strides and offset) when backward reads it. `source` is kept anyway, so the product's memory is
  freed as soon as the forward no longer uses it. The match is by memory address: the caller
  keeps `product` referenced until the block exits, so no other tensor can take its address
  while the hooks are in force.

`ready(t)`: only where it is sound to install the hooks: gradients recorded, no other saved-tensor
hooks in force (gradient checkpointing brings its own and decides what is kept, and so does the
opt-in frozen-half mode, engine/halfweights.py), not inside torch.compile (which plans its own
saved tensors), CPU or CUDA. Autocast: the recomputed ops (chunk, gelu, sigmoid, products) are on
no autocast list, so their values do not depend on whether backward runs under autocast (tested
under CPU bf16 autocast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


def ready(tensor: torch.Tensor) -> bool:
    """Whether the hooks may be installed around work on `tensor` (see the module doc)."""
    return (
        torch.is_grad_enabled()
        and tensor.device.type in ("cpu", "cuda")
        and not torch.compiler.is_compiling()
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


class Recomputed(torch.autograd.Function):
    """`act(h)` keeping only `h` for backward (see the module doc)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        ctx.act = act
        ctx.save_for_backward(h)
        return act(h)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward fails loudly
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (h,) = ctx.saved_tensors
        with torch.enable_grad():
            again = h.detach().requires_grad_(True)
            (grad_h,) = torch.autograd.grad(ctx.act(again), again, grad)
        return grad_h, None


@contextlib.contextmanager
def kept_as(
    product: torch.Tensor,
    source: torch.Tensor,
    recompute: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Saved tensors on `product`'s memory are kept as `source` (see the module doc)."""
    where = product.untyped_storage().data_ptr()  # an address: the product itself is not kept
    device = product.device

    def pack(saved: torch.Tensor) -> Any:
        if saved.device == device and saved.untyped_storage().data_ptr() == where:
            return (source, saved.size(), saved.stride(), saved.storage_offset())
        return saved

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        kept, size, stride, offset = packed
        with torch.no_grad():
            return recompute(kept.detach()).as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
