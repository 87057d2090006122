"""Create an optimizer's per-parameter state before the first step, as that step would.

Why: torch's Adam/AdamW, transformers' Adafactor and bitsandbytes' 8-bit optimizers create their
state lazily, inside the first step, while every gradient (or, with the fused backward pass, the
backward pass's activations) is alive. Their gigabytes then sit above memory that is freed right
after, and the next step's activations and gradients do not fit back into that hole: the heap grows
past the sum of what is live. Created before the first forward, the state sits below everything a
step allocates and frees. The values are exactly the library's own first-step initialisation (zeros,
step 0); a test compares them, and a run's parameters and state after several steps, with the lazy
path bit for bit.

`settle_state` does the same for state a step replaces instead of updating in place (Adafactor
assigns a new 0-d `RMS` tensor to every parameter at every step): the new value is copied into
the tensor it replaces, so a thousand small long-lived tensors are not left scattered through
memory the step's large temporaries use, which kept the heap from coalescing (full SD1.5,
Adafactor + fused backward: 7.1 -> 8.2 GiB over 4 steps without it, 7.21 flat with it).

Only optimizers whose initialisation is replicated here (or, for bitsandbytes, called through
the library's own `init_state`) are primed; others keep their lazy state. A parameter that never
receives a gradient (say the last text-encoder layer with clip_skip = 2) gets state too; it is
never read, since these optimizers skip parameters without a gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _without_state(optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict, Any, dict]]:
    """(group, parameter, its empty state dict) for every trainable parameter without state."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state and p.requires_grad:
                yield group, p, state


def _prime_adam(optimizer: torch.optim.Optimizer) -> None:
    """torch.optim.Adam / AdamW: what `Adam._init_group` creates for a parameter."""
    import torch
    from torch.optim.optimizer import _get_scalar_dtype

    for group, p, state in _without_state(optimizer):
        if group["capturable"] or group["fused"]:
            dtype = _get_scalar_dtype(is_fused=group["fused"])
            state["step"] = torch.zeros((), dtype=dtype, device=p.device)
        else:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _prime_adafactor(optimizer: torch.optim.Optimizer) -> None:
    """transformers' Adafactor: what its step creates (state in float32, like its gradients)."""
    import torch

    for group, p, state in _without_state(optimizer):
        factored, use_first_moment = optimizer._get_options(group, p.shape)
        f32 = {"dtype": torch.float32, "device": p.device}  # the float() of a gradient
        state["step"] = 0
        if use_first_moment:
            state["exp_avg"] = torch.zeros_like(p, **f32)
        if factored:
            state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **f32)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], **f32)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, **f32)
        # 0 in the library, never read: every step computes it before use. A 0-d tensor here
        # gives each step's new value a home that settle_state() keeps.
        state["RMS"] = torch.zeros((), **f32)


def _prime_bitsandbytes(optimizer: Any) -> None:
    """bitsandbytes' 8-bit/paged optimizers: their own `init_state`, which their step calls for
    a parameter without state (so nothing is replicated here)."""
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            if not optimizer.state[p] and p.requires_grad:
                optimizer.init_state(group, p, gindex, pindex)


def prime_state(optimizer: torch.optim.Optimizer) -> bool:
    """Create the per-parameter state of a known optimizer now; False for other optimizers."""
    import torch

    kind = type(optimizer)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        _prime_adam(optimizer)
        return True
    if kind.__name__ == "Adafactor" and kind.__module__.startswith("transformers."):
        _prime_adafactor(optimizer)
        return True
    if kind.__module__.startswith("bitsandbytes.") and hasattr(optimizer, "init_state"):
        _prime_bitsandbytes(optimizer)
        return True
    return False


def state_snapshot(optimizer: torch.optim.Optimizer, params: list[Any] | None = None) -> dict:
    """The state entries of `params` (all parameters with state when None), before a step."""
    state = optimizer.state
    keys = state.keys() if params is None else [p for p in params if p in state]
    return {p: dict(state[p]) for p in keys}


def settle_state(optimizer: torch.optim.Optimizer, before: dict) -> None:
    """Copy state tensors a step rebound back into the tensors they replaced (same shape, dtype
    and device: the same values, in memory allocated before training)."""
    import torch

    for param, entries in before.items():
        state = optimizer.state[param]
        for key, old in entries.items():
            new = state.get(key)
            if (
                new is not old
                and isinstance(old, torch.Tensor)
                and isinstance(new, torch.Tensor)
                and (new.shape, new.dtype, new.device) == (old.shape, old.dtype, old.device)
            ):
                with torch.no_grad():
                    old.copy_(new)
                state[key] = old
