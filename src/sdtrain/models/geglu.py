"""The U-Net's GEGLU feed-forward gate, recomputed in backward instead of kept for it.

diffusers' GEGLU (the first layer of every transformer block's feed-forward) computes
`proj(x) -> (hidden, gate) -> hidden * gelu(gate)`. Autograd keeps the projection output (two
inner widths: both factors' gradients read it) and gelu(gate) (one inner width, for hidden's
gradient) until backward. `use_recomputing_geglu(unet)` routes the product through one autograd
function that keeps only the projection output and computes gelu(gate) again in backward: the
same kernels on the same inputs, so the forward and every gradient are bit-identical, for one
elementwise gelu more per block in backward. SD1.5 at 256 px, batch 1, fp32: 16 blocks, one
activation of at most 1024 x 1280 floats (5 MiB) each, 44 MiB in all. Peak RSS (fp32 LoRA,
token embedding already half, 2026-12-07): 4968-4971 -> 4933-4939 MiB in one sitting
(benchmarks/bench_train.py, 2 runs each); in a second (10-step runs, 2 each) 4960-4969 ->
4954-4981 MiB, inside the run-to-run spread the heap's fragmentation gives. Step time: within
1 % (3.28-3.42 -> 3.32-3.44 s median, the same runs).

The feed-forward's output layer then keeps the product itself (its LoRA's input, or its trained
weight's): as much again (1024 x 1280 floats at the top level). Its FeedForward keeps it as the
projection instead and computes it again when backward reads it (models/saved_recompute.py):
SD1.5 fp32 LoRA at 256 px, 10-step runs alternating in one sitting (2026-12-07), peak RSS
4899-4921 MiB against 4933-4988 without it (4 runs each), step time unchanged (2.95-3.24 s
median either way).

Only the CPU / CUDA path of the stock modules (without torch_npu, whose fused kernel keeps its
own path), only modules of exactly those classes, only a feed-forward without dropout, and only
while gradients are recorded (the output layer's part: also not under gradient checkpointing or
torch.compile). Training applies it to the loaded U-Net (run/train.py); the adapters that later
wrap `proj` and the output layer are called through the modules as before. SDTRAIN_GEGLU=stock
turns it off (A/B).
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any

import torch

OPT_OUT = "SDTRAIN_GEGLU"


class _GatedGelu(torch.autograd.Function):
    """(..., 2I) projection -> (..., I) `hidden * gelu(gate)`; saves only the projection."""

    @staticmethod
    def forward(ctx: Any, projected: torch.Tensor) -> torch.Tensor:
        hidden, gate = projected.chunk(2, dim=-1)
        ctx.save_for_backward(projected)
        return hidden * torch.nn.functional.gelu(gate)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        hidden, gate = projected.chunk(2, dim=-1)
        # autograd's own formulas: mul -> (grad * other, grad * self); gelu -> gelu_backward;
        # chunk -> cat of the parts' gradients
        grad_hidden = grad * torch.nn.functional.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate, approximate="none")
        return torch.cat([grad_hidden, grad_gate], dim=-1)


def _forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """GEGLU.forward, with the product through `_GatedGelu` when its gradient is recorded."""
    from diffusers.models.activations import GEGLU

    if args or kwargs.get("scale") is not None or hidden_states.device.type not in ("cpu", "cuda"):
        return GEGLU.forward(self, hidden_states, *args, **kwargs)  # its deprecation, mps
    projected = self.proj(hidden_states)
    if not (torch.is_grad_enabled() and projected.requires_grad):
        hidden, gate = projected.chunk(2, dim=-1)
        return hidden * self.gelu(gate)
    return _GatedGelu.apply(projected)


def _gated_product(projected: torch.Tensor) -> torch.Tensor:
    """`hidden * gelu(gate)` with `_GatedGelu.forward`'s kernels (the recomputation)."""
    hidden, gate = projected.chunk(2, dim=-1)
    return hidden * torch.nn.functional.gelu(gate)


def _ff_forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """FeedForward.forward whose output layer keeps the gated product for backward as the
    projection, which `_GatedGelu` keeps anyway (models/saved_recompute.py)."""
    from diffusers.models.attention import FeedForward

    from sdtrain.models.saved_recompute import kept_as, ready

    if args or kwargs.get("scale") is not None or not ready(hidden_states):
        return FeedForward.forward(self, hidden_states, *args, **kwargs)
    projected = self.net[0].proj(hidden_states)
    if projected.requires_grad:
        out = _GatedGelu.apply(projected)
        keeping = kept_as(out, projected, _gated_product)
    else:  # nothing is kept: GEGLU's own product
        out, keeping = _gated_product(projected), contextlib.nullcontext()
    with keeping:
        for layer in self.net[1:]:  # Dropout(0) returns its input; the output Linear
            out = layer(out)
    return out


def use_recomputing_geglu(module: torch.nn.Module) -> int:
    """Route every diffusers GEGLU of `module` through the recomputing product, and its
    feed-forward's output layer past keeping that product (see the module doc); returns how
    many GEGLUs (0 when opted out or on torch_npu)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward
    from diffusers.utils import is_torch_npu_available

    if os.environ.get(OPT_OUT, "").strip().lower() == "stock" or is_torch_npu_available():
        return 0
    count = 0
    for geglu in module.modules():
        if type(geglu) is GEGLU and "gelu" not in vars(geglu):  # no per-instance gelu
            geglu.forward = types.MethodType(_forward, geglu)  # type: ignore[method-assign]
            count += 1
    for ff in module.modules():
        if (
            type(ff) is FeedForward
            and "forward" in vars(ff.net[0])
            and all(type(m) is not torch.nn.Dropout or m.p == 0 for m in ff.net[1:])
        ):
            ff.forward = types.MethodType(_ff_forward, ff)  # type: ignore[method-assign]
    return count
